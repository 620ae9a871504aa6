"""Synthetic semantic/part segmentation sources in their real on-disk formats (ADE20K, COCO-Stuff, Mapillary,
PACO-LVIS, PASCAL-Part).

Label maps are painted shape by shape (later shapes cover earlier ones). Alongside each raw label the writer keeps
the pixel mask each *query name* must decode to, computed from the shapes themselves (a painted shape removes its
pixels from every earlier class), so tests compare the loaders against what was drawn, not against the PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from dataset.sem_seg import load_ade20k_classes, load_cocostuff_classes
from dataset.synthetic.shapes import COLORS, random_shape, random_size, paint_image, write_image
from utils.io import atomic_path, atomic_write_json

# (raw label value, query name) choices per dense source; ADE raw values are class id + 1 (0 = unlabeled).
ADE_VALUES = (1, 3, 13, 45, 83, 150)  # wall, sky, person, chest of drawers, light, flag
COCOSTUFF_VALUES = (0, 2, 62, 105, 96, 171)  # person, car, chair, clouds, building-other*, wall-brick* (*ignored)
MAPILLARY_LABELS = (
    ("animal--bird", "Bird"),
    ("animal--ground-animal", "Ground Animal"),
    ("construction--barrier--curb", "Curb"),
    ("construction--barrier--fence", "Fence"),
    ("construction--flat--road", "Road"),
    ("nature--sky", "Sky"),
    ("object--vehicle--car", "Car"),
    ("void--unlabeled", "Unlabeled"),
)
PACO_CATEGORIES = (
    "mug_(coffee_cup)", "mug_(coffee_cup):handle", "trash_can", "trash_can:lid", "bowl", "bowl:rim",
    "knife:blade", "knife:handle",
)
PASCAL_PART_CATEGORIES = ("person:hair", "person:torso", "dog:head", "dog:tail", "aeroplane:wing", "bottle:body")


def _paint_label(rng: np.random.Generator, h: int, w: int, background: int, values: list[int]) -> tuple[np.ndarray, dict, list]:
    """Raw uint8 label painted with one random shape per value; returns (label, drawn masks per value, layers)."""
    label = np.full((h, w), background, dtype=np.uint8)
    drawn: dict[int, np.ndarray] = {}
    layers = []
    colors = list(COLORS)
    for k, v in enumerate(values):
        shape = random_shape(rng, h, w).mask(h, w).astype(bool)
        for m in drawn.values():
            m &= ~shape
        drawn[v] = drawn.get(v, np.zeros((h, w), dtype=bool)) | shape
        label[shape] = v
        layers.append((shape, colors[k % len(colors)]))
    return label, {v: m for v, m in drawn.items() if m.any()}, layers


def _write_png(path: Path, label: np.ndarray, palette: bool = False) -> None:
    """8-bit PNG of class ids (optionally palette mode, like Mapillary's labels), written atomically."""
    im = Image.fromarray(label)
    if palette:
        im.putpalette([c for i in range(256) for c in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def _dense_item(image_path: Path, label_path: Path, drawn: dict, names: dict) -> dict:
    return {
        "image": image_path,
        "label": label_path,
        "masks": {names[v]: m.astype(np.uint8) for v, m in drawn.items() if names.get(v) is not None},
    }


def write_ade20k(root: Path, rng: np.random.Generator) -> dict:
    """3 labelled images + 1 fully unlabeled one (never usable: the loader must redraw)."""
    classes = load_ade20k_classes()
    names = {v: classes[v - 1] for v in ADE_VALUES}
    items = []
    for k in range(4):
        stem = f"ADE_train_{k + 1:08d}"
        h, w = random_size(rng)
        values = [int(v) for v in rng.choice(ADE_VALUES, size=3, replace=False)] if k < 3 else []
        label, drawn, layers = _paint_label(rng, h, w, 0, values)
        image_path = root / "ade20k/images/training" / f"{stem}.jpg"
        label_path = root / "ade20k/annotations/training" / f"{stem}.png"
        write_image(image_path, paint_image(rng, h, w, layers))
        label_path.parent.mkdir(parents=True, exist_ok=True)
        _write_png(label_path, label)
        items.append(_dense_item(image_path, label_path, drawn, names))
    return {"items": items, "class_names": classes}


def write_cocostuff(root: Path, rng: np.random.Generator) -> dict:
    """3 images whose labels include ``*-*`` classes (ignored by the loader) and the 255 background."""
    classes = load_cocostuff_classes()
    names = {v: (None if "-" in classes[v] else classes[v]) for v in COCOSTUFF_VALUES}
    items = []
    for k in range(3):
        stem = f"{100001 + k:012d}"
        h, w = random_size(rng)
        values = [int(v) for v in rng.choice(COCOSTUFF_VALUES, size=4, replace=False)]
        label, drawn, layers = _paint_label(rng, h, w, 255, values)
        image_path = root / "coco/train2017" / f"{stem}.jpg"
        label_path = root / "cocostuff/train2017" / f"{stem}.png"
        write_image(image_path, paint_image(rng, h, w, layers))
        label_path.parent.mkdir(parents=True, exist_ok=True)
        _write_png(label_path, label)
        item = _dense_item(image_path, label_path, drawn, names)
        item["ignored"] = sorted(classes[v] for v in drawn if names[v] is None)
        items.append(item)
    return {"items": items, "class_names": classes}


def write_mapillary(root: Path, rng: np.random.Generator) -> dict:
    """A small ``config_v2.0.json`` (last label "Unlabeled" = background) and 3 palette-PNG label maps."""
    config = {
        "labels": [
            {"name": n, "readable": r, "color": [(i * 37) % 256, (i * 91) % 256, (i * 53) % 256],
             "instances": i in (0, 1, 6), "evaluate": r != "Unlabeled"}
            for i, (n, r) in enumerate(MAPILLARY_LABELS)
        ],
        "version": 2.0,
        "mapping": "public",
        "folder_structure": "{split}/{content}/{key:.{22}}.{ext}",
    }
    atomic_write_json(root / "mapillary/config_v2.0.json", config)
    unlabeled = len(MAPILLARY_LABELS) - 1
    names = {i: r.lower() for i, (_, r) in enumerate(MAPILLARY_LABELS[:-1])}
    items = []
    for k in range(3):
        stem = f"map{k:02d}_{int(rng.integers(10**9)):010d}"
        h, w = random_size(rng)
        values = [int(v) for v in rng.choice(unlabeled, size=3, replace=False)]
        label, drawn, layers = _paint_label(rng, h, w, unlabeled, values)
        image_path = root / "mapillary/training/images" / f"{stem}.jpg"
        label_path = root / "mapillary/training/v2.0/labels" / f"{stem}.png"
        write_image(image_path, paint_image(rng, h, w, layers))
        label_path.parent.mkdir(parents=True, exist_ok=True)
        _write_png(label_path, label, palette=True)
        items.append(_dense_item(image_path, label_path, drawn, names))
    return {"items": items, "class_names": [r.lower() for _, r in MAPILLARY_LABELS]}


def _coco_parts(
    rng: np.random.Generator, categories: tuple[str, ...], n_images: int, first_image_id: int,
    file_name: Callable[[int], str],
    image_dir: Path, json_path: Path,
) -> dict:
    """COCO json with polygon annotations (one shape each) plus its images; the last image has no annotation."""
    cats = [{"id": i + 1, "name": n, "supercategory": n.split(":")[0]} for i, n in enumerate(categories)]
    images, anns, items = [], [], []
    ann_id = 1
    for k in range(n_images):
        image_id = first_image_id + k
        h, w = random_size(rng)
        fname = file_name(image_id)
        images.append({"id": image_id, "file_name": fname, "height": h, "width": w})
        n_anns = int(rng.integers(2, 4)) if k < n_images - 1 else 0
        layers, expected = [], {}
        for cat in rng.choice(len(cats), size=n_anns, replace=False):
            shape = random_shape(rng, h, w)
            x0, y0, x1, y1 = shape.outer.x0, shape.outer.y0, shape.outer.x1, shape.outer.y1
            mask = shape.mask(h, w)
            anns.append({
                "id": ann_id, "image_id": image_id, "category_id": int(cat) + 1,
                "segmentation": [shape.coco_polygon()], "area": float(mask.sum()),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "iscrowd": 0,
            })
            expected[ann_id] = {"category": categories[int(cat)], "mask": mask}
            layers.append((mask, list(COLORS)[len(layers) % len(COLORS)]))
            ann_id += 1
        write_image(image_dir / fname, paint_image(rng, h, w, layers))
        items.append({"image": image_dir / fname, "image_id": image_id, "annotations": expected})
    atomic_write_json(json_path, {"images": images, "annotations": anns, "categories": cats})
    return {"items": items, "json": json_path}


def write_paco_lvis(root: Path, rng: np.random.Generator) -> dict:
    return _coco_parts(
        rng, PACO_CATEGORIES, 4, 200001, lambda i: f"train2017/{i:012d}.jpg", root / "coco",
        root / "vlpart/paco/annotations/paco_lvis_v1_train.json",
    )


def write_pascal_part(root: Path, rng: np.random.Generator) -> dict:
    return _coco_parts(
        rng, PASCAL_PART_CATEGORIES, 4, 2008000100, lambda i: f"2008_{i % 10**6:06d}.jpg",
        root / "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages", root / "vlpart/pascal_part/train.json",
    )


def write_sem_seg(root: Path, rng: np.random.Generator) -> dict:
    """Write all five sources under ``root``; return per source ``{"items": [...]}`` with the expected masks.

    Dense items: ``image, label, masks: {query name: uint8 [H,W]}`` (+ ``ignored`` names for COCO-Stuff).
    Part items: ``image, image_id, annotations: {ann_id: {"category": raw name, "mask": uint8 [H,W]}}``.
    """
    root = Path(root)
    return {
        "ade20k": write_ade20k(root, rng),
        "cocostuff": write_cocostuff(root, rng),
        "mapillary": write_mapillary(root, rng),
        "paco_lvis": write_paco_lvis(root, rng),
        "pascal_part": write_pascal_part(root, rng),
    }


def summary_counts(summary: dict) -> dict[str, int]:
    """Images per source (for the command-line summary)."""
    return {name: len(part["items"]) for name, part in summary.items()}

