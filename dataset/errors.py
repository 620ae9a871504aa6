"""One error type for every data problem, with a message that names the dataset, the path and the fix."""

from __future__ import annotations

import os
from typing import Optional


class DatasetError(RuntimeError):
    """Raised for missing or malformed data; the message is meant to be read by a person."""


def require_path(path: "os.PathLike[str] | str", dataset: str, kind: str = "file", hint: Optional[str] = None) -> str:
    """Return ``path`` as str if it exists (as a file or directory), else raise a DatasetError naming it."""
    path = os.fspath(path)
    ok = os.path.isdir(path) if kind == "dir" else os.path.isfile(path)
    if not ok:
        msg = f"{dataset}: expected {kind} not found: {path}"
        if hint:
            msg += f"\n{hint}"
        msg += "\n(See the dataset tree in README.md, section 'Datasets'.)"
        raise DatasetError(msg)
    return path
