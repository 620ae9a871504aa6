"""ReasonSeg (LISA's LabelMe-style json + SESAME's false-premise triples): reading, mask rasterisation, training set.

On-disk layout: ``<dataset_dir>/reason_seg/<name>/<split>/<stem>.jpg`` with ``<stem>.json`` beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.conversation import render_prompt
from dataset.errors import DatasetError
from dataset.preprocess import ImagePreprocessor, training_item
from dataset.qa_templates import (
    LONG_ANSWER_TEMPLATE,
    LONG_QUESTION_TEMPLATE,
    SHORT_QUESTION_TEMPLATE,
    choose,
    select_items,
)
from model.constants import MASK_IGNORE_VALUE

REASON_TREE = (
    "expected tree: <dataset_dir>/reason_seg/ReasonSeg/{train,val,test}/<stem>.jpg + <stem>.json "
    "(LabelMe json with 'shapes', 'text', 'is_sentence'; training json also 'false_premise_QA')"
)


@dataclass(frozen=True)
class ReasonAnnotation:
    """The fields of one ReasonSeg json that the loaders use."""

    texts: list[str]
    is_sentence: bool
    shapes: list[dict]
    false_premise_qa: Optional[list[tuple[str, bool, str]]]  # (query, query_is_sentence, correction answer)


def _draw_polygon(canvas: np.ndarray, points: np.ndarray, value: int) -> None:
    """Closed outline (thickness 1) plus fill, the way the original painted each LabelMe polygon."""
    cv2.polylines(canvas, [points], True, int(value), 1)
    cv2.fillPoly(canvas, [points], int(value))


def rasterize_reason_mask(shapes: Sequence[dict], height: int, width: int) -> np.ndarray:
    """uint8 [H, W] mask: 1 = target, 255 = ``ignore`` label, 0 = background.

    Shapes labelled ``flag`` are dropped; points are truncated to int32; shapes are painted largest area first
    so smaller ones overwrite. Ties keep the reverse of file order (``argsort`` then reversed, as the original
    did for its small shape lists; a stable sort makes it deterministic for any count).
    """
    kept = [s for s in shapes if str(s["label"]).lower() != "flag"]
    polys = [np.asarray(s["points"], dtype=np.float64).astype(np.int32).reshape(-1, 2) for s in kept]
    areas = []
    for pts in polys:
        canvas = np.zeros((height, width), dtype=np.uint8)
        _draw_polygon(canvas, pts, 1)
        areas.append(int(canvas.sum()))
    order = np.argsort(np.asarray(areas, dtype=np.int64), kind="stable")[::-1]
    mask = np.zeros((height, width), dtype=np.uint8)
    for i in order:
        value = MASK_IGNORE_VALUE if "ignore" in str(kept[i]["label"]).lower() else 1
        _draw_polygon(mask, polys[i], value)
    return mask


def _parse_fp_qa(raw: Any, path: Path, dataset_name: str) -> Optional[list[tuple[str, bool, str]]]:
    if raw is None:
        return None
    triples = []
    for k, item in enumerate(raw if isinstance(raw, list) else [None]):
        if not (isinstance(item, (list, tuple)) and len(item) >= 3 and isinstance(item[0], str)):
            raise DatasetError(
                f"{dataset_name}: malformed 'false_premise_QA' entry {k} in {path}: expected "
                f"[query: str, is_sentence: bool, answer: str], got {item!r}"
            )
        triples.append((item[0], item[1] is True or item[1] == 1, str(item[2])))
    return triples


@lru_cache(maxsize=4096)
def read_reason_annotation(json_path: Path, dataset_name: str = "ReasonSeg") -> ReasonAnnotation:
    """Parse one json (UTF-8, falling back to cp1252 like the original); cached because it is re-read per sample."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise DatasetError(
            f"{dataset_name}: annotation file not found: {json_path} (each .jpg needs a .json beside it)"
        )
    raw_bytes = json_path.read_bytes()
    try:
        try:
            data = json.loads(raw_bytes.decode("utf-8"))
        except UnicodeDecodeError:
            data = json.loads(raw_bytes.decode("cp1252"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{dataset_name}: malformed json {json_path}: {err}") from None
    try:
        shapes = data["shapes"]
        texts = data["text"]
        is_sentence = data["is_sentence"]
        for s in shapes:
            s["label"], s["points"]  # noqa: B018 (presence check)
    except (KeyError, TypeError) as err:
        raise DatasetError(
            f"{dataset_name}: malformed annotation {json_path}: missing key {err}; expected 'shapes' (each with "
            "'label' and 'points'), 'text' and 'is_sentence'"
        ) from None
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise DatasetError(f"{dataset_name}: annotation {json_path} has an empty 'text' list")
    return ReasonAnnotation(
        texts=[str(t) for t in texts],
        is_sentence=bool(is_sentence),
        shapes=shapes,
        false_premise_qa=_parse_fp_qa(data.get("false_premise_QA"), json_path, dataset_name),
    )


def parse_reason_data(spec: str) -> tuple[str, list[str]]:
    """``"ReasonSeg|train_val"`` -> ("ReasonSeg", ["train", "val"])."""
    if "|" not in spec:
        raise ValueError(f"--reason_seg_data must look like 'ReasonSeg|train' (name|split[_split...]), got {spec!r}")
    name, splits = spec.split("|", 1)
    return name, [s for s in splits.split("_") if s]


def list_reason_images(dataset_dir: Path, name: str, splits: Sequence[str]) -> list[Path]:
    """Sorted ``*.jpg`` of every split (sorted so item order never depends on the filesystem)."""
    out: list[Path] = []
    for split in splits:
        folder = Path(dataset_dir) / "reason_seg" / name / split
        if not folder.is_dir():
            raise DatasetError(f"ReasonSeg: folder not found: {folder}\n{REASON_TREE}")
        jpgs = sorted(folder.glob("*.jpg"))
        if not jpgs:
            raise DatasetError(f"ReasonSeg: no .jpg images in {folder}\n{REASON_TREE}")
        out.extend(jpgs)
    return out


def json_for(image_path: Path) -> Path:
    """Sibling annotation path (stem-based, so directory names containing '.jpg' are harmless)."""
    return image_path.with_suffix(".json")


class ReasonSegDataset(Dataset):
    """Training ReasonSeg: true-premise segmentation (0.85) or false-premise correction (0.15) conversations.

    An item is the training 7-tuple. In true-premise mode it has k conversations (k sampled query texts, each
    answered with one ``[SEG]``) and k copies of the target mask (ignore pixels count as background). In
    false-premise mode it has one conversation per used ``false_premise_QA`` triple, answered with its
    correction text, no mask and ``exists`` False for each. Images without triples always use true premise.
    """

    def __init__(
        self,
        dataset_dir: "str | Path",
        preprocessor: Optional[ImagePreprocessor] = None,
        reason_seg_data: str = "ReasonSeg|train",
        num_classes_per_sample: int = 1,
        template: str = "llava_v1",
        fp_probability: float = 0.15,
        samples_per_epoch: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        self.dataset_dir = Path(dataset_dir)
        self.preprocessor = preprocessor or ImagePreprocessor()
        self.name, self.splits = parse_reason_data(reason_seg_data)
        self.images = list_reason_images(self.dataset_dir, self.name, self.splits)
        for img in self.images:  # fail now (not mid-training) on a missing or broken json
            read_reason_annotation(json_for(img), self.name)
        self.num_classes_per_sample = num_classes_per_sample
        self.fp_probability = fp_probability
        self.template = template
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed

    def __len__(self) -> int:
        return self.samples_per_epoch if self.samples_per_epoch is not None else len(self.images)

    def __getitem__(self, idx: int) -> tuple:
        return self.sample(np.random.default_rng([self.seed, idx]))

    def sample(self, rng: np.random.Generator) -> tuple:
        """Draw an image uniformly and build its sample with ``rng`` only."""
        return self.build(int(rng.integers(len(self.images))), rng)

    def build(self, image_index: int, rng: np.random.Generator) -> tuple:
        image_path = self.images[image_index]
        ann = read_reason_annotation(json_for(image_path), self.name)
        prepared = self.preprocessor.load(image_path, self.name)
        h, w = prepared.original_size

        false_premise = rng.random() < self.fp_probability and bool(ann.false_premise_qa)
        chosen = select_items(rng, list(range(len(ann.texts))), self.num_classes_per_sample)
        turns: list[tuple[str, str]] = []
        if false_premise:
            triples = select_items(rng, ann.false_premise_qa, self.num_classes_per_sample)[: len(chosen)]
            for query, query_is_sentence, answer in triples:
                if query_is_sentence:
                    question = choose(rng, LONG_QUESTION_TEMPLATE).format(sent=query)
                else:
                    question = choose(rng, SHORT_QUESTION_TEMPLATE).format(class_name=query)
                turns.append((question, answer))
            masks = torch.zeros((0, h, w), dtype=torch.float32)
            exists = [False] * len(turns)
        else:
            for i in chosen:
                text = ann.texts[i]
                if ann.is_sentence:
                    question = choose(rng, LONG_QUESTION_TEMPLATE).format(sent=text)
                else:
                    question = choose(rng, SHORT_QUESTION_TEMPLATE).format(class_name=text.lower())
                turns.append((question, choose(rng, LONG_ANSWER_TEMPLATE)))
            mask = rasterize_reason_mask(ann.shapes, h, w) == 1
            masks = torch.from_numpy(mask).float().unsqueeze(0).repeat(len(turns), 1, 1)
            exists = [True] * len(turns)
        conversations = [render_prompt([t], self.template) for t in turns]
        return training_item(image_path, prepared, conversations, masks, exists)
