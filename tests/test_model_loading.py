"""Released-layout round trips (4.31 .bin shards with legacy inv_freq keys, our safetensors) and loader errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from model import READForCausalLM
from tests.helpers.models import (
    make_tiny_batch,
    save_tiny_clip,
    save_tiny_plain_llava,
    save_tiny_released_checkpoint,
    tiny_read_model,
)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    model = tiny_read_model(seed=3)
    clip = save_tiny_clip(root / "clip", model)
    ckpt = save_tiny_released_checkpoint(root / "read", model, clip, num_shards=3, fmt="bin")
    return {"root": root, "model": model, "clip": clip, "ckpt": ckpt}


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_released_bin_shards_load_back_with_identical_outputs(released) -> None:
    files = sorted(p.name for p in released["ckpt"].iterdir())
    assert "pytorch_model-00001-of-00003.bin" in files and "pytorch_model.bin.index.json" in files
    index = json.loads((released["ckpt"] / "pytorch_model.bin.index.json").read_text())
    assert any(k.endswith("rotary_emb.inv_freq") for k in index["weight_map"])
    assert not any("vision_tower" in k for k in index["weight_map"])

    loaded = READForCausalLM.from_pretrained(released["ckpt"])  # CLIP from config.json's mm_vision_tower
    original = released["model"]
    _same_state(original, loaded)
    for (name, buf), (_, buf2) in zip(original.named_buffers(), loaded.named_buffers()):
        assert torch.equal(buf, buf2), name
    assert not loaded.training
    assert loaded.config.seg_token_idx == 1000 and loaded.config.im_start_token_idx == 1001  # from tokenizer
    assert loaded.config._attn_implementation == "sdpa"

    batch = make_tiny_batch([[("<image>\nWhere is the cup? Please segment it.", "It is [SEG].")]], [(50, 70)], seed=4)
    batch["inference"] = True
    with torch.no_grad():
        a, b = original(**batch), loaded(**batch)
        feats = original.model.encode_images(batch["images_clip"])
        mm = original.model.prepare_multimodal(batch["input_ids"], feats, batch["attention_masks"])
        la = original.lm_head(original.language_model_forward(mm).last_hidden_state)
        mm2 = loaded.model.prepare_multimodal(batch["input_ids"], loaded.model.encode_images(batch["images_clip"]),
                                              batch["attention_masks"])
        lb = loaded.lm_head(loaded.language_model_forward(mm2).last_hidden_state)
    assert torch.equal(a["pred_masks"][0], b["pred_masks"][0])
    assert torch.equal(la, lb)


@pytest.mark.parametrize("architecture", ["SESAMEForCausalLM", "LISAForCausalLM"])
def test_other_released_architectures_load(released, architecture, tmp_path) -> None:
    ckpt = shutil.copytree(released["ckpt"], tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = [architecture]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    loaded = READForCausalLM.from_pretrained(ckpt, vision_tower=released["clip"], dtype="bf16")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.model.vision_tower.clip.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, released["model"].lm_head.weight.to(torch.bfloat16))


def test_save_pretrained_writes_the_released_layout(released, tmp_path) -> None:
    out = tmp_path / "saved"
    released["model"].save_pretrained(out, max_shard_size="1MB")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["architectures"] == ["READForCausalLM"]
    assert cfg["train_mask_decoder"] is True and cfg["out_dim"] == 256 and "vision_config" not in cfg
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not any("vision_tower" in k for k in index["weight_map"])
    assert set(index["weight_map"]) == {k for k in released["model"].state_dict() if "vision_tower" not in k}
    loaded = READForCausalLM.from_pretrained(out, vision_tower=released["clip"])
    _same_state(released["model"], loaded)


def _copy(released, tmp_path) -> Path:
    return Path(shutil.copytree(released["ckpt"], tmp_path / "broken"))


def _edit_shard(ckpt: Path, edit) -> None:
    path = ckpt / "pytorch_model-00003-of-00003.bin"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    index_path = ckpt / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != path.name}
    index["weight_map"].update({k: path.name for k in state})
    index_path.write_text(json.dumps(index))


def test_strict_key_errors_name_the_keys(released, tmp_path) -> None:
    ckpt = _copy(released, tmp_path)
    clip = released["clip"]
    _edit_shard(ckpt, lambda s: s.__setitem__("model.extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"1 unexpected keys: model\.extra\.weight"):
        READForCausalLM.from_pretrained(ckpt, vision_tower=clip)

    _edit_shard(ckpt, lambda s: (s.pop("model.extra.weight"), s.pop("lm_head.weight")))
    with pytest.raises(ValueError, match=r"1 missing keys: lm_head\.weight"):
        READForCausalLM.from_pretrained(ckpt, vision_tower=clip)

    _edit_shard(ckpt, lambda s: s.__setitem__("lm_head.weight", torch.zeros(1003, 65)))
    with pytest.raises(ValueError, match=r"lm_head\.weight \(checkpoint \[1003, 65\], model \[1003, 64\]\)"):
        READForCausalLM.from_pretrained(ckpt, vision_tower=clip)



def test_clip_keys_in_a_checkpoint_are_ignored_clip_comes_from_its_directory(released, tmp_path, caplog) -> None:
    """Spec §1.3: a checkpoint that also carries the (frozen) CLIP loads; the tower is read from its own directory."""
    ckpt = _copy(released, tmp_path)
    _edit_shard(ckpt, lambda s: s.__setitem__("model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight",
                                              torch.zeros(32)))
    with caplog.at_level("WARNING", logger="model.loading"):
        loaded = READForCausalLM.from_pretrained(ckpt, vision_tower=released["clip"])
    assert "ignoring 1 CLIP keys" in caplog.text
    _same_state(released["model"], loaded)  # the zeros were not used: CLIP equals the directory's


def test_rope_frequencies_stay_float32_when_the_model_is_cast(released) -> None:
    model = READForCausalLM.from_pretrained(released["ckpt"])
    reference = model.model.rotary_emb.inv_freq.clone()
    assert reference.dtype == torch.float32
    for cast in (torch.bfloat16, torch.float16):
        rope = model.to(cast).model.rotary_emb
        assert rope.inv_freq.dtype == torch.float32 and torch.equal(rope.inv_freq, reference)
        assert model.lm_head.weight.dtype == cast


def test_released_config_defaults(tmp_path) -> None:
    from model.config import READConfig

    base = {"model_type": "llava", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
            "num_attention_heads": 40, "mm_projector_type": "mlp2x_gelu", "mm_vision_tower": "clip"}
    assert READConfig.from_released_dict(base).sasp_config().num_points == 60  # 13B: the 13B SasP settings
    seven = dict(base, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    assert READConfig.from_released_dict(seven).sasp_config().num_points == 30
    assert READConfig.from_released_dict(dict(base, sasp_preset="read-7b")).sasp_config().num_points == 30
    no_type = {k: v for k, v in seven.items() if k != "mm_projector_type"}
    assert READConfig.from_released_dict(no_type).mm_projector_type == "linear"  # LLaVA's builder default


def test_missing_files_are_named(released, tmp_path) -> None:
    ckpt = _copy(released, tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        READForCausalLM.from_pretrained(ckpt, vision_tower=tmp_path / "nowhere")
    (ckpt / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_model-00002-of-00003.bin"):
        READForCausalLM.from_pretrained(ckpt, vision_tower=released["clip"])
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        READForCausalLM.from_pretrained(ckpt)
    with pytest.raises(FileNotFoundError, match="not found"):
        READForCausalLM.from_pretrained(tmp_path / "absent")


def test_plain_llava_needs_a_sam_checkpoint(released, tmp_path) -> None:
    plain = save_tiny_plain_llava(tmp_path / "llava", released["model"], released["clip"])
    with pytest.raises(ValueError, match="plain LLaVA checkpoint .* sam_checkpoint=<sam_vit_h_4b8939.pth>"):
        READForCausalLM.from_pretrained(plain)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        READForCausalLM.from_pretrained(plain, sam_checkpoint=tmp_path / "missing.pth", sam_variant="tiny")


def test_wrong_clip_tower_and_original_keyword_arguments(released, tmp_path) -> None:
    clip224 = Path(shutil.copytree(released["clip"], tmp_path / "clip224"))
    cfg = json.loads((clip224 / "config.json").read_text())
    cfg["vision_config"]["image_size"] = 224  # the 224-pixel tower the original demo defaulted to: 256 patches
    (clip224 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"clip224 gives 256 patches of width 32, but .* 576 patches of width 32"):
        READForCausalLM.from_pretrained(released["ckpt"], vision_tower=clip224)
    with pytest.warns(UserWarning, match=r"ignores \['device_map', 'low_cpu_mem_usage'\]"):
        model = READForCausalLM.from_pretrained(released["ckpt"], torch_dtype=torch.bfloat16, low_cpu_mem_usage=True,
                                                device_map="auto")
    assert model.lm_head.weight.dtype == torch.bfloat16
