"""The "see + segment" test set of test_read: FP-RefCOCO(+/g), R-RefCOCO(+/g), RefCOCO(+/g) and ReasonSeg.

One item per image with all of its queries. Prompts end with ``ASSISTANT:`` and default to the ``vicuna_v1``
system text, which the original test used (it never switched away from the module default); pass
``template="llava_v1"`` to use the training template instead. Ground truth for a query whose object does not
exist (false premise / R- negative / ReasonSeg false-premise triple) is an all-zero mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.conversation import render_prompt
from dataset.errors import DatasetError
from dataset.preprocess import ImagePreprocessor, sam_mask_shape
from dataset.reason_seg import json_for, rasterize_reason_mask, read_reason_annotation
from dataset.refer import ReferIndex, check_image_matches
from dataset.validation import lisa_question, reason_images_for_subset, refer_questions

FP_TEST_REFER_DATASETS: tuple[str, ...] = (
    "fprefcoco",
    "fprefcoco+",
    "fprefcocog",
    "refcoco",
    "refcoco+",
    "refcocog",
    "R-refcoco",
    "R-refcoco+",
    "R-refcocog",
)
FP_TEST_DATASETS: tuple[str, ...] = FP_TEST_REFER_DATASETS + ("ReasonSeg",)
IMAGE_PREFIX = "<image>\n"


def question_text(question: str) -> str:
    """The raw question stored in the predictions file (the prompt's question without the image placeholder)."""
    return question[len(IMAGE_PREFIX):].strip() if question.startswith(IMAGE_PREFIX) else question.strip()


@dataclass
class FPTestItem:
    """Everything test inference needs for one image; lists are aligned per query."""

    image_path: str
    image: torch.Tensor  # float32 [3, 1024, 1024]
    image_clip: torch.Tensor  # float32 [3, 336, 336]
    sam_mask_shape: list  # [(new_h, new_w), (H, W)]
    prompts: list[str]  # rendered, ending with "ASSISTANT:"
    questions: list[str]  # raw question text per query
    sentences: list[str]  # the referring expression / query text
    gt_masks: torch.Tensor  # uint8 [N, H, W]; zeros where exists is False; 255 = ignore (ReasonSeg)
    exists: list[bool]
    ref_ids: list[int]
    sent_ids: list[int]  # position of the sentence within its ref (what the original stored)
    ann_ids: list[tuple[int, ...]]

    def as_eval_tuple(self) -> tuple:
        """The validation 10-tuple, for ``collate_val(..., padding="left")``."""
        return (
            self.image_path,
            self.image,
            self.image_clip,
            list(self.prompts),
            self.gt_masks,
            self.sam_mask_shape,
            list(self.exists),
            list(self.ref_ids),
            list(self.sent_ids),
            {self.image_path: list(self.prompts)},
        )


def collate_fp_items(batch: list[FPTestItem]) -> list[FPTestItem]:
    """DataLoader collate that keeps items as they are (picklable, unlike a lambda)."""
    return list(batch)


class FPTestDataset(Dataset):
    """See + segment test set. ``split`` is selectable (the original hard-coded ``val``)."""

    def __init__(
        self,
        dataset_dir: "str | Path",
        preprocessor: Optional[ImagePreprocessor] = None,
        dataset_name: str = "fprefcoco",
        split: str = "val",
        template: str = "vicuna_v1",
        question_style: str = "sesame",
        query_subset: str = "all",
        include_false_premise: bool = True,
        seed: int = 0,
    ) -> None:
        if dataset_name not in FP_TEST_DATASETS:
            raise DatasetError(f"unknown test dataset {dataset_name!r}; expected one of {', '.join(FP_TEST_DATASETS)}")
        self.dataset_dir = Path(dataset_dir)
        self.preprocessor = preprocessor or ImagePreprocessor()
        self.name = dataset_name
        self.split = split
        self.template = template
        self.question_style = question_style
        self.include_false_premise = include_false_premise
        self.seed = seed
        if dataset_name == "ReasonSeg":
            splits = [s for s in split.split("_") if s]
            self.images = reason_images_for_subset(self.dataset_dir, dataset_name, splits, query_subset)
        else:
            if query_subset != "all":
                raise ValueError(f"query_subset {query_subset!r} applies to ReasonSeg only")
            self.index = ReferIndex(self.dataset_dir, dataset_name)
            try:
                self.queries = self.index.queries_by_image(split)
            except ValueError as err:
                raise DatasetError(f"{dataset_name}: {err}") from None
            self.image_ids = sorted(self.queries)
            if not self.image_ids:
                raise DatasetError(f"{dataset_name}: no refs with split {split!r} in {self.index.refs_path}")
            refer_questions(np.random.default_rng(0), [], question_style)  # validate the style now

    def __len__(self) -> int:
        return len(self.images) if self.name == "ReasonSeg" else len(self.image_ids)

    def image_path(self, idx: int) -> str:
        """Path of item ``idx``'s image, without decoding it (used for stable sample keys and resume)."""
        if self.name == "ReasonSeg":
            return str(self.images[idx])
        return str(self.index.image_path(self.image_ids[idx]))

    def __getitem__(self, idx: int) -> FPTestItem:
        return self._reason_item(idx) if self.name == "ReasonSeg" else self._refer_item(idx)

    def _prompts(self, questions: list[str]) -> list[str]:
        return [render_prompt([(q, None)], self.template) for q in questions]

    def _refer_item(self, idx: int) -> FPTestItem:
        image_id = self.image_ids[idx]
        image_path = self.index.image_path(image_id)
        prepared = self.preprocessor.load(image_path, self.name)
        check_image_matches(prepared.original_size, self.index, image_id)
        queries = self.queries[image_id]
        questions = refer_questions(np.random.default_rng([self.seed, idx]), queries, self.question_style)
        return FPTestItem(
            image_path=str(image_path),
            image=prepared.image,
            image_clip=prepared.image_clip,
            sam_mask_shape=sam_mask_shape(prepared),
            prompts=self._prompts(questions),
            questions=[question_text(q) for q in questions],
            sentences=[q.sentence for q in queries],
            gt_masks=torch.from_numpy(self.index.query_masks(queries, image_id, include_nonexistent=True)),
            exists=[q.exists for q in queries],
            ref_ids=[q.ref_id for q in queries],
            sent_ids=[q.sent_index for q in queries],
            ann_ids=[q.ann_ids for q in queries],
        )

    def _reason_item(self, idx: int) -> FPTestItem:
        """The image's query ``text[0]`` (exists) plus, if present, its false-premise queries (do not exist)."""
        image_path = self.images[idx]
        ann = read_reason_annotation(json_for(image_path), self.name)
        prepared = self.preprocessor.load(image_path, self.name)
        h, w = prepared.original_size
        sentences = [ann.texts[0]]
        questions = [lisa_question(ann.texts[0], ann.is_sentence)]
        masks = [rasterize_reason_mask(ann.shapes, h, w)]
        if self.include_false_premise and ann.false_premise_qa:
            for query, query_is_sentence, _ in ann.false_premise_qa:
                sentences.append(query)
                questions.append(lisa_question(query, query_is_sentence))
                masks.append(np.zeros((h, w), dtype=np.uint8))
        n = len(questions)
        return FPTestItem(
            image_path=str(image_path),
            image=prepared.image,
            image_clip=prepared.image_clip,
            sam_mask_shape=sam_mask_shape(prepared),
            prompts=self._prompts(questions),
            questions=[question_text(q) for q in questions],
            sentences=sentences,
            gt_masks=torch.from_numpy(np.stack(masks)),
            exists=[True] + [False] * (n - 1),
            ref_ids=[idx] * n,
            sent_ids=list(range(n)),
            ann_ids=[()] * n,
        )
