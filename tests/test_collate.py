"""Collation into the batch dict of docs/interfaces.md: keys, dtypes, shapes, label masking, truncation, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.collate import TrainSample, ValSample, collate_train, collate_val
from dataset.reason_seg import ReasonSegDataset
from dataset.sem_seg import DENIAL, TRUE_PREMISE, SemSegDataset
from dataset.validation import TestReferDataset
from dataset.vqa import VQADataset
from model.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from tests.helpers.tokenizer import tiny_tokenizer

TRAIN_KEYS = {"image_paths", "images", "images_clip", "input_ids", "labels", "attention_masks", "offset",
              "masks_list", "sam_mask_shape_list", "inference", "conversation_list", "exists"}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def train_batch(synthetic_root: Path) -> list[tuple]:
    """Four real items: sem-seg true premise (several questions), sem-seg denial, multi-turn VQA, ReasonSeg."""
    sem = SemSegDataset(synthetic_root, sem_seg_data="ade20k||cocostuff", num_classes_per_sample=3)
    src = sem.sources[0]
    draw = next(d for i in range(len(src)) if (d := src.draw(np.random.default_rng(3), 3, item=i)) and len(d.positives) > 1)
    vqa = VQADataset(synthetic_root)
    multi = next(k for k, (_, turns) in enumerate(vqa.items) if len(turns) == 3)
    reason = ReasonSegDataset(synthetic_root, num_classes_per_sample=2, fp_probability=0.0)
    return [
        sem.build("ade20k", draw, TRUE_PREMISE, np.random.default_rng(0)),
        sem.build("ade20k", draw, DENIAL, np.random.default_rng(1)),
        vqa.build(multi),
        reason.sample(np.random.default_rng(0)),
    ]


@pytest.fixture(scope="module")
def train_out(train_batch: list[tuple], tok) -> dict:
    return collate_train(train_batch, tok)


def test_keys_dtypes_and_shapes(train_batch: list[tuple], train_out: dict) -> None:
    out = train_out
    assert set(out) == TRAIN_KEYS
    b = len(train_batch)
    t = sum(len(item[3]) for item in train_batch)
    assert out["images"].dtype == torch.float32 and out["images"].shape == (b, 3, 1024, 1024)
    assert out["images_clip"].dtype == torch.float32 and out["images_clip"].shape == (b, 3, 336, 336)
    assert out["input_ids"].dtype == torch.int64 and out["input_ids"].shape[0] == t
    assert out["labels"].dtype == torch.int64 and out["labels"].shape == out["input_ids"].shape
    assert out["attention_masks"].dtype == torch.bool and out["attention_masks"].shape == out["input_ids"].shape
    assert out["offset"].dtype == torch.int64
    assert out["offset"].tolist() == np.cumsum([0] + [len(item[3]) for item in train_batch]).tolist()
    assert out["inference"] is False and out["image_paths"] == [item[0] for item in train_batch]
    assert len(out["conversation_list"]) == t and len(out["masks_list"]) == b
    for item, masks, shape, exists in zip(train_batch, out["masks_list"], out["sam_mask_shape_list"], out["exists"]):
        assert masks.dtype == torch.float32 and torch.equal(masks, item[4].float())
        assert shape == item[5] and exists == item[6] and all(type(e) is bool for e in exists)
    assert out["masks_list"][1].shape[0] == 0 and out["masks_list"][2].shape[0] == 0
    for conv in out["conversation_list"]:
        assert conv.count("<im_start><image><im_end>") == 1
    ids = out["input_ids"]
    assert ((ids == IMAGE_TOKEN_INDEX).sum(1) == 1).all()
    image_cols = (ids == IMAGE_TOKEN_INDEX).float().argmax(1)
    assert (image_cols == image_cols[0]).all()  # <im_start> at the same position in every row
    lengths = out["attention_masks"].sum(1)
    for row, n in zip(ids, lengths):  # right padding with 0
        assert (row[n:] == 0).all() and (row[:n] != 0).all()


def _answers(conversation: str) -> list[str]:
    rounds = [r for r in conversation.split("</s>") if r]
    return [r.split(" ASSISTANT: ", 1)[1] for r in rounds]


def test_only_answer_tokens_are_supervised(train_out: dict, tok) -> None:
    ids, labels = train_out["input_ids"], train_out["labels"]
    for row_ids, row_labels, conv in zip(ids, labels, train_out["conversation_list"]):
        sup = row_labels != IGNORE_INDEX
        assert torch.equal(row_labels[sup], row_ids[sup])
        supervised = row_ids[sup].tolist()
        answers = _answers(conv)
        assert supervised.count(tok.eos_token_id) == len(answers)  # each answer's closing </s>
        assert supervised[-1] == tok.eos_token_id
        spans, cur = [], []
        for t in supervised:
            if t == tok.eos_token_id:
                spans.append(cur)
                cur = []
            else:
                cur.append(t)
        assert [tok.decode(s) for s in spans] == [tok.decode(tok.encode(a, add_bos=False)) for a in answers]
        assert not sup[: int((row_ids == IMAGE_TOKEN_INDEX).nonzero()) + 1].any()  # system, image, question
        assert (row_labels[row_ids == 0] == IGNORE_INDEX).all()  # padding


def test_seg_rows_and_masks_agree(train_batch: list[tuple], train_out: dict, tok) -> None:
    seg = tok.seg_token_id
    off = train_out["offset"].tolist()
    for i, masks in enumerate(train_out["masks_list"]):
        rows = train_out["input_ids"][off[i] : off[i + 1]]
        assert int((rows == seg).sum()) == masks.shape[0]
        assert ((rows == seg).sum(1) <= 1).all()


def test_truncation_to_max_length_minus_255(train_batch: list[tuple], tok) -> None:
    out = collate_train(train_batch, tok, max_length=255 + 40)
    assert out["input_ids"].shape[1] == out["labels"].shape[1] == out["attention_masks"].shape[1] == 40
    full = collate_train(train_batch, tok, max_length=4096)
    assert torch.equal(out["input_ids"], full["input_ids"][:, :40]) and torch.equal(out["labels"], full["labels"][:, :40])
    default = collate_train(train_batch, tok)  # tokenizer.model_max_length
    assert default["input_ids"].shape[1] == min(full["input_ids"].shape[1], tok.model_max_length - 255)
    with pytest.raises(ValueError, match=r"max_length 200 leaves no room after the 255-token margin"):
        collate_train(train_batch, tok, max_length=200)


def test_named_tuples_are_accepted(train_batch: list[tuple], tok) -> None:
    out = collate_train([TrainSample(*item) for item in train_batch[:2]], tok)
    assert torch.equal(out["input_ids"], collate_train(train_batch[:2], tok)["input_ids"])


@pytest.fixture(scope="module")
def val_items(synthetic_root: Path) -> list[tuple]:
    ds = TestReferDataset(synthetic_root, dataset_name="refcoco", split="val", mode="val")
    return [ds[0]]


def test_collate_val(val_items: list[tuple], tok) -> None:
    out = collate_val(val_items, tok)
    assert set(out) == TRAIN_KEYS | {"ref_ids", "sent_ids", "conversation_records"}
    assert out["labels"] is None and out["inference"] is True
    assert out["ref_ids"] == [list(val_items[0][7])] and out["sent_ids"] == [list(val_items[0][8])]
    assert out["conversation_records"] == [val_items[0][9]]
    n = len(val_items[0][3])
    assert out["input_ids"].shape[0] == n and out["offset"].tolist() == [0, n]
    assert out["masks_list"][0].dtype == torch.float32 and out["masks_list"][0].shape[0] == n
    left = collate_val(val_items, tok, padding="left")
    lengths = left["attention_masks"].sum(1)
    width = left["input_ids"].shape[1]
    for row, k in zip(left["input_ids"], lengths):
        assert (row[: width - k] == 0).all() and (row[width - k :] != 0).all()
    assert collate_val([ValSample(*val_items[0])], tok)["input_ids"].equal(out["input_ids"])


# ------------------------------------------------------------------------------------------ malformed input


def _replace(item: tuple, index: int, value) -> tuple:
    return tuple(value if i == index else x for i, x in enumerate(item))


def test_malformed_items(train_batch: list[tuple], val_items: list[tuple], tok) -> None:
    sem_tp, denial, vqa = train_batch[0], train_batch[1], train_batch[2]
    cases = [
        ([], r"collate_train: empty batch"),
        ([sem_tp[:6]], r"collate_train: item 0 must be a 7-tuple \(image_path, .*exists\), got tuple of length 6"),
        ([_replace(sem_tp, 3, [])], r"conversations must be a non-empty list of prompt strings"),
        ([_replace(vqa, 3, [vqa[3][0].replace("<image>", "")])], r"needs exactly one '<image>', found 0"),
        ([_replace(sem_tp, 4, sem_tp[4][0])], r"masks must be a tensor \[m, H, W\]"),
        ([_replace(sem_tp, 4, sem_tp[4][:-1])], r"contain \d+ '\[SEG\]' but there are \d+ masks"),
        ([_replace(denial, 6, [False])], r"exists has 1 flags for \d+ conversations"),
    ]
    for batch, message in cases:
        with pytest.raises(ValueError, match=message):
            collate_train(batch, tok)
    with pytest.raises(ValueError, match=r"collate_val: item 0 must be a 10-tuple"):
        collate_val([sem_tp], tok)
    with pytest.raises(ValueError, match=r"collate_train: item 0 must be a 7-tuple"):
        collate_train(val_items, tok)
