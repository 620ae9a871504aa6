"""Batch collation: per-sample tuples -> the batch dict of docs/interfaces.md (``READForCausalLM.forward(**batch)``).

A batch of B images with k_i conversations each becomes T = sum(k_i) token rows; ``offset`` maps rows back to
images (rows ``offset[i]:offset[i+1]`` belong to image i). Masks stay at each image's original size, one float32
tensor per image.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Optional, Sequence

import torch

from dataset.conversation import insert_image_tokens, tokenize_conversations
from model.constants import DEFAULT_IMAGE_TOKEN, SEG_TOKEN

TRAIN_TRUNCATION_MARGIN = 255  # the original cut training rows to model_max_length - 255 columns


class TrainSample(NamedTuple):
    """One training item (a plain tuple in this order is accepted as well)."""

    image_path: str
    image: torch.Tensor  # float32 [3, 1024, 1024] SAM input
    image_clip: torch.Tensor  # float32 [3, 336, 336]
    conversations: list  # k rendered prompts with `<image>`
    masks: torch.Tensor  # [m, H, W], m = number of [SEG] in the conversations
    sam_mask_shape: list  # [(new_h, new_w), (H, W)]
    exists: list  # k bools


class ValSample(NamedTuple):
    """One validation/test item: the training fields plus the bookkeeping of the evaluation loop."""

    image_path: str
    image: torch.Tensor
    image_clip: torch.Tensor
    conversations: list
    masks: torch.Tensor
    sam_mask_shape: list
    exists: list
    ref_ids: list
    sent_ids: list
    conversation_record: dict


def _check_items(batch: Sequence[Any], size: int, kind: str, check_seg: bool) -> None:
    """One clear ValueError for a malformed item (names the image and what was expected)."""
    if len(batch) == 0:
        raise ValueError(f"{kind}: empty batch")
    for b, item in enumerate(batch):
        if not isinstance(item, (tuple, list)) or len(item) != size:
            got = f"{type(item).__name__} of length {len(item)}" if isinstance(item, (tuple, list)) else type(item).__name__
            raise ValueError(f"{kind}: item {b} must be a {size}-tuple ({', '.join(ValSample._fields[:size])}), got {got}")
        path, image, image_clip, convs, masks = item[:5]
        where = f"{kind}: item {b} ({path})"
        if not isinstance(convs, (list, tuple)) or not convs or not all(isinstance(c, str) for c in convs):
            raise ValueError(f"{where}: conversations must be a non-empty list of prompt strings, got {convs!r}")
        for c in convs:
            if c.count(DEFAULT_IMAGE_TOKEN) != 1:
                raise ValueError(f"{where}: every conversation needs exactly one '<image>', found "
                                 f"{c.count(DEFAULT_IMAGE_TOKEN)} in {c[:120]!r}")
        if not isinstance(masks, torch.Tensor) or masks.dim() != 3:
            shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
            raise ValueError(f"{where}: masks must be a tensor [m, H, W], got {shape}")
        if len(item[6]) != len(convs) and check_seg:
            raise ValueError(f"{where}: exists has {len(item[6])} flags for {len(convs)} conversations")
        if check_seg:
            n_seg = sum(c.count(SEG_TOKEN) for c in convs)
            if n_seg != masks.shape[0]:
                raise ValueError(f"{where}: the conversations contain {n_seg} '[SEG]' but there are "
                                 f"{masks.shape[0]} masks; each [SEG] needs exactly one mask")


def _common(batch: Sequence[tuple], use_mm_start_end: bool) -> dict:
    conversation_list, offset = [], [0]
    for item in batch:
        conversation_list.extend(insert_image_tokens(c, use_mm_start_end) for c in item[3])
        offset.append(offset[-1] + len(item[3]))
    return {
        "image_paths": [str(item[0]) for item in batch],
        "images": torch.stack([item[1] for item in batch]).float(),
        "images_clip": torch.stack([item[2] for item in batch]).float(),
        "masks_list": [item[4].float() for item in batch],
        "sam_mask_shape_list": [item[5] for item in batch],
        "offset": torch.tensor(offset, dtype=torch.long),
        "conversation_list": conversation_list,
        "exists": [[bool(e) for e in item[6]] for item in batch],
    }


def collate_train(
    batch: Sequence[tuple],
    tokenizer: Any,
    template: str = "llava_v1",
    use_mm_start_end: bool = True,
    max_length: Optional[int] = None,
) -> dict:
    """Training batch: right-padded ids, answer-only labels, rows cut to ``max_length - 255`` columns.

    ``max_length`` is the model's ``model_max_length`` (default: ``tokenizer.model_max_length``).
    """
    _check_items(batch, 7, "collate_train", check_seg=True)
    out = _common(batch, use_mm_start_end)
    max_length = tokenizer.model_max_length if max_length is None else max_length
    if max_length - TRAIN_TRUNCATION_MARGIN < 1:
        raise ValueError(f"collate_train: max_length {max_length} leaves no room after the {TRAIN_TRUNCATION_MARGIN}-token margin")
    tok = tokenize_conversations(
        out["conversation_list"], tokenizer, template, padding="right", with_labels=True,
        max_length=max_length - TRAIN_TRUNCATION_MARGIN,
    )
    out.update(input_ids=tok["input_ids"], labels=tok["labels"], attention_masks=tok["attention_mask"], inference=False)
    return out


def collate_val(
    batch: Sequence[tuple],
    tokenizer: Any,
    template: str = "llava_v1",
    use_mm_start_end: bool = True,
    padding: Literal["right", "left"] = "right",
) -> dict:
    """Validation/test batch (10-tuples): no labels, no truncation, ``inference=True`` and the id bookkeeping."""
    _check_items(batch, 10, "collate_val", check_seg=False)
    out = _common(batch, use_mm_start_end)
    tok = tokenize_conversations(out["conversation_list"], tokenizer, template, padding=padding, with_labels=False)
    out.update(
        input_ids=tok["input_ids"],
        labels=None,
        attention_masks=tok["attention_mask"],
        inference=True,
        ref_ids=[list(item[7]) for item in batch],
        sent_ids=[list(item[8]) for item in batch],
        conversation_records=[item[9] for item in batch],
    )
    return out
