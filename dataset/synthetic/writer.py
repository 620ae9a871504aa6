"""One call that writes the whole synthetic dataset root (every training and evaluation source).

Each source gets its own generator derived from ``(seed, source number)``, so the files of one source do not
depend on the others and the same seed always writes byte-identical files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np

from dataset.synthetic.reason_writer import write_reason_seg
from dataset.synthetic.refer_writer import write_refer
from dataset.synthetic.semseg_writer import write_sem_seg
from dataset.synthetic.vqa_writer import write_vqa

# Source order is part of the seeding: append new writers at the end.
WRITERS = (
    ("reason_seg", write_reason_seg),
    ("refer_seg", write_refer),
    ("sem_seg", write_sem_seg),
    ("vqa", write_vqa),
)


def write_synthetic_dataset(out: Union[str, Path], seed: int = 0) -> dict:
    """Write every source under ``out`` (created if needed; meant to be empty) and return the writers' summaries.

    Returns ``{"root": Path, "seed": int, "reason_seg": ..., "refer_seg": ..., "sem_seg": ..., "vqa": ...}``; each
    summary holds the masks/turns the loaders must reproduce (see the writer modules).
    """
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    summary: dict = {"root": root, "seed": int(seed)}
    for k, (name, write) in enumerate(WRITERS):
        summary[name] = write(root, np.random.default_rng([int(seed), k]))
    return summary


def count_files(root: Union[str, Path]) -> dict[str, int]:
    """Number of files under each top-level folder of ``root`` (for printed summaries)."""
    root = Path(root)
    counts: dict[str, int] = {}
    for top in sorted(p for p in root.iterdir() if p.is_dir()):
        counts[top.name] = sum(len(files) for _, _, files in os.walk(top))
    return counts
