"""Referring segmentation data (refclef, RefCOCO/+/g and their R- and FP- variants): a small REFER reader and the
training dataset.

Each dataset is ``<dataset_dir>/refer_seg/<name>/refs(<split_by>).p`` (pickled list of refs) plus
``instances.json`` (COCO-style images/annotations/categories). Masks are decoded with pycocotools exactly as the
original REFER API did (overlapping polygons/RLEs are summed, so overlaps read 2); the compressed RLE of every
annotation is computed once and kept. Decoded masks are cached only up to ``mask_cache_bytes``: a small bounded
cache (:data:`EVAL_MASK_CACHE_BYTES`) for a bare :class:`ReferIndex` (the evaluation sets, which read every sentence
of an image in turn), none by default for the training :class:`ReferSegDataset` (random draws over ~10 sources
rarely hit it, and every source in every DataLoader worker of every rank would hold its own copy).

Training samples whose image does not have the instances.json size are skipped with a warning and redrawn
(at most :data:`MAX_DRAWS` draws); the evaluation sets still raise :class:`DatasetError` for such an image.
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from dataset.conversation import render_prompt
from dataset.errors import DatasetError
from dataset.preprocess import ImagePreprocessor, PreparedImage, training_item
from dataset.qa_templates import (
    CORRECT_ANSWER_TEMPLATE,
    NEG_ANSWER_TEMPLATE,
    SHORT_ANSWER_TEMPLATE,
    SHORT_QUESTION_TEMPLATE,
    choose,
    select_items,
)

REFER_DATASETS: tuple[str, ...] = (
    "refclef",
    "refcoco",
    "refcoco+",
    "refcocog",
    "R-refcoco",
    "R-refcoco+",
    "R-refcocog",
    "fprefcoco",
    "fprefcoco+",
    "fprefcocog",
)
FP_REFER_DATASETS: tuple[str, ...] = ("fprefcoco", "fprefcoco+", "fprefcocog")
COCO_IMAGE_DIR = "images/mscoco/images/train2014"
REFCLEF_IMAGE_DIR = "images/saiapr_tc-12"

# Decoded-mask cache of a ReferIndex built directly (validation / test sets: the sentences of one image share masks).
EVAL_MASK_CACHE_BYTES = 32 << 20
# Training images whose size does not match instances.json are redrawn; this bounds the loop (as in sem_seg.py).
MAX_DRAWS = 100


def split_by_for(name: str) -> str:
    """Which ``refs(<split_by>).p`` a dataset name reads (data.md §1)."""
    if name not in REFER_DATASETS:
        raise ValueError(f"unknown refer dataset {name!r}; expected one of {', '.join(REFER_DATASETS)}")
    if name == "refclef":
        return "unc"
    if name in ("refcocog", "R-refcocog"):
        return "umd_exclude_unified"
    if name in FP_REFER_DATASETS:
        return "berkeley_exclude_unified"
    return "unc_exclude_unified"


def refer_tree(name: str) -> str:
    """The files a refer dataset needs, for error messages."""
    if name == "refclef":
        images = REFCLEF_IMAGE_DIR + "/<file_name>"
    else:
        images = COCO_IMAGE_DIR + "/COCO_train2014_<12 digits>.jpg"
    return (
        f"expected tree: <dataset_dir>/refer_seg/{name}/refs({split_by_for(name)}).p + "
        f"<dataset_dir>/refer_seg/{name}/instances.json, images in <dataset_dir>/refer_seg/{images}"
    )


def _as_bool(value: Any, what: str) -> bool:
    """Flags must be real booleans (or 0/1); the original's ``is True`` tests silently mis-handled anything else."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"{what} must be a boolean, got {value!r}")


def sentence_exists(sent: dict) -> bool:
    """``not is_false_premise`` if present, else ``exist`` if present, else True."""
    if "is_false_premise" in sent:
        return not _as_bool(sent["is_false_premise"], "is_false_premise")
    if "exist" in sent:
        return _as_bool(sent["exist"], "exist")
    return True


def segmentation_to_rles(seg: Any, h: int, w: int) -> list[dict]:
    """Compressed RLEs (bytes counts) of a COCO segmentation: polygons, RLE dicts (compressed or not), or []."""
    if seg is None or (isinstance(seg, list) and len(seg) == 0):
        return []
    if isinstance(seg, dict):
        seg = [seg]
    if not isinstance(seg, list):
        raise ValueError(f"segmentation must be a list or a dict, got {type(seg).__name__}")
    if all(isinstance(p, list) for p in seg):
        bad = [len(p) for p in seg if len(p) < 6 or len(p) % 2]
        if bad:
            raise ValueError(f"polygons need an even number (>= 6) of coordinates, got lengths {bad}")
        return list(mask_utils.frPyObjects([[float(v) for v in p] for p in seg], h, w))
    rles = []
    for rle in seg:
        if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
            raise ValueError(f"expected RLE dicts with 'size' and 'counts', got {rle!r:.80}")
        if list(rle["size"]) != [h, w]:
            raise ValueError(f"RLE size {list(rle['size'])} differs from the image size [{h}, {w}]")
        counts = rle["counts"]
        if isinstance(counts, list):  # uncompressed RLE (iscrowd style)
            rles.append(mask_utils.frPyObjects(rle, h, w))
        else:
            rles.append({"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else bytes(counts)})
    return rles


def decode_rles(rles: Sequence[dict], h: int, w: int) -> np.ndarray:
    """Sum of the decoded RLE masks as uint8 [h, w] (the original's behaviour: overlaps add up)."""
    if not rles:
        return np.zeros((h, w), dtype=np.uint8)
    return mask_utils.decode(list(rles)).sum(axis=2).astype(np.uint8)


def decode_segmentation(seg: Any, h: int, w: int) -> np.ndarray:
    """uint8 [h, w] mask of one annotation's ``segmentation``."""
    return decode_rles(segmentation_to_rles(seg, h, w), h, w)


def select_refs_for_split(refs: Sequence[dict], split: str) -> list[dict]:
    """REFER's ``getRefIds(split=...)`` rule: testA/B/C by letter, testAB/BC/AC exact, test by substring."""
    if split in ("testA", "testB", "testC"):
        return [r for r in refs if split[-1] in r["split"]]
    if split in ("testAB", "testBC", "testAC"):
        return [r for r in refs if r["split"] == split]
    if split == "test":
        return [r for r in refs if "test" in r["split"]]
    if split in ("train", "val"):
        return [r for r in refs if r["split"] == split]
    raise ValueError(
        f"unknown refer split {split!r}; expected train, val, test, testA, testB, testC, testAB, testBC or testAC"
    )


@dataclass(frozen=True)
class ReferQuery:
    """One referring expression of one image, with everything answers and masks need."""

    sentence: str
    gt_sentence: str  # the corrected expression of a false-premise sentence ("" if none)
    exists: bool
    ref_id: int
    ann_ids: tuple[int, ...]  # usually one; several are OR-combined, -1 means "no target"
    sent_index: int  # position within its ref (the original's "sent_ids")
    sent_id: int  # dataset-wide sentence id


class ReferIndex:
    """One refer dataset: refs, annotations, image records, the compressed RLE of every decoded annotation, and an
    LRU cache of decoded masks bounded by ``mask_cache_bytes`` (0 disables it; default
    :data:`EVAL_MASK_CACHE_BYTES`, what the evaluation sets use)."""

    def __init__(self, dataset_dir: "str | Path", name: str, mask_cache_bytes: int = EVAL_MASK_CACHE_BYTES) -> None:
        if mask_cache_bytes < 0:
            raise ValueError(f"mask_cache_bytes must be >= 0, got {mask_cache_bytes}")
        if name not in REFER_DATASETS:
            raise DatasetError(f"unknown refer dataset {name!r}; expected one of {', '.join(REFER_DATASETS)}")
        self.name = name
        self.split_by = split_by_for(name)
        self.root = Path(dataset_dir) / "refer_seg"
        folder = self.root / name
        if not folder.is_dir():
            raise DatasetError(f"{name}: dataset folder not found: {folder}\n{refer_tree(name)}")
        self.refs_path = folder / f"refs({self.split_by}).p"
        self.instances_path = folder / "instances.json"
        for p in (self.refs_path, self.instances_path):
            if not p.is_file():
                raise DatasetError(f"{name}: file not found: {p}\n{refer_tree(name)}")
        self.image_dir = self.root / (REFCLEF_IMAGE_DIR if name == "refclef" else COCO_IMAGE_DIR)
        if not self.image_dir.is_dir():
            raise DatasetError(f"{name}: image folder not found: {self.image_dir}\n{refer_tree(name)}")
        self.refs = self._load_refs()
        self._load_instances()
        self._rles: dict[int, list[dict]] = {}
        self._decoded: "OrderedDict[tuple[int, ...], np.ndarray]" = OrderedDict()
        self._decoded_bytes = 0
        self.mask_cache_bytes = mask_cache_bytes

    # ---- loading -------------------------------------------------------------------------------------------
    def _load_refs(self) -> list[dict]:
        try:
            with open(self.refs_path, "rb") as f:
                try:
                    refs = pickle.load(f)
                except UnicodeDecodeError:  # pickles written by Python 2
                    f.seek(0)
                    refs = pickle.load(f, encoding="latin1")
        except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
            raise DatasetError(f"{self.name}: cannot unpickle {self.refs_path}: {type(err).__name__}: {err}") from None
        if not isinstance(refs, list):
            raise DatasetError(f"{self.name}: {self.refs_path} must hold a list of refs, got {type(refs).__name__}")
        for k, ref in enumerate(refs):
            try:
                int(ref["ref_id"]), int(ref["image_id"]), str(ref["split"])
                ann = ref["ann_id"]
                if not isinstance(ann, (int, np.integer, list)):
                    raise TypeError(f"ann_id must be an int, got {ann!r}")
                for s in ref["sentences"]:
                    str(s["sent"])
                    sentence_exists(s)
            except (KeyError, TypeError, ValueError) as err:
                raise DatasetError(
                    f"{self.name}: malformed ref #{k} in {self.refs_path}: {type(err).__name__}: {err}; a ref needs "
                    "ref_id, ann_id, image_id, split and sentences [{sent, sent_id, ...}]"
                ) from None
        return refs

    def _load_instances(self) -> None:
        try:
            data = json.loads(self.instances_path.read_text(encoding="utf-8"))
            self.images = {int(im["id"]): im for im in data["images"]}
            self.anns = {int(a["id"]): a for a in data["annotations"]}
            self.categories = {int(c["id"]): c["name"] for c in data.get("categories", [])}
            for im in self.images.values():
                int(im["height"]), int(im["width"]), str(im["file_name"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
            raise DatasetError(
                f"{self.name}: malformed {self.instances_path}: {type(err).__name__}: {err}; expected COCO-style "
                "{'images': [{id, file_name, height, width}], 'annotations': [{id, image_id, segmentation}], "
                "'categories': [{id, name}]}"
            ) from None
        for ref in self.refs:
            missing = [a for a in self._ann_ids(ref) if a != -1 and a not in self.anns]
            if missing or int(ref["image_id"]) not in self.images:
                raise DatasetError(
                    f"{self.name}: ref {ref['ref_id']} in {self.refs_path} points to "
                    f"{'annotation(s) ' + str(missing) if missing else 'image ' + str(ref['image_id'])} "
                    f"missing from {self.instances_path}"
                )

    @staticmethod
    def _ann_ids(ref: dict) -> tuple[int, ...]:
        ann = ref["ann_id"]
        return tuple(int(a) for a in ann) if isinstance(ann, list) else (int(ann),)

    # ---- queries ---------------------------------------------------------------------------------------------
    def ref_ids(self, split: str) -> list[int]:
        return [int(r["ref_id"]) for r in select_refs_for_split(self.refs, split)]

    def image_ids(self, split: str) -> list[int]:
        """Sorted ids of the images with at least one sentence in ``split`` (sorted: stable item order)."""
        return sorted({int(r["image_id"]) for r in select_refs_for_split(self.refs, split) if r["sentences"]})

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.images[image_id]["file_name"]

    def image_size(self, image_id: int) -> tuple[int, int]:
        im = self.images[image_id]
        return int(im["height"]), int(im["width"])

    def queries_by_image(self, split: str) -> dict[int, list[ReferQuery]]:
        """image_id -> every sentence of every ref of ``split`` on that image (pickle order)."""
        out: dict[int, list[ReferQuery]] = {}
        for ref in select_refs_for_split(self.refs, split):
            for k, s in enumerate(ref["sentences"]):
                out.setdefault(int(ref["image_id"]), []).append(
                    ReferQuery(
                        sentence=str(s["sent"]),
                        gt_sentence=str(s.get("gt_sent", "")),
                        exists=sentence_exists(s),
                        ref_id=int(ref["ref_id"]),
                        ann_ids=self._ann_ids(ref),
                        sent_index=k,
                        sent_id=int(s.get("sent_id", -1)),
                    )
                )
        return out

    # ---- masks -------------------------------------------------------------------------------------------------
    def _ann_rles(self, ann_id: int, h: int, w: int) -> list[dict]:
        if ann_id not in self._rles:
            try:
                self._rles[ann_id] = segmentation_to_rles(self.anns[ann_id].get("segmentation", []), h, w)
            except (ValueError, TypeError, IndexError, KeyError) as err:
                raise DatasetError(
                    f"{self.name}: cannot decode the segmentation of annotation {ann_id} "
                    f"in {self.instances_path}: {err}"
                ) from None
        return self._rles[ann_id]

    def ann_mask(self, ann_ids: "int | Sequence[int]", image_id: int) -> np.ndarray:
        """uint8 [H, W] mask of one annotation (values 0/1, 2 where its parts overlap); several ids are OR-ed
        (as the original's list branch did) and any -1 gives an empty mask. Returned arrays are read-only; they are
        kept in the decoded-mask cache only if ``mask_cache_bytes`` allows (never when it is 0)."""
        key = (int(ann_ids),) if isinstance(ann_ids, (int, np.integer)) else tuple(int(a) for a in ann_ids)
        if key in self._decoded:
            self._decoded.move_to_end(key)
            return self._decoded[key]
        h, w = self.image_size(image_id)
        if -1 in key:
            mask = np.zeros((h, w), dtype=np.uint8)
        elif len(key) == 1:
            mask = decode_rles(self._ann_rles(key[0], h, w), h, w)
        else:
            mask = np.zeros((h, w), dtype=np.uint8)
            for a in key:
                mask |= (decode_rles(self._ann_rles(a, h, w), h, w) > 0).astype(np.uint8)
        mask.setflags(write=False)
        if mask.nbytes <= self.mask_cache_bytes:
            self._decoded[key] = mask
            self._decoded_bytes += mask.nbytes
            while self._decoded_bytes > self.mask_cache_bytes:
                _, old = self._decoded.popitem(last=False)
                self._decoded_bytes -= old.nbytes
        return mask

    def query_masks(self, queries: Sequence[ReferQuery], image_id: int, include_nonexistent: bool) -> np.ndarray:
        """uint8 [N, H, W]: existing queries get their mask; non-existent ones get zeros or are left out."""
        h, w = self.image_size(image_id)
        rows = [
            self.ann_mask(q.ann_ids, image_id) if q.exists else np.zeros((h, w), dtype=np.uint8)
            for q in queries
            if q.exists or include_nonexistent
        ]
        return np.stack(rows) if rows else np.zeros((0, h, w), dtype=np.uint8)


def refer_answer(rng: np.random.Generator, dataset_name: str, query: ReferQuery) -> str:
    """Mask answer if the object exists; FP-* datasets correct the premise; R-* (and others) deny it."""
    name = query.sentence.strip().lower()
    if query.exists:
        return choose(rng, SHORT_ANSWER_TEMPLATE).format(class_name=name)
    if dataset_name in FP_REFER_DATASETS:
        return choose(rng, CORRECT_ANSWER_TEMPLATE).format(class_name=name, gt_name=query.gt_sentence.strip().lower())
    return choose(rng, NEG_ANSWER_TEMPLATE).format(class_name=name)


def refer_question(rng: np.random.Generator, query: ReferQuery) -> str:
    """Training/validation question: a random short-question template with the lowercased expression."""
    return choose(rng, SHORT_QUESTION_TEMPLATE).format(class_name=query.sentence.lower())


def image_size_mismatch(prepared_size: tuple[int, int], index: ReferIndex, image_id: int) -> Optional[str]:
    """None if the decoded jpg has the instances.json size (masks are decoded at that size), else the message."""
    expected = index.image_size(image_id)
    if tuple(prepared_size) == expected:
        return None
    return (
        f"{index.name}: image {index.image_path(image_id)} is {prepared_size[0]}x{prepared_size[1]} (HxW) but "
        f"{index.instances_path} says {expected[0]}x{expected[1]}"
    )


def check_image_matches(prepared_size: tuple[int, int], index: ReferIndex, image_id: int) -> None:
    """Raise :class:`DatasetError` if the jpg does not have the instances.json size (evaluation sets: never skip)."""
    problem = image_size_mismatch(prepared_size, index, image_id)
    if problem is not None:
        raise DatasetError(problem)


class ReferSegDataset(Dataset):
    """Training referring segmentation over a ``||``-separated list of refer datasets.

    Each sample picks a dataset uniformly, then one of its training images uniformly, and turns up to
    ``num_classes_per_sample`` of that image's sentences into conversations. Existing objects get a ``[SEG]``
    answer and a mask; FP-* false premises get a correction, R-* negatives a denial (no mask, no ``[SEG]``).

    A drawn image whose size differs from its instances.json record is skipped: one warning naming the path and
    both sizes, ``skipped_images`` counts it, and the same ``rng`` draws again (at most :data:`MAX_DRAWS` draws,
    then :class:`DatasetError`). ``build`` (one given image) still raises for it.

    ``mask_cache_bytes`` is the decoded-mask cache of each source; 0 (default) keeps only the compressed RLEs,
    so host memory does not grow with sources x DataLoader workers x ranks. Raise it to trade memory for decoding.
    """

    def __init__(
        self,
        dataset_dir: "str | Path",
        preprocessor: Optional[ImagePreprocessor] = None,
        refer_seg_data: str = "refclef||refcoco||refcoco+||refcocog",
        num_classes_per_sample: int = 1,
        template: str = "llava_v1",
        samples_per_epoch: Optional[int] = None,
        seed: int = 0,
        split: str = "train",
        mask_cache_bytes: int = 0,
    ) -> None:
        self.preprocessor = preprocessor or ImagePreprocessor()
        self.names = [n for n in refer_seg_data.split("||") if n]
        if not self.names:
            raise ValueError(f"refer_seg_data lists no dataset: {refer_seg_data!r}")
        self.indexes = [ReferIndex(dataset_dir, n, mask_cache_bytes=mask_cache_bytes) for n in self.names]
        self.queries = [ix.queries_by_image(split) for ix in self.indexes]
        self.image_ids = [sorted(q) for q in self.queries]
        for index, ids in zip(self.indexes, self.image_ids):
            if not ids:
                raise DatasetError(f"{index.name}: no refs with split {split!r} in {index.refs_path}")
        self.num_classes_per_sample = num_classes_per_sample
        self.template = template
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.skipped_images = 0  # draws skipped for an image/annotation size mismatch (per process: each worker)

    def __len__(self) -> int:
        return self.samples_per_epoch if self.samples_per_epoch is not None else sum(map(len, self.image_ids))

    def __getitem__(self, idx: int) -> tuple:
        return self.sample(np.random.default_rng([self.seed, idx]))

    def sample(self, rng: np.random.Generator) -> tuple:
        """Draw dataset and image with ``rng``; an image whose size does not match its annotation is skipped."""
        for _ in range(MAX_DRAWS):
            d = int(rng.integers(len(self.names)))
            image_id = self.image_ids[d][int(rng.integers(len(self.image_ids[d])))]
            index = self.indexes[d]
            prepared = self.preprocessor.load(index.image_path(image_id), self.names[d])
            problem = image_size_mismatch(prepared.original_size, index, image_id)
            if problem is None:
                return self._assemble(d, image_id, prepared, rng)
            self.skipped_images += 1
            warnings.warn(f"{problem}; skipping this training image and drawing another")
        raise DatasetError(
            f"refer_seg ({'||'.join(self.names)}): no image with the size its instances.json records in "
            f"{MAX_DRAWS} draws; check the images against {', '.join(str(ix.instances_path) for ix in self.indexes)}"
        )

    def build(self, dataset_index: int, image_id: int, rng: np.random.Generator) -> tuple:
        """The training 7-tuple of one given image (raises :class:`DatasetError` if its size is wrong)."""
        index, name = self.indexes[dataset_index], self.names[dataset_index]
        prepared = self.preprocessor.load(index.image_path(image_id), name)
        check_image_matches(prepared.original_size, index, image_id)
        return self._assemble(dataset_index, image_id, prepared, rng)

    def _assemble(self, dataset_index: int, image_id: int, prepared: PreparedImage, rng: np.random.Generator) -> tuple:
        index, name = self.indexes[dataset_index], self.names[dataset_index]
        image_path = index.image_path(image_id)
        sampled = select_items(rng, self.queries[dataset_index][image_id], self.num_classes_per_sample)
        conversations = []
        for q in sampled:
            question = refer_question(rng, q)
            conversations.append(render_prompt([(question, refer_answer(rng, name, q))], self.template))
        masks = torch.from_numpy(index.query_masks(sampled, image_id, include_nonexistent=False))
        return training_item(image_path, prepared, conversations, masks, [q.exists for q in sampled])
