"""READ's module layout against the released checkpoints' key/shape lists, and READConfig's config.json rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model import READConfig, READForCausalLM
from tests.helpers.tokenizer import shared_dir

LEGACY_SUFFIX = "rotary_emb.inv_freq"


def _fixture(name: str) -> dict:
    path = shared_dir() / "fixtures" / f"{name}-state-dict.json"
    return json.loads(Path(path).read_text())


@pytest.mark.parametrize("preset", ["read-7b", "read-13b"])
def test_meta_build_matches_released_state_dict(preset: str) -> None:
    fixture = _fixture(preset)
    with torch.device("meta"):
        model = READForCausalLM(READConfig.from_preset(preset))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert all(v.is_meta for v in model.state_dict().values())

    released = {k: v for k, v in fixture["checkpoint"].items() if not k.endswith(LEGACY_SUFFIX)}
    assert any(k.endswith(LEGACY_SUFFIX) for k in fixture["checkpoint"])  # the fixture does list the legacy keys
    ours = {k: v for k, v in shapes.items() if "vision_tower" not in k}
    assert ours == released

    tower = {k: v for k, v in shapes.items() if "vision_tower" in k}
    assert tower == fixture["vision_tower"]
    assert not any(LEGACY_SUFFIX in k for k in shapes)


def test_tiny_preset_keeps_real_interfaces() -> None:
    cfg = READConfig.from_preset("tiny")
    with torch.device("meta"):
        model = READForCausalLM(cfg)
    assert model.model.vision_tower.num_patches == 576
    assert model.model.mm_projector[0].in_features == cfg.mm_hidden_size == cfg.vision_config["hidden_size"]
    assert model.model.text_hidden_fcs[0][2].out_features == 256
    assert isinstance(model.model.mm_projector[1], torch.nn.GELU)
    assert model.lm_head.weight.shape == (1003, 64)
    assert (cfg.seg_token_idx, cfg.im_start_token_idx, cfg.im_end_token_idx) == (1000, 1001, 1002)
    with pytest.raises(ValueError, match="unknown READ preset"):
        READConfig.from_preset("read-70b")


LLAVA15_CONFIG = {
    "_name_or_path": "llava-v1.5-7b",
    "architectures": ["LlavaLlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "freeze_mm_mlp_adapter": False,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "image_aspect_ratio": "pad",
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_length": 4096,
    "max_position_embeddings": 4096,
    "mm_hidden_size": 1024,
    "mm_projector_type": "mlp2x_gelu",
    "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    "model_type": "llava",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.31.0",
    "tune_mm_mlp_adapter": False,
    "use_cache": True,
    "use_mm_proj": True,
    "vocab_size": 32000,
}


def test_released_config_plain_llava_gets_read_fields() -> None:
    cfg = READConfig.from_released_dict(LLAVA15_CONFIG)
    assert cfg.model_type == "read_llava"  # never transformers' own "llava"
    assert cfg.mm_use_im_start_end is True and cfg.train_mask_decoder is True and cfg.out_dim == 256
    assert cfg.vision_tower == cfg.mm_vision_tower == "openai/clip-vit-large-patch14-336"
    assert cfg.image_aspect_ratio == "square" and cfg.mm_use_im_patch_token is False
    assert cfg.rope_parameters["rope_theta"] == 10000.0 and cfg.rms_norm_eps == 1e-5
    assert cfg.seg_token_idx is None  # ids come from the tokenizer, never hard-coded
    out = cfg.to_released_dict()
    assert out["model_type"] == "llava" and out["architectures"] == ["READForCausalLM"]
    assert "vision_config" not in out


def test_released_config_read_fields_are_kept_and_wrong_type_stops() -> None:
    read_cfg = dict(LLAVA15_CONFIG, architectures=["SESAMEForCausalLM"], train_mask_decoder=True,
                    mm_use_im_start_end=False, out_dim=256, vision_tower="/clip", mm_vision_tower="/clip")
    cfg = READConfig.from_released_dict(read_cfg)
    assert cfg.mm_use_im_start_end is False  # only a plain LLaVA start forces it on
    with pytest.raises(ValueError, match="model_type is 'llava_next'"):
        READConfig.from_released_dict(dict(LLAVA15_CONFIG, model_type="llava_next"), source="x/config.json")
