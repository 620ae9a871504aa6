"""ReasonSeg: mask rasterisation, json reading, the training set (true/false premise) and TestReasoningDataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.errors import DatasetError
from dataset.preprocess import ImagePreprocessor
from dataset.qa_templates import LISA_ANSWER, LONG_ANSWER_TEMPLATE
from dataset.reason_seg import (
    ReasonSegDataset,
    json_for,
    list_reason_images,
    parse_reason_data,
    rasterize_reason_mask,
    read_reason_annotation,
)
from dataset.synthetic.reason_writer import write_reason_seg
from dataset.validation import TestReasoningDataset

SYSTEM_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
SMALL = ImagePreprocessor(sam_size=64, clip_size=28)  # loaders do not depend on the input sizes


@pytest.fixture(scope="module")
def reason(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("reason")
    return root, write_reason_seg(root, np.random.default_rng(7))


def _poly(label: str, x0: float, y0: float, x1: float, y1: float) -> dict:
    return {"label": label, "points": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]}


# ---------------------------------------------------------------- rasterisation


def test_rasterize_inclusive_vertices_truncation_and_flag() -> None:
    shapes = [_poly("target", 2.9, 1.2, 5.7, 3.99), _poly("flag", 0, 0, 9, 9)]
    m = rasterize_reason_mask(shapes, 8, 10)
    expected = np.zeros((8, 10), np.uint8)
    expected[1:4, 2:6] = 1  # points truncate to (2,1)-(5,3), drawn inclusively
    assert np.array_equal(m, expected)


def test_rasterize_order_ignore_and_case() -> None:
    shapes = [
        _poly("target", 3, 3, 4, 4),  # small target inside the ignore region: painted last
        _poly("IGNORE_me", 1, 1, 6, 6),
        _poly("target", 0, 0, 8, 8),  # largest: painted first
    ]
    m = rasterize_reason_mask(shapes, 10, 10)
    expected = np.zeros((10, 10), np.uint8)
    expected[0:9, 0:9] = 1
    expected[1:7, 1:7] = 255
    expected[3:5, 3:5] = 1
    assert np.array_equal(m, expected)
    assert set(np.unique(m)) == {0, 1, 255}


def test_rasterize_ties_earlier_shape_wins() -> None:
    """Equal areas: reversed argsort paints the later shape first, so the earlier one ends on top."""
    shapes = [_poly("ignore", 0, 0, 3, 3), _poly("target", 2, 2, 5, 5)]
    m = rasterize_reason_mask(shapes, 6, 6)
    assert m[2, 2] == 255 and m[3, 3] == 255 and m[4, 4] == 1 and m[0, 0] == 255


def test_synthetic_masks_match_the_generator(reason) -> None:
    root, summary = reason
    for split, items in summary["splits"].items():
        for item in items:
            ann = read_reason_annotation(json_for(item["image"]), "ReasonSeg")
            h, w = item["mask"].shape
            assert np.array_equal(rasterize_reason_mask(ann.shapes, h, w), item["mask"]), item["image"]
            assert set(np.unique(item["mask"])) <= {0, 1, 255} and (item["mask"] == 255).any()


# ---------------------------------------------------------------- json reading


def test_json_fields_and_cp1252_fallback(tmp_path) -> None:
    path = tmp_path / "a.json"
    record = {"text": ["the caf\u2019s sign"], "is_sentence": False, "shapes": [_poly("target", 0, 0, 2, 2)],
              "false_premise_QA": [["a dog", False, "No dog, but a sign."]]}
    path.write_bytes(json.dumps(record, ensure_ascii=False).encode("cp1252"))
    ann = read_reason_annotation(path, "ReasonSeg")
    assert ann.texts == ["the caf\u2019s sign"] and ann.is_sentence is False
    assert ann.false_premise_qa == [("a dog", False, "No dog, but a sign.")]


def test_malformed_json_names_the_file(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"text": ["x"], "shapes": [')
    with pytest.raises(DatasetError, match=r"ReasonSeg: malformed json .*bad\.json"):
        read_reason_annotation(path, "ReasonSeg")


def test_missing_keys_name_the_file(tmp_path) -> None:
    path = tmp_path / "nokey.json"
    path.write_text(json.dumps({"text": ["x"], "is_sentence": False}))
    with pytest.raises(DatasetError, match=r"malformed annotation .*nokey\.json: missing key 'shapes'"):
        read_reason_annotation(path, "ReasonSeg")


def test_malformed_false_premise_entry(tmp_path) -> None:
    path = tmp_path / "fp.json"
    path.write_text(json.dumps({"text": ["x"], "is_sentence": False, "shapes": [], "false_premise_QA": [["only"]]}))
    with pytest.raises(DatasetError, match=r"malformed 'false_premise_QA' entry 0 in .*fp\.json"):
        read_reason_annotation(path, "ReasonSeg")


def test_parse_reason_data() -> None:
    assert parse_reason_data("ReasonSeg|train_val") == ("ReasonSeg", ["train", "val"])
    with pytest.raises(ValueError, match="name|split"):
        parse_reason_data("ReasonSeg")


def test_listing_is_sorted(reason) -> None:
    root, summary = reason
    listed = list_reason_images(root, "ReasonSeg", ["val", "test"])
    assert listed == sorted(p["image"] for p in summary["splits"]["val"]) + sorted(
        p["image"] for p in summary["splits"]["test"]
    )


# ---------------------------------------------------------------- training dataset


def test_true_premise_samples(reason) -> None:
    root, summary = reason
    ds = ReasonSegDataset(root, SMALL, num_classes_per_sample=2, fp_probability=0.0, samples_per_epoch=7)
    assert len(ds) == 7
    expected = {str(i["image"]): i for i in summary["splits"]["train"]}
    for idx in range(3):
        path, image, image_clip, convs, masks, shape, exists = ds[idx]
        item = expected[path]
        k = min(2, len(item["texts"]))
        assert image.shape == (3, 64, 64) and image_clip.shape == (3, 28, 28)
        assert len(convs) == k and exists == [True] * k
        assert masks.dtype == torch.float32 and masks.shape == (k, *item["mask"].shape)
        for m in masks:  # ignore pixels become background in training
            assert torch.equal(m, torch.from_numpy(item["mask"] == 1).float())
        assert shape[1] == item["mask"].shape
        for c in convs:
            assert c.startswith(SYSTEM_HUMAN + " USER: <image>\n") and c.endswith("</s>") and c.count("[SEG]") == 1
            assert c.split(" ASSISTANT: ")[1][: -len("</s>")] in LONG_ANSWER_TEMPLATE


def test_false_premise_samples_have_no_seg_and_no_mask(reason) -> None:
    root, summary = reason
    ds = ReasonSegDataset(root, SMALL, num_classes_per_sample=3, fp_probability=1.0)
    triples = {str(i["image"]): i["false_premise_QA"] for i in summary["splits"]["train"]}
    texts = {str(i["image"]): i["texts"] for i in summary["splits"]["train"]}
    for idx in range(3):
        path, _, _, convs, masks, shape, exists = ds[idx]
        assert masks.shape == (0, *shape[1]) and exists == [False] * len(convs)
        assert len(convs) == min(3, len(texts[path]))  # as many conversations as sampled texts
        answers = {t[2] for t in triples[path]}
        for c in convs:
            assert "[SEG]" not in c
            assert c.split(" ASSISTANT: ")[1][: -len("</s>")] in answers


def test_items_are_deterministic_per_index(reason) -> None:
    root, _ = reason
    ds = ReasonSegDataset(root, SMALL, num_classes_per_sample=3, seed=3)
    a, b = ds[5], ds[5]
    assert a[0] == b[0] and a[3] == b[3] and torch.equal(a[4], b[4])
    other = ReasonSegDataset(root, SMALL, num_classes_per_sample=3, seed=4)
    assert [other[i][3] for i in range(4)] != [ds[i][3] for i in range(4)]
    s = ds.sample(np.random.default_rng(0))
    assert len(s) == 7


def test_missing_split_folder(tmp_path) -> None:
    msg = r"ReasonSeg: folder not found: .*reason_seg/ReasonSeg/train\n.*expected tree"
    with pytest.raises(DatasetError, match=msg):
        ReasonSegDataset(tmp_path, SMALL)


def test_missing_json_beside_jpg(reason, tmp_path) -> None:
    root, summary = reason
    split = tmp_path / "reason_seg" / "ReasonSeg" / "train"
    split.mkdir(parents=True)
    shutil.copy(summary["splits"]["train"][0]["image"], split / "lonely.jpg")
    with pytest.raises(DatasetError, match=r"annotation file not found: .*lonely\.json"):
        ReasonSegDataset(tmp_path, SMALL)


def test_corrupt_jpg_is_reported(reason, tmp_path) -> None:
    _, summary = reason
    split = tmp_path / "reason_seg" / "ReasonSeg" / "val"
    split.mkdir(parents=True)
    src = summary["splits"]["val"][0]["image"]
    shutil.copy(json_for(src), split / "bad.json")
    (split / "bad.jpg").write_bytes(b"not a jpeg at all")
    ds = TestReasoningDataset(tmp_path, SMALL)
    with pytest.raises(DatasetError, match=r"cannot decode image .*bad\.jpg"):
        ds[0]


# ---------------------------------------------------------------- validation / test


def test_val_mode_prompt_and_mask(reason) -> None:
    root, summary = reason
    ds = TestReasoningDataset(root, SMALL, split="val", mode="val")
    items = summary["splits"]["val"]
    assert len(ds) == len(items)
    for idx, item in enumerate(items):
        out = ds[idx]
        assert len(out) == 10
        path, _, _, convs, masks, shape, exists, ref_ids, sent_ids, record = out
        text = item["texts"][0]
        if item["is_sentence"]:
            question = f"<image>\n{text} Please output segmentation mask."
        else:
            question = f"<image>\nWhat is {text.lower()} in this image? Please output segmentation mask."
        assert convs == [f"{SYSTEM_HUMAN} USER: {question} ASSISTANT: {LISA_ANSWER}</s>"]
        assert masks.dtype == torch.uint8 and masks.shape == (1, *item["mask"].shape)
        assert np.array_equal(masks[0].numpy(), item["mask"])
        assert exists == [True] and ref_ids == [idx] and sent_ids == [0] and record == {path: convs}
        assert shape[1] == item["mask"].shape


def test_test_mode_has_open_prompt_and_one_mask(reason) -> None:
    root, summary = reason
    ds = TestReasoningDataset(root, SMALL, split="test", mode="test", template="vicuna_v1")
    for idx in range(len(ds)):
        _, _, _, convs, masks, _, exists, _, _, _ = ds[idx]
        assert len(convs) == 1 and convs[0].endswith(" ASSISTANT:") and "curious user" in convs[0]
        assert masks.shape[0] == 1 == len(exists)  # fix: the original returned [mask, zeros] for one prompt


@pytest.mark.parametrize("subset, want", [("short", False), ("long", True)])
def test_query_subsets(reason, subset: str, want: bool) -> None:
    root, summary = reason
    ds = TestReasoningDataset(root, SMALL, split="val_test", query_subset=subset)
    expected = [str(i["image"]) for s in ("val", "test") for i in summary["splits"][s] if i["is_sentence"] == want]
    assert [str(p) for p in ds.images] == expected and len(ds) > 0
    all_ds = TestReasoningDataset(root, SMALL, split="val_test", query_subset="all")
    assert len(all_ds) == 6


def test_bad_arguments(reason) -> None:
    root, _ = reason
    with pytest.raises(ValueError, match="query_subset"):
        TestReasoningDataset(root, SMALL, query_subset="medium")
    with pytest.raises(ValueError, match="mode must be"):
        TestReasoningDataset(root, SMALL, mode="train")


def test_writer_is_deterministic(tmp_path) -> None:
    a = write_reason_seg(tmp_path / "a", np.random.default_rng(5))
    b = write_reason_seg(tmp_path / "b", np.random.default_rng(5))
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 2 * sum(a["counts"].values())
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert all(np.array_equal(x["mask"], y["mask"]) for x, y in zip(a["splits"]["val"], b["splits"]["val"]))
