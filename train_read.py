"""READ training, per-epoch validation and evaluation-only runs, with DeepSpeed.

Launch with the ``deepspeed`` launcher (one process per GPU; hostfile for several nodes), ``torchrun``, or plain
``python train_read.py`` for one process. Without CUDA everything runs on the CPU (DeepSpeed's CPU accelerator,
gloo). See ``python train_read.py --help`` and README.md (section "Training and evaluation").

Order of work: parse and check every input (paths, dataset names, sample rates, config files) -> build the
datasets -> build tokenizer + model -> DeepSpeed engine -> resume -> epochs of (train, validate, checkpoint).
Any bad input stops with one message before a model is built.
"""

from __future__ import annotations

import argparse
import logging
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from utils import checkpoint as ckpt
from utils.distributed import DistEnv, ShardSampler, barrier, rank_seed, seed_everything, setup_distributed
from utils.io import atomic_path, atomic_write_json
from utils.logging import RunLogger, progress
from utils.metrics import AverageMeter, ProgressMeter, SegmentationMeter, reduce_meters

LOSS_KEYS = ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss", "mask_loss")
VAL_METRICS_JSON = "val_metrics.json"
TRAIN_MIX_VAL = "train_mix"  # validation on fixed draws from the training mixture (dataset/train_val.py)
TRAIN_MIX_VAL_SAMPLES = 200
RUN_ARGS_JSON = "run_args.json"
LORA_DEFAULTS = {"lora_r": 8, "lora_alpha": 16, "lora_target_modules": "q_proj,v_proj"}  # the original's  # every flag of a run (+ the resolved SasP settings), next to ckpt_model
SASP_MODES = ("released", "paper")
PRECISIONS = ("fp32", "bf16", "fp16")
CONV_TYPES = ("llava_v1", "llava_llama_2")
REASON_VAL = "ReasonSeg"
# refer sets whose every sentence has its object: their answers all hold [SEG] (FP-/R- sets need generation)
TEACHER_FORCED_REFER = ("refcoco", "refcoco+", "refcocog", "refclef")


class UsageError(Exception):
    """A bad flag, path or file; main() prints the message alone (no traceback) and exits with status 2."""


# ---------------------------------------------------------------------------------------------- flags
def build_parser() -> argparse.ArgumentParser:
    """Every flag of the original train_read.py (same names and defaults unless noted) plus the new ones."""
    p = argparse.ArgumentParser(
        description="READ Model Training",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Booleans take --x / --no-x. Launch: deepspeed [--hostfile H] [--include localhost:0,1] "
        "[--master_port P] train_read.py ...; torchrun --nproc_per_node N train_read.py ...; or python train_read.py.",
    )
    b = argparse.BooleanOptionalAction
    g = p.add_argument_group("model")
    g.add_argument("--local_rank", type=int, default=0, help="node-local rank; set by the deepspeed launcher "
                   "(LOCAL_RANK from the environment wins)")
    g.add_argument("--version", default="liuhaotian/llava-v1.5-7b",
                   help="local directory of the starting checkpoint: a READ or SESAME checkpoint, or a plain "
                   "LLaVA-1.5 (then --no-use_released_param); the tokenizer is read from it too")
    g.add_argument("--precision", default="bf16", choices=PRECISIONS,
                   help="weights/activation dtype and the DeepSpeed fp16/bf16 switch")
    g.add_argument("--image_size", type=int, default=1024, help="SAM input side (longest image side, padded square)")
    g.add_argument("--model_max_length", type=int, default=512,
                   help="tokenizer max length; training rows are cut to model_max_length - 255 tokens")
    g.add_argument("--vision_tower", default="openai/clip-vit-large-patch14-336",
                   help="local directory of CLIP ViT-L/14-336 (the vision tower)")
    g.add_argument("--load_in_8bit", action=b, default=False,
                   help="accepted for compatibility; 8-bit loading is not supported (stops with a message)")
    g.add_argument("--load_in_4bit", action=b, default=False,
                   help="accepted for compatibility; 4-bit loading is not supported (stops with a message)")
    g.add_argument("--vision_pretrained", default="",
                   help="SAM ViT-H checkpoint (sam_vit_h_4b8939.pth); required with --no-use_released_param")
    g.add_argument("--out_dim", type=int, default=256,
                   help="output size of the [SEG] projection (SAM prompt dim); must equal the checkpoint's")
    g.add_argument("--use_released_param", action=b, default=True,
                   help="on: --version is a READ/SESAME checkpoint and its SAM + [SEG] projection are used; off: "
                   "--version is a plain LLaVA-1.5, SAM comes from --vision_pretrained and the projection is new")
    g.add_argument("--train_mask_decoder", action=b, default=True, help="train SAM's mask decoder")
    g.add_argument("--use_mm_start_end", action=b, default=True, help="wrap <image> in <im_start>/<im_end>")
    g.add_argument("--gradient_checkpointing", action=b, default=True, help="activation checkpointing in the LLM")
    g.add_argument("--attn_implementation", default=None, choices=("sdpa", "flash_attention_2", "eager"),
                   help="attention kernel (default: flash-attention 2 on CUDA when installed, else SDPA)")
    g.add_argument("--conv_type", default="llava_v1", choices=CONV_TYPES,
                   help="conversation template and the label-masking separator")

    g = p.add_argument_group("LoRA and losses")
    g.add_argument("--lora_r", type=int, default=None,
                   help="LoRA rank; 0 disables LoRA (whole LLM trainable). Default 8, or the resumed run's value "
                        "(run_args.json beside its ckpt_model)")
    g.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha (default 16, or the resumed run's)")
    g.add_argument("--lora_dropout", type=float, default=0.05, help="LoRA dropout")
    g.add_argument("--lora_target_modules", default=None,
                   help="comma-separated name substrings of the LLM Linear layers that get LoRA (default "
                        "q_proj,v_proj, or the resumed run's)")
    g.add_argument("--ce_loss_weight", type=float, default=1.0, help="weight of the text cross-entropy")
    g.add_argument("--dice_loss_weight", type=float, default=0.5, help="weight of the mask dice loss")
    g.add_argument("--bce_loss_weight", type=float, default=2.0, help="weight of the mask sigmoid BCE")

    g = p.add_argument_group("SasP (stored in the checkpoint config; evaluation reuses it unless given)")
    g.add_argument("--sasp_preset", default=None, help="named SasP settings: read-7b (30 points, 0.8/0.2, "
                   "down-sample 2), read-13b, read-13b-stage1, read-13b-stage2 (default: the checkpoint's, else read-7b)")
    g.add_argument("--num_points", type=int, default=None, help="points per [SEG] (overrides the preset)")
    g.add_argument("--t_pos", type=float, default=None, help="positive-point threshold (overrides the preset)")
    g.add_argument("--t_neg", type=float, default=None, help="negative-point threshold (overrides the preset)")
    g.add_argument("--down_sample", type=int, default=None, help="similarity-map down-sampling (overrides the preset)")
    g.add_argument("--sasp_mode", default=None, choices=SASP_MODES,
                   help="released: the released code's thresholds and DtoC; paper: the paper's Algorithm 1")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_dir", default="../dataset", help="root of every dataset (see README, Data); ../dataset as the original scripts (./dataset is this repo's code package)")
    g.add_argument("--dataset", default="refer_seg||correct_refer_seg||vqa||neg_refer_seg",
                   help="training sub-datasets joined by '||' (sem_seg, refer_seg, neg_refer_seg, "
                   "correct_refer_seg, vqa, reason_seg)")
    g.add_argument("--sample_rates", default="12,2,2,1",
                   help="one weight per --dataset entry (the original default '9,3,3' had one weight too few; "
                   "this is its released ReferSeg mix)")
    g.add_argument("--sem_seg_data", default="ade20k||cocostuff||pascal_part||paco_lvis||mapillary",
                   help="semantic-segmentation sources of sem_seg")
    g.add_argument("--refer_seg_data", default="refclef||refcoco||refcoco+||refcocog", help="sources of refer_seg")
    g.add_argument("--neg_refer_seg_data", default="R-refcocog||R-refcoco||R-refcoco+", help="sources of neg_refer_seg")
    g.add_argument("--correct_refer_seg_data", default="fprefcocog||fprefcoco||fprefcoco+",
                   help="sources of correct_refer_seg (now passed on; the original ignored this flag)")
    g.add_argument("--vqa_data", default="llava_instruct_150k", help="JSON name under <dataset_dir>/llava_dataset/")
    g.add_argument("--reason_seg_data", default="ReasonSeg|train", help="'<name>|<splits joined by _>'")
    g.add_argument("--num_classes_per_sample", type=int, default=1, help="max queries sampled per training image")
    g.add_argument("--val_dataset", default=REASON_VAL,
                   help="validation set: ReasonSeg, refcoco, refcoco+, refcocog, refclef or "
                        "train_mix (fixed draws with masks from the --dataset training mixture; --max_val_samples "
                        "of them, default 200)")
    g.add_argument("--val_split", default="val", help="ReasonSeg: val|test; refer sets: val|test|testA|testB")
    g.add_argument("--val_subsets", action=b, default=False,
                   help="ReasonSeg: also report the short-query and long-query subsets")
    g.add_argument("--val_question_style", default="sesame", choices=("sesame", "lisa"),
                   help="refer validation questions: seeded SESAME templates or LISA's fixed one")
    g.add_argument("--max_val_samples", type=int, default=0, help="validate on the first N images only (0 = all)")
    g.add_argument("--workers", type=int, default=4, help="DataLoader worker processes (training and validation)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=20, help="epochs to train")
    g.add_argument("--lr_schedule_epochs", type=int, default=0,
                   help="length of the WarmupDecayLR schedule in epochs (0: --epochs). The released models were "
                        "trained ~8 epochs on a 20-epoch schedule: --epochs 8 --lr_schedule_epochs 20")
    g.add_argument("--steps_per_epoch", type=int, default=500, help="optimizer steps per epoch")
    g.add_argument("--batch_size", type=int, default=12, help="batch size per device per step (micro-batch)")
    g.add_argument("--grad_accumulation_steps", type=int, default=1, help="DeepSpeed gradient accumulation")
    g.add_argument("--val_batch_size", type=int, default=1, help="validation batch size (must be 1)")
    g.add_argument("--lr", type=float, default=0.0003, help="peak learning rate")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--warmup_steps", type=int, default=100, help="linear warm-up steps of WarmupDecayLR")
    g.add_argument("--fused_adam", action=b, default=False,
                   help="DeepSpeed's fused Adam kernel (JIT-built, needs a CUDA toolchain) instead of torch AdamW")
    g.add_argument("--deepspeed_config", default="",
                   help="JSON file merged over the built-in DeepSpeed config (e.g. ZeRO-3, CPU offload); "
                   "its keys win, values \"auto\" keep the built-in ones")
    g.add_argument("--seed", type=int, default=42, help="base seed; each rank and epoch derives its own")

    g = p.add_argument_group("run control")
    g.add_argument("--log_base_dir", default="./runs", help="parent of the run directory")
    g.add_argument("--exp_name", default="read_referseg", help="run name; the run directory is log_base_dir/exp_name")
    g.add_argument("--no_eval", action=b, default=False, help="skip validation; save a checkpoint every epoch")
    g.add_argument("--eval_only", action=b, default=False,
                   help="validate once and exit (no training data, no optimizer); weights from --version, "
                   "or from a DeepSpeed checkpoint given by --resume / --auto_resume")
    g.add_argument("--val_before_train", action=b, default=False,
                   help="also validate before the first training step (the step-0 baseline)")
    g.add_argument("--save_masks", default="", help="write each validation image's predicted and GT masks "
                   "(<dir>/<index>.npz: pred, gt uint8 [N,H,W], image_path)")
    g.add_argument("--resume", default="", help="DeepSpeed checkpoint directory to continue from")
    g.add_argument("--auto_resume", action=b, default=False,
                   help="continue from <run dir>/ckpt_model when it holds a checkpoint")
    g.add_argument("--start_epoch", type=int, default=0, help="first epoch when not resuming")
    g.add_argument("--print_freq", type=int, default=3, help="log every N optimizer steps")
    g.add_argument("--use_wandb", action=b, default=False, help="log to wandb instead of TensorBoard")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    args = build_parser().parse_args(list(argv))
    args.log_dir = os.path.join(args.log_base_dir, args.exp_name)
    return args


# ---------------------------------------------------------------------------------------------- input checks
def _need_dir(path: str, flag: str, what: str, marker: Optional[str] = None) -> None:
    if not path or not os.path.isdir(path):
        raise UsageError(f"{flag}: {what} directory not found: {path!r} (nothing is downloaded; give a local path)")
    if marker and not os.path.isfile(os.path.join(path, marker)):
        raise UsageError(f"{flag}: {path!r} has no {marker}; expected {what}")


def checkpoint_has_sam(version: str) -> Optional[bool]:
    """Whether a checkpoint directory holds SAM weights, read from its index/safetensors header (None: unknown)."""
    d = Path(version)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).is_file():
            keys = json.loads((d / index).read_text()).get("weight_map", {})
            return any(k.startswith("model.visual_model.") for k in keys)
    if (d / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(d / "model.safetensors"), "pt") as f:
            return any(k.startswith("model.visual_model.") for k in f.keys())
    return None


def build_sasp_config(args: argparse.Namespace) -> Any:
    """The SasP settings: explicit flags over ``--sasp_preset``, else the checkpoint's stored ones, else read-7b."""
    from model.sasp import SasPConfig

    overrides = {
        k: v
        for k, v in (("num_points", args.num_points), ("t_pos", args.t_pos), ("t_neg", args.t_neg),
                     ("down_sample", args.down_sample), ("mode", args.sasp_mode))
        if v is not None
    }
    base = None
    if args.sasp_preset is not None:
        if args.sasp_preset not in SasPConfig.preset_names():
            raise UsageError(f"--sasp_preset: unknown preset {args.sasp_preset!r}; expected one of "
                             f"{', '.join(SasPConfig.preset_names())}")
        base = SasPConfig.preset(args.sasp_preset)
    else:
        base = run_sasp_config(args) or stored_sasp_config(args.version)
    if base is None:
        base = SasPConfig.preset("read-7b")
    try:
        return replace(base, **overrides)
    except ValueError as err:
        raise UsageError(f"SasP flags: {err}") from None


def resumed_run_args(args: argparse.Namespace) -> tuple[dict, Optional[Path]]:
    """Flags of the training run whose checkpoint is resumed (``<run dir>/run_args.json``), or ({}, None)."""
    if not (args.resume or args.auto_resume):
        return {}, None
    ckpt_dir = Path(args.resume) if args.resume else Path(args.log_dir) / ckpt.CKPT_DIRNAME
    path = ckpt_dir.parent / RUN_ARGS_JSON
    if not path.is_file():
        return {}, None
    try:
        return json.loads(path.read_text()), path
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON ({err})") from None


def run_sasp_config(args: argparse.Namespace) -> Any:
    """SasP settings of the training run whose checkpoint is resumed, if any."""
    from model.sasp import SasPConfig

    saved = resumed_run_args(args)[0].get("sasp")
    return SasPConfig(**saved) if saved else None


def resolve_lora_settings(args: argparse.Namespace) -> None:
    """Unset LoRA flags take the resumed run's values (else the original defaults); a conflicting flag stops.

    A checkpoint's adapters only load into the same rank and targets, and a different alpha would silently rescale
    the LoRA update, so the run's own settings are authoritative.
    """
    saved, path = resumed_run_args(args)
    for name, default in LORA_DEFAULTS.items():
        given = getattr(args, name)
        if given is not None and name in saved and saved[name] is not None and given != saved[name]:
            raise UsageError(f"--{name} {given!r} differs from the resumed run's {saved[name]!r} ({path}); "
                             "drop the flag to use the run's value")
        if given is None:
            setattr(args, name, saved.get(name) if saved.get(name) is not None else default)


def stored_sasp_config(version: str) -> Any:
    """SasP settings saved in ``<version>/config.json`` by an earlier READ run (None when absent)."""
    path = Path(version) / "config.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    if raw.get("sasp") is None and raw.get("sasp_preset") is None:
        return None
    from model.config import READConfig

    try:
        return READConfig.from_released_dict(raw, source=str(path)).sasp_config()
    except (ValueError, TypeError):
        return None


def load_ds_override(path: str) -> dict:
    if not path:
        return {}
    if not os.path.isfile(path):
        raise UsageError(f"--deepspeed_config: file not found: {path!r}")
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"--deepspeed_config: {path!r} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--deepspeed_config: {path!r} must hold a JSON object")
    return data


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model: flags, files, directories. Raises UsageError with one message."""
    if args.load_in_8bit or args.load_in_4bit:
        raise UsageError("--load_in_8bit/--load_in_4bit: quantised loading is not supported (the original parsed "
                         "these flags but never used them); drop them")
    if args.val_batch_size != 1:
        raise UsageError(f"--val_batch_size must be 1 (one image per validation step), got {args.val_batch_size}")
    for flag in ("epochs", "steps_per_epoch", "batch_size", "grad_accumulation_steps", "print_freq", "image_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    resolve_lora_settings(args)
    if args.workers < 0 or args.max_val_samples < 0 or args.lora_r < 0:
        raise UsageError("--workers, --max_val_samples and --lora_r must be >= 0")
    if args.lr_schedule_epochs < 0:
        raise UsageError(f"--lr_schedule_epochs must be >= 0 (0: --epochs), got {args.lr_schedule_epochs}")
    if args.warmup_steps < 1:
        raise UsageError(f"--warmup_steps must be >= 1 (DeepSpeed's WarmupDecayLR), got {args.warmup_steps}")
    if args.use_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UsageError("--use_wandb: the wandb package is not installed (pip install wandb), "
                             "or drop the flag to log to TensorBoard") from None
    args.ds_override = load_ds_override(args.deepspeed_config)

    _need_dir(args.version, "--version", "checkpoint (READ / SESAME / LLaVA-1.5)", "config.json")
    _need_dir(args.vision_tower, "--vision_tower", "CLIP vision tower", "config.json")
    has_sam = checkpoint_has_sam(args.version)
    if args.use_released_param and has_sam is False:
        raise UsageError(f"--version {args.version!r} is a plain LLaVA-1.5 checkpoint (no SAM weights): add "
                         "--no-use_released_param --vision_pretrained <sam_vit_h_4b8939.pth>")
    if not args.use_released_param:
        if has_sam:
            raise UsageError(f"--no-use_released_param starts from a plain LLaVA-1.5, but --version "
                             f"{args.version!r} already holds SAM weights (a READ/SESAME checkpoint): drop "
                             "--no-use_released_param")
        if not os.path.isfile(args.vision_pretrained):
            raise UsageError(f"--vision_pretrained: SAM checkpoint file not found: {args.vision_pretrained!r} "
                             "(needed with --no-use_released_param)")
    if args.resume:
        if not os.path.isdir(args.resume):
            raise UsageError(f"--resume: checkpoint directory not found: {args.resume!r}")
        if ckpt.resume_tag(Path(args.resume)) is None:
            raise UsageError(f"--resume: {args.resume!r} holds no DeepSpeed checkpoint (no 'last'/'latest' file "
                             "naming an existing tag directory)")
    if args.conv_type not in CONV_TYPES:
        raise UsageError(f"--conv_type must be one of {CONV_TYPES}")
    if args.val_dataset not in (REASON_VAL, TRAIN_MIX_VAL, *TEACHER_FORCED_REFER):
        hint = (" (false-premise / negative sets are scored by generation: use test_read.py)"
                if args.val_dataset.lower().startswith(("fp", "r-")) else "")
        raise UsageError(f"--val_dataset: {args.val_dataset!r} cannot be validated with teacher forcing{hint}; "
                         f"expected {REASON_VAL}, {TRAIN_MIX_VAL} or one of {', '.join(TEACHER_FORCED_REFER)}")
    args.sasp = build_sasp_config(args)
    if not os.path.isdir(args.dataset_dir):
        raise UsageError(f"--dataset_dir: directory not found: {args.dataset_dir!r}")


# ---------------------------------------------------------------------------------------------- datasets
@dataclass
class ValData:
    dataset: Any
    subset_of: Optional[list[str]]  # per item "short"/"long" when --val_subsets, else None


def hybrid_config(args: argparse.Namespace) -> Any:
    from dataset.hybrid import HybridConfig

    return HybridConfig(
        dataset=args.dataset,
        sample_rates=args.sample_rates,
        sem_seg_data=args.sem_seg_data,
        refer_seg_data=args.refer_seg_data,
        neg_refer_seg_data=args.neg_refer_seg_data,
        correct_refer_seg_data=args.correct_refer_seg_data,
        vqa_data=args.vqa_data,
        reason_seg_data=args.reason_seg_data,
        num_classes_per_sample=args.num_classes_per_sample,
        image_size=args.image_size,
        template=args.conv_type,
    )


def check_train_data(args: argparse.Namespace) -> Any:
    """Names, weights and paths of the training mixture (no image is read)."""
    from dataset.hybrid import parse_sample_rates, validate_dataset_dir

    config = hybrid_config(args)
    try:
        parse_sample_rates(config.dataset, config.sample_rates)
    except ValueError as err:
        raise UsageError(str(err)) from None
    validate_dataset_dir(args.dataset_dir, config)
    return config


def build_train_dataset(args: argparse.Namespace, env: DistEnv, config: Any) -> Any:
    from dataset.hybrid import HybridDataset, samples_per_epoch
    from dataset.preprocess import ImagePreprocessor

    total = samples_per_epoch(args.batch_size, args.grad_accumulation_steps, args.steps_per_epoch, env.world_size)
    return HybridDataset(args.dataset_dir, ImagePreprocessor(sam_size=args.image_size), config,
                         samples_per_epoch=total, seed=args.seed, rank=env.rank)


def build_val_data(args: argparse.Namespace) -> ValData:
    """TestReasoningDataset / TestReferDataset in val mode (answers in the prompt: teacher forcing)."""
    from dataset.preprocess import ImagePreprocessor
    from dataset.validation import TestReasoningDataset, TestReferDataset

    pre = ImagePreprocessor(sam_size=args.image_size)
    if args.val_dataset == REASON_VAL:
        ds = TestReasoningDataset(args.dataset_dir, pre, REASON_VAL, split=args.val_split, mode="val",
                                  template=args.conv_type)
        subset_of = None
        if args.val_subsets:
            from dataset.reason_seg import json_for, read_reason_annotation

            subset_of = ["long" if read_reason_annotation(json_for(p), REASON_VAL).is_sentence else "short"
                         for p in ds.images]
    elif args.val_dataset in TEACHER_FORCED_REFER:
        if args.val_subsets:
            raise UsageError("--val_subsets applies to ReasonSeg only (short/long queries)")
        ds = TestReferDataset(args.dataset_dir, pre, args.val_dataset, split=args.val_split, mode="val",
                              question_style=args.val_question_style, template=args.conv_type, seed=args.seed)
        subset_of = None
    elif args.val_dataset == TRAIN_MIX_VAL:
        if args.val_subsets:
            raise UsageError("--val_subsets applies to ReasonSeg only (short/long queries)")
        from dataset.hybrid import HybridDataset
        from dataset.train_val import TrainValDataset

        mixture = HybridDataset(args.dataset_dir, pre, hybrid_config(args), samples_per_epoch=1, seed=args.seed, rank=0)
        ds = TrainValDataset(mixture, num_samples=args.max_val_samples or TRAIN_MIX_VAL_SAMPLES, seed=args.seed + 1)
        subset_of = None
    else:
        raise UsageError(f"--val_dataset: unknown validation set {args.val_dataset!r}; expected {REASON_VAL}, "
                         f"{TRAIN_MIX_VAL} or one of {', '.join(TEACHER_FORCED_REFER)}")
    if args.max_val_samples and len(ds) > args.max_val_samples:
        ds = torch.utils.data.Subset(ds, range(args.max_val_samples))
        subset_of = subset_of[: args.max_val_samples] if subset_of else None
    return ValData(ds, subset_of)


# ---------------------------------------------------------------------------------------------- model / engine
def build_model(args: argparse.Namespace, env: Optional[DistEnv]) -> tuple[Any, torch.nn.Module]:
    """Tokenizer + READ (+ LoRA) on the CPU; ``env`` (None: CPU) only decides the attention kernel."""
    from model.builder import READInitArgs, init_read_model
    from model.loading import choose_attn_implementation

    lora_r = args.lora_r
    if args.eval_only and not (args.resume or args.auto_resume):
        lora_r = 0  # evaluating --version directly: adapters would be zero-initialised no-ops
    init = READInitArgs(
        version=args.version,
        vision_tower=args.vision_tower,
        precision=args.precision,
        model_max_length=args.model_max_length,
        sam_checkpoint=None if args.use_released_param else args.vision_pretrained,
        lora_r=lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_target_modules=args.lora_target_modules,
        ce_loss_weight=args.ce_loss_weight,
        bce_loss_weight=args.bce_loss_weight,
        dice_loss_weight=args.dice_loss_weight,
        use_mm_start_end=args.use_mm_start_end,
        sasp_config=args.sasp,
        gradient_checkpointing=args.gradient_checkpointing and not args.eval_only,
        # chosen for the rank's device (the weights are loaded on the CPU first): flash-attention 2 on CUDA when
        # installed and the precision is bf16/fp16, else SDPA
        attn_implementation=args.attn_implementation or choose_attn_implementation(
            None, env.device if env is not None else "cpu", run_dtype(args)
        ),
        device="cpu",  # DeepSpeed moves the module to the rank's device
        sam_variant=None,  # keep the checkpoint's SAM size (vit_h for released checkpoints)
    )
    try:
        tokenizer, model = init_read_model(init)
    except (FileNotFoundError, ValueError) as err:  # the loader's messages name the file and the fix
        raise UsageError(f"loading --version {args.version!r}: {err}") from None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if int(inner.config.out_dim) != args.out_dim:
        raise UsageError(f"--out_dim {args.out_dim} does not match the checkpoint's out_dim {inner.config.out_dim}")
    if not args.train_mask_decoder:
        inner.model.visual_model.mask_decoder.requires_grad_(False)
    return tokenizer, model


def build_ds_config(args: argparse.Namespace, eval_only: bool = False) -> dict:
    """The original's DeepSpeed config (ZeRO-2, AdamW, WarmupDecayLR, clipping 1.0), then the file override."""
    cfg: dict = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": args.grad_accumulation_steps,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": args.lr, "weight_decay": 0.0, "betas": [args.beta1, args.beta2],
                       "torch_adam": not args.fused_adam},
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": (args.lr_schedule_epochs or args.epochs) * args.steps_per_epoch,
                "warmup_min_lr": 0,
                "warmup_max_lr": args.lr,
                "warmup_num_steps": args.warmup_steps,
                "warmup_type": "linear",
            },
        },
        "fp16": {"enabled": args.precision == "fp16"},
        "bf16": {"enabled": args.precision == "bf16"},
        "gradient_clipping": 1.0,
        "zero_optimization": {
            "stage": 2,
            "contiguous_gradients": True,
            "overlap_comm": True,
            "reduce_scatter": True,
            "reduce_bucket_size": 5e8,
            "allgather_bucket_size": 5e8,
        },
        "steps_per_print": 10**9,  # our own logging; keeps DeepSpeed quiet
    }
    cfg = merge_config(cfg, getattr(args, "ds_override", {}) or {})
    if eval_only:
        cfg.pop("optimizer", None)
        cfg.pop("scheduler", None)
        zero = cfg.get("zero_optimization", {})
        if zero.get("stage", 0) in (1, 2):  # ZeRO-1/2 shard optimizer state only and refuse to run without one
            cfg["zero_optimization"] = {"stage": 0}
    return cfg


def merge_config(base: dict, override: dict) -> dict:
    """Recursive merge: ``override`` wins; an override value "auto" keeps the base value."""
    out = dict(base)
    for key, value in override.items():
        if value == "auto":
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out


def build_engine(args: argparse.Namespace, model: torch.nn.Module, eval_only: bool) -> Any:
    import deepspeed

    config = build_ds_config(args, eval_only=eval_only)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=None if eval_only else params, config=config)
    return engine


def run_dtype(args: argparse.Namespace) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]


def prepare_batch(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Move every tensor (and list of tensors) to ``device``; images in the run dtype, masks stay float."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if key in ("images", "images_clip"):
                value = value.to(dtype)
        elif isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
            value = [v.to(device, non_blocking=True) for v in value]
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------- train / validate
def train_epoch(
    engine: Any, loader: Any, epoch: int, first_step: int, args: argparse.Namespace, env: DistEnv,
    logger: RunLogger, dtype: torch.dtype,
) -> None:
    """``steps_per_epoch - first_step`` optimizer steps; losses are averaged over each logging window."""
    meters = {k: AverageMeter(k, ":.4f") for k in LOSS_KEYS}
    batch_time, data_time = AverageMeter("Time", ":6.3f"), AverageMeter("Data", ":6.3f")
    line = ProgressMeter(args.steps_per_epoch, [batch_time, data_time, *meters.values()], prefix=f"Epoch: [{epoch}]")
    bar = progress(args.steps_per_epoch, f"epoch {epoch}", env.is_main, initial=first_step)
    engine.train()
    it = iter(loader)
    end = time.time()
    for step in range(first_step, args.steps_per_epoch):
        for _ in range(args.grad_accumulation_steps):
            batch = prepare_batch(next(it), env.device, dtype)
            data_time.update(time.time() - end)
            out = engine(**batch)
            n = len(batch["sam_mask_shape_list"])
            for key in LOSS_KEYS:
                meters[key].update(out[key].item(), n)
            engine.backward(out["loss"])
            engine.step()
        batch_time.update(time.time() - end)
        end = time.time()
        global_step = epoch * args.steps_per_epoch + step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{meters['loss'].val:.4f}")
        if (step + 1) % args.print_freq == 0 or step + 1 == args.steps_per_epoch:
            for m in (*meters.values(), batch_time, data_time):
                m.all_reduce()
            values = {k: float(m.avg) for k, m in meters.items()}
            values["lr"] = float(engine.get_lr()[0])
            logger.info(line.line(step + 1))
            logger.scalars(values, global_step)
            for m in (*meters.values(), batch_time, data_time):
                m.reset()
    if bar is not None:
        bar.close()


def save_mask_file(directory: Path, index: int, pred: torch.Tensor, gt: torch.Tensor, image_path: str) -> None:
    """``<dir>/<index:06d>.npz`` with the binarised prediction and the GT (uint8 [N,H,W]), atomically."""
    with atomic_path(directory / f"{index:06d}.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, pred=(pred > 0).to(torch.uint8).cpu().numpy(), gt=gt.to(torch.uint8).cpu().numpy(),
                                image_path=np.array(image_path))


def validate(
    engine: Any, val: ValData, tokenizer: Any, args: argparse.Namespace, env: DistEnv, logger: RunLogger,
    dtype: torch.dtype, step: int, epoch: int,
) -> dict:
    """Teacher-forced masks for every validation image, gIoU/cIoU reduced over ranks (no sample counted twice)."""
    from dataset.collate import collate_val

    sampler = ShardSampler(len(val.dataset), env.rank, env.world_size)
    loader = torch.utils.data.DataLoader(
        val.dataset, batch_size=1, sampler=sampler, num_workers=args.workers, pin_memory=False,
        collate_fn=partial(collate_val, tokenizer=tokenizer, template=args.conv_type,
                           use_mm_start_end=args.use_mm_start_end),
    )
    names = ["all"] + (["long", "short"] if val.subset_of is not None else [])
    meters = {name: SegmentationMeter() for name in names}
    save_dir = Path(args.save_masks) if args.save_masks else None
    bar = progress(len(sampler), "validate", env.is_main)
    engine.eval()
    with torch.no_grad():
        for pos, batch in enumerate(loader):
            batch = prepare_batch(batch, env.device, dtype)
            out = engine(**batch)
            if bar is not None:
                bar.update(1)
            if sampler.is_padding(pos):
                continue  # a repeat that only keeps the ranks in step
            index = sampler.index_at(pos)
            pred, gt = out["pred_masks"][0].float(), batch["masks_list"][0]
            meters["all"].update(pred, gt)
            if val.subset_of is not None:
                meters[val.subset_of[index]].update(pred, gt)
            if save_dir is not None:
                save_mask_file(save_dir, index, pred, gt, batch["image_paths"][0])
    if bar is not None:
        bar.close()
    results = reduce_meters(meters)
    engine.train()
    report = {
        "epoch": epoch, "global_step": step, "val_dataset": args.val_dataset, "val_split": args.val_split,
        "giou": results["all"]["giou"], "ciou": results["all"]["ciou"], "num_masks": results["all"]["num_masks"],
        "subsets": {k: v for k, v in results.items() if k != "all"},
    }
    logger.info(f"giou: {report['giou']:.4f}, ciou: {report['ciou']:.4f}  ({report['num_masks']} masks, "
                f"{args.val_dataset} {args.val_split})")
    scalars = {"giou": report["giou"], "ciou": report["ciou"]}
    for name, r in report["subsets"].items():
        logger.info(f"  {name} queries: giou: {r['giou']:.4f}, ciou: {r['ciou']:.4f}  ({r['num_masks']} masks)")
        scalars[f"giou_{name}"], scalars[f"ciou_{name}"] = r["giou"], r["ciou"]
    logger.scalars(scalars, step, kind="val")
    if env.is_main:
        atomic_write_json(Path(args.log_dir) / VAL_METRICS_JSON, report)
    return report


def make_train_loader(dataset: Any, tokenizer: Any, args: argparse.Namespace, env: DistEnv, epoch: int,
                      first_step: int) -> Any:
    """This epoch's loader: the rank's share of the mixture, starting after ``first_step`` finished steps."""
    from dataset.collate import collate_train

    dataset.set_epoch(epoch)
    per_step = args.batch_size * args.grad_accumulation_steps
    sampler = ShardSampler(len(dataset), env.rank, env.world_size, start=first_step * per_step)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, pin_memory=False,
        drop_last=False, collate_fn=partial(collate_train, tokenizer=tokenizer, template=args.conv_type,
                                            use_mm_start_end=args.use_mm_start_end, max_length=args.model_max_length),
    )


# ---------------------------------------------------------------------------------------------- main
def resume_source(args: argparse.Namespace) -> Optional[tuple[Path, str]]:
    """(directory, tag) to load: --resume, else the run's own ckpt_model with --auto_resume, else None."""
    def pick(directory: Path) -> Optional[str]:
        if args.eval_only:  # evaluate the best checkpoint (what 'latest' names), as the original kept only it
            return ckpt.read_pointer(directory, ckpt.BEST_POINTER) or ckpt.resume_tag(directory)
        return ckpt.resume_tag(directory)  # continue training from the most recent one

    if args.resume:
        return Path(args.resume), pick(Path(args.resume)) or ""
    own = Path(args.log_dir) / ckpt.CKPT_DIRNAME
    if args.auto_resume and own.is_dir():
        tag = pick(own)
        if tag:
            return own, tag
    return None


def run(args: argparse.Namespace) -> dict:
    """Checks, data, model, engine, resume, then training epochs or one evaluation; returns the last metrics."""
    check_args(args)
    train_config = None if args.eval_only else check_train_data(args)
    val = None if (args.no_eval and not args.eval_only) else build_val_data(args)

    env = setup_distributed(args.local_rank)
    seed_everything(args.seed)  # identical model initialisation on every rank
    logger = RunLogger(Path(args.log_dir), env.is_main, args.use_wandb, args.exp_name)
    train_ds = build_train_dataset(args, env, train_config) if train_config is not None else None
    if args.eval_only:
        logger.info(f"Evaluating on {len(val.dataset)} examples ({args.val_dataset} {args.val_split}).")
    else:
        logger.info(f"Training with {len(train_ds)} examples and validating with "
                    f"{len(val.dataset) if val is not None else 0} examples.")

    if env.is_main and not args.eval_only:
        saved = {k: v for k, v in vars(args).items() if k not in ("sasp", "ds_override")}
        atomic_write_json(Path(args.log_dir) / RUN_ARGS_JSON, {**saved, "sasp": asdict(args.sasp),
                                                              "world_size": env.world_size})
    tokenizer, model = build_model(args, env)
    engine = build_engine(args, model, eval_only=args.eval_only)
    dtype = run_dtype(args)
    ckpt_dir = Path(args.log_dir) / ckpt.CKPT_DIRNAME
    state = ckpt.TrainState()
    source = resume_source(args)
    if source is not None:
        state = ckpt.load(engine, source[0], source[1], log_dir=Path(args.log_dir), module_only=args.eval_only)
        logger.event("resume", directory=str(source[0]), tag=source[1], global_step=state.global_step)
        if not args.eval_only:
            logger.info(f"resume training from {source[0] / source[1]}, start from epoch "
                        f"{state.global_step // args.steps_per_epoch}")
    if args.eval_only:
        assert val is not None
        report = validate(engine, val, tokenizer, args, env, logger, dtype, step=state.global_step, epoch=state.epoch)
        logger.close()
        return report

    start_step = state.global_step if source is not None else args.start_epoch * args.steps_per_epoch
    start_epoch = start_step // args.steps_per_epoch
    report: dict = {}
    if args.val_before_train and val is not None:
        report = validate(engine, val, tokenizer, args, env, logger, dtype, step=start_step, epoch=start_epoch)
    for epoch in range(start_epoch, args.epochs):
        first = start_step - epoch * args.steps_per_epoch if epoch == start_epoch else 0
        seed_everything(rank_seed(args.seed, env.rank, epoch))
        loader = make_train_loader(train_ds, tokenizer, args, env, epoch, first)
        train_epoch(engine, loader, epoch, first, args, env, logger, dtype)
        state.global_step = (epoch + 1) * args.steps_per_epoch
        state.epoch = epoch + 1
        is_best = True
        if val is not None:
            report = validate(engine, val, tokenizer, args, env, logger, dtype, step=state.global_step, epoch=epoch)
            is_best = report["ciou"] > state.best_score
            if is_best:
                state.best_score, state.best_giou = report["ciou"], report["giou"]
        tag = ckpt.save(engine, ckpt_dir, state, is_best=is_best, is_main=env.is_main)
        if val is not None and is_best and env.is_main:
            ckpt.write_meta(Path(args.log_dir), epoch, state.best_score, state.best_giou)
        logger.event("checkpoint", tag=tag, epoch=epoch, global_step=state.global_step, is_best=is_best,
                     best_ciou=state.best_score if math.isfinite(state.best_score) else None)
    barrier()
    logger.close()
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # library loggers (e.g. "model.loading": what was loaded from where) on rank 0 only
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="[%(name)s] %(message)s")
    from dataset.errors import DatasetError

    try:
        run(args)
    except (UsageError, DatasetError) as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"train_read.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
