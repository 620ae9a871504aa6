"""Refer family: pickle names, split rules, mask decoding (polygons, RLE, overlaps), flags, training and val sets."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dataset.errors import DatasetError
from dataset.fp_test import FPTestDataset
from dataset.preprocess import ImagePreprocessor
from dataset.qa_templates import CORRECT_ANSWER_TEMPLATE, NEG_ANSWER_TEMPLATE, SHORT_ANSWER_TEMPLATE
import dataset.refer as refer_module
from dataset.refer import (
    EVAL_MASK_CACHE_BYTES,
    REFER_DATASETS,
    ReferIndex,
    ReferSegDataset,
    decode_segmentation,
    select_refs_for_split,
    sentence_exists,
    split_by_for,
)
from dataset.synthetic.refer_writer import write_refer
from dataset.validation import TestReferDataset

SMALL = ImagePreprocessor(sam_size=64, clip_size=28)


@pytest.fixture(scope="module")
def refer(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("refer")
    return root, write_refer(root, np.random.default_rng(11))


def _answer(conv: str) -> str:
    return conv.split(" ASSISTANT: ", 1)[1][: -len("</s>")]


def _matches_some(text: str, templates: list[str], **fields: str) -> bool:
    return any(text == t.format(**fields) for t in templates)


# ---------------------------------------------------------------- names and splits


def test_split_by_and_pickle_names(refer) -> None:
    root, _ = refer
    table = {
        "refclef": "unc",
        "refcoco": "unc_exclude_unified",
        "refcoco+": "unc_exclude_unified",
        "refcocog": "umd_exclude_unified",
        "R-refcoco": "unc_exclude_unified",
        "R-refcoco+": "unc_exclude_unified",
        "R-refcocog": "umd_exclude_unified",
        "fprefcoco": "berkeley_exclude_unified",
        "fprefcoco+": "berkeley_exclude_unified",
        "fprefcocog": "berkeley_exclude_unified",
    }
    assert {n: split_by_for(n) for n in REFER_DATASETS} == table
    for name, split_by in table.items():
        assert (root / "refer_seg" / name / f"refs({split_by}).p").is_file()
    with pytest.raises(ValueError, match="unknown refer dataset 'grefcoco'"):
        split_by_for("grefcoco")


def test_split_rules() -> None:
    refs = [{"split": s} for s in ("train", "val", "testA", "testB", "testC", "testAB", "test")]
    pick = lambda split: [r["split"] for r in select_refs_for_split(refs, split)]  # noqa: E731
    assert pick("testA") == ["testA", "testAB"]
    assert pick("testB") == ["testB", "testAB"]
    assert pick("testC") == ["testC"]
    assert pick("testAB") == ["testAB"]
    assert pick("test") == ["testA", "testB", "testC", "testAB", "test"]
    assert pick("train") == ["train"] and pick("val") == ["val"]
    with pytest.raises(ValueError, match="unknown refer split 'dev'"):
        pick("dev")


def test_image_ids_are_sorted_and_follow_splits(refer) -> None:
    root, summary = refer
    for name in ("refclef", "refcocog", "fprefcoco"):
        ix = ReferIndex(root, name)
        for split, ids in summary["datasets"][name]["image_splits"].items():
            assert ix.image_ids(split) == ids
    clef = ReferIndex(root, "refclef")
    lettered = set(clef.image_ids("testA")) | set(clef.image_ids("testB")) | set(clef.image_ids("testC"))
    assert clef.image_ids("test") == sorted(lettered)
    assert clef.image_path(clef.image_ids("train")[0]).is_file()
    assert "saiapr_tc-12" in str(clef.image_path(clef.image_ids("train")[0]))


# ---------------------------------------------------------------- masks


def test_every_annotation_decodes_to_the_drawn_mask(refer) -> None:
    root, summary = refer
    for name, info in (("refcoco", summary["coco"]), ("refclef", summary["refclef"])):
        ix = ReferIndex(root, name)
        instances = json.loads((root / "refer_seg" / name / "instances.json").read_text())
        image_of = {a["id"]: a["image_id"] for a in instances["annotations"]}
        for ann_id, expected in info["ann_masks"].items():
            got = ix.ann_mask(ann_id, image_of[ann_id])
            assert got.dtype == np.uint8 and np.array_equal(got, expected), (name, ann_id)
    overlap_values = [m.max() for m in summary["coco"]["ann_masks"].values()] + [
        m.max() for m in summary["refclef"]["ann_masks"].values()
    ]
    assert 2 in overlap_values  # overlapping parts sum to 2, as the original REFER decoding did


def test_decode_formats_directly() -> None:
    h, w = 6, 8
    poly = [[1.0, 1.0, 4.0, 1.0, 4.0, 3.0, 1.0, 3.0]]
    expected = np.zeros((h, w), np.uint8)
    expected[1:3, 1:4] = 1
    assert np.array_equal(decode_segmentation(poly, h, w), expected)
    assert np.array_equal(decode_segmentation(poly + poly, h, w), 2 * expected)
    assert np.array_equal(decode_segmentation([], h, w), np.zeros((h, w), np.uint8))
    # uncompressed (column-major runs: 7 zeros, then ones in column 1 rows 1-2 ...) vs the compressed form
    from pycocotools import mask as mu

    rle = mu.encode(np.asfortranarray(expected))
    compressed_str = {"size": [h, w], "counts": rle["counts"].decode()}
    assert np.array_equal(decode_segmentation([compressed_str], h, w), expected)
    flat = expected.reshape(-1, order="F")
    runs, cur, n = [], 0, 0
    for v in flat:  # tiny reference encoder, independent of the writer's
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    assert np.array_equal(decode_segmentation({"size": [h, w], "counts": runs}, h, w), expected)
    with pytest.raises(ValueError, match="even number"):
        decode_segmentation([[1.0, 2.0, 3.0]], h, w)
    with pytest.raises(ValueError, match="differs from the image size"):
        decode_segmentation([{"size": [3, 3], "counts": "abc"}], h, w)


def test_masks_are_cached_and_read_only(refer) -> None:
    root, summary = refer
    ix = ReferIndex(root, "refcoco")
    ref = ix.refs[0]
    a = ix.ann_mask(ref["ann_id"], ref["image_id"])
    b = ix.ann_mask(ref["ann_id"], ref["image_id"])
    assert a is b and not a.flags.writeable
    tiny = ReferIndex(root, "refcoco", mask_cache_bytes=1)  # cache too small: still decodes correctly
    assert np.array_equal(tiny.ann_mask(ref["ann_id"], ref["image_id"]), a) and len(tiny._decoded) == 0
    assert ix.mask_cache_bytes == EVAL_MASK_CACHE_BYTES <= 64 << 20  # evaluation sets: small and bounded
    with pytest.raises(ValueError, match="mask_cache_bytes"):
        ReferIndex(root, "refcoco", mask_cache_bytes=-1)


def test_training_keeps_no_decoded_masks_by_default(refer) -> None:
    root, _ = refer
    names = "refclef||refcoco||refcocog||fprefcoco"
    ds = ReferSegDataset(root, SMALL, refer_seg_data=names, num_classes_per_sample=3)
    n_masks = sum(ds[idx][4].shape[0] for idx in range(10))
    assert n_masks > 0  # masks were decoded...
    for ix in ds.indexes:  # ...but only the compressed RLEs stay
        assert ix.mask_cache_bytes == 0 and len(ix._decoded) == 0 and ix._decoded_bytes == 0
    assert any(ix._rles for ix in ds.indexes)
    cached = ReferSegDataset(root, SMALL, refer_seg_data=names, num_classes_per_sample=3, mask_cache_bytes=8 << 20)
    for idx in range(10):
        out = ds[idx]
        again = cached[idx]
        assert again[0] == out[0] and torch.equal(again[4], out[4])  # same samples with or without the cache
    assert sum(len(ix._decoded) for ix in cached.indexes) > 0
    assert all(0 < ix._decoded_bytes <= 8 << 20 for ix in cached.indexes if ix._decoded)


def test_list_ann_ids_are_or_combined_and_minus_one_is_empty(refer) -> None:
    root, summary = refer
    ix = ReferIndex(root, "refcoco")
    image_id = summary["coco"]["image_ids"][0]
    anns = [a for a in ix.anns.values() if a["image_id"] == image_id][:2]
    m = ix.ann_mask([anns[0]["id"], anns[1]["id"]], image_id)
    union = (summary["coco"]["ann_masks"][anns[0]["id"]] > 0) | (summary["coco"]["ann_masks"][anns[1]["id"]] > 0)
    assert np.array_equal(m, union.astype(np.uint8))
    assert ix.ann_mask([anns[0]["id"], -1], image_id).sum() == 0


# ---------------------------------------------------------------- flags


def test_existence_flags() -> None:
    assert sentence_exists({"sent": "x"}) is True
    assert sentence_exists({"is_false_premise": True, "exist": True}) is False
    assert sentence_exists({"is_false_premise": np.bool_(False)}) is True
    assert sentence_exists({"exist": False}) is False
    assert sentence_exists({"exist": 1}) is True
    with pytest.raises(ValueError, match="exist must be a boolean"):
        sentence_exists({"exist": "no"})


def test_queries_carry_fp_and_r_flags(refer) -> None:
    root, _ = refer
    fp = ReferIndex(root, "fprefcoco").queries_by_image("train")
    flat = [q for qs in fp.values() for q in qs]
    false = [q for q in flat if not q.exists]
    assert false and all(q.gt_sentence for q in false)
    assert any(q.exists and q.gt_sentence == "" for q in flat)  # missing gt_sent reads as ""
    r = [q for qs in ReferIndex(root, "R-refcoco").queries_by_image("train").values() for q in qs]
    assert any(not q.exists for q in r) and all(q.gt_sentence == "" for q in r)
    plain = [q for qs in ReferIndex(root, "refcoco").queries_by_image("train").values() for q in qs]
    assert all(q.exists for q in plain)


# ---------------------------------------------------------------- training dataset


@pytest.mark.parametrize(
    "names", ["refclef||refcoco||refcocog", "fprefcoco||fprefcoco+||fprefcocog", "R-refcoco||R-refcocog"]
)
def test_training_samples_are_consistent(refer, names: str) -> None:
    root, summary = refer
    ds = ReferSegDataset(root, SMALL, refer_seg_data=names, num_classes_per_sample=3, samples_per_epoch=50)
    assert len(ds) == 50
    seen_negative = False
    for idx in range(6):
        path, image, clip, convs, masks, shape, exists = ds[idx]
        assert image.shape == (3, 64, 64) and clip.shape == (3, 28, 28)
        assert 1 <= len(convs) <= 3 and len(exists) == len(convs)
        assert sum(c.count("[SEG]") for c in convs) == masks.shape[0] == sum(exists)
        assert masks.dtype == torch.uint8 and tuple(masks.shape[1:]) == shape[1]
        for c, ex in zip(convs, exists):
            ans = _answer(c)
            assert ("[SEG]" in ans) == ex
            if not ex:
                seen_negative = True
                if names.startswith("fp"):
                    assert _matches_some_prefix(ans, CORRECT_ANSWER_TEMPLATE)
                else:
                    assert _matches_some_prefix(ans, NEG_ANSWER_TEMPLATE)
        info = summary["refclef"] if "saiapr" in path else summary["coco"]
        expected = [m for m in info["ann_masks"].values() if m.shape == tuple(masks.shape[1:])]
        for m in masks:  # every returned mask is one of the drawn annotation masks of that image size
            assert any(np.array_equal(m.numpy(), e) for e in expected)
    if not names.startswith("refclef"):
        assert seen_negative


def _matches_some_prefix(answer: str, templates: list[str]) -> bool:
    """True if ``answer`` is one of ``templates`` with its placeholders filled by any text."""
    import re

    for t in templates:
        pattern = re.escape(t).replace(re.escape("{class_name}"), ".+").replace(re.escape("{gt_name}"), ".+")
        if re.fullmatch(pattern, answer):
            return True
    return False


def test_training_answers_lowercase_and_strip(refer) -> None:
    root, _ = refer
    ds = ReferSegDataset(root, SMALL, refer_seg_data="refcoco", num_classes_per_sample=5)
    image_id = ds.image_ids[0][0]
    convs = ds.build(0, image_id, np.random.default_rng(0))[3]
    queries = ds.queries[0][image_id]
    for c in convs:
        ans = _answer(c)
        assert any(_matches_some(ans, SHORT_ANSWER_TEMPLATE, class_name=q.sentence.strip().lower()) for q in queries)
        question = c.split("USER: ", 1)[1].split(" ASSISTANT:")[0]
        assert any(q.sentence.lower() in question for q in queries)
    assert any(q.sentence != q.sentence.lower() for q in queries)  # the fixture has an upper-case sentence here


def test_training_is_deterministic_per_index(refer) -> None:
    root, _ = refer
    ds = ReferSegDataset(root, SMALL, refer_seg_data="refcoco||refcocog", num_classes_per_sample=2, seed=1)
    a, b = ds[3], ds[3]
    assert a[0] == b[0] and a[3] == b[3] and torch.equal(a[4], b[4])


# ---------------------------------------------------------------- errors


def test_missing_dataset_folder(tmp_path) -> None:
    msg = r"refcoco: dataset folder not found: .*refer_seg/refcoco\n.*refs\(unc_exclude_unified\)\.p"
    with pytest.raises(DatasetError, match=msg):
        ReferIndex(tmp_path, "refcoco")


def test_missing_pickle(refer, tmp_path) -> None:
    root, _ = refer
    (tmp_path / "refer_seg" / "refcocog").mkdir(parents=True)
    shutil.copy(root / "refer_seg/refcocog/instances.json", tmp_path / "refer_seg/refcocog/instances.json")
    with pytest.raises(DatasetError, match=r"refcocog: file not found: .*refs\(umd_exclude_unified\)\.p"):
        ReferIndex(tmp_path, "refcocog")


def _copy_dataset(root: Path, tmp: Path, name: str) -> Path:
    shutil.copytree(root / "refer_seg" / name, tmp / "refer_seg" / name)
    (tmp / "refer_seg" / "images" / "mscoco" / "images" / "train2014").mkdir(parents=True, exist_ok=True)
    return tmp / "refer_seg" / name


def test_malformed_pickle(refer, tmp_path) -> None:
    root, _ = refer
    folder = _copy_dataset(root, tmp_path, "refcoco")
    (folder / "refs(unc_exclude_unified).p").write_bytes(b"garbage, not a pickle")
    with pytest.raises(DatasetError, match=r"refcoco: cannot unpickle .*refs\(unc_exclude_unified\)\.p"):
        ReferIndex(tmp_path, "refcoco")


def test_ref_without_sentences_key(refer, tmp_path) -> None:
    root, _ = refer
    folder = _copy_dataset(root, tmp_path, "refcoco")
    refs = pickle.loads((folder / "refs(unc_exclude_unified).p").read_bytes())
    del refs[2]["sentences"]
    (folder / "refs(unc_exclude_unified).p").write_bytes(pickle.dumps(refs))
    with pytest.raises(DatasetError, match=r"malformed ref #2 in .*KeyError: 'sentences'"):
        ReferIndex(tmp_path, "refcoco")


def test_malformed_instances(refer, tmp_path) -> None:
    root, _ = refer
    folder = _copy_dataset(root, tmp_path, "refcoco+")
    (folder / "instances.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"refcoco\+: malformed .*instances\.json"):
        ReferIndex(tmp_path, "refcoco+")


def test_ref_pointing_to_missing_annotation(refer, tmp_path) -> None:
    root, _ = refer
    folder = _copy_dataset(root, tmp_path, "refcoco")
    data = json.loads((folder / "instances.json").read_text())
    refs = pickle.loads((folder / "refs(unc_exclude_unified).p").read_bytes())
    data["annotations"] = [a for a in data["annotations"] if a["id"] != refs[0]["ann_id"]]
    (folder / "instances.json").write_text(json.dumps(data))
    msg = rf"ref {refs[0]['ref_id']} .*annotation\(s\) \[{refs[0]['ann_id']}\] missing"
    with pytest.raises(DatasetError, match=msg):
        ReferIndex(tmp_path, "refcoco")


def test_image_size_mismatch_is_reported(refer, tmp_path) -> None:
    root, _ = refer
    folder = _copy_dataset(root, tmp_path, "refcoco")
    shutil.rmtree(tmp_path / "refer_seg" / "images")
    shutil.copytree(root / "refer_seg" / "images" / "mscoco", tmp_path / "refer_seg" / "images" / "mscoco")
    data = json.loads((folder / "instances.json").read_text())
    data["images"][3]["height"] += 1
    (folder / "instances.json").write_text(json.dumps(data))
    ds = TestReferDataset(tmp_path, SMALL, "refcoco", "val")
    msg = r"refcoco: image .*COCO_train2014_\d{12}\.jpg is \d+x\d+ \(HxW\) but .*instances\.json says"
    with pytest.raises(DatasetError, match=msg):
        ds[0]


def _copy_refcoco_with_images(root: Path, tmp: Path) -> None:
    _copy_dataset(root, tmp, "refcoco")
    shutil.rmtree(tmp / "refer_seg" / "images")
    shutil.copytree(root / "refer_seg" / "images" / "mscoco", tmp / "refer_seg" / "images" / "mscoco")


def _overwrite_with_other_size(path: Path) -> tuple[int, int]:
    """Write a JPEG 7 rows taller and 5 columns wider over ``path``; return the original (H, W)."""
    h, w = cv2.imread(str(path)).shape[:2]
    assert cv2.imwrite(str(path), np.full((h + 7, w + 5, 3), 127, np.uint8))
    return h, w


def test_training_skips_an_image_of_the_wrong_size(refer, tmp_path) -> None:
    root, summary = refer
    _copy_refcoco_with_images(root, tmp_path)
    ds = ReferSegDataset(tmp_path, SMALL, refer_seg_data="refcoco", num_classes_per_sample=2)
    victim = Path(ds[0][0])
    h, w = _overwrite_with_other_size(victim)
    msg = rf"refcoco: image {re.escape(str(victim))} is {h + 7}x{w + 5} \(HxW\) but .*instances\.json says {h}x{w}"
    with pytest.warns(UserWarning, match=msg) as record:
        path, image, clip, convs, masks, shape, exists = ds[0]
    skipped = [r for r in record if "skipping this training image" in str(r.message)]
    assert len(skipped) == ds.skipped_images >= 1 and all(str(victim) in str(r.message) for r in skipped)
    # a well-formed sample of another image
    assert path != str(victim) and Path(path).is_file()
    assert image.shape == (3, 64, 64) and clip.shape == (3, 28, 28)
    assert 1 <= len(convs) == len(exists) <= 2 and sum(c.count("[SEG]") for c in convs) == masks.shape[0] == sum(exists)
    assert masks.dtype == torch.uint8 and tuple(masks.shape[1:]) == shape[1] == cv2.imread(path).shape[:2]
    for m in masks:
        assert any(np.array_equal(m.numpy(), e) for e in summary["coco"]["ann_masks"].values())
    with pytest.warns(UserWarning, match=msg):
        assert ds[0][0] == path  # still a function of (seed, idx)
    # validation and test sets must not skip images: they stop on it, naming the path
    val = TestReferDataset(tmp_path, SMALL, "refcoco", "train")
    fp = FPTestDataset(tmp_path, SMALL, "refcoco", split="train")
    k = [val.index.image_path(i) for i in val.image_ids].index(victim)
    for eval_set in (val, fp):
        with pytest.raises(DatasetError, match=msg):
            eval_set[k]
    with pytest.raises(DatasetError, match=msg):  # building that given image for training raises as well
        ds.build(0, val.image_ids[k], np.random.default_rng(0))


def test_training_redraws_are_bounded(refer, tmp_path, monkeypatch) -> None:
    root, _ = refer
    _copy_refcoco_with_images(root, tmp_path)
    ds = ReferSegDataset(tmp_path, SMALL, refer_seg_data="refcoco")
    for image_id in ds.image_ids[0]:
        _overwrite_with_other_size(ds.indexes[0].image_path(image_id))
    monkeypatch.setattr(refer_module, "MAX_DRAWS", 4)
    with pytest.warns(UserWarning, match="skipping this training image"):
        with pytest.raises(DatasetError, match=r"refer_seg \(refcoco\): no image with the size .* in 4 draws"):
            ds[0]
    assert ds.skipped_images == 4


# ---------------------------------------------------------------- validation / test


def test_refer_val_items(refer) -> None:
    root, summary = refer
    ds = TestReferDataset(root, SMALL, "R-refcoco", "val", mode="val")
    refs = [r for r in summary["datasets"]["R-refcoco"]["refs"] if r["split"] == "val"]
    assert len(ds) == len({r["image_id"] for r in refs})
    out = ds[0]
    assert len(out) == 10
    path, _, _, convs, masks, shape, exists, ref_ids, sent_ids, record = out
    expected_exists = [s["exist"] for r in refs for s in r["sentences"]]
    assert exists == expected_exists and len(convs) == len(exists) == masks.shape[0]
    assert ref_ids == [r["ref_id"] for r in refs for _ in r["sentences"]]
    assert sent_ids == [k for r in refs for k in range(len(r["sentences"]))]
    ann_of = [r["ann_id"] for r in refs for _ in r["sentences"]]
    for m, ex, ann in zip(masks, exists, ann_of):
        expected = summary["coco"]["ann_masks"][ann] if ex else np.zeros(shape[1], np.uint8)
        assert np.array_equal(m.numpy(), expected)
    for c, ex in zip(convs, exists):
        assert c.endswith("</s>") and ("[SEG]" in c) == ex
    assert record == {path: convs}


def test_refer_test_mode_and_template_determinism(refer) -> None:
    root, _ = refer
    a = TestReferDataset(root, SMALL, "refcocog", "test", mode="test", seed=0)
    b = TestReferDataset(root, SMALL, "refcocog", "test", mode="test", seed=0)
    assert len(a) == 2
    assert a[1][3] == b[1][3] and all(c.endswith(" ASSISTANT:") for c in a[1][3])
    lisa = TestReferDataset(root, SMALL, "refcocog", "test", mode="test", question_style="lisa")
    assert all("Please output segmentation mask. ASSISTANT:" in c for c in lisa[0][3])
    with pytest.raises(ValueError, match="question_style"):
        TestReferDataset(root, SMALL, "refcocog", "test", question_style="random")[0]
