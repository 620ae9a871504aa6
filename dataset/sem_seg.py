"""Semantic and part segmentation training sources: ADE20K, COCO-Stuff, Mapillary Vistas, PACO-LVIS, PASCAL-Part.

Every sample is one image and up to ``num_classes_per_sample`` single-turn conversations about classes (or object
parts) that are present in it (true premise, answered with ``[SEG]`` and a mask), or about classes that are absent
(denial, or a correction naming a present class; no ``[SEG]``, no mask). Dense sources read one label PNG per image
(pixel value = class id); part sources read COCO-format json with one mask per annotation.

Deliberate differences from the original (data.md §8): class files are found next to this module (not via the
working directory); paths are joined from stems (never string-replaced in the whole path); ignored classes
(COCO-Stuff ``*-*`` classes, Mapillary ``unlabeled``) are never used as queries, neither as positives nor as
"absent" negatives; a denial/correction sample never indexes past the available negatives; empty-mask tensors have
the shape (0, H, W) and every mask is uint8. A drawn image whose label/annotation size differs from the image is
skipped with a warning and redrawn (like an undecodable mask, at most :data:`MAX_DRAWS` draws) instead of stopping
training; :meth:`SemSegDataset.build` on one given draw still raises :class:`DatasetError` for it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dataset.conversation import render_prompt
from dataset.errors import DatasetError, require_path
from dataset.preprocess import ImagePreprocessor, PreparedImage, training_item
from dataset.qa_templates import (
    CORRECT_ANSWER_TEMPLATE,
    NEG_ANSWER_TEMPLATE,
    SHORT_ANSWER_TEMPLATE,
    SHORT_QUESTION_TEMPLATE,
    choose,
    select_items,
)
from model.constants import MASK_IGNORE_VALUE

CLASSES_DIR = Path(__file__).resolve().parent / "classes"
SEM_SEG_SOURCES: tuple[str, ...] = ("ade20k", "cocostuff", "mapillary", "paco_lvis", "pascal_part")
DEFAULT_SEM_SEG_DATA = "ade20k||cocostuff||pascal_part||paco_lvis||mapillary"

# Mode of a sample (data.md §4.3 / §5.1): the question is about a present class, or about an absent one.
TRUE_PREMISE, DENIAL, CORRECTION = "true_premise", "denial", "correction"
SEM_SEG_MODES: tuple[str, ...] = (TRUE_PREMISE, DENIAL, CORRECTION)
SEM_SEG_MODE_PROBS: tuple[float, ...] = (0.85, 0.07, 0.08)

# Images without any usable class, with an undecodable mask or with a label/image size mismatch are redrawn; this
# bounds the loop (original: unbounded recursion).
MAX_DRAWS = 100

SEM_SEG_TREE = """\
<dataset_dir>/
├── ade20k/images/training/*.jpg  +  ade20k/annotations/training/<same stem>.png
├── cocostuff/train2017/<12 digits>.png  +  coco/train2017/<same stem>.jpg
├── mapillary/config_v2.0.json, mapillary/training/v2.0/labels/*.png, mapillary/training/images/<same stem>.jpg
├── vlpart/paco/annotations/paco_lvis_v1_train.json  (images: coco/<file_name>, file_name = train2017/<id>.jpg)
└── vlpart/pascal_part/train.json  (images: vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/<file_name>)"""

PathLike = Union[str, Path]


# ----------------------------------------------------------------------------------------------- class names


@lru_cache(maxsize=None)
def load_ade20k_classes() -> tuple[str, ...]:
    """The 150 ADE20K SceneParsing names; index = label value after :func:`remap_ade20k_label`."""
    path = CLASSES_DIR / "ade20k_classes.json"
    names = json.loads(path.read_text(encoding="utf-8"))
    if len(names) != 150 or len(set(names)) != 150:
        raise DatasetError(f"ade20k: {path} must list 150 unique class names, found {len(names)}")
    return tuple(names)


@lru_cache(maxsize=None)
def load_cocostuff_classes() -> tuple[str, ...]:
    """The 182 COCO-Stuff names; index i = label value i (line ``0: unlabeled`` is skipped)."""
    path = CLASSES_DIR / "cocostuff_classes.txt"
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    names = [ln.rsplit(": ", 1)[-1] for ln in lines[1:]]
    if len(names) != 182:
        raise DatasetError(f"cocostuff: {path} must have 183 lines '<id>: <name>' (0 = unlabeled), found {len(lines)}")
    return tuple(names)


def remap_ade20k_label(label: np.ndarray) -> np.ndarray:
    """ADE20K PNG (0 = unlabeled, 1..150) -> class ids 0..149 with 255 = ignore (0->255, -1, 254->255 in uint8)."""
    out = label.astype(np.uint8, copy=True)
    out[out == 0] = 255
    out = out - np.uint8(1)
    out[out == 254] = 255
    return out


def cocostuff_ignored_ids(names: Sequence[str]) -> np.ndarray:
    """Class ids whose name contains ``-`` (e.g. ``wall-brick``); the original turns their pixels into 255."""
    return np.array([i for i, n in enumerate(names) if "-" in n], dtype=np.int64)


def remap_cocostuff_label(label: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """COCO-Stuff PNG (0..181, 255) with every ``*-*`` class set to 255 (vectorised lookup table)."""
    lut = np.arange(256, dtype=np.uint8)
    lut[cocostuff_ignored_ids(names)] = MASK_IGNORE_VALUE
    return lut[label]


def keep_label(label: np.ndarray) -> np.ndarray:
    """Mapillary pixel values are class ids already (a named function so datasets stay picklable)."""
    return label


def load_mapillary_classes(config_path: Path) -> tuple[str, ...]:
    """``label["readable"].lower()`` of every entry of ``config_v2.0.json``'s ``labels`` (index = class id)."""
    try:
        labels = json.loads(Path(config_path).read_text(encoding="utf-8"))["labels"]
        return tuple(str(lab["readable"]).lower() for lab in labels)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DatasetError(
            f"mapillary: malformed {config_path}: {err!r}; expected {{\"labels\": [{{\"readable\": \"Car\", ...}}, ...]}}"
        ) from None


def parse_part_category(name: str) -> Union[str, tuple[str, str]]:
    """PACO/PASCAL-Part category name: ``obj`` -> "obj", ``obj:part`` -> (obj, part); ``_(...)`` suffixes dropped.

    Underscores stay (``mug_(coffee_cup):handle`` -> ("mug", "handle"), ``trash_can`` -> "trash_can").
    """
    parts = name.strip().split(":")
    if len(parts) == 1:
        return parts[0].split("_(")[0]
    if len(parts) == 2:
        return parts[0].split("_(")[0], parts[1].split("_(")[0]
    raise ValueError(f"category name {name!r} has more than one ':'")


def part_query_name(category: Union[str, tuple[str, str]], rng: np.random.Generator) -> str:
    """Query text of a category: an object name, or "<obj> <part>" / "the <part> of the <obj>" with p = 0.5 each."""
    if isinstance(category, tuple):
        obj, part = category
        return f"{obj} {part}" if rng.random() < 0.5 else f"the {part} of the {obj}"
    return category


# ----------------------------------------------------------------------------------------------- sources


@dataclass
class SegDraw:
    """One drawn image with its sampled present and absent classes (names already in query form)."""

    image_path: Path
    positives: list[str]  # sampled present classes/parts, in sample order
    negatives: list[str]  # sampled absent classes (may be fewer than positives)
    masks: np.ndarray  # uint8 [k, H, W]; masks[i] belongs to positives[i]


def _image_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def _check_pairs(source: str, images: Sequence[Path], what: str) -> None:
    """Fail at construction when annotation files lack their image (one message, the first few paths)."""
    have: dict[Path, set[str]] = {}
    missing = []
    for p in images:
        if p.name not in have.setdefault(p.parent, _image_names(p.parent)):
            missing.append(str(p))
    if missing:
        shown = "\n  ".join(missing[:5])
        raise DatasetError(
            f"{source}: {len(missing)} {what} missing, e.g.\n  {shown}\nexpected tree:\n{SEM_SEG_TREE}"
        )


class DenseLabelSource:
    """A source with one label PNG per image: pixel value = class id after ``remap``, 255 = ignore."""

    def __init__(
        self,
        name: str,
        image_paths: Sequence[Path],
        label_paths: Sequence[Path],
        class_names: Sequence[str],
        remap: Callable[[np.ndarray], np.ndarray],
        query_ids: Sequence[int],
    ) -> None:
        if not label_paths:
            raise DatasetError(f"{name}: no label images found\nexpected tree:\n{SEM_SEG_TREE}")
        self.name = name
        self.image_paths = list(image_paths)
        self.label_paths = list(label_paths)
        self.class_names = tuple(class_names)
        self.remap = remap
        self.query_ids = np.asarray(sorted(query_ids), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.label_paths)

    def load_label(self, item: int) -> np.ndarray:
        """Remapped uint8 [H, W] label of one image (read with PIL, so palette PNGs give their indices)."""
        path = self.label_paths[item]
        try:
            with Image.open(path) as im:
                raw = np.array(im)
        except OSError as err:
            raise DatasetError(f"{self.name}: cannot read label image {path}: {err}") from None
        if raw.ndim != 2 or raw.dtype != np.uint8:
            raise DatasetError(
                f"{self.name}: label {path} must be a single-channel 8-bit PNG of class ids, got "
                f"dtype {raw.dtype} shape {raw.shape}"
            )
        label = self.remap(raw)
        bad = (label != MASK_IGNORE_VALUE) & (label >= len(self.class_names))
        if bad.any():
            raise DatasetError(
                f"{self.name}: label {path} has class id {int(label[bad].max())} but only "
                f"{len(self.class_names)} classes are known"
            )
        return label

    def draw(self, rng: np.random.Generator, n: int, item: Optional[int] = None) -> Optional[SegDraw]:
        """Sample up to ``n`` present and ``n`` absent classes of one image; None if nothing usable is present."""
        item = int(rng.integers(len(self))) if item is None else item
        label = self.load_label(item)
        present = np.unique(label)
        present = present[np.isin(present, self.query_ids)]
        if present.size == 0:
            return None
        absent = np.setdiff1d(self.query_ids, present)
        pos = select_items(rng, [int(c) for c in present], n)
        neg = select_items(rng, [int(c) for c in absent], n)
        masks = (label[None] == np.asarray(pos, dtype=np.uint8)[:, None, None]).astype(np.uint8)
        return SegDraw(
            self.image_paths[item],
            [self.class_names[c] for c in pos],
            [self.class_names[c] for c in neg],
            masks,
        )


class CocoPartSource:
    """A COCO-format source (PACO-LVIS, PASCAL-Part): one mask per annotation, names parsed by category."""

    def __init__(self, name: str, json_path: Path, image_dir: Path, require_parts: bool) -> None:
        from pycocotools.coco import COCO

        require_path(json_path, name, hint=f"expected tree:\n{SEM_SEG_TREE}")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
                self.coco = COCO(str(json_path))
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as err:
            raise DatasetError(f"{name}: cannot read COCO annotations {json_path}: {err!r}") from None
        self.name = name
        self.json_path = Path(json_path)
        self.image_dir = Path(image_dir)
        self.categories: dict[int, Union[str, tuple[str, str]]] = {}
        for cat in self.coco.loadCats(self.coco.getCatIds()):
            try:
                parsed = parse_part_category(cat["name"])
            except ValueError as err:
                raise DatasetError(f"{name}: {json_path}: {err}") from None
            if require_parts and not isinstance(parsed, tuple):
                raise DatasetError(
                    f"{name}: {json_path}: category {cat['id']} is named {cat['name']!r}; every category must be "
                    "'<object>:<part>'"
                )
            self.categories[int(cat["id"])] = parsed
        self.category_ids = np.asarray(sorted(self.categories), dtype=np.int64)
        # Images without annotations are never usable (the original redrew them); keep the others, sorted.
        self.image_ids = sorted(i for i in self.coco.getImgIds() if self.coco.imgToAnns.get(i))
        if not self.image_ids:
            raise DatasetError(f"{name}: {json_path} has no image with annotations")
        _check_pairs(name, [self.image_path(i) for i in self.image_ids], "images")

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def image_size(self, image_id: int) -> tuple[int, int]:
        info = self.coco.imgs[image_id]
        return int(info["height"]), int(info["width"])

    def draw(self, rng: np.random.Generator, n: int, item: Optional[int] = None) -> Optional[SegDraw]:
        """Sample up to ``n`` annotations and ``n`` absent categories of one image; None if a mask cannot be decoded."""
        item = int(rng.integers(len(self))) if item is None else item
        image_id = self.image_ids[item]
        anns = self.coco.imgToAnns[image_id]
        present = np.unique([int(a["category_id"]) for a in anns])
        absent = np.setdiff1d(self.category_ids, present)
        pos = select_items(rng, anns, n)
        neg = select_items(rng, [int(c) for c in absent], n)
        masks = []
        for ann in pos:
            try:
                masks.append(self.coco.annToMask(ann).astype(np.uint8))
            except Exception as err:  # noqa: BLE001 - pycocotools raises assorted types on bad segmentations
                warnings.warn(f"{self.name}: skipping image {image_id}, annotation {ann.get('id')} does not decode: {err!r}")
                return None
        return SegDraw(
            self.image_path(image_id),
            [part_query_name(self.categories[int(a["category_id"])], rng) for a in pos],
            [part_query_name(self.categories[c], rng) for c in neg],
            np.stack(masks),
        )


SegSource = Union[DenseLabelSource, CocoPartSource]


def build_ade20k(dataset_dir: Path) -> DenseLabelSource:
    image_dir = require_path(dataset_dir / "ade20k/images/training", "ade20k", "dir", f"expected tree:\n{SEM_SEG_TREE}")
    label_dir = require_path(dataset_dir / "ade20k/annotations/training", "ade20k", "dir", f"expected tree:\n{SEM_SEG_TREE}")
    images = sorted(p for p in Path(image_dir).iterdir() if p.name.endswith(".jpg"))
    labels = [Path(label_dir) / (p.stem + ".png") for p in images]
    _check_pairs("ade20k", labels, "annotation PNGs")
    names = load_ade20k_classes()
    return DenseLabelSource("ade20k", images, labels, names, remap_ade20k_label, range(len(names)))


def build_cocostuff(dataset_dir: Path) -> DenseLabelSource:
    hint = f"expected tree:\n{SEM_SEG_TREE}"
    label_dir = Path(require_path(dataset_dir / "cocostuff/train2017", "cocostuff", "dir", hint))
    require_path(dataset_dir / "coco/train2017", "cocostuff", "dir", hint)
    labels = sorted(label_dir.glob("*.png"))
    images = [dataset_dir / "coco/train2017" / (p.stem + ".jpg") for p in labels]
    _check_pairs("cocostuff", images, "images")
    names = load_cocostuff_classes()
    ignored = set(cocostuff_ignored_ids(names).tolist())
    return DenseLabelSource(
        "cocostuff", images, labels, names, functools.partial(remap_cocostuff_label, names=names),
        [i for i in range(len(names)) if i not in ignored],
    )


def build_mapillary(dataset_dir: Path) -> DenseLabelSource:
    hint = f"expected tree:\n{SEM_SEG_TREE}"
    config = Path(require_path(dataset_dir / "mapillary/config_v2.0.json", "mapillary", "file", hint))
    label_dir = Path(require_path(dataset_dir / "mapillary/training/v2.0/labels", "mapillary", "dir", hint))
    names = load_mapillary_classes(config)
    labels = sorted(label_dir.glob("*.png"))
    images = [dataset_dir / "mapillary/training/images" / (p.stem + ".jpg") for p in labels]
    _check_pairs("mapillary", images, "images")
    return DenseLabelSource(
        "mapillary", images, labels, names, keep_label, [i for i, n in enumerate(names) if n != "unlabeled"]
    )


def build_paco_lvis(dataset_dir: Path) -> CocoPartSource:
    return CocoPartSource(
        "paco_lvis", dataset_dir / "vlpart/paco/annotations/paco_lvis_v1_train.json", dataset_dir / "coco", False
    )


def build_pascal_part(dataset_dir: Path) -> CocoPartSource:
    return CocoPartSource(
        "pascal_part",
        dataset_dir / "vlpart/pascal_part/train.json",
        dataset_dir / "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages",
        True,
    )


SOURCE_BUILDERS: dict[str, Callable[[Path], SegSource]] = {
    "ade20k": build_ade20k,
    "cocostuff": build_cocostuff,
    "mapillary": build_mapillary,
    "paco_lvis": build_paco_lvis,
    "pascal_part": build_pascal_part,
}


def parse_sem_seg_data(sem_seg_data: str, flag: str = "--sem_seg_data") -> list[str]:
    """Split ``a||b||c`` and check every name has a loader (``partimagenet`` has none: one clear error)."""
    names = [n for n in sem_seg_data.split("||") if n]
    if not names:
        raise ValueError(f"{flag} names no source: {sem_seg_data!r}; expected some of {'||'.join(SEM_SEG_SOURCES)}")
    unknown = [n for n in names if n not in SOURCE_BUILDERS]
    if unknown:
        raise ValueError(
            f"{flag}: unknown semantic-segmentation source(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(SEM_SEG_SOURCES)} (partimagenet has no loader)"
        )
    return names


# ----------------------------------------------------------------------------------------------- dataset


def size_mismatch(source: str, draw: SegDraw, prepared: PreparedImage) -> Optional[str]:
    """None if the draw's masks have the decoded image's size, else a message naming the path and both sizes."""
    h, w = int(draw.masks.shape[1]), int(draw.masks.shape[2])
    if (h, w) == tuple(prepared.original_size):
        return None
    return (
        f"{source}: annotation of {draw.image_path} is {h}x{w} (HxW) but the image is "
        f"{prepared.original_size[0]}x{prepared.original_size[1]}"
    )


class SemSegDataset(Dataset):
    """Training semantic/part segmentation over the ``||``-separated sources of ``sem_seg_data``.

    A sample picks a source uniformly, an image uniformly, and a mode (true premise 0.85, denial 0.07,
    correction 0.08). True premise: k questions about present classes, each answered with one ``[SEG]``, and the
    k masks. Denial / correction: k questions about absent classes, answered "not here" (denial) or "not here, but
    there is <present class>" (correction), no masks, ``exists`` all False.

    A drawn image whose masks do not have the image's size is skipped: one warning naming the image path and both
    sizes, ``skipped_images`` counts it, and the same ``rng`` draws again (within the :data:`MAX_DRAWS` bound).
    """

    def __init__(
        self,
        dataset_dir: PathLike,
        preprocessor: Optional[ImagePreprocessor] = None,
        sem_seg_data: str = DEFAULT_SEM_SEG_DATA,
        num_classes_per_sample: int = 1,
        template: str = "llava_v1",
        samples_per_epoch: Optional[int] = None,
        seed: int = 0,
        mode_probs: Sequence[float] = SEM_SEG_MODE_PROBS,
    ) -> None:
        if num_classes_per_sample < 1:
            raise ValueError(f"--num_classes_per_sample must be >= 1, got {num_classes_per_sample}")
        self.dataset_dir = Path(dataset_dir)
        self.preprocessor = preprocessor or ImagePreprocessor()
        self.names = parse_sem_seg_data(sem_seg_data)
        self.sources: list[SegSource] = [SOURCE_BUILDERS[n](self.dataset_dir) for n in self.names]
        self.num_classes_per_sample = num_classes_per_sample
        self.template = template
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.mode_probs = np.asarray(mode_probs, dtype=np.float64) / float(np.sum(mode_probs))
        self.skipped_images = 0  # draws skipped for a label/image size mismatch (per process: each worker)

    def __len__(self) -> int:
        return self.samples_per_epoch if self.samples_per_epoch is not None else sum(map(len, self.sources))

    def __getitem__(self, idx: int) -> tuple:
        return self.sample(np.random.default_rng([self.seed, idx]))

    def sample(self, rng: np.random.Generator) -> tuple:
        """Draw source, image and mode with ``rng`` only; images without a usable class, with an undecodable mask
        or whose annotation size differs from the image (warned and counted in ``skipped_images``) are redrawn."""
        for _ in range(MAX_DRAWS):
            s = int(rng.integers(len(self.sources)))
            draw = self.sources[s].draw(rng, self.num_classes_per_sample)
            if draw is None:
                continue
            mode = self.draw_mode(rng)
            prepared = self.preprocessor.load(draw.image_path, self.names[s])
            problem = size_mismatch(self.names[s], draw, prepared)
            if problem is None:
                return self._assemble(draw, mode, prepared, rng)
            self.skipped_images += 1
            warnings.warn(f"{problem}; skipping this training image and drawing another")
        raise DatasetError(f"sem_seg: no usable image in {MAX_DRAWS} draws from {'||'.join(self.names)}")

    def draw_mode(self, rng: np.random.Generator) -> str:
        """True premise / denial / correction with ``mode_probs`` (0.85 / 0.07 / 0.08 by default)."""
        return SEM_SEG_MODES[int(rng.choice(len(SEM_SEG_MODES), p=self.mode_probs))]

    def build(self, source: str, draw: SegDraw, mode: str, rng: np.random.Generator) -> tuple:
        """Turn a draw into the training 7-tuple for ``mode`` (falls back to true premise without negatives).

        Raises :class:`DatasetError` if the draw's masks do not have the image's size (``sample`` redraws instead).
        """
        if mode not in SEM_SEG_MODES:
            raise ValueError(f"unknown sem_seg mode {mode!r}; expected one of {SEM_SEG_MODES}")
        prepared = self.preprocessor.load(draw.image_path, source)
        problem = size_mismatch(source, draw, prepared)
        if problem is not None:
            raise DatasetError(problem)
        return self._assemble(draw, mode, prepared, rng)

    def _assemble(self, draw: SegDraw, mode: str, prepared: PreparedImage, rng: np.random.Generator) -> tuple:
        if mode != TRUE_PREMISE and not draw.negatives:
            mode = TRUE_PREMISE  # every class of the source is present: nothing can be denied
        h, w = int(draw.masks.shape[1]), int(draw.masks.shape[2])
        positives = draw.positives if mode == TRUE_PREMISE else draw.positives[: len(draw.negatives)]
        turns = []
        for j, text in enumerate(positives):
            question = choose(rng, SHORT_QUESTION_TEMPLATE)
            if mode == TRUE_PREMISE:
                q = question.format(class_name=text.lower())
                a = choose(rng, SHORT_ANSWER_TEMPLATE).format(class_name=text.lower())
            elif mode == DENIAL:
                neg = draw.negatives[j].lower()
                q = question.format(class_name=neg)
                a = choose(rng, NEG_ANSWER_TEMPLATE).format(class_name=neg)
            else:
                neg = draw.negatives[j].lower()
                q = question.format(class_name=neg)
                a = choose(rng, CORRECT_ANSWER_TEMPLATE).format(class_name=neg, gt_name=text.lower())
            turns.append((q, a))
        if mode == TRUE_PREMISE:
            masks = torch.from_numpy(np.ascontiguousarray(draw.masks))
        else:
            masks = torch.zeros((0, h, w), dtype=torch.uint8)
        conversations = [render_prompt([t], self.template) for t in turns]
        return training_item(draw.image_path, prepared, conversations, masks, [mode == TRUE_PREMISE] * len(turns))
