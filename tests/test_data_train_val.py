"""Validation on fixed draws from the training mixture (the original's TrainValDataset, fixed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dataset.collate import collate_val
from dataset.hybrid import REASONSEG_MIX, HybridConfig, HybridDataset
from dataset.train_val import TrainValDataset
from tests.helpers.tokenizer import tiny_tokenizer


def _mixture(root: Path, rank: int) -> HybridDataset:
    config = HybridConfig(dataset=REASONSEG_MIX, sample_rates="10,1,1,1,1,10", num_classes_per_sample=2)
    return HybridDataset(root, config=config, samples_per_epoch=8, seed=42, rank=rank)


def test_items_are_fixed_masked_ten_tuples_that_collate(synthetic_root: Path) -> None:
    val = TrainValDataset(_mixture(synthetic_root, rank=0), num_samples=6, seed=3)
    other_rank = TrainValDataset(_mixture(synthetic_root, rank=1), num_samples=6, seed=3)
    assert len(val) == 6
    items = [val[i] for i in range(len(val))]
    for i, item in enumerate(items):
        assert len(item) == 10
        image_path, _, _, conversations, masks, sam_shape, exists, ref_ids, sent_ids, record = item
        n = masks.shape[0]
        assert n >= 1 and masks.shape[1:] == tuple(sam_shape[1])
        assert sum(c.count("[SEG]") for c in conversations) == n
        assert ref_ids == list(range(n)) and sent_ids == list(range(n)) and record == {image_path: conversations}
        again, elsewhere = val[i], other_rank[i]  # no dependence on the call, the epoch or the rank
        assert again[3] == conversations and elsewhere[3] == conversations
        assert torch.equal(again[4], masks) and torch.equal(elsewhere[4], masks)
    assert len({item[0] + "".join(item[3]) for item in items}) > 1  # not one sample repeated

    batch = collate_val(items[:1], tiny_tokenizer())
    assert batch["inference"] is True and batch["labels"] is None
    assert batch["input_ids"].shape[0] == len(items[0][3])
    assert batch["masks_list"][0].dtype == torch.float32


def test_a_mixture_without_masks_is_reported(synthetic_root: Path) -> None:
    config = HybridConfig(dataset="vqa", sample_rates="1")
    val = TrainValDataset(HybridDataset(synthetic_root, config=config, samples_per_epoch=1, rank=0), 2, max_draws=3)
    with pytest.raises(Exception, match=r"train_val: 3 draws from the training mixture \(vqa\) gave no sample"):
        val[0]
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        TrainValDataset(val.mixture, 0)
