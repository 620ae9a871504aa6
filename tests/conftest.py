"""Shared test fixtures: one synthetic dataset root per test session (every source, real on-disk formats)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataset.synthetic.writer import write_synthetic_dataset


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Summary of ``write_synthetic_dataset(root, seed=0)`` (expected masks/turns per source) plus ``"root"``.

    Read-only for tests: copy what you need to corrupt into your own ``tmp_path``.
    """
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "dataset", seed=0)


@pytest.fixture(scope="session")
def synthetic_root(synthetic_dataset: dict) -> Path:
    """The synthetic ``--dataset_dir`` (ReasonSeg, refer_seg, ADE20K, COCO-Stuff, Mapillary, PACO, PASCAL-Part, VQA)."""
    return synthetic_dataset["root"]
