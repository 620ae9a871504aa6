"""One readable report of how a state dict differs from what a model expects (names and shapes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch


def listing(names: Sequence[str], limit: int = 6) -> str:
    """The first few names, then how many more: keeps an error message one screen long."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def key_mismatch(
    expected: Mapping[str, Sequence[int]], found: Mapping[str, torch.Tensor], found_name: str = "checkpoint"
) -> Optional[str]:
    """None when ``found`` has exactly the expected names and shapes, else a one-line description."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        f"{k} ({found_name} {list(found[k].shape)}, model {list(expected[k])})"
        for k in set(expected) & set(found)
        if tuple(found[k].shape) != tuple(expected[k])
    )
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {listing(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches: {listing(mismatched)}")
    return "; ".join(parts) or None
