"""Synthetic refer_seg tree: COCO-style images + instances.json + refs(<split_by>).p for all ten dataset names.

COCO-based datasets share one set of images (as the real RefCOCO family shares COCO train2014) and one
instances.json with polygon annotations (one of them two overlapping polygons, whose overlap decodes to 2), a
compressed-RLE list and an uncompressed iscrowd RLE. refclef has its own images under ``saiapr_tc-12/<dd>/images``
with compressed-RLE segmentations, one of them two overlapping parts. FP-* sentences carry
``is_false_premise``/``gt_sent``; R-* sentences carry ``exist``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from dataset.refer import FP_REFER_DATASETS, REFER_DATASETS, split_by_for
from dataset.synthetic.shapes import COLORS, Shape, ellipse_mask, paint_image, random_shape, random_size, write_image
from utils.io import atomic_write_bytes, atomic_write_json

N_COCO_IMAGES = 6
N_REFCLEF_IMAGES = 5
FALSE_OBJECTS = ("a purple giraffe", "the blue bicycle", "a wooden boat", "the sleeping cat", "a red umbrella")


def _image_splits(name: str) -> list[str]:
    """Split of each COCO image (by position) for a dataset; refs of one image share its split."""
    if name in ("refcocog", "R-refcocog", "fprefcocog"):
        return ["train", "train", "train", "val", "test", "test"]
    return ["train", "train", "train", "val", "testA", "testB"]


def _compressed(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")}


def _uncompressed(mask: np.ndarray) -> dict:
    """COCO iscrowd RLE: column-major run lengths starting with a run of zeros."""
    flat = np.asfortranarray(mask.astype(np.uint8)).reshape(-1, order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def _coco_images(root: Path, rng: np.random.Generator) -> tuple[dict, dict]:
    """Images + annotations shared by every COCO-based dataset; returns (instances, summary)."""
    images, anns, masks, descriptions = [], [], {}, {}
    ann_id = 1000
    colors = list(COLORS)
    for i in range(N_COCO_IMAGES):
        image_id = 581000 + 7 * i
        h, w = random_size(rng)
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        layers, img_anns = [], []
        for k in range(3 if i % 2 == 0 else 2):
            color = colors[(i + 2 * k) % len(colors)]
            ann_id += 1
            if i == 1 and k == 1:  # two overlapping rectangles in one annotation: the overlap decodes to 2
                a, b = random_shape(rng, h, w, "rectangle"), random_shape(rng, h, w, "rectangle")
                seg, mask = [a.coco_polygon(), b.coco_polygon()], a.mask(h, w) + b.mask(h, w)
                desc, iscrowd = f"the {color} pair of boxes", 0
            elif i == 2 and k == 2:  # iscrowd annotation with an uncompressed RLE dict
                mask = ellipse_mask(rng, h, w)
                seg, desc, iscrowd = _uncompressed(mask), f"the {color} ellipse", 1
            elif i == 4 and k == 1:  # a list of compressed RLEs (refclef style) inside COCO instances
                mask = ellipse_mask(rng, h, w)
                seg, desc, iscrowd = [_compressed(mask)], f"the {color} oval", 0
            else:
                shape: Shape = random_shape(rng, h, w)
                seg, mask, desc, iscrowd = [shape.coco_polygon()], shape.mask(h, w), f"the {shape.describe(color)}", 0
            ys, xs = np.nonzero(mask)
            bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
            img_anns.append(
                {"id": ann_id, "image_id": image_id, "category_id": 1 + k, "segmentation": seg,
                 "area": float((mask > 0).sum()), "bbox": bbox, "iscrowd": iscrowd}
            )
            masks[ann_id] = mask.astype(np.uint8)
            descriptions[ann_id] = desc
            layers.append((mask, color))
        write_image(root / "refer_seg/images/mscoco/images/train2014" / file_name, paint_image(rng, h, w, layers))
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        anns.extend(img_anns)
    categories = [{"id": 1, "name": "box"}, {"id": 2, "name": "block"}, {"id": 3, "name": "blob"}]
    instances = {"images": images, "annotations": anns, "categories": categories}
    return instances, {"ann_masks": masks, "descriptions": descriptions}


def _refclef_images(root: Path, rng: np.random.Generator) -> tuple[dict, dict]:
    images, anns, masks, descriptions = [], [], {}, {}
    ann_id = 50
    colors = list(COLORS)
    for i in range(N_REFCLEF_IMAGES):
        image_id = 20000 + 13 * i
        h, w = random_size(rng)
        file_name = f"{i:02d}/images/{image_id}.jpg"
        layers = []
        for k in range(2):
            color = colors[(3 * i + k) % len(colors)]
            ann_id += 1
            if i == 0 and k == 0:  # two overlapping RLE parts: the overlap decodes to 2
                m1, m2 = ellipse_mask(rng, h, w), random_shape(rng, h, w).mask(h, w)
                seg, mask, desc = [_compressed(m1), _compressed(m2)], m1 + m2, f"{color} things"
            else:
                mask = ellipse_mask(rng, h, w) if k == 0 else random_shape(rng, h, w).mask(h, w)
                seg, desc = [_compressed(mask)], f"{color} {'ellipse' if k == 0 else 'block'}"
            anns.append(
                {"id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": seg, "bbox": [0, 0, 1, 1]}
            )
            masks[ann_id] = mask.astype(np.uint8)
            descriptions[ann_id] = desc
            layers.append((mask, color))
        write_image(root / "refer_seg/images/saiapr_tc-12" / file_name, paint_image(rng, h, w, layers))
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
    instances = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    return instances, {"ann_masks": masks, "descriptions": descriptions}


def _sentence(sent_id: int, text: str, **flags: Any) -> dict:
    return {"sent_id": sent_id, "sent": text, "raw": text, "tokens": text.split(), **flags}


def _refs_for(name: str, instances: dict, descriptions: dict, rng: np.random.Generator) -> list[dict]:
    """Refs of one dataset: one ref per annotation, 1-2 sentences each, with the dataset's flags."""
    refs: list[dict] = []
    sent_id, ref_id = 0, 0
    if name == "refclef":
        splits = ["train", "train", "val", "testA", "testB"]
    else:
        splits = _image_splits(name)
    by_image: dict[int, list[dict]] = {}
    for a in instances["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for i, image in enumerate(instances["images"]):
        for k, ann in enumerate(by_image[image["id"]]):
            desc = descriptions[ann["id"]]
            sentences = []
            texts = [desc] if k % 2 else [desc, f"{desc} in the picture "]  # trailing space: answers strip it
            for text in texts:
                flags: dict[str, Any] = {}
                if name in FP_REFER_DATASETS:
                    flags = {"is_false_premise": False}
                    if k == 0:
                        flags["gt_sent"] = text  # true sentences of the first ref carry gt_sent; others omit it
                elif name.startswith("R-"):
                    flags = {"exist": True}
                sentences.append(_sentence(sent_id, text.upper() if k == 1 and i == 0 else text, **flags))
                sent_id += 1
            if name in FP_REFER_DATASETS:
                false = FALSE_OBJECTS[int(rng.integers(len(FALSE_OBJECTS)))]
                sentences.append(_sentence(sent_id, false, is_false_premise=True, gt_sent=desc))
                sent_id += 1
            elif name.startswith("R-"):
                false = FALSE_OBJECTS[int(rng.integers(len(FALSE_OBJECTS)))]
                sentences.append(_sentence(sent_id, false, exist=False))
                sent_id += 1
            split = splits[i]
            if name == "refclef" and i == N_REFCLEF_IMAGES - 1 and k == 1:
                split = "testC"
            refs.append(
                {"ref_id": ref_id, "ann_id": ann["id"], "image_id": image["id"], "category_id": ann["category_id"],
                 "split": split, "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences],
                 "file_name": image["file_name"]}
            )
            ref_id += 1
    return refs


def write_refer(root: Path, rng: np.random.Generator) -> dict:
    """Write ``<root>/refer_seg/...`` for every refer dataset name; return a summary with the expected masks.

    Summary: ``{"coco": {"ann_masks", "descriptions", "image_ids"}, "refclef": {...}, "datasets": {name:
    {"split_by", "refs" (list of ref dicts), "image_splits" {split: sorted image ids}}}}``.
    """
    root = Path(root)
    coco_instances, coco = _coco_images(root, rng)
    clef_instances, clef = _refclef_images(root, rng)
    coco["image_ids"] = [im["id"] for im in coco_instances["images"]]
    clef["image_ids"] = [im["id"] for im in clef_instances["images"]]
    coco["images"] = {im["id"]: im for im in coco_instances["images"]}
    clef["images"] = {im["id"]: im for im in clef_instances["images"]}
    datasets = {}
    for name in REFER_DATASETS:
        instances, info = (clef_instances, clef) if name == "refclef" else (coco_instances, coco)
        refs = _refs_for(name, instances, info["descriptions"], rng)
        folder = root / "refer_seg" / name
        atomic_write_json(folder / "instances.json", instances, indent=0)
        atomic_write_bytes(folder / f"refs({split_by_for(name)}).p", pickle.dumps(refs))
        image_splits: dict[str, set] = {}
        for r in refs:
            image_splits.setdefault(r["split"], set()).add(r["image_id"])
        datasets[name] = {
            "split_by": split_by_for(name),
            "refs": refs,
            "image_splits": {s: sorted(v) for s, v in image_splits.items()},
        }
    return {"coco": coco, "refclef": clef, "datasets": datasets}
