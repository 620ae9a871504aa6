"""LLaVA-1.5 on transformers 5: LLaMA decoder + CLIP ViT tower (layer -2, no CLS) + ``mlp2x_gelu`` projector.

Module names reproduce the original checkpoint layout:

- ``embed_tokens``, ``layers.*``, ``norm``: transformers' own `LlamaModel` (subclassed, so the names are its own);
- ``mm_projector.{0,2}``: Linear, exact GELU, Linear;
- ``vision_tower.vision_tower.vision_model.*``: transformers 5's `CLIPVisionModel` dropped the inner
  ``vision_model`` level that 4.31 had, so :class:`CLIPVisionTower` holds it one level deeper
  (:class:`CLIPLegacyLayout`) to keep the 4.31 names.

Image splicing (:func:`splice_image_features`) is vectorised over rows: every row holds exactly one ``-200``
placeholder that is replaced by the 576 projected CLIP patches. The expanded attention mask marks the image
positions valid and keeps each text token's own mask value, which equals the original's "prepend 575 ones" rule
for right-padded rows and is also correct for left-padded rows (generation). Position ids count valid tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaModel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX


class CLIPLegacyLayout(nn.Module):
    """Holds a `CLIPVisionModel` under ``vision_model`` so parameter names match the 4.31 class."""

    def __init__(self, clip: CLIPVisionModel) -> None:
        super().__init__()
        self.vision_model = clip


class CLIPVisionTower(nn.Module):
    """Frozen CLIP vision tower returning the patch features of one hidden layer (LLaVA's ``select_layer``)."""

    def __init__(self, config: CLIPVisionConfig, select_layer: int = -2, select_feature: str = "patch") -> None:
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"mm_vision_select_feature must be 'patch' or 'cls_patch', got {select_feature!r}")
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.vision_tower = CLIPLegacyLayout(CLIPVisionModel(config))

    @property
    def clip(self) -> CLIPVisionModel:
        return self.vision_tower.vision_model

    def set_clip(self, clip: CLIPVisionModel) -> None:
        """Install a CLIP loaded from its own directory (the released checkpoints never contain it)."""
        self.vision_tower.vision_model = clip

    @property
    def num_patches(self) -> int:
        cfg = self.clip.config
        return (cfg.image_size // cfg.patch_size) ** 2

    @property
    def hidden_size(self) -> int:
        return self.clip.config.hidden_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,S,S] -> [B, num_patches, C] features of ``select_layer`` (no post-layernorm), in ``images``' dtype."""
        param = next(self.clip.parameters())
        out = self.clip(images.to(device=param.device, dtype=param.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            feats = feats[:, 1:]
        return feats.to(images.dtype)


def build_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """``linear`` or ``mlp{N}x_gelu`` (LLaVA-1.5: ``mlp2x_gelu`` = Linear, GELU, Linear)."""
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if match is None:
        raise ValueError(f"mm_projector_type {projector_type!r} is not supported; expected 'mlp2x_gelu' or 'linear'")
    layers: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
    for _ in range(1, int(match.group(1))):
        layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*layers)


@dataclass
class MultimodalInputs:
    """The spliced sequence. ``L' = L + N - 1`` with N image tokens per row."""

    inputs_embeds: torch.Tensor  # [T, L', H]
    attention_mask: torch.Tensor  # [T, L'] bool
    position_ids: torch.Tensor  # [T, L'] long
    expanded_ids: torch.Tensor  # [T, L'] long, image slots hold IMAGE_TOKEN_INDEX
    image_start: torch.Tensor  # [T] long: first image position (= index of the -200 in input_ids)
    labels: torch.Tensor | None  # [T, L'] long, IGNORE_INDEX on image slots


def splice_image_features(
    input_ids: torch.Tensor,
    image_features: torch.Tensor,
    embed_tokens: nn.Module,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    pad_token_id: int = 0,
) -> MultimodalInputs:
    """Replace each row's single ``-200`` by that row's N image vectors (``image_features`` [T,N,H]).

    Token j < q keeps index j, the image fills q..q+N-1 and token j > q moves to j+N-1 (spec §2.3).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [T, L], got shape {tuple(input_ids.shape)}")
    is_image_token = input_ids == IMAGE_TOKEN_INDEX
    per_row = is_image_token.sum(1)
    if not bool((per_row == 1).all()):
        raise ValueError(
            f"every row of input_ids must hold exactly one image placeholder {IMAGE_TOKEN_INDEX}; "
            f"counts per row: {per_row.tolist()}"
        )
    T, L = input_ids.shape
    if image_features.shape[0] != T:
        raise ValueError(f"image_features has {image_features.shape[0]} rows, input_ids has {T}")
    N, H = image_features.shape[1], image_features.shape[2]
    device = input_ids.device
    q = is_image_token.to(torch.int64).argmax(1)  # [T]
    k = torch.arange(L + N - 1, device=device)[None]  # [1, L']
    rel = k - q[:, None]
    is_image = (rel >= 0) & (rel < N)  # [T, L']
    text_index = torch.where(k < q[:, None], k, k - (N - 1)).clamp(0, L - 1)

    text_embeds = embed_tokens(input_ids.masked_fill(is_image_token, pad_token_id))
    gathered = text_embeds.gather(1, text_index[..., None].expand(-1, -1, text_embeds.shape[-1]))
    inputs_embeds = gathered.masked_scatter(is_image[..., None], image_features.to(gathered.dtype).reshape(T, N, H))

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    mask = attention_mask.to(torch.bool).gather(1, text_index) | is_image
    position_ids = (mask.to(torch.int64).cumsum(1) - 1).clamp(min=0)
    expanded_ids = input_ids.gather(1, text_index).masked_fill(is_image, IMAGE_TOKEN_INDEX)
    expanded_labels = None
    if labels is not None:
        expanded_labels = labels.gather(1, text_index).masked_fill(is_image, IGNORE_INDEX)
    return MultimodalInputs(inputs_embeds, mask, position_ids, expanded_ids, q, expanded_labels)


class Float32RotaryEmbedding(LlamaRotaryEmbedding):
    """RoPE whose inverse frequencies stay float32 when the model is cast (``.bfloat16()``, ``.half()``).

    transformers 4.31 built its cos/sin cache from float32 frequencies before any cast; today's rotary module
    recomputes the angles from ``inv_freq`` on every call, so a bf16 ``inv_freq`` would shift them (by ~0.9 rad at
    position 700 for head_dim 128). Device moves still apply.
    """

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and not self.inv_freq.is_meta:
            init = (
                self.compute_default_rope_parameters
                if self.rope_type == "default"
                else ROPE_INIT_FUNCTIONS[self.rope_type]
            )
            inv_freq, _ = init(self.config)
            self.inv_freq = inv_freq.to(device=self.inv_freq.device, dtype=torch.float32)
            self.original_inv_freq = self.inv_freq.clone()
        return self


class LlavaLlamaModel(LlamaModel):
    """`LlamaModel` + CLIP tower + projector (the original ``LlavaLlamaModel``/``LlavaMetaModel``)."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.rotary_emb = Float32RotaryEmbedding(config=config)
        self.vision_tower = CLIPVisionTower(
            config.clip_vision_config(), config.mm_vision_select_layer, config.mm_vision_select_feature
        )
        self.mm_projector = build_projector(config.mm_projector_type, config.mm_hidden_size, config.hidden_size)

    def encode_images(self, images_clip: torch.Tensor) -> torch.Tensor:
        """CLIP (no grad) then the projector: [B,3,336,336] -> [B,576,H] in the projector's dtype."""
        proj_param = next(self.mm_projector.parameters())
        feats = self.vision_tower(images_clip.to(proj_param.device))
        return self.mm_projector(feats.to(proj_param.dtype))

    def prepare_multimodal(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> MultimodalInputs:
        """Splice per-row image features (already projected, [T,576,H]) into the token embeddings."""
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        return splice_image_features(input_ids, image_features, self.embed_tokens, attention_mask, labels, pad)
