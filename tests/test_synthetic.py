"""Synthetic dataset writer and its command: formats on disk, determinism by seed, CLI behaviour."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from dataset.synthetic.writer import count_files, write_synthetic_dataset
from scripts.make_synthetic_data import main as make_synthetic_main


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path: Path, synthetic_root: Path) -> None:
    write_synthetic_dataset(tmp_path / "a", seed=0)
    again = _digests(tmp_path / "a")
    assert again == _digests(synthetic_root)  # the session fixture also used seed 0
    write_synthetic_dataset(tmp_path / "b", seed=1)
    other = _digests(tmp_path / "b")
    changed = [k for k in again if other.get(k) != again[k]]
    assert len(changed) > len(again) // 2


def test_every_source_in_its_real_layout(synthetic_root: Path) -> None:
    r = synthetic_root
    expected_files = [
        "mapillary/config_v2.0.json", "vlpart/paco/annotations/paco_lvis_v1_train.json", "vlpart/pascal_part/train.json",
        "llava_dataset/llava_instruct_150k.json", "refer_seg/refclef/refs(unc).p", "refer_seg/refcoco/instances.json",
        "refer_seg/refcocog/refs(umd_exclude_unified).p", "refer_seg/fprefcoco/refs(berkeley_exclude_unified).p",
    ]
    for rel in expected_files:
        assert (r / rel).is_file(), rel
    for split in ("train", "val", "test"):
        assert list((r / "reason_seg/ReasonSeg" / split).glob("*.jpg"))
    ade = sorted((r / "ade20k/images/training").glob("*.jpg"))
    assert ade and all((r / "ade20k/annotations/training" / (p.stem + ".png")).is_file() for p in ade)
    stuff = sorted((r / "cocostuff/train2017").glob("*.png"))
    assert stuff and all((r / "coco/train2017" / (p.stem + ".jpg")).is_file() for p in stuff)
    labels = sorted((r / "mapillary/training/v2.0/labels").glob("*.png"))
    assert labels and all((r / "mapillary/training/images" / (p.stem + ".jpg")).is_file() for p in labels)
    for p in labels:
        with Image.open(p) as im:
            assert im.mode == "P"  # Mapillary ships palette PNGs: values are indices, not colours
    for p in [*ade, *stuff]:
        assert p.suffix == ".jpg" or Image.open(p).mode == "L"
    for p in r.rglob("*.jpg"):
        assert cv2.imread(str(p)) is not None, p
    paco = json.loads((r / "vlpart/paco/annotations/paco_lvis_v1_train.json").read_text())
    for im in paco["images"]:
        assert im["file_name"].startswith("train2017/") and (r / "coco" / im["file_name"]).is_file()
        h, w = cv2.imread(str(r / "coco" / im["file_name"])).shape[:2]
        assert (im["height"], im["width"]) == (h, w)
    assert any(":" in c["name"] and "_(" in c["name"] for c in paco["categories"])
    part = json.loads((r / "vlpart/pascal_part/train.json").read_text())
    assert all(c["name"].count(":") == 1 for c in part["categories"])
    for im in part["images"]:
        assert (r / "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages" / im["file_name"]).is_file()
    vqa = json.loads((r / "llava_dataset/llava_instruct_150k.json").read_text())
    for rec in vqa:
        assert set(rec) == {"id", "image", "conversations"} and (r / "coco/train2017" / rec["image"]).is_file()
        assert sum("<image>" in m["value"] for m in rec["conversations"]) == 1
    refs = pickle.loads((r / "refer_seg/refcoco/refs(unc_exclude_unified).p").read_bytes())
    assert refs and {"ref_id", "ann_id", "image_id", "split", "sentences"} <= set(refs[0])


def test_mask_sizes_equal_image_sizes(synthetic_dataset: dict) -> None:
    for name in ("ade20k", "cocostuff", "mapillary"):
        for item in synthetic_dataset["sem_seg"][name]["items"]:
            h, w = cv2.imread(str(item["image"])).shape[:2]
            assert np.array(Image.open(item["label"])).shape == (h, w)
            assert all(m.shape == (h, w) for m in item["masks"].values())


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert make_synthetic_main(["--out", str(tmp_path / "x"), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    counts = count_files(tmp_path / "x")
    assert f"(seed 3)" in printed and f"total" in printed and str(sum(counts.values())) in printed
    for name in ("ade20k", "refer_seg", "reason_seg", "llava_dataset", "vlpart", "mapillary", "cocostuff", "coco"):
        assert name in counts and f"{name}/" in printed
    assert make_synthetic_main(["--out", str(tmp_path / "x")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        make_synthetic_main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--out" in help_text and "--seed" in help_text and "byte-identical" in help_text
