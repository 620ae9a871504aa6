"""Synthetic ReasonSeg: ``reason_seg/ReasonSeg/{train,val,test}/<stem>.jpg + <stem>.json`` (LabelMe-style).

Every image has a large target, an ``ignore`` region partly over it, a small target inside the ignore region, a
``flag`` shape (dropped by the loader) and fractional point coordinates (truncated by the loader). The expected
mask is computed here from the pixel sets alone: shapes in decreasing area, later ones overwrite, ``ignore`` = 255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dataset.synthetic.shapes import Box, Shape, paint_image, random_shape, random_size, write_image
from utils.io import atomic_write_json

SPLITS = {"train": 4, "val": 3, "test": 3}
# The targets are the big red shape and the small blue box, so every query describes exactly those two.
SHORT_TEXTS = ("the red shape and the blue box", "the red and blue regions", "the coloured blocks", "the red and the blue parts")
LONG_TEXTS = (
    "Which parts of the picture would you cover if you had to paint over everything red or blue?",
    "Which coloured objects stand out from the noisy background of this image?",
    "If the noisy background is the floor, which things are lying on it?",
)
FP_SHORT = ("a flying saucer", "the orange cat", "a snowman")
FP_LONG = ("Where is the umbrella that keeps the dog dry?", "Which bird is sitting on the roof?")


def _inner_box(outer: Box, rng: np.random.Generator) -> Box:
    """A box strictly inside ``outer`` (so it is smaller and painted later)."""
    w, h = outer.x1 - outer.x0, outer.y1 - outer.y0
    bw, bh = max(2, w // 3), max(2, h // 3)
    x0 = outer.x0 + int(rng.integers(1, max(2, w - bw)))
    y0 = outer.y0 + int(rng.integers(1, max(2, h - bh)))
    return Box(x0, y0, min(x0 + bw, outer.x1 - 1), min(y0 + bh, outer.y1 - 1))


def _shape_record(label: str, shape: Shape, rng: np.random.Generator, stem: str) -> dict:
    return {
        "label": label,
        "labels": [label],
        "shape_type": "polygon",
        "points": shape.labelme_points(rng),
        "image_name": f"{stem}.jpg",
        "group_id": None,
        "group_ids": [],
        "flags": {},
    }


def _fp_triples(rng: np.random.Generator, n: int) -> list[list]:
    out = []
    for k in range(n):
        if k % 2:
            q = FP_LONG[int(rng.integers(len(FP_LONG)))]
            out.append([q, True, "There is no such object here; the image only shows coloured blocks."])
        else:
            q = FP_SHORT[int(rng.integers(len(FP_SHORT)))]
            out.append([q, False, f"I cannot find {q} in the image, but there is a red block."])
    return out


def _one_image(folder: Path, stem: str, rng: np.random.Generator, is_sentence: bool, fp_count: int | None) -> dict:
    h, w = random_size(rng)
    big = random_shape(rng, h, w, "l-shape" if rng.random() < 0.5 else "rectangle")
    ob = big.outer
    # ignore region: the lower-right part of the big target plus some background
    ign = Shape("rectangle", Box((ob.x0 + ob.x1) // 2, (ob.y0 + ob.y1) // 2, min(w, ob.x1 + 6), min(h, ob.y1 + 6)))
    small = Shape("rectangle", _inner_box(ign.outer, rng))
    flag = Shape("rectangle", Box(0, 0, w, h))
    shapes = [("target", big), ("Ignore", ign), ("target", small), ("flag", flag)]

    expected = np.zeros((h, w), dtype=np.uint8)
    drawn = [(lab, s) for lab, s in shapes if lab.lower() != "flag"]
    areas = [int(s.mask(h, w).sum()) for _, s in drawn]
    for i in sorted(range(len(drawn)), key=lambda i: (-areas[i], -i)):  # area desc; ties: later first
        lab, s = drawn[i]
        expected[s.mask(h, w).astype(bool)] = 255 if "ignore" in lab.lower() else 1

    n_texts = int(rng.integers(1, 4))
    pool = LONG_TEXTS if is_sentence else SHORT_TEXTS
    texts = [pool[(k + int(rng.integers(len(pool)))) % len(pool)] for k in range(n_texts)]
    record = {
        "text": texts,
        "is_sentence": is_sentence,
        "shapes": [_shape_record(lab, s, rng, stem) for lab, s in shapes],
    }
    if fp_count is not None:
        record["false_premise_QA"] = _fp_triples(rng, fp_count)
    layers = [(big.mask(h, w), "red"), (ign.mask(h, w), "white"), (small.mask(h, w), "blue")]
    image_path = folder / f"{stem}.jpg"
    write_image(image_path, paint_image(rng, h, w, layers))
    atomic_write_json(folder / f"{stem}.json", record)
    return {
        "image": image_path,
        "mask": expected,
        "texts": texts,
        "is_sentence": is_sentence,
        "false_premise_QA": record.get("false_premise_QA"),
    }


def write_reason_seg(root: Path, rng: np.random.Generator) -> dict:
    """Write ``<root>/reason_seg/ReasonSeg/{train,val,test}``; return ``{"splits": {split: [per-image dict sorted by
    path]}, "counts": {split: n}}`` where each dict has ``image, mask (expected uint8), texts, is_sentence,
    false_premise_QA``. Training images always carry at least as many false-premise triples as texts; in val/test
    the last image has none (the key is absent)."""
    root = Path(root)
    out: dict = {"splits": {}, "counts": {}}
    for split, n in SPLITS.items():
        folder = root / "reason_seg" / "ReasonSeg" / split
        folder.mkdir(parents=True, exist_ok=True)
        items = []
        for k in range(n):
            stem = f"{split}_{int(rng.integers(10**6, 10**7))}_{k}"
            is_sentence = k % 2 == 1
            if split == "train":
                fp_count = 3
            else:
                fp_count = None if k == n - 1 else 1 + k % 2
            items.append(_one_image(folder, stem, rng, is_sentence, fp_count))
        out["splits"][split] = sorted(items, key=lambda d: str(d["image"]))
        out["counts"][split] = n
    return out
