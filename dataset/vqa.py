"""LLaVA-Instruct-150k visual question answering (keeps the chat ability while training segmentation).

``<dataset_dir>/llava_dataset/<vqa_data>.json`` is a list of ``{"id", "image": "<12 digits>.jpg", "conversations":
[{"from": "human"|"gpt", "value": str}, ...]}``; images are COCO 2017 train (``<dataset_dir>/coco/train2017``).
A sample is one multi-turn conversation, no mask and ``exists == [False]``.

Every record is normalised and checked once, when the dataset is built, so a malformed record fails before
training starts (the original asserted role alternation per sample, mid-training).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.conversation import render_prompt
from dataset.errors import DatasetError, require_path
from dataset.preprocess import ImagePreprocessor, training_item
from model.constants import DEFAULT_IMAGE_TOKEN

VQA_TREE = """\
<dataset_dir>/
├── llava_dataset/llava_instruct_150k.json   (list of {"id", "image": "<id>.jpg", "conversations": [...]})
└── coco/train2017/<id>.jpg                  (COCO 2017 train images)"""

ROLE_ORDER = ("human", "gpt")


def normalise_image_message(value: str) -> str:
    """A message holding ``<image>`` becomes ``"<image>\\n" + the rest, stripped`` (LLaVA's own rule; idempotent)."""
    if DEFAULT_IMAGE_TOKEN not in value:
        return value
    return DEFAULT_IMAGE_TOKEN + "\n" + value.replace(DEFAULT_IMAGE_TOKEN, "").strip()


def conversation_turns(record: Any, where: str) -> list[tuple[str, str]]:
    """(question, answer) turns of one LLaVA record, with ``<image>`` moved to the front of the first question.

    A leading ``gpt`` message is dropped (as the original did); after that the roles must alternate
    human/gpt and end with an answer, and ``<image>`` must occur exactly once, in the first question.
    """
    try:
        messages = [(str(m["from"]), str(m["value"])) for m in record["conversations"]]
    except (KeyError, TypeError) as err:
        raise DatasetError(
            f"{where}: expected {{'conversations': [{{'from': 'human'|'gpt', 'value': str}}, ...]}}, missing {err}"
        ) from None
    if messages and messages[0][0] != "human":
        messages = messages[1:]
    if not messages or len(messages) % 2:
        raise DatasetError(f"{where}: expected alternating human/gpt messages ending with a gpt answer, got "
                           f"{[m[0] for m in messages]}")
    for j, (role, _) in enumerate(messages):
        if role != ROLE_ORDER[j % 2]:
            raise DatasetError(f"{where}: message {j} is from {role!r}, expected {ROLE_ORDER[j % 2]!r} "
                               f"(roles must alternate human/gpt)")
    count = sum(v.count(DEFAULT_IMAGE_TOKEN) for _, v in messages)
    if count != 1 or DEFAULT_IMAGE_TOKEN not in messages[0][1]:
        raise DatasetError(f"{where}: '<image>' must occur exactly once, in the first human message (found {count})")
    values = [normalise_image_message(v) for _, v in messages]
    return list(zip(values[0::2], values[1::2]))


class VQADataset(Dataset):
    """Training VQA: a uniformly drawn LLaVA-Instruct record rendered as one multi-turn conversation."""

    def __init__(
        self,
        dataset_dir: Union[str, Path],
        preprocessor: Optional[ImagePreprocessor] = None,
        vqa_data: str = "llava_instruct_150k",
        template: str = "llava_v1",
        samples_per_epoch: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        self.dataset_dir = Path(dataset_dir)
        self.preprocessor = preprocessor or ImagePreprocessor()
        self.json_path = Path(require_path(self.dataset_dir / "llava_dataset" / f"{vqa_data}.json", "vqa",
                                           hint=f"expected tree:\n{VQA_TREE}"))
        self.image_dir = Path(require_path(self.dataset_dir / "coco/train2017", "vqa", "dir",
                                           hint=f"expected tree:\n{VQA_TREE}"))
        try:
            records = json.loads(self.json_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(f"vqa: malformed json {self.json_path}: {err}") from None
        if not isinstance(records, list) or not records:
            raise DatasetError(f"vqa: {self.json_path} must hold a non-empty JSON list of records")
        self.items: list[tuple[str, list[tuple[str, str]]]] = []
        for k, rec in enumerate(records):
            where = f"vqa: {self.json_path} record {k} (id {rec.get('id') if isinstance(rec, dict) else None!r})"
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
                raise DatasetError(f"{where}: expected an object with 'image': '<id>.jpg'")
            self.items.append((rec["image"], conversation_turns(rec, where)))
        present = {p.name for p in self.image_dir.iterdir()}
        missing = sorted({img for img, _ in self.items if img not in present})
        if missing:
            raise DatasetError(
                f"vqa: {len(missing)} images named in {self.json_path} are missing from {self.image_dir}, e.g. "
                f"{', '.join(missing[:5])}\nexpected tree:\n{VQA_TREE}"
            )
        self.template = template
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed

    def __len__(self) -> int:
        return self.samples_per_epoch if self.samples_per_epoch is not None else len(self.items)

    def __getitem__(self, idx: int) -> tuple:
        return self.sample(np.random.default_rng([self.seed, idx]))

    def sample(self, rng: np.random.Generator) -> tuple:
        return self.build(int(rng.integers(len(self.items))))

    def build(self, item: int) -> tuple:
        """The training 7-tuple of record ``item``: one conversation, an empty (0, H, W) mask, ``exists == [False]``."""
        image_name, turns = self.items[item]
        image_path = self.image_dir / image_name
        prepared = self.preprocessor.load(image_path, "vqa")
        h, w = prepared.original_size
        no_mask = torch.zeros((0, h, w), dtype=torch.uint8)
        return training_item(image_path, prepared, [render_prompt(turns, self.template)], no_mask, [False])
