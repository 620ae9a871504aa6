"""READ inference: greedy generation with the KV cache, then one SasP + SAM mask per generated ``[SEG]``.

The original (spec §5) ran transformers 4.31 ``generate`` with the cache disabled, re-encoding CLIP and re-running
the whole sequence for every new token, so that the last step's hidden states spanned the full sequence. Causal
attention makes the states of a prefix independent of what follows, so the same vectors come from a cached run:

- the 576 image states come from the prefill pass (row b's image starts at its ``-200`` position);
- the SEG state of a ``[SEG]`` is the last-layer state of the step that *emitted* it (the position before it,
  spec §2.4), i.e. the state whose LM-head output was ``[SEG]``.

Batches are left-padded (attention mask + position ids counting valid tokens), each row stops at EOS or after
``max_new_tokens``; rows that finished keep being fed the pad id, which nothing reads. Every ``[SEG]`` of an
answer gets its own SasP points and mask (the original crashed on two); ``present`` follows SESAME: a ``[SEG]``
was generated and the first ``[SEG]``'s mask is non-empty. Each row uses its own image size (the original used
row 0's for every row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicCache

from .constants import IMAGE_TOKEN_INDEX

if TYPE_CHECKING:
    from .read import READForCausalLM
    from .sasp import SasPConfig


@dataclass
class GenerationResult:
    """One row's answer and masks (all tensors on the CPU)."""

    token_ids: list[int]
    mask: torch.Tensor  # [H, W] bool: masks[0], or all False without [SEG]
    present: bool
    masks: list[torch.Tensor] = field(default_factory=list)  # [H, W] bool per [SEG]
    mask_logits: list[torch.Tensor] = field(default_factory=list)  # [H, W] float32 per [SEG]
    points: list[torch.Tensor] = field(default_factory=list)  # [P, 2] float32 per [SEG]
    point_labels: list[torch.Tensor] = field(default_factory=list)  # [P] int64 per [SEG]
    similarity: list[torch.Tensor] = field(default_factory=list)  # [576] float32 per [SEG]


def left_pad(rows: Sequence[Sequence[int] | torch.Tensor], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids left-padded with ``pad_id`` and the [B, L] bool mask of real tokens."""
    tensors = [torch.as_tensor(r, dtype=torch.long).flatten() for r in rows]
    width = max(t.numel() for t in tensors)
    ids = torch.full((len(tensors), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(tensors), width), dtype=torch.bool)
    for i, t in enumerate(tensors):
        if t.numel():
            ids[i, width - t.numel() :] = t
            mask[i, width - t.numel() :] = True
    return ids.to(device), mask.to(device)


def _eos_ids(config) -> set[int]:
    eos = config.eos_token_id
    if eos is None:
        raise ValueError("generate_masks: config.eos_token_id is not set")
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _check_inputs(
    images_clip: torch.Tensor,
    images: torch.Tensor | None,
    input_ids: Sequence,
    sam_mask_shape_list: Sequence,
    image_embeddings: torch.Tensor | None,
    max_new_tokens: int,
) -> None:
    b = len(input_ids)
    if b == 0:
        raise ValueError("generate_masks: input_ids is empty")
    if images_clip.shape[0] != b or len(sam_mask_shape_list) != b:
        raise ValueError(
            f"generate_masks: {b} prompts need {b} rows of images_clip (got {images_clip.shape[0]}) and "
            f"{b} sam_mask_shape_list entries (got {len(sam_mask_shape_list)})"
        )
    if image_embeddings is None and (images is None or images.shape[0] != b):
        raise ValueError(f"generate_masks: pass images [{b},3,1024,1024] or image_embeddings [{b},256,64,64]")
    if image_embeddings is not None and image_embeddings.shape[0] != b:
        raise ValueError(f"generate_masks: image_embeddings has {image_embeddings.shape[0]} rows for {b} prompts")
    for i, ids in enumerate(input_ids):
        n = int((torch.as_tensor(ids) == IMAGE_TOKEN_INDEX).sum())
        if n != 1:
            raise ValueError(f"generate_masks: prompt {i} holds {n} image placeholders ({IMAGE_TOKEN_INDEX}); expected 1")
    if max_new_tokens < 1:
        raise ValueError(f"generate_masks: max_new_tokens must be >= 1, got {max_new_tokens}")


@torch.no_grad()
def greedy_decode(
    model: "READForCausalLM",
    images_clip: torch.Tensor,
    input_ids: Sequence[Sequence[int] | torch.Tensor],
    max_new_tokens: int,
) -> dict[str, torch.Tensor]:
    """Greedy decoding with a DynamicCache.

    Returns ``tokens`` [B, S] (S <= max_new_tokens; entries after a row's EOS are meaningless), ``lengths`` [B]
    (tokens per row, EOS included), ``step_states`` [B, S, H] (the last-layer state that produced each token),
    ``image_states`` [B, 576, H] (prefill).
    """
    cfg = model.config
    device = model.lm_head.weight.device
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    eos = torch.tensor(sorted(_eos_ids(cfg)), device=device)
    ids, mask = left_pad(input_ids, pad, device)
    features = model.model.encode_images(images_clip.to(device))
    mm = model.model.prepare_multimodal(ids, features, mask)
    cache = DynamicCache(config=cfg)
    hidden = model.language_model_forward(mm, past_key_values=cache, use_cache=True).last_hidden_state
    b = hidden.shape[0]
    n_img = model.model.vision_tower.num_patches
    rows = torch.arange(b, device=device)
    image_states = hidden[rows[:, None], mm.image_start[:, None] + torch.arange(n_img, device=device)[None]]

    last = hidden[:, -1]
    attention = mm.attention_mask.to(torch.long)
    position = mm.position_ids[:, -1]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)
    tokens, states = [], []
    for step in range(max_new_tokens):
        next_token = model.lm_head(last).argmax(-1)
        tokens.append(next_token)
        states.append(last)
        lengths = lengths + (~done).long()
        done = done | torch.isin(next_token, eos)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        feed = next_token.masked_fill(done, pad)
        attention = torch.cat([attention, attention.new_ones(b, 1)], 1)
        position = position + 1
        out = model.model(
            input_ids=feed[:, None],
            attention_mask=attention,
            position_ids=position[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        last = out.last_hidden_state[:, -1]
    return {
        "tokens": torch.stack(tokens, 1),
        "lengths": lengths,
        "step_states": torch.stack(states, 1),
        "image_states": image_states,
    }


@torch.no_grad()
def generate_masks(
    model: "READForCausalLM",
    images_clip: torch.Tensor,
    images: torch.Tensor | None,
    input_ids: Sequence[Sequence[int] | torch.Tensor],
    sam_mask_shape_list: Sequence,
    max_new_tokens: int = 512,
    image_embeddings: torch.Tensor | None = None,
    sasp_config: "SasPConfig | None" = None,
) -> list[GenerationResult]:
    """Answer B prompts (row b sees images_clip[b] / images[b]) and segment every ``[SEG]``; see module docstring."""
    _check_inputs(images_clip, images, input_ids, sam_mask_shape_list, image_embeddings, max_new_tokens)
    seg_id = model.config.require_seg_token_idx()
    dec = greedy_decode(model, images_clip, input_ids, max_new_tokens)
    tokens, lengths = dec["tokens"], dec["lengths"]
    b, steps = tokens.shape
    device = tokens.device
    valid = torch.arange(steps, device=device)[None] < lengths[:, None]
    rows, positions = ((tokens == seg_id) & valid).nonzero(as_tuple=True)  # answer order within each row

    sizes = [tuple(int(v) for v in sam_mask_shape_list[r][1]) for r in rows.tolist()]
    prompts = model.seg_prompts(dec["step_states"][rows, positions], dec["image_states"][rows], sizes, sasp_config)

    if image_embeddings is None and rows.numel():
        needed = sorted(set(rows.tolist()))
        encoded = model.encode_images_sam(images[needed])
        embedding_of = {r: encoded[k : k + 1] for k, r in enumerate(needed)}
    else:
        embedding_of = {r: image_embeddings[r : r + 1].to(device) for r in set(rows.tolist())}

    per_row = torch.bincount(rows, minlength=b).tolist()
    chunks = {
        key: prompts[key].split(per_row) for key in ("text_embeds", "points", "labels", "similarity")
    }
    results = []
    for r in range(b):
        (h_in, w_in), (h, w) = sam_mask_shape_list[r]
        ids = tokens[r, : int(lengths[r])].tolist()
        if per_row[r] == 0:
            results.append(GenerationResult(ids, torch.zeros(int(h), int(w), dtype=torch.bool), False))
            continue
        logits = model.decode_masks(
            embedding_of[r],
            chunks["points"][r],
            chunks["labels"][r],
            chunks["text_embeds"][r],
            (h_in, w_in),
            (h, w),
        ).cpu()
        masks = list(logits > 0)
        results.append(
            GenerationResult(
                token_ids=ids,
                mask=masks[0],
                present=bool(masks[0].any()),
                masks=masks,
                mask_logits=list(logits),
                points=list(chunks["points"][r].float().cpu()),
                point_labels=list(chunks["labels"][r].cpu()),
                similarity=list(chunks["similarity"][r].float().cpu()),
            )
        )
    return results


__all__ = ["GenerationResult", "generate_masks", "greedy_decode", "left_pad"]
