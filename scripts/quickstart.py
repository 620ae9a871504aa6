"""Quick start: train a tiny random READ on synthetic data with DeepSpeed, with no weights and no data to download.

    python scripts/quickstart.py                 # CPU (or the first GPU when CUDA is visible), a few minutes

What it does, all under ``--out`` (default ``runs/quickstart``):

1. writes the synthetic dataset (every source, real on-disk formats; ``dataset/synthetic``);
2. trains a small SentencePiece tokenizer (LLaMA settings) on the prompt templates, builds a random READ of the
   ``tiny`` preset (2-layer LLaMA, tiny CLIP, tiny SAM; the real 576-patch / 1024-px interfaces) and saves it in
   the released layout (``tiny_read/``) with its CLIP tower (``tiny_clip/``);
3. runs ``train_read.py`` in this process (DeepSpeed engine, ZeRO-2, gloo on the CPU): ReasonSeg-style training
   images, validation on the ReasonSeg val split before training and after every epoch;
4. prints gIoU / cIoU at step 0 and at the end and writes them to ``quickstart_metrics.json``.

The exit status is 0 when the final masks beat the step-0 masks (gIoU and cIoU both higher), 1 otherwise.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils.io import atomic_write_json, read_jsonl  # noqa: E402

# LLaMA's SentencePiece settings (BPE, byte fallback, unk/bos/eos = 0/1/2, no normalisation).
SPM_SETTINGS = dict(
    model_type="bpe", character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
    byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
    add_dummy_prefix=True, remove_extra_whitespaces=False, minloglevel=2,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="READ quick start: synthetic data + tiny random READ + DeepSpeed",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/quickstart", help="working directory (data, tiny model, run logs)")
    p.add_argument("--epochs", type=int, default=4, help="epochs (validation after each)")
    p.add_argument("--steps_per_epoch", type=int, default=50, help="optimizer steps per epoch")
    p.add_argument("--lr", type=float, default=0.003, help="peak learning rate")
    p.add_argument("--warmup_steps", type=int, default=10, help="LR warm-up steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the tokenizer and the random model")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: load in the training process)")
    p.add_argument("--vocab_size", type=int, default=1000, help="SentencePiece vocabulary (before READ's 3 tokens)")
    p.add_argument("--fresh", action="store_true", help="delete --out first (otherwise data and model are reused)")
    return p


def template_corpus() -> list[str]:
    """Every prompt string the datasets can produce (templates, system prompts, answers)."""
    import dataset.qa_templates as qa
    from dataset.conversation import TEMPLATES

    lines: list[str] = []
    for name in sorted(vars(qa)):
        value = getattr(qa, name)
        if name.startswith("_"):
            continue
        if isinstance(value, str):
            lines.append(value)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(x, str) for x in value):
            lines.extend(value)
    for template in TEMPLATES.values():
        lines.extend(str(v) for v in vars(template).values() if isinstance(v, str))
    return lines


def write_tokenizer(directory: Path, vocab_size: int) -> "object":
    """Train the SentencePiece model in memory and return the READTokenizer with [SEG]/<im_start>/<im_end>."""
    import sentencepiece as spm

    from model.tokenizer import READTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(template_corpus()), model_writer=buf,
                                   vocab_size=vocab_size, **SPM_SETTINGS)
    tokenizer = READTokenizer(buf.getvalue(), model_max_length=512, source="quickstart")
    tokenizer.add_read_tokens(use_mm_start_end=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


def write_tiny_model(out: Path, seed: int, vocab_size: int) -> tuple[Path, Path]:
    """A random READ of the tiny preset in the released layout (+ tokenizer) and its CLIP directory."""
    import torch

    from model.config import READConfig
    from model.read import READForCausalLM

    model_dir, clip_dir = out / "tiny_read", out / "tiny_clip"
    if (model_dir / "config.json").is_file() and (clip_dir / "config.json").is_file():
        return model_dir, clip_dir
    tmp_model, tmp_clip = out / "tiny_read.partial", out / "tiny_clip.partial"
    for d in (tmp_model, tmp_clip):
        shutil.rmtree(d, ignore_errors=True)
    tokenizer = write_tokenizer(tmp_model, vocab_size)
    torch.manual_seed(seed)
    config = READConfig.from_preset(
        "tiny",
        vocab_size=len(tokenizer),
        seg_token_idx=tokenizer.seg_token_id,
        im_start_token_idx=tokenizer.im_start_token_id,
        im_end_token_idx=tokenizer.im_end_token_id,
        attn_implementation="sdpa",
    )
    model = READForCausalLM(config)
    model.model.vision_tower.clip.save_pretrained(str(tmp_clip))
    model.config.mm_vision_tower = model.config.vision_tower = str(clip_dir.resolve())
    model.save_pretrained(str(tmp_model))
    tmp_clip.rename(clip_dir)
    tmp_model.rename(model_dir)
    return model_dir, clip_dir


def train_argv(args: argparse.Namespace, data: Path, model_dir: Path, clip_dir: Path, gpu: bool) -> list[str]:
    return [
        "--version", str(model_dir), "--vision_tower", str(clip_dir), "--dataset_dir", str(data),
        "--dataset", "reason_seg", "--sample_rates", "1", "--val_dataset", "ReasonSeg", "--val_split", "val",
        "--precision", "bf16" if gpu else "fp32", "--no-gradient_checkpointing",
        "--epochs", str(args.epochs), "--steps_per_epoch", str(args.steps_per_epoch), "--batch_size", "1",
        "--lr", str(args.lr), "--warmup_steps", str(args.warmup_steps), "--workers", str(args.workers),
        "--print_freq", "10", "--seed", str(args.seed), "--val_before_train",
        "--log_base_dir", str(args.out), "--exp_name", "run",
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out / "run", ignore_errors=True)  # a quick start always trains from step 0
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    import torch

    from dataset.synthetic.writer import write_synthetic_dataset

    data = out / "data"
    if not (data / "reason_seg").is_dir():
        write_synthetic_dataset(data, seed=args.seed)
    model_dir, clip_dir = write_tiny_model(out, args.seed, args.vocab_size)
    gpu = torch.cuda.is_available()
    print(f"[quickstart] data in {data}, tiny READ in {model_dir}; training on {'GPU' if gpu else 'CPU'} "
          f"for {args.epochs * args.steps_per_epoch} steps", flush=True)

    import train_read

    status = train_read.main(train_argv(args, data, model_dir, clip_dir, gpu))
    if status != 0:
        return status
    vals = [r for r in read_jsonl(out / "run" / "log.jsonl") if r["kind"] == "val"]
    first, last = vals[0], vals[-1]
    improved = last["giou"] > first["giou"] and last["ciou"] > first["ciou"]
    summary = {
        "step0": {"giou": first["giou"], "ciou": first["ciou"]},
        "final": {"step": last["step"], "giou": last["giou"], "ciou": last["ciou"]},
        "history": [{"step": r["step"], "giou": r["giou"], "ciou": r["ciou"]} for r in vals],
        "improved": improved,
        "seconds": round(time.time() - start, 1),
    }
    atomic_write_json(out / "quickstart_metrics.json", summary)
    print(f"[quickstart] step 0:    gIoU {first['giou']:.4f}  cIoU {first['ciou']:.4f}")
    print(f"[quickstart] step {last['step']}: gIoU {last['giou']:.4f}  cIoU {last['ciou']:.4f}  "
          f"({'better' if improved else 'NOT better'} than step 0; {summary['seconds']:.0f} s)")
    print(f"[quickstart] TensorBoard: tensorboard --logdir {out / 'run'}")
    return 0 if improved else 1


if __name__ == "__main__":
    sys.exit(main())
