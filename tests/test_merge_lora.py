"""LoRA merge: a real (1-process, CPU, gloo) DeepSpeed ZeRO-2 checkpoint of a PEFT-wrapped tiny READ is merged by
scripts/merge_lora_weights.py into a released-layout directory that loads and answers like the unmerged model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataset.conversation import insert_image_tokens, render_prompt, tokenize_with_image
from model.builder import READInitArgs, init_read_model
from model.read import READForCausalLM
from model.tokenizer import READTokenizer
from tests.helpers.models import make_tiny_batch, save_tiny_clip, save_tiny_released_checkpoint, tiny_read_model
from tests.helpers.tokenizer import tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import merge_lora_weights  # noqa: E402

LORA_R, LORA_ALPHA = 4, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_deepspeed_checkpoint(model: torch.nn.Module, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """engine.save_checkpoint of a 1-process ZeRO-2 engine on the CPU; the process group is torn down after."""
    import importlib

    import deepspeed

    ds_comm = importlib.import_module("deepspeed.comm.comm")
    ds_torch = importlib.import_module("deepspeed.comm.torch")  # the package re-exports `torch`, so no `import as`

    for key, value in {"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                       "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    # the shared-memory collective kernel only speeds up multi-process CPU runs; skip its ~2 min JIT build
    monkeypatch.setattr(ds_torch, "build_shm_op", lambda: None)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    # a torch optimizer: DeepSpeed's own AdamW would JIT-compile its fused kernel (minutes) on a fresh machine
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=True)
    try:
        engine.save_checkpoint(str(directory))
    finally:
        deepspeed.comm.destroy_process_group()
        ds_comm.cdb = None


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("merge")
    base_model = tiny_read_model(seed=1)
    clip = save_tiny_clip(root / "clip", base_model)
    base = save_tiny_released_checkpoint(root / "base", base_model, clip)
    torch.manual_seed(0)
    _, peft = init_read_model(READInitArgs(version=str(base), vision_tower=str(clip), precision="fp32",
                                           lora_r=LORA_R, lora_alpha=LORA_ALPHA, gradient_checkpointing=False,
                                           sam_variant=None))
    with torch.no_grad():  # "trained" weights: non-zero LoRA B (A is random already) and a changed text_hidden_fcs
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
            elif "text_hidden_fcs" in name:
                p.add_(0.05 * torch.randn_like(p))
    mp = pytest.MonkeyPatch()
    try:
        save_deepspeed_checkpoint(peft, root / "run" / "ckpt_model", mp)
    finally:
        mp.undo()
    out = root / "READ-tiny"
    argv = ["--ckpt_dir", str(root / "run" / "ckpt_model"), "--version", str(base), "--vision_tower", str(clip),
            "--save_path", str(out), "--precision", "fp32", "--lora_r", str(LORA_R), "--lora_alpha", str(LORA_ALPHA),
            "--max_shard_size", "2MB", "--model_max_length", "1024"]
    assert merge_lora_weights.main(argv) == 0
    return {"root": root, "base": base, "clip": clip, "out": out, "peft": peft.eval(), "argv": argv}


def test_merged_directory_layout(merged) -> None:
    out = merged["out"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["READForCausalLM"] and config["model_type"] == "llava"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    keys = set(index["weight_map"])
    assert not any("vision_tower" in k or "lora_" in k or "base_model" in k for k in keys)
    assert "model.text_hidden_fcs.0.0.weight" in keys and "lm_head.weight" in keys
    assert not (out.parent / (out.name + ".partial")).exists()
    tok = READTokenizer.from_pretrained(out, model_max_length=None)
    assert tok.model_max_length == 1024 and tok.token_to_id("[SEG]") == 1000 and len(tok) == 1003


@torch.no_grad()
def test_merged_model_answers_like_the_unmerged_one(merged) -> None:
    peft = merged["peft"]
    model = READForCausalLM.from_pretrained(str(merged["out"]), vision_tower=str(merged["clip"]))
    base = READForCausalLM.from_pretrained(str(merged["base"]), vision_tower=str(merged["clip"]))
    # W_merged = W_base + (alpha / r) B A, recomputed here from the PEFT model's adapters
    inner = peft.get_base_model()
    for i in range(model.config.num_hidden_layers):
        for proj in ("q_proj", "v_proj"):
            lora = getattr(inner.model.layers[i].self_attn, proj)
            delta = (LORA_ALPHA / LORA_R) * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
            assert delta.abs().max() > 1e-2
            w_base = getattr(base.model.layers[i].self_attn, proj).weight
            torch.testing.assert_close(getattr(model.model.layers[i].self_attn, proj).weight, w_base + delta)
    torch.testing.assert_close(model.model.text_hidden_fcs[0][0].weight, inner.model.text_hidden_fcs[0][0].weight)

    batch = make_tiny_batch([[("<image>\nWhat is in the picture?", "It is [SEG].")]], [(40, 52)], seed=3)
    ref = peft(**batch)
    got = model(**batch)
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["pred_masks"][0], ref["pred_masks"][0], rtol=1e-4, atol=1e-4)

    prompt = insert_image_tokens(render_prompt([("<image>\nWhat is in the picture?", None)], "llava_v1"))
    ids = tokenize_with_image(prompt, tiny_tokenizer())
    embedding = model.encode_images_sam(batch["images"][:1])  # SAM's image encoder carries no LoRA
    args = (batch["images_clip"][:1], None, [ids], batch["sam_mask_shape_list"][:1])
    (a,) = inner.generate_masks(*args, max_new_tokens=4, image_embeddings=embedding)
    (b,) = model.generate_masks(*args, max_new_tokens=4, image_embeddings=embedding)
    assert a.token_ids == b.token_ids
    assert len(a.mask_logits) == len(b.mask_logits)
    for x, y in zip(a.mask_logits, b.mask_logits):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_wrong_lora_rank_and_missing_checkpoint_are_reported(merged, tmp_path) -> None:
    argv = list(merged["argv"])
    argv[argv.index("--save_path") + 1] = str(tmp_path / "x")
    argv[argv.index("--lora_r") + 1] = "8"
    with pytest.raises(SystemExit, match=r"--lora_r.*shape mismatches: base_model\.model\.model\.layers.*lora_A.*checkpoint \[4, 64\], model \[8, 64\]"):
        merge_lora_weights.main(argv)
    assert not (tmp_path / "x").exists()
    env = dict(os.environ, EXP_DIRECTORY=str(tmp_path / "nowhere"))
    proc = subprocess.run(["bash", str(REPO / "merge_lora_weight.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "nowhere/ckpt_model is not a DeepSpeed checkpoint directory" in proc.stderr


def test_lora_and_sasp_settings_come_from_the_runs_run_args(merged, tmp_path) -> None:
    """Without --lora_r/--lora_alpha/--sasp_preset the merge reads them from run_args.json beside ckpt_model."""
    from dataclasses import asdict

    from model.sasp import SasPConfig

    run_args = merged["root"] / "run" / "run_args.json"
    sasp = asdict(SasPConfig.preset("read-13b"))
    run_args.write_text(json.dumps({"lora_r": LORA_R, "lora_alpha": LORA_ALPHA,
                                    "lora_target_modules": "q_proj,v_proj", "sasp": sasp}))
    try:
        argv = list(merged["argv"])
        for flag in ("--lora_r", "--lora_alpha"):
            i = argv.index(flag)
            del argv[i : i + 2]
        argv[argv.index("--save_path") + 1] = str(tmp_path / "from-run-args")
        assert merge_lora_weights.main(argv) == 0
    finally:
        run_args.unlink()
    config = json.loads((tmp_path / "from-run-args" / "config.json").read_text())
    assert config["sasp"]["num_points"] == 60 and config["sasp"]["t_pos"] == 0.6
    first = json.loads((merged["out"] / "model.safetensors.index.json").read_text())["weight_map"]
    again = json.loads((tmp_path / "from-run-args" / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(first) == set(again)
    from safetensors.torch import load_file

    key = "model.layers.0.self_attn.q_proj.weight"
    a = load_file(str(merged["out"] / first[key]))[key]
    b = load_file(str(tmp_path / "from-run-args" / again[key]))[key]
    assert torch.equal(a, b)  # the same LoRA rank/alpha was used, so the same merged weights
