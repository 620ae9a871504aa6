"""DeepSpeed checkpoints of a READ run: last + best, switched atomically, with the original's meta file.

Layout of ``<log_dir>/ckpt_model`` (a normal DeepSpeed checkpoint directory):

- ``global_step<N>/`` tag directories written by ``engine.save_checkpoint``;
- ``latest``: the tag of the BEST checkpoint (by cIoU), as in the original, so ``zero_to_fp32.py`` and the
  LoRA merge pick the best model;
- ``last``: the tag of the most recent checkpoint, which ``--auto_resume`` continues from.

A new tag is written completely before either pointer file is replaced (``os.replace``), and tags no pointer
names are removed only afterwards, so a kill at any moment leaves the previous last/best checkpoints intact.
The training state (step, epoch, best score) travels inside the checkpoint as DeepSpeed client state.
Beside the directory, each new best writes ``epoch{E}_meta_log_ciou{C:.3f}_giou{G:.3f}.pth`` = ``{"epoch": E}``.
"""

from __future__ import annotations

import glob
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from utils.distributed import barrier, broadcast_object
from utils.io import atomic_path, atomic_write_text

CKPT_DIRNAME = "ckpt_model"
BEST_POINTER = "latest"  # DeepSpeed's own pointer name; read by zero_to_fp32.py and the merge script
LAST_POINTER = "last"
TAG_PATTERN = re.compile(r"^global_step(\d+)$")
_META_CIOU = re.compile(r"ciou(-?[0-9.]+)_")


@dataclass
class TrainState:
    """What a resumed run needs besides DeepSpeed's module/optimizer/scheduler states."""

    global_step: int = 0
    epoch: int = 0  # epochs completed
    best_score: float = -math.inf  # best cIoU so far (-inf: nothing validated yet)
    best_giou: float = 0.0
    best_tag: str = ""


def tag_for(step: int) -> str:
    return f"global_step{step}"


def read_pointer(ckpt_dir: Path, name: str) -> Optional[str]:
    """The tag a pointer file names, if the file and the tag directory both exist."""
    path = Path(ckpt_dir) / name
    if not path.is_file():
        return None
    lines = path.read_text().split()
    tag = lines[0] if lines else ""
    return tag if tag and (Path(ckpt_dir) / tag).is_dir() else None


def resume_tag(ckpt_dir: Path) -> Optional[str]:
    """The checkpoint to continue training from: ``last``, else ``latest`` (original layout)."""
    return read_pointer(ckpt_dir, LAST_POINTER) or read_pointer(ckpt_dir, BEST_POINTER)


def meta_filename(epoch: int, ciou: float, giou: float) -> str:
    return f"epoch{epoch}_meta_log_ciou{ciou:.3f}_giou{giou:.3f}.pth"


def write_meta(log_dir: Path, epoch: int, ciou: float, giou: float) -> Path:
    """The original's per-best-epoch marker file, written atomically."""
    path = Path(log_dir) / meta_filename(epoch, ciou, giou)
    with atomic_path(path) as tmp:
        torch.save({"epoch": epoch}, tmp)
    return path


def best_score_from_meta(log_dir: Path) -> Optional[float]:
    """The original's fallback: cIoU parsed from the newest ``*.pth`` meta file name (None if there is none)."""
    files = sorted(glob.glob(os.path.join(str(log_dir), "*.pth")), key=os.path.getmtime)
    for f in reversed(files):
        m = _META_CIOU.search(os.path.basename(f))
        if m:
            return float(m.group(1))
    return None


def save(engine: Any, ckpt_dir: Path, state: TrainState, is_best: bool, is_main: bool) -> str:
    """Save ``engine`` at ``state.global_step`` on every rank, then switch the pointers and prune (rank 0)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(state.global_step)
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if (ckpt_dir / tag).exists() and tag not in _referenced(ckpt_dir):
            shutil.rmtree(ckpt_dir / tag)  # debris of a save that was killed before its pointer switch
    barrier()
    if is_best:
        state.best_tag = tag
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"read_state": asdict(state)}, save_latest=False)
    barrier()
    if is_main:
        atomic_write_text(ckpt_dir / LAST_POINTER, tag + "\n")
        if is_best or read_pointer(ckpt_dir, BEST_POINTER) is None:
            atomic_write_text(ckpt_dir / BEST_POINTER, tag + "\n")
        keep = _referenced(ckpt_dir)
        for entry in ckpt_dir.iterdir():
            if entry.is_dir() and TAG_PATTERN.match(entry.name) and entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)
    barrier()
    return tag


def _referenced(ckpt_dir: Path) -> set[str]:
    return {t for t in (read_pointer(ckpt_dir, LAST_POINTER), read_pointer(ckpt_dir, BEST_POINTER)) if t}


def load(
    engine: Any, ckpt_dir: Path, tag: str, log_dir: Optional[Path] = None, module_only: bool = False
) -> TrainState:
    """Restore module (+ optimizer and LR schedule unless ``module_only``) and return the saved TrainState."""
    load_path, client = engine.load_checkpoint(
        str(ckpt_dir),
        tag=tag,
        load_module_only=module_only,
        load_optimizer_states=not module_only,
        load_lr_scheduler_states=not module_only,
    )
    if load_path is None:
        raise FileNotFoundError(f"--resume: DeepSpeed found no checkpoint {tag!r} in {ckpt_dir}")
    saved = (client or {}).get("read_state")
    if saved is not None:
        return TrainState(**saved)
    # A checkpoint of the original code: step from the tag, best score from the meta file names.
    m = TAG_PATTERN.match(tag)
    step = int(m.group(1)) if m else int(getattr(engine, "global_steps", 0))
    best = best_score_from_meta(log_dir) if log_dir is not None else None
    state = TrainState(global_step=step, best_score=-math.inf if best is None else best, best_tag=tag)
    return broadcast_object(state)  # type: ignore[return-value]
