"""The quick start end to end with very few steps: it writes data, tokenizer and tiny model, trains with DeepSpeed,
validates before and after, and writes its metrics JSON (the full run, 200 steps, is what shows learning)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.tokenizer import READTokenizer
from utils.io import read_jsonl

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_quickstart_reduced_run(tmp_path):
    out = tmp_path / "qs"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "scripts/quickstart.py", "--out", str(out), "--epochs", "1",
                           "--steps_per_epoch", "2", "--warmup_steps", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1 = masks not better yet (2 steps)
    summary = json.loads((out / "quickstart_metrics.json").read_text())
    assert summary["improved"] == (proc.returncode == 0)
    assert [h["step"] for h in summary["history"]] == [0, 2]
    assert summary["final"]["step"] == 2 and 0.0 <= summary["step0"]["giou"] <= 1.0
    assert f"step 0:    gIoU {summary['step0']['giou']:.4f}  cIoU {summary['step0']['ciou']:.4f}" in proc.stdout
    tok = READTokenizer.from_pretrained(out / "tiny_read")  # the tokenizer trained on the fly
    assert tok.seg_token_id == len(tok) - 3 and tok.encode("[SEG]", add_bos=False) == [tok.seg_token_id]
    assert (out / "data" / "reason_seg" / "ReasonSeg" / "val").is_dir()
    train = [r for r in read_jsonl(out / "run" / "log.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2] and train[0]["loss"] > 0  # logged every 10 steps and at epoch end
    assert (out / "run" / "ckpt_model" / "latest").is_file()
