"""The training initialiser (plain LLaVA + SAM start, READ start), LoRA names, trainable set, merge and export."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel

from model import READForCausalLM
from model.builder import READInitArgs, init_read_model, load_read_for_inference
from model.lora import merge_lora
from model.sam import build_sam
from tests.helpers.models import (
    save_tiny_clip,
    save_tiny_plain_llava,
    save_tiny_released_checkpoint,
    tiny_read_model,
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("builder")
    model = tiny_read_model(seed=4)
    clip = save_tiny_clip(root / "clip", model)
    torch.manual_seed(9)
    sam_state = build_sam("tiny").state_dict()
    torch.save(sam_state, root / "sam_tiny.pth")
    return {
        "model": model,
        "clip": clip,
        "read": save_tiny_released_checkpoint(root / "read", model, clip),
        "llava": save_tiny_plain_llava(root / "llava", model, clip),
        "sam": root / "sam_tiny.pth",
        "sam_state": sam_state,
    }


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_plain_llava_start(dirs) -> None:
    args = READInitArgs(version=str(dirs["llava"]), vision_tower=str(dirs["clip"]), precision="fp32",
                        sam_checkpoint=str(dirs["sam"]), sam_variant="tiny", lora_r=4, lora_alpha=8)
    torch.manual_seed(0)
    tokenizer, model = init_read_model(args)
    assert isinstance(model, PeftModel)
    base = model.get_base_model()
    assert len(tokenizer) == 1003 and base.config.vocab_size == 1003
    assert (base.config.seg_token_idx, base.config.im_start_token_idx) == (1000, 1001)

    # embeddings: the 1000 old rows kept, 3 new rows ~ N(0, 0.02) in both matrices
    old = dirs["model"]
    assert torch.equal(base.model.embed_tokens.weight[:1000], old.model.embed_tokens.weight[:1000])
    assert torch.equal(base.lm_head.weight[:1000], old.lm_head.weight[:1000])
    new = torch.cat([base.model.embed_tokens.weight[1000:], base.lm_head.weight[1000:]]).detach()
    assert 0.013 < float(new.std()) < 0.027 and abs(float(new.mean())) < 0.01

    # SAM from the .pth; text_hidden_fcs with PyTorch's default Linear init (uniform within 1/sqrt(fan_in))
    sam = base.model.visual_model.state_dict()
    assert all(torch.equal(sam[k], dirs["sam_state"][k]) for k in dirs["sam_state"])
    fc0 = base.model.text_hidden_fcs[0][0].weight.detach()
    bound = 1 / math.sqrt(64)
    assert float(fc0.abs().max()) <= bound and float(fc0.std()) > 0.5 * bound / math.sqrt(3)

    names = _trainable(model)
    lora = {n for n in names if "lora_" in n}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in lora
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight" in lora
    assert len(lora) == 2 * 2 * 2  # 2 layers x {q, v} x {A, B}; none in SAM's q_proj/v_proj
    rest = names - lora
    markers = ("lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs")
    assert rest and all(any(m in n for m in markers) for n in rest)
    expected_rest = {n for n, _ in model.named_parameters() if any(m in n for m in markers) and "lora_" not in n}
    assert rest == expected_rest
    assert all(layer.gradient_checkpointing for layer in base.model.layers)


def test_read_start_merge_and_export(dirs, tmp_path) -> None:
    args = READInitArgs(version=str(dirs["read"]), vision_tower=str(dirs["clip"]), precision="fp32",
                        lora_r=4, lora_alpha=8, lora_dropout=0.0, dice_loss_weight=4.0)
    tokenizer, model = init_read_model(args)
    base = model.get_base_model()
    assert base.config.dice_loss_weight == 4.0 and base.config.vocab_size == 1003  # resize is a no-op
    with torch.no_grad():  # make the merge non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    q = base.model.layers[0].self_attn.q_proj
    expected = q.base_layer.weight + (8 / 4) * q.lora_B.default.weight @ q.lora_A.default.weight
    merged = merge_lora(model)
    assert isinstance(merged, READForCausalLM)
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected)
    merged.save_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / "model.safetensors").is_file()
    tokenizer.save_pretrained(tmp_path / "export")

    tok2, loaded = load_read_for_inference(tmp_path / "export", dirs["clip"], dtype=torch.float32)
    assert len(tok2) == 1003 and not loaded.training
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, merged.model.layers[0].self_attn.q_proj.weight)
    assert loaded.config.seg_token_idx == 1000 and loaded.config.eos_token_id == 2
