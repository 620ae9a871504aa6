"""`READConfig`: the LLaVA-1.5 LLaMA config plus READ's fields, readable from released ``config.json`` files.

Released LLaVA-1.5 / LISA / SESAME / READ directories declare ``model_type: "llava"``, which transformers 5 maps to
its own nested ``LlavaConfig``. We therefore never go through ``AutoConfig``: :meth:`READConfig.from_released_dict`
reads the flat dict directly, and :meth:`READConfig.to_released_dict` writes ``model_type: "llava"`` back, while the
class itself carries the distinct ``model_type`` ``"read_llava"`` so that nothing collides inside transformers.

The CLIP tower's own config (``vision_config``) is not part of the released file: the tower is always loaded from its
own directory (``mm_vision_tower``), and the presets carry the ViT-L/14-336 numbers for meta-device builds.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, LlamaConfig

RELEASED_MODEL_TYPE = "llava"
RELEASED_ARCHITECTURE = "READForCausalLM"
# architectures a released directory may declare; the field is informational (spec §1.4 b)
KNOWN_ARCHITECTURES = ("READForCausalLM", "SESAMEForCausalLM", "LISAForCausalLM", "LlavaLlamaForCausalLM")

# CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336), the tower of every released checkpoint.
CLIP_VIT_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    projection_dim=768,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_channels=3,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)

_LLAVA_15_COMMON = dict(
    vocab_size=32003,  # 32000 + [SEG], <im_start>, <im_end>
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    mm_hidden_size=1024,
    sam_variant="vit_h",
)

# Each preset is a dict of READConfig kwargs. The token ids of the released presets come from the tokenizer
# (builder.py sets them); the tiny preset uses the ids of tests/helpers/tokenizer.py (vocab 1003).
PRESETS: dict[str, dict[str, Any]] = {
    "read-7b": dict(
        _LLAVA_15_COMMON,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vision_config=CLIP_VIT_L_336,
        sasp_preset="read-7b",
    ),
    "read-13b": dict(
        _LLAVA_15_COMMON,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vision_config=CLIP_VIT_L_336,
        sasp_preset="read-13b",
    ),
    "tiny": dict(
        vocab_size=1003,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        mm_hidden_size=32,
        # still 336/14 = 24x24 = 576 patches: SasP and the SEG shift depend on it
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            projection_dim=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_channels=3,
            image_size=336,
            patch_size=14,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
        sam_variant="tiny",
        sasp_preset="read-7b",
        seg_token_idx=1000,
        im_start_token_idx=1001,
        im_end_token_idx=1002,
    ),
}

# fields READ sets on every construction of the original ReadModel (spec §1.4); written back on save
_FORCED_FIELDS = dict(
    mm_vision_select_feature="patch",
    image_aspect_ratio="square",
    image_grid_pinpoints=None,
    tune_mm_mlp_adapter=False,
    freeze_mm_mlp_adapter=True,
    pretrain_mm_mlp_adapter=None,
    mm_use_im_patch_token=False,
    use_mm_proj=True,
)

# our own fields that are not part of the released file
_NOT_RELEASED = ("vision_config",)


@strict
class READConfig(LlamaConfig):
    """LLaMA sizes + LLaVA-1.5 vision fields + READ fields (SAM, SasP, ids, loss weights).

    ``seg_token_idx`` / ``im_start_token_idx`` are never hard-coded: they come from the tokenizer (builder.py) or the
    preset. ``sasp`` holds the SasP settings as a dict (see :meth:`sasp_config`); ``None`` means ``sasp_preset``.
    """

    model_type = "read_llava"

    # LLaVA-1.5
    mm_vision_tower: str | None = None
    vision_tower: str | None = None
    vision_config: dict | None = None
    mm_hidden_size: int = 1024
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    mm_use_im_start_end: bool = True
    mm_use_im_patch_token: bool = False
    # READ
    train_mask_decoder: bool = True
    out_dim: int = 256
    sam_variant: str = "vit_h"
    sasp_preset: str = "read-7b"
    sasp: dict | None = None
    seg_token_idx: int | None = None
    im_start_token_idx: int | None = None
    im_end_token_idx: int | None = None
    ce_loss_weight: float = 1.0
    bce_loss_weight: float = 2.0
    dice_loss_weight: float = 0.5

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "READConfig":
        """``"read-7b"``, ``"read-13b"`` (released sizes, SAM ViT-H, CLIP ViT-L/14-336) or ``"tiny"`` (tests)."""
        if name not in PRESETS:
            raise ValueError(f"unknown READ preset {name!r}; expected one of {sorted(PRESETS)}")
        kwargs = copy.deepcopy(PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_released_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "READConfig":
        """Build from a released LLaVA-1.5 / LISA / SESAME / READ ``config.json`` dict (model_type ``"llava"``).

        Applies the original constructor's rules: a config without ``train_mask_decoder`` (plain LLaVA-1.5) gets
        ``mm_use_im_start_end=True``, ``train_mask_decoder=True`` and ``out_dim=256``; ``vision_tower`` and
        ``mm_vision_tower`` mirror each other.
        """
        d = dict(raw)
        model_type = d.pop("model_type", None)
        if model_type not in (RELEASED_MODEL_TYPE, cls.model_type):
            raise ValueError(
                f"{source}: model_type is {model_type!r}; expected {RELEASED_MODEL_TYPE!r} (a LLaVA-1.5, LISA, "
                f"SESAME or READ checkpoint)"
            )
        for legacy in ("torch_dtype", "transformers_version", "_name_or_path", "max_length", "model_max_length"):
            d.pop(legacy, None)
        if d.get("rope_scaling") is None:
            d.pop("rope_scaling", None)
        if "train_mask_decoder" not in d:
            d.update(mm_use_im_start_end=True, train_mask_decoder=True, out_dim=256)
        tower = d.get("mm_vision_tower") or d.get("vision_tower")
        d["mm_vision_tower"] = d["vision_tower"] = tower
        if "default_im_start_token_idx" in d and "im_start_token_idx" not in d:
            d["im_start_token_idx"] = d.pop("default_im_start_token_idx")
        d.update(_FORCED_FIELDS)
        d.setdefault("sam_variant", "vit_h")
        # LLaVA's builder reads a missing projector type as a single Linear (LLaVA-v1-based LISA configs)
        d.setdefault("mm_projector_type", "linear")
        if d.get("sasp") is None and "sasp_preset" not in d:
            # released configs carry no SasP settings: use the ones the original shipped for that model size
            d["sasp_preset"] = "read-13b" if d.get("hidden_size") == 5120 else "read-7b"
        return cls(**d)

    def to_released_dict(self) -> dict[str, Any]:
        """The ``config.json`` content of a released READ directory (``model_type: "llava"``)."""
        d = self.to_dict()
        for key in _NOT_RELEASED:
            d.pop(key, None)
        d.update(_FORCED_FIELDS)
        d["model_type"] = RELEASED_MODEL_TYPE
        d["architectures"] = [RELEASED_ARCHITECTURE]
        d["vision_tower"] = d.get("mm_vision_tower")
        d["use_cache"] = False
        return d

    # ------------------------------------------------------------------ typed views
    def clip_vision_config(self) -> CLIPVisionConfig:
        """The CLIP tower config; set from the tower's directory when loading, from the preset otherwise."""
        if self.vision_config is None:
            raise ValueError(
                "READConfig.vision_config is not set: load CLIP's config from its directory "
                "(READForCausalLM.from_pretrained(..., vision_tower=<clip dir>)) or use READConfig.from_preset()"
            )
        cfg = dict(self.vision_config)
        for key in ("model_type", "transformers_version", "architectures"):
            cfg.pop(key, None)
        return CLIPVisionConfig(**cfg)

    def sasp_config(self):
        """SasP settings: ``sasp`` when set, else the named preset."""
        from .sasp import SasPConfig

        if self.sasp is not None:
            return SasPConfig(**self.sasp)
        return SasPConfig.preset(self.sasp_preset)

    def set_sasp(self, sasp_config) -> None:
        """Store a `SasPConfig` (as a dict, so config.json stays JSON)."""
        self.sasp = asdict(sasp_config)

    def loss_weights(self):
        """The CE / BCE / Dice weights as `model.losses.LossWeights`."""
        from .losses import LossWeights

        return LossWeights(ce=self.ce_loss_weight, bce=self.bce_loss_weight, dice=self.dice_loss_weight)

    def require_seg_token_idx(self) -> int:
        """``seg_token_idx``; stops with a clear message when the tokenizer id was never set."""
        if self.seg_token_idx is None:
            raise ValueError(
                "READConfig.seg_token_idx is not set: pass seg_token_idx=tokenizer.seg_token_id "
                "(model/builder.py does this) before running the segmentation forward or generation"
            )
        return int(self.seg_token_idx)
