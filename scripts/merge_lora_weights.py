"""Turn a READ training run into a released-layout directory that test_read.py, demo.py and val_read.sh load.

DeepSpeed checkpoint (``<log_dir>/ckpt_model``) -> one fp32 state dict (``deepspeed.utils.zero_to_fp32``, in
process: no temporary file) -> the PEFT model rebuilt exactly as training built it (``init_read_model`` with the
same base ``--version`` and LoRA r/alpha/targets) -> strict load -> ``merge_and_unload`` (W += alpha/r B A) ->
``save_pretrained`` (config ``READForCausalLM``, sharded safetensors, no CLIP tower) + the tokenizer.

The directory is assembled under ``<save_path>.partial`` and renamed at the end, so a failed merge never leaves
a half-written model where a good one is expected.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.builder import READInitArgs, init_read_model  # noqa: E402
from model.lora import merge_lora  # noqa: E402
from model.read import READForCausalLM  # noqa: E402
from model.sasp import SasPConfig  # noqa: E402
from model.state_dict_check import key_mismatch  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="merge lora weights and save model with hf format",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt_dir", help="DeepSpeed checkpoint directory (<log_dir>/ckpt_model, with 'latest')")
    src.add_argument("--weight", help="an already consolidated state dict (.bin/.pt from zero_to_fp32, or .safetensors)")
    p.add_argument("--tag", default=None, help="checkpoint tag inside --ckpt_dir (default: the one named in 'latest')")
    p.add_argument("--version", required=True,
                   help="the base directory training started from (SESAME / READ / LLaVA-1.5): config, tokenizer, shapes")
    p.add_argument("--vision_tower", required=True, help="local CLIP ViT-L/14-336 directory (not saved in the output)")
    p.add_argument("--sam_checkpoint", "--vision_pretrained", dest="sam_checkpoint", default=None,
                   help="sam_vit_h_4b8939.pth, only needed when --version is a plain LLaVA-1.5 (SAM shapes)")
    p.add_argument("--save_path", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save_path")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16", help="dtype of the saved weights")
    p.add_argument("--model_max_length", type=int, default=2048, help="written into the saved tokenizer config")
    p.add_argument("--lora_r", type=int, default=None,
                   help="LoRA rank used in training (default: the run's run_args.json beside --ckpt_dir, else 8)")
    p.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha used in training (default: run_args.json, else 16)")
    p.add_argument("--lora_dropout", type=float, default=0.05, help="LoRA dropout used in training (no effect on merge)")
    p.add_argument("--lora_target_modules", default=None,
                   help="LoRA targets used in training (default: run_args.json, else q_proj,v_proj)")
    p.add_argument("--use_mm_start_end", action=argparse.BooleanOptionalAction, default=True,
                   help="image start/end tokens, as in training")
    p.add_argument("--sasp_preset", default=None,
                   help="SasP settings stored in the saved config (default: the run's resolved SasP settings from "
                        "run_args.json, else read-7b)")
    p.add_argument("--max_shard_size", default="5GB", help="safetensors shard size")
    return p


FALLBACKS = {"lora_r": 8, "lora_alpha": 16, "lora_target_modules": "q_proj,v_proj"}


def resolve_run_settings(args: argparse.Namespace) -> SasPConfig:
    """Fill unset LoRA flags from the training run's ``run_args.json`` (beside ``ckpt_model``), then the defaults.

    Returns the SasP settings to store: ``--sasp_preset`` if given, else the run's resolved settings, else read-7b.
    """
    saved: dict = {}
    if args.ckpt_dir:
        path = Path(args.ckpt_dir).resolve().parent / "run_args.json"
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise SystemExit(f"{path}: not valid JSON ({err})") from None
            print(f"[merge] training settings read from {path}")
    for name, fallback in FALLBACKS.items():
        if getattr(args, name) is None:
            setattr(args, name, saved.get(name, fallback))
    if args.sasp_preset is not None:
        return SasPConfig.preset(args.sasp_preset)
    if saved.get("sasp"):
        return SasPConfig(**saved["sasp"])
    return SasPConfig.preset("read-7b")


def load_fp32_state_dict(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of the run (every parameter, frozen ones included, plus buffers)."""
    if args.ckpt_dir:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        ckpt = Path(args.ckpt_dir)
        if not ckpt.is_dir() or (args.tag is None and not (ckpt / "latest").is_file()):
            raise SystemExit(f"--ckpt_dir {ckpt}: expected a DeepSpeed checkpoint directory with a 'latest' file "
                             f"(or pass --tag)")
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=args.tag)
    else:
        path = Path(args.weight)
        if not path.is_file():
            raise SystemExit(f"--weight {path}: file not found")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not state:
        raise SystemExit("the checkpoint holds no state dict")
    # a DeepSpeed engine wraps the model as "module"; zero_to_fp32 already strips it, a raw dump may not
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True) with one readable message instead of PyTorch's wall of keys."""
    # training checkpoints of the original (transformers 4.31) also carry the rotary inv_freq buffers
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    problem = key_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()}, state)
    if problem:
        raise SystemExit(
            f"{source} does not match the model rebuilt from --version with --lora_r/--lora_alpha/"
            f"--lora_target_modules: {problem}"
        )
    model.load_state_dict(state, strict=True)


def merge(args: argparse.Namespace) -> Path:
    save_path = Path(args.save_path)
    if save_path.exists() and not args.overwrite:
        raise SystemExit(f"--save_path {save_path} exists; pass --overwrite to replace it")
    sasp = resolve_run_settings(args)
    print(f"[merge] LoRA r={args.lora_r} alpha={args.lora_alpha} targets={args.lora_target_modules}; SasP {sasp}")
    state = load_fp32_state_dict(args)
    init = READInitArgs(
        version=args.version, vision_tower=args.vision_tower, precision=args.precision,
        model_max_length=args.model_max_length, sam_checkpoint=args.sam_checkpoint, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lora_target_modules=args.lora_target_modules,
        use_mm_start_end=args.use_mm_start_end, sasp_config=sasp,
        gradient_checkpointing=False,
        sam_variant=None,  # keep the base config's SAM variant (READ/SESAME configs say vit_h)
    )
    tokenizer, model = init_read_model(init)
    load_strict(model, state, args.ckpt_dir or args.weight)
    del state
    merged = merge_lora(model) if args.lora_r > 0 else model
    if not isinstance(merged, READForCausalLM):
        raise SystemExit(f"unexpected model type after the merge: {type(merged).__name__}")
    merged.eval()
    tokenizer.model_max_length = args.model_max_length

    partial = save_path.with_name(save_path.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    merged.save_pretrained(str(partial), max_shard_size=args.max_shard_size)
    tokenizer.save_pretrained(str(partial))
    if save_path.exists():
        shutil.rmtree(save_path)
    os.replace(partial, save_path)
    return save_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out = merge(args)
    print(f"saved the merged model to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
