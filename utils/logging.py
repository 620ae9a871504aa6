"""Run logging for training/validation: rank-0 console lines, TensorBoard (or wandb) scalars, a JSONL record.

Only rank 0 writes. The JSONL file (``<log_dir>/log.jsonl``) carries the same scalars as TensorBoard, one
record per logging step, so scripts and tests can read a run without the TensorBoard event parser.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from tqdm import tqdm

from utils.io import append_jsonl

LOG_JSONL = "log.jsonl"


class RunLogger:
    """Scalars to TensorBoard (default) or wandb, plus a JSONL mirror; a silent no-op on non-zero ranks."""

    def __init__(self, log_dir: Path, is_main: bool, use_wandb: bool = False, exp_name: str = "read") -> None:
        self.log_dir = Path(log_dir)
        self.is_main = is_main
        self.writer: Any = None
        self.wandb: Any = None
        if not is_main:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if use_wandb:
            import wandb  # checked by train_read.check_inputs, so the import succeeds here

            self.wandb = wandb
            wandb.init(project="read", name=exp_name, dir=str(self.log_dir))
        else:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir))

    def info(self, message: str) -> None:
        """Print on rank 0 without breaking an active tqdm bar."""
        if self.is_main:
            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    def scalars(self, values: Mapping[str, float], step: int, kind: str = "train") -> None:
        if not self.is_main:
            return
        for name, value in values.items():
            if self.writer is not None:
                self.writer.add_scalar(name, float(value), step)
        if self.wandb is not None:
            self.wandb.log({k: float(v) for k, v in values.items()}, step=step)
        append_jsonl(self.log_dir / LOG_JSONL, {"kind": kind, "step": int(step), **{k: float(v) for k, v in values.items()}})
        if self.writer is not None:
            self.writer.flush()

    def event(self, kind: str, **fields: Any) -> None:
        """A non-scalar record in the JSONL log (start, resume, checkpoint)."""
        if self.is_main:
            append_jsonl(self.log_dir / LOG_JSONL, {"kind": kind, **fields})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def progress(total: int, desc: str, is_main: bool, initial: int = 0) -> Optional[tqdm]:
    """A tqdm bar on rank 0 only (None elsewhere)."""
    if not is_main:
        return None
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr)
