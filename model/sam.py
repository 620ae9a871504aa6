"""SAM for READ: building the standard sizes, loading `sam_vit_*.pth`, and READ's prompt/mask path.

The modules themselves come from the PyPI `segment_anything` package. What READ changed in its vendored
copy (model.md §3.2 step 6, §3.3, §8.10) is re-expressed here as functions that drive those modules:

- the prompt encoder also takes the `[SEG]` text embedding, appended after the points and the pad point;
- positional encodings are computed in the dtype of the gaussian matrix (bf16 for the released model),
  where upstream forces float32 and fails on a bf16 matrix;
- `postprocess_masks` upcasts to float32 first and returns float32 logits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import nn

from model.constants import SAM_IMAGE_SIZE, SAM_PIXEL_MEAN, SAM_PIXEL_STD
from model.state_dict_check import key_mismatch

PROMPT_EMBED_DIM = 256
SAM_PATCH_SIZE = 16

SizeLike = Union[Sequence[int], torch.Size, torch.Tensor]


@dataclass(frozen=True)
class SamVariant:
    """Hyper-parameters of one SAM size; everything downstream of the encoder keeps the real shapes."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    encoder_window_size: int = 14
    decoder_mlp_dim: int = 2048
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16


SAM_VARIANTS: dict[str, SamVariant] = {
    "vit_h": SamVariant(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamVariant(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamVariant(768, 12, 12, (2, 5, 8, 11)),
    # Test-sized encoder and transformer MLP; prompt dim 256, image 1024 and all I/O shapes stay real.
    "tiny": SamVariant(32, 2, 2, (1,), encoder_window_size=4, decoder_mlp_dim=64),
}


def build_sam(
    variant: str, checkpoint: Optional[Union[str, Path]] = None, dtype: Optional[torch.dtype] = None
) -> Sam:
    """Build a SAM of a named size, optionally load `checkpoint` (strict), then cast to `dtype`.

    Works inside `torch.device("meta")`; a checkpoint given there is loaded with `assign=True`, which
    materialises the weights on the CPU without a random initialisation first.
    """
    if variant not in SAM_VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; expected one of {sorted(SAM_VARIANTS)}")
    v = SAM_VARIANTS[variant]
    if checkpoint is not None:
        # the checkpoint replaces every parameter: skip the random init (~640M parameters for vit_h)
        with torch.device("meta"):
            sam = _construct_sam(v)
        load_sam_checkpoint(sam, checkpoint, variant=variant)
        if sam.pixel_mean.is_meta:  # non-persistent buffers are not in the checkpoint
            sam.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1), False)
            sam.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1), False)
    else:
        sam = _construct_sam(v)
    sam.eval()
    if dtype is not None:
        sam.to(dtype)
    return sam


def _construct_sam(v: "SamVariant") -> Sam:
    grid = SAM_IMAGE_SIZE // SAM_PATCH_SIZE
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=v.encoder_depth,
            embed_dim=v.encoder_embed_dim,
            img_size=SAM_IMAGE_SIZE,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=v.encoder_num_heads,
            patch_size=SAM_PATCH_SIZE,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=v.encoder_global_attn_indexes,
            window_size=v.encoder_window_size,
            out_chans=PROMPT_EMBED_DIM,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(SAM_IMAGE_SIZE, SAM_IMAGE_SIZE),
            mask_in_chans=v.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=v.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=v.decoder_depth,
                embedding_dim=PROMPT_EMBED_DIM,
                mlp_dim=v.decoder_mlp_dim,
                num_heads=v.decoder_num_heads,
            ),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=v.iou_head_depth,
            iou_head_hidden_dim=v.iou_head_hidden_dim,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )


def load_sam_checkpoint(sam: Sam, checkpoint: Union[str, Path], variant: str = "?") -> None:
    """Load a `sam_vit_*.pth` state dict (keys `image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`).

    Strict: any missing, unexpected or differently shaped key stops with one message naming the file.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint {str(path)!r} not found (expected a sam_vit_*.pth file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure becomes one clear message
        raise ValueError(f"SAM checkpoint {str(path)!r} could not be read as a torch state dict: {exc}") from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in state.items()
    ):
        raise ValueError(f"SAM checkpoint {str(path)!r} is not a flat mapping of parameter names to tensors")

    expected = {k: tuple(t.shape) for k, t in sam.state_dict().items()}
    problem = key_mismatch(expected, state, found_name="file")
    if problem:
        raise ValueError(f"SAM checkpoint {str(path)!r} does not match SAM variant {variant!r}: {problem}")
    on_meta = any(t.is_meta for t in sam.state_dict().values())
    sam.load_state_dict(state, strict=True, assign=on_meta)


# --------------------------------------------------------------------------------------------------
# Prompt encoding (READ's modified PromptEncoder.forward, points + text, no boxes, no masks)


def _pe_encoding(prompt_encoder: PromptEncoder, coords01: torch.Tensor) -> torch.Tensor:
    """Random-Fourier PE of coords in [0,1]; `2c-1` in the input's dtype, the rest in the gaussian's."""
    gaussian = prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    centred = (2 * coords01 - 1).to(gaussian.dtype)
    proj = (2 * math.pi) * (centred @ gaussian)
    return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


def dense_positional_encoding(prompt_encoder: PromptEncoder) -> torch.Tensor:
    """`get_dense_pe()` with the pixel-centre grid built in the gaussian's dtype: [1, 256, h, w]."""
    gaussian = prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    h, w = prompt_encoder.image_embedding_size
    ys = (torch.arange(h, device=gaussian.device, dtype=gaussian.dtype) + 0.5) / h
    xs = (torch.arange(w, device=gaussian.device, dtype=gaussian.dtype) + 0.5) / w
    grid = torch.stack([xs.unsqueeze(0).expand(h, w), ys.unsqueeze(1).expand(h, w)], dim=-1)
    return _pe_encoding(prompt_encoder, grid).permute(2, 0, 1).unsqueeze(0)


def embed_prompts(
    prompt_encoder: PromptEncoder, points: torch.Tensor, labels: torch.Tensor, text_embeds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse tokens [n, P+2, 256] (P points, pad point, text) in text_embeds' dtype; dense [n, 256, 64, 64].

    Points are in the 1024 frame (see `scale_points_to_sam_frame`). Labels: 1 positive, 0 negative,
    -1 "not a point" (its position is dropped, exactly like the pad point).
    """
    dim = prompt_encoder.embed_dim
    if points.dim() != 3 or points.shape[-1] != 2:
        raise ValueError(f"embed_prompts: points must be [n, P, 2], got {list(points.shape)}")
    n = points.shape[0]
    if tuple(labels.shape) != tuple(points.shape[:2]):
        raise ValueError(f"embed_prompts: labels must be {list(points.shape[:2])}, got {list(labels.shape)}")
    if text_embeds.dim() != 3 or text_embeds.shape[0] != n or text_embeds.shape[1] != 1 or text_embeds.shape[2] != dim:
        raise ValueError(f"embed_prompts: text_embeds must be [{n}, 1, {dim}], got {list(text_embeds.shape)}")

    # Pixel-centre shift, then the pad point (0, 0) with label -1 because no boxes are given.
    shifted = points + 0.5
    pad_point = torch.zeros((n, 1, 2), device=points.device, dtype=torch.float32)
    coords = torch.cat([shifted, pad_point], dim=1)
    labels = torch.cat([labels, torch.full((n, 1), -1, device=labels.device, dtype=labels.dtype)], dim=1)
    in_h, in_w = prompt_encoder.input_image_size
    coords = (coords / coords.new_tensor([in_w, in_h])).to(torch.float32)
    pe = _pe_encoding(prompt_encoder, coords)

    lab = labels.unsqueeze(-1)
    not_a_point = prompt_encoder.not_a_point_embed.weight[0]
    negative = prompt_encoder.point_embeddings[0].weight[0]
    positive = prompt_encoder.point_embeddings[1].weight[0]
    added = torch.where(
        lab == -1,
        not_a_point,
        torch.where(lab == 0, negative, torch.where(lab == 1, positive, torch.zeros_like(positive))),
    )
    point_tokens = (pe.masked_fill(lab == -1, 0.0) + added).to(pe.dtype)

    sparse = torch.cat([point_tokens.to(text_embeds.dtype), text_embeds], dim=1)
    eh, ew = prompt_encoder.image_embedding_size
    dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, eh, ew)
    return sparse, dense


# --------------------------------------------------------------------------------------------------
# Coordinates, decoding, post-processing


def _pair(size: SizeLike, what: str) -> tuple[int, int]:
    values = size.tolist() if isinstance(size, torch.Tensor) else list(size)
    if len(values) != 2:
        raise ValueError(f"{what} must be (height, width), got {values!r}")
    return int(values[0]), int(values[1])


def scale_points_to_sam_frame(
    points: torch.Tensor, original_size: SizeLike, long_side: int = SAM_IMAGE_SIZE
) -> torch.Tensor:
    """Map (x, y) in original pixels to the resized-longest-side frame; differentiable, float32.

    new_h = int(H * s + 0.5), new_w = int(W * s + 0.5) with s = long_side / max(H, W), as the resize of
    the SAM input; an empty tensor is returned unchanged.
    """
    if points.numel() == 0:
        return points
    old_h, old_w = _pair(original_size, "original_size")
    scale = long_side * 1.0 / max(old_h, old_w)
    new_h, new_w = int(old_h * scale + 0.5), int(old_w * scale + 0.5)
    coords = points.float()
    return torch.stack([coords[..., 0] * (new_w / old_w), coords[..., 1] * (new_h / old_h)], dim=-1)


def postprocess_masks(
    low_res: torch.Tensor, input_size: SizeLike, original_size: SizeLike, image_size: int = SAM_IMAGE_SIZE
) -> torch.Tensor:
    """Low-res logits [n, 1, 256, 256] -> float32 logits [n, H, W]: upsample, crop the padding, resize."""
    h_in, w_in = _pair(input_size, "input_size")
    out_hw = _pair(original_size, "original_size")
    masks = F.interpolate(low_res.float(), (image_size, image_size), mode="bilinear", align_corners=False)
    masks = masks[..., :h_in, :w_in]
    masks = F.interpolate(masks, out_hw, mode="bilinear", align_corners=False)
    return masks[:, 0]


def predict_masks(
    sam: Sam,
    image_embedding: torch.Tensor,
    points: torch.Tensor,
    labels: torch.Tensor,
    text_embeds: torch.Tensor,
    input_size: SizeLike,
    original_size: SizeLike,
) -> torch.Tensor:
    """READ's `generate_pred_masks` for one image: float32 mask logits [n, H, W] (n may be 0).

    points [n, P, 2] are in original pixels; text_embeds [n, 256] or [n, 1, 256]; image_embedding
    [1, 256, 64, 64] (or [256, 64, 64]). Decoder inputs are cast to the decoder's parameter dtype.
    """
    if text_embeds.dim() == 2:
        text_embeds = text_embeds.unsqueeze(1)
    if points.numel() == 0 and points.dim() != 3:
        # No SEG anywhere in the batch: SasP hands over 1-D empty tensors.
        points, labels = points.reshape(0, 0, 2), labels.reshape(0, 0)
    if image_embedding.dim() == 3:
        image_embedding = image_embedding.unsqueeze(0)
    if image_embedding.dim() != 4 or image_embedding.shape[0] != 1:
        raise ValueError(f"predict_masks: image_embedding must be [1, C, h, w], got {list(image_embedding.shape)}")
    if points.shape[0] != text_embeds.shape[0]:
        raise ValueError(
            f"predict_masks: {points.shape[0]} point sets for {text_embeds.shape[0]} text embeddings"
        )

    n = points.shape[0]
    if n == 0:
        # Upstream's decoder cannot reshape a 0-mask batch (the fork could). Decode one dummy prompt
        # appended to the empty inputs and drop it: same [0, H, W] result, and the decoder and the
        # inputs stay in the autograd graph with zero gradients, as in the original.
        points = torch.cat([points, points.new_zeros((1, *points.shape[1:]))])
        labels = torch.cat([labels, labels.new_full((1, *labels.shape[1:]), -1)])
        text_embeds = torch.cat([text_embeds, text_embeds.new_zeros((1, *text_embeds.shape[1:]))])

    coords = scale_points_to_sam_frame(points, original_size)
    sparse, dense = embed_prompts(sam.prompt_encoder, coords, labels, text_embeds)
    dtype = next(sam.mask_decoder.parameters()).dtype
    low_res, _ = sam.mask_decoder(
        image_embeddings=image_embedding.to(dtype),
        image_pe=dense_positional_encoding(sam.prompt_encoder).to(dtype),
        sparse_prompt_embeddings=sparse.to(dtype),
        dense_prompt_embeddings=dense.to(dtype),
        multimask_output=False,
    )
    return postprocess_masks(low_res[:n], input_size, original_size, image_size=sam.image_encoder.img_size)


__all__ = [
    "SAM_VARIANTS",
    "SamVariant",
    "build_sam",
    "load_sam_checkpoint",
    "embed_prompts",
    "dense_positional_encoding",
    "scale_points_to_sam_frame",
    "postprocess_masks",
    "predict_masks",
]
