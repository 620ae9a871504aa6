"""Validation/test datasets: ReasonSeg (LISA templates, short/long query subsets) and RefCOCO(+/g).

Items are the 10-tuple ``(image_path, image, image_clip, conversations, masks uint8 [N,H,W], sam_mask_shape,
exists, ref_ids, sent_ids, conversation_record)`` consumed by ``collate_val``. In ``mode="val"`` prompts include the
answer (teacher-forced evaluation); in ``mode="test"`` they end with ``ASSISTANT:`` (generation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.conversation import render_prompt
from dataset.errors import DatasetError
from dataset.preprocess import ImagePreprocessor, training_item
from dataset.qa_templates import LISA_ANSWER, LISA_LONG_QUESTION, LISA_SHORT_QUESTION
from dataset.reason_seg import (
    REASON_TREE,
    json_for,
    list_reason_images,
    rasterize_reason_mask,
    read_reason_annotation,
)
from dataset.refer import ReferIndex, ReferQuery, check_image_matches, refer_answer, refer_question

Mode = Literal["val", "test"]
QuerySubset = Literal["all", "short", "long"]
QUERY_SUBSETS: tuple[str, ...] = ("all", "short", "long")


def _check_mode(mode: str) -> None:
    if mode not in ("val", "test"):
        raise ValueError(f"mode must be 'val' (answers included) or 'test' (prompt ends with ASSISTANT:), got {mode!r}")


def lisa_question(text: str, is_sentence: bool) -> str:
    """LISA's fixed validation question: long template with the sentence as is, short one with it lowercased."""
    if is_sentence:
        return LISA_LONG_QUESTION.format(sent=text)
    return LISA_SHORT_QUESTION.format(class_name=text.lower())


def reason_images_for_subset(dataset_dir: Path, name: str, splits: list[str], query_subset: str) -> list[Path]:
    """Sorted images of the splits, restricted to short (is_sentence False) or long (True) queries if asked."""
    if query_subset not in QUERY_SUBSETS:
        raise ValueError(f"query_subset must be one of {', '.join(QUERY_SUBSETS)}, got {query_subset!r}")
    images = list_reason_images(dataset_dir, name, splits)
    if query_subset == "all":
        for p in images:
            read_reason_annotation(json_for(p), name)  # fail early on a broken json
        return images
    want_long = query_subset == "long"
    kept = [p for p in images if read_reason_annotation(json_for(p), name).is_sentence == want_long]
    if not kept:
        raise DatasetError(f"{name}: no {query_subset} queries in splits {splits} under {dataset_dir}\n{REASON_TREE}")
    return kept


class TestReasoningDataset(Dataset):
    """ReasonSeg val/test: one LISA-template query per image (``text[0]``), one mask uint8 {0, 1, 255}."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        dataset_dir: "str | Path",
        preprocessor: Optional[ImagePreprocessor] = None,
        dataset_name: str = "ReasonSeg",
        split: str = "val",
        mode: Mode = "val",
        query_subset: QuerySubset = "all",
        template: str = "llava_v1",
    ) -> None:
        _check_mode(mode)
        self.dataset_dir = Path(dataset_dir)
        self.preprocessor = preprocessor or ImagePreprocessor()
        self.name = dataset_name
        self.splits = [s for s in split.split("_") if s]
        self.mode = mode
        self.query_subset = query_subset
        self.template = template
        self.images = reason_images_for_subset(self.dataset_dir, self.name, self.splits, query_subset)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int) -> tuple:
        image_path = self.images[idx]
        ann = read_reason_annotation(json_for(image_path), self.name)
        prepared = self.preprocessor.load(image_path, self.name)
        h, w = prepared.original_size
        question = lisa_question(ann.texts[0], ann.is_sentence)
        answer = LISA_ANSWER if self.mode == "val" else None
        conversations = [render_prompt([(question, answer)], self.template)]
        mask = torch.from_numpy(rasterize_reason_mask(ann.shapes, h, w)).unsqueeze(0)
        item = training_item(image_path, prepared, conversations, mask, [True])
        return (*item, [idx], [0], {str(image_path): conversations})


def refer_questions(
    rng: np.random.Generator, queries: list[ReferQuery], question_style: str
) -> list[str]:
    """Question per query: a random short template ("sesame", as the original) or LISA's fixed one ("lisa")."""
    if question_style == "sesame":
        return [refer_question(rng, q) for q in queries]
    if question_style == "lisa":
        return [LISA_SHORT_QUESTION.format(class_name=q.sentence.lower()) for q in queries]
    raise ValueError(f"question_style must be 'sesame' or 'lisa', got {question_style!r}")


class TestReferDataset(Dataset):
    """RefCOCO-family val/test: one item per image with every sentence of every ref of the split.

    Template draws use ``np.random.default_rng([seed, idx])`` so prompts (and metrics) do not depend on the number
    of workers. Masks are uint8 [N, H, W], one per sentence, zeros for sentences whose object does not exist.
    """

    __test__ = False

    def __init__(
        self,
        dataset_dir: "str | Path",
        preprocessor: Optional[ImagePreprocessor] = None,
        dataset_name: str = "refcoco",
        split: str = "val",
        mode: Mode = "val",
        question_style: str = "sesame",
        template: str = "llava_v1",
        seed: int = 0,
    ) -> None:
        _check_mode(mode)
        self.preprocessor = preprocessor or ImagePreprocessor()
        self.name = dataset_name
        self.split = split
        self.mode = mode
        self.question_style = question_style
        self.template = template
        self.seed = seed
        refer_questions(np.random.default_rng(0), [], question_style)  # reject an unknown style now
        self.index = ReferIndex(dataset_dir, dataset_name)
        try:
            self.queries = self.index.queries_by_image(split)
        except ValueError as err:
            raise DatasetError(f"{dataset_name}: {err}") from None
        self.image_ids = sorted(self.queries)
        if not self.image_ids:
            raise DatasetError(f"{dataset_name}: no refs with split {split!r} in {self.index.refs_path}")

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, idx: int) -> tuple:
        image_id = self.image_ids[idx]
        image_path = self.index.image_path(image_id)
        prepared = self.preprocessor.load(image_path, self.name)
        check_image_matches(prepared.original_size, self.index, image_id)
        queries = self.queries[image_id]
        rng = np.random.default_rng([self.seed, idx])
        questions = refer_questions(rng, queries, self.question_style)
        conversations = []
        for q, question in zip(queries, questions):
            answer = refer_answer(rng, self.name, q) if self.mode == "val" else None
            conversations.append(render_prompt([(question, answer)], self.template))
        masks = torch.from_numpy(self.index.query_masks(queries, image_id, include_nonexistent=True))
        item = training_item(image_path, prepared, conversations, masks, [q.exists for q in queries])
        return (*item, [q.ref_id for q in queries], [q.sent_index for q in queries], {str(image_path): conversations})
