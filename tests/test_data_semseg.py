"""Semantic / part segmentation sources: class lists, label remapping, masks vs the generator, modes, errors."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import dataset.sem_seg as sem_seg_module
from dataset.errors import DatasetError
from dataset.preprocess import ImagePreprocessor
from dataset.qa_templates import CORRECT_ANSWER_TEMPLATE, NEG_ANSWER_TEMPLATE, SHORT_ANSWER_TEMPLATE
from dataset.sem_seg import (
    CLASSES_DIR,
    CORRECTION,
    DENIAL,
    SEM_SEG_MODES,
    TRUE_PREMISE,
    SegDraw,
    SemSegDataset,
    build_ade20k,
    build_cocostuff,
    build_mapillary,
    build_paco_lvis,
    build_pascal_part,
    load_ade20k_classes,
    load_cocostuff_classes,
    parse_part_category,
    part_query_name,
    remap_ade20k_label,
    remap_cocostuff_label,
)

DENSE = {"ade20k": build_ade20k, "cocostuff": build_cocostuff, "mapillary": build_mapillary}
PARTS = {"paco_lvis": build_paco_lvis, "pascal_part": build_pascal_part}


@pytest.fixture(scope="module")
def semseg(synthetic_root: Path) -> SemSegDataset:
    return SemSegDataset(synthetic_root, num_classes_per_sample=3)


def _answer(conv: str) -> str:
    return conv.split(" ASSISTANT: ", 1)[1].removesuffix("</s>")


def _question(conv: str) -> str:
    return conv.split(" USER: ", 1)[1].split(" ASSISTANT: ", 1)[0]


# ------------------------------------------------------------------------------------------ class lists


def test_ade20k_class_list() -> None:
    names = load_ade20k_classes()
    assert len(names) == 150 and len(set(names)) == 150
    assert names[:5] == ("wall", "building", "sky", "floor", "tree")
    assert names[-3:] == ("glass", "clock", "flag")
    assert names[44] == "chest of drawers" and "windowpane" in names
    assert json.loads((CLASSES_DIR / "ade20k_classes.json").read_text()) == list(names)


def test_cocostuff_class_list_is_the_original_file() -> None:
    data = (CLASSES_DIR / "cocostuff_classes.txt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == "6292e91f089828221aa3a7867e41bcb885e7614f3cc6fe4edae2eef45ff26205"
    names = load_cocostuff_classes()
    assert len(names) == 182 and len(set(names)) == 182
    assert names[:3] == ("person", "bicycle", "car") and names[-3:] == ("window-blind", "window-other", "wood")
    assert sum("-" in n for n in names) == 28
    assert {"street sign", "hair brush"} <= set(names)


# ------------------------------------------------------------------------------------------ remapping


def test_ade20k_remap() -> None:
    raw = np.array([[0, 1, 2], [149, 150, 0]], dtype=np.uint8)
    assert remap_ade20k_label(raw).tolist() == [[255, 0, 1], [148, 149, 255]]


def test_cocostuff_remap_ignores_hyphen_classes() -> None:
    names = load_cocostuff_classes()
    wall_brick, person, sky = names.index("wall-brick"), names.index("person"), names.index("sky")
    raw = np.array([[person, wall_brick, sky, 255]], dtype=np.uint8)
    assert remap_cocostuff_label(raw, names).tolist() == [[0, 255, sky, 255]]


def test_part_category_parsing() -> None:
    assert parse_part_category("mug_(coffee_cup):handle") == ("mug", "handle")
    assert parse_part_category(" trash_can ") == "trash_can"
    assert parse_part_category("dog:head") == ("dog", "head")
    with pytest.raises(ValueError, match="more than one ':'"):
        parse_part_category("a:b:c")
    rng = np.random.default_rng(0)
    forms = {part_query_name(("dog", "head"), rng) for _ in range(50)}
    assert forms == {"dog head", "the head of the dog"}
    assert part_query_name("trash_can", rng) == "trash_can"


# ------------------------------------------------------------------------------------------ masks vs generator


@pytest.mark.parametrize("name", sorted(DENSE))
def test_dense_masks_equal_what_was_drawn(name: str, synthetic_root: Path, synthetic_dataset: dict) -> None:
    source = DENSE[name](synthetic_root)
    expected = {str(it["label"]): it for it in synthetic_dataset["sem_seg"][name]["items"]}
    assert sorted(map(str, source.label_paths)) == sorted(expected)
    names = load_cocostuff_classes() if name == "cocostuff" else None
    usable = 0
    for item in range(len(source)):
        want = expected[str(source.label_paths[item])]
        draw = source.draw(np.random.default_rng(item), n=50, item=item)
        if not want["masks"]:
            assert draw is None  # nothing usable in this label: the loader must redraw
            continue
        usable += 1
        assert draw.image_path == want["image"]
        got = dict(zip(draw.positives, draw.masks))
        assert sorted(got) == sorted(want["masks"])
        for cls, mask in want["masks"].items():
            assert got[cls].dtype == np.uint8 and np.array_equal(got[cls], mask), (name, item, cls)
        assert not set(draw.negatives) & set(draw.positives)
        if names is not None:
            assert not any("-" in n for n in draw.negatives)  # ignored classes are never "absent"
            assert set(want["ignored"]).isdisjoint(draw.positives)
        if name == "mapillary":
            assert "unlabeled" not in draw.positives + draw.negatives
    assert usable >= 3


def _all_names(category: str) -> set[str]:
    """Every query text a raw PACO/PASCAL-Part category can become (written out independently of the loader)."""
    obj, _, part = category.partition(":")
    obj, part = obj.split("_(")[0], part.split("_(")[0]
    return {f"{obj} {part}", f"the {part} of the {obj}"} if part else {obj}


@pytest.mark.parametrize("name", sorted(PARTS))
def test_part_masks_equal_what_was_drawn(name: str, synthetic_root: Path, synthetic_dataset: dict) -> None:
    source = PARTS[name](synthetic_root)
    items = synthetic_dataset["sem_seg"][name]["items"]
    with_anns = [it for it in items if it["annotations"]]
    assert len(source) == len(with_anns) == len(items) - 1  # the image without annotations is never drawn
    for item in range(len(source)):
        want = next(it for it in items if it["image_id"] == source.image_ids[item])
        draw = source.draw(np.random.default_rng(item), n=50, item=item)
        assert draw.image_path == want["image"]
        assert len(draw.positives) == len(want["annotations"]) == draw.masks.shape[0]
        pool = list(want["annotations"].values())
        for text, mask in zip(draw.positives, draw.masks):
            match = [a for a in pool if np.array_equal(a["mask"], mask)]
            assert len(match) == 1
            assert text in _all_names(match[0]["category"])
            pool.remove(match[0])
        present_names = set().union(*(_all_names(a["category"]) for a in want["annotations"].values()))
        assert draw.negatives and present_names.isdisjoint(draw.negatives)


# ------------------------------------------------------------------------------------------ sample construction


def _draw(semseg: SemSegDataset, source: str, item: int = 0) -> SegDraw:
    src = semseg.sources[semseg.names.index(source)]
    for k in range(len(src)):
        draw = src.draw(np.random.default_rng(7), n=3, item=(item + k) % len(src))
        if draw is not None and len(draw.positives) >= 2:
            return draw
    raise AssertionError("no image with two classes")


def test_true_premise_sample(semseg: SemSegDataset) -> None:
    draw = _draw(semseg, "ade20k")
    path, image, clip, convs, masks, shape, exists = semseg.build("ade20k", draw, TRUE_PREMISE, np.random.default_rng(1))
    k = len(draw.positives)
    assert len(convs) == k and exists == [True] * k
    assert masks.dtype == torch.uint8 and masks.shape == draw.masks.shape and torch.equal(masks, torch.from_numpy(draw.masks))
    assert image.shape == (3, 1024, 1024) and clip.shape == (3, 336, 336)
    h, w = Image.open(path).size[::-1]
    assert shape[1] == (h, w) == tuple(masks.shape[1:])
    answers = {t.format(class_name=n.lower()) for t in SHORT_ANSWER_TEMPLATE for n in draw.positives}
    for conv, name in zip(convs, draw.positives):
        assert conv.count("[SEG]") == 1 and conv.count("<image>") == 1
        assert name.lower() in _question(conv) and _answer(conv) in answers


@pytest.mark.parametrize("mode", [DENIAL, CORRECTION])
def test_denial_and_correction_have_no_seg_and_no_mask(semseg: SemSegDataset, mode: str) -> None:
    draw = _draw(semseg, "cocostuff")
    _, _, _, convs, masks, shape, exists = semseg.build("cocostuff", draw, mode, np.random.default_rng(2))
    k = min(len(draw.positives), len(draw.negatives))
    assert len(convs) == k and exists == [False] * k
    assert masks.shape == (0, *draw.masks.shape[1:]) and shape[1] == tuple(draw.masks.shape[1:])
    for j, conv in enumerate(convs):
        neg, pos = draw.negatives[j].lower(), draw.positives[j].lower()
        assert "[SEG]" not in conv and neg in _question(conv)
        if mode == DENIAL:
            assert _answer(conv) in {t.format(class_name=neg) for t in NEG_ANSWER_TEMPLATE}
        else:
            assert _answer(conv) in {t.format(class_name=neg, gt_name=pos) for t in CORRECT_ANSWER_TEMPLATE}


def test_denial_never_indexes_past_the_negatives(semseg: SemSegDataset) -> None:
    draw = _draw(semseg, "ade20k")
    short = SegDraw(draw.image_path, draw.positives, draw.negatives[:1], draw.masks)
    convs = semseg.build("ade20k", short, DENIAL, np.random.default_rng(0))[3]
    assert len(convs) == 1
    nothing_absent = SegDraw(draw.image_path, draw.positives, [], draw.masks)  # falls back to true premise
    convs, masks, exists = [semseg.build("ade20k", nothing_absent, CORRECTION, np.random.default_rng(0))[i] for i in (3, 4, 6)]
    assert all(c.count("[SEG]") == 1 for c in convs) and masks.shape[0] == len(convs) and all(exists)


def test_mode_probabilities(semseg: SemSegDataset) -> None:
    rng = np.random.default_rng(123)
    n = 20000
    counts = {m: 0 for m in SEM_SEG_MODES}
    for _ in range(n):
        counts[semseg.draw_mode(rng)] += 1
    for mode, p in zip(SEM_SEG_MODES, (0.85, 0.07, 0.08)):
        assert abs(counts[mode] / n - p) < 4 * (p * (1 - p) / n) ** 0.5, counts


def test_samples_are_well_formed_and_reproducible(semseg: SemSegDataset) -> None:
    for idx in range(6):
        a = semseg[idx]
        path, image, clip, convs, masks, shape, exists = a
        assert len(convs) == len(exists) >= 1
        assert sum(c.count("[SEG]") for c in convs) == masks.shape[0] == sum(exists)
        assert masks.shape[1:] == shape[1]
    b, c = semseg[3], semseg[3]
    assert b[0] == c[0] and b[3] == c[3] and torch.equal(b[4], c[4]) and torch.equal(b[1], c[1])
    assert pickle.loads(pickle.dumps(semseg)).names == semseg.names  # spawn-started workers need this


# ------------------------------------------------------------------------------------------ errors


def test_unknown_source_names_the_flag(synthetic_root: Path) -> None:
    with pytest.raises(ValueError, match=r"--sem_seg_data.*'partimagenet'.*no loader"):
        SemSegDataset(synthetic_root, sem_seg_data="ade20k||partimagenet")


def test_missing_source_lists_expected_tree(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"ade20k: expected dir not found: .*ade20k/images/training(.|\n)*ade20k/annotations"):
        SemSegDataset(tmp_path, sem_seg_data="ade20k")


def _copy(root: Path, tmp: Path, *rels: str) -> Path:
    for rel in rels:
        shutil.copytree(root / rel, tmp / rel)
    return tmp


def test_missing_annotation_png(synthetic_root: Path, tmp_path: Path) -> None:
    root = _copy(synthetic_root, tmp_path, "ade20k")
    victim = sorted((root / "ade20k/annotations/training").iterdir())[0]
    victim.unlink()
    with pytest.raises(DatasetError, match=rf"ade20k: 1 annotation PNGs missing(.|\n)*{victim.name}"):
        build_ade20k(root)


def test_label_value_out_of_range(synthetic_root: Path, tmp_path: Path) -> None:
    root = _copy(synthetic_root, tmp_path, "ade20k")
    label = sorted((root / "ade20k/annotations/training").iterdir())[0]
    arr = np.array(Image.open(label))
    arr[0, 0] = 200
    Image.fromarray(arr).save(label)
    with pytest.raises(DatasetError, match=r"has class id 199 but only 150 classes"):
        build_ade20k(root).load_label(0)


def test_label_size_must_match_image(synthetic_root: Path, tmp_path: Path) -> None:
    root = _copy(synthetic_root, tmp_path, "ade20k")
    ds = SemSegDataset(root, sem_seg_data="ade20k")
    draw = ds.sources[0].draw(np.random.default_rng(0), 1, item=0)
    bad = SegDraw(draw.image_path, draw.positives, draw.negatives, draw.masks[:, :-1])
    with pytest.raises(DatasetError, match=r"annotation of .* is \d+x\d+ \(HxW\) but the image is"):
        ds.build("ade20k", bad, TRUE_PREMISE, np.random.default_rng(0))


def _overwrite_with_other_size(path: Path) -> tuple[int, int]:
    """Write a JPEG 7 rows taller and 5 columns wider over ``path``; return the original (H, W)."""
    h, w = cv2.imread(str(path)).shape[:2]
    assert cv2.imwrite(str(path), np.full((h + 7, w + 5, 3), 127, np.uint8))
    return h, w


@pytest.mark.parametrize("name,tree", [("ade20k", "ade20k"), ("pascal_part", "vlpart")])
def test_training_skips_an_image_whose_size_differs_from_its_label(
    name: str, tree: str, synthetic_root: Path, synthetic_dataset: dict, tmp_path: Path
) -> None:
    root = _copy(synthetic_root, tmp_path, tree)
    ds = SemSegDataset(root, ImagePreprocessor(sam_size=64, clip_size=28), sem_seg_data=name, num_classes_per_sample=3)
    victim = Path(ds[0][0])
    h, w = _overwrite_with_other_size(victim)
    msg = rf"{name}: annotation of {re.escape(str(victim))} is {h}x{w} \(HxW\) but the image is {h + 7}x{w + 5}"
    with pytest.warns(UserWarning, match=msg) as record:
        path, image, clip, convs, masks, shape, exists = ds[0]
    skipped = [r for r in record if "skipping this training image" in str(r.message)]
    assert len(skipped) == ds.skipped_images >= 1 and all(str(victim) in str(r.message) for r in skipped)
    # a well-formed sample of another image, with that image's masks
    assert path != str(victim) and image.shape == (3, 64, 64) and clip.shape == (3, 28, 28)
    assert len(convs) == len(exists) >= 1 and sum(c.count("[SEG]") for c in convs) == masks.shape[0] == sum(exists)
    assert masks.dtype == torch.uint8 and tuple(masks.shape[1:]) == shape[1] == cv2.imread(path).shape[:2]
    item = next(it for it in synthetic_dataset["sem_seg"][name]["items"] if Path(it["image"]).name == Path(path).name)
    expected = item["masks"].values() if name == "ade20k" else [a["mask"] for a in item["annotations"].values()]
    for m in masks:
        assert any(np.array_equal(m.numpy(), e) for e in expected)
    # building that given image still raises, naming the path and both sizes
    src = ds.sources[0]
    paths = src.image_paths if name == "ade20k" else [src.image_path(i) for i in src.image_ids]
    draw = src.draw(np.random.default_rng(0), 3, item=[Path(p) for p in paths].index(victim))
    with pytest.raises(DatasetError, match=msg):
        ds.build(name, draw, TRUE_PREMISE, np.random.default_rng(0))


def test_size_mismatch_redraws_are_bounded(synthetic_root: Path, tmp_path: Path, monkeypatch) -> None:
    root = _copy(synthetic_root, tmp_path, "ade20k")
    ds = SemSegDataset(root, ImagePreprocessor(sam_size=64, clip_size=28), sem_seg_data="ade20k")
    for image in ds.sources[0].image_paths:
        _overwrite_with_other_size(image)
    monkeypatch.setattr(sem_seg_module, "MAX_DRAWS", 5)
    with pytest.warns(UserWarning, match="skipping this training image"):
        with pytest.raises(DatasetError, match=r"sem_seg: no usable image in 5 draws from ade20k"):
            ds[0]
    assert 1 <= ds.skipped_images <= 5


def test_pascal_part_names_must_be_object_part(synthetic_root: Path, tmp_path: Path) -> None:
    root = _copy(synthetic_root, tmp_path, "vlpart")
    path = root / "vlpart/pascal_part/train.json"
    data = json.loads(path.read_text())
    data["categories"][0]["name"] = "person"
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"pascal_part: .*train.json: category 1 is named 'person'; every category must be '<object>:<part>'"):
        build_pascal_part(root)


def test_missing_coco_image_for_cocostuff(synthetic_root: Path, tmp_path: Path) -> None:
    root = _copy(synthetic_root, tmp_path, "cocostuff")
    (root / "coco/train2017").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"cocostuff: 3 images missing(.|\n)*coco/train2017/000000100001.jpg"):
        build_cocostuff(root)
