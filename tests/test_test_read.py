"""test_read.py end to end on the synthetic FP-RefCOCO set with a tiny released-layout checkpoint (CPU).

The tiny model's LM head is rewired so that greedy decoding answers every prompt with "[SEG]</s>" (as in
tests/test_model_generation.py: at init scale the last state is dominated by the current token's embedding, so
lm_head[next] = 50 * e[current] / |e[current]| makes ``current -> next`` the argmax). Every query therefore goes
through SasP + SAM and produces a real mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import test_read
from dataset.conversation import insert_image_tokens, render_prompt, tokenize_with_image
from dataset.fp_test import FPTestDataset
from dataset.preprocess import ImagePreprocessor
from tests.helpers.models import save_tiny_clip, save_tiny_released_checkpoint, tiny_read_model
from tests.helpers.tokenizer import tiny_tokenizer

SEG, EOS = 1000, 2
DATASET, SPLIT = "fprefcoco", "test"  # the synthetic test split has 2 images (8 + 5 queries)


def seg_answering_model(seed: int = 0):
    """A tiny READ whose greedy answer to any prompt ending in "ASSISTANT:" is "[SEG]</s>"."""
    model = tiny_read_model(seed=seed)
    tok = tiny_tokenizer()
    colon = tokenize_with_image(insert_image_tokens(render_prompt([("<image>\nx", None)], "vicuna_v1")), tok)[-1]
    emb = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        model.lm_head.weight[SEG] = 50 * emb[colon] / emb[colon].norm()
        model.lm_head.weight[EOS] = 50 * emb[SEG] / emb[SEG].norm()
    return model


def write_seg_answering_checkpoint(directory: Path) -> tuple[Path, Path]:
    """(released-layout checkpoint dir, CLIP dir) of `seg_answering_model`."""
    model = seg_answering_model()
    clip = save_tiny_clip(directory / "clip", model)
    ckpt = save_tiny_released_checkpoint(directory / "ckpt", model, clip)
    return ckpt, clip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_seg_answering_checkpoint(tmp_path_factory.mktemp("test_read_model"))[0]


def run_args(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--version", str(ckpt), "--dataset_dir", str(data), "--val_dataset", DATASET, "--split", SPLIT,
            "--out", str(out), "--precision", "fp32", "--device", "cpu", "--max_new_tokens", "3",
            "--query_batch_size", "3", "--workers", "0", "--no_progress", *extra]


def independent_scores(pred_dir: Path) -> dict:
    """See accuracy and cIoU straight from the saved files with numpy (the original's definitions)."""
    inter = union = 0
    correct = total = 0
    for line in (pred_dir / "predictions.jsonl").read_text().splitlines():
        r = json.loads(line)
        z = np.load(pred_dir / r["mask_file"])
        pred, gt = z["pred"].astype(np.int64), z["gt"].astype(np.int64)
        valid = gt != 255
        inter += int(((pred == 1) & (gt == 1) & valid).sum())
        union += int((((pred == 1) | (gt == 1)) & valid).sum())
        correct += sum(a == b for a, b in zip(r["gt_exists"], r["pred_exists"]))
        total += len(r["gt_exists"])
    return {"ciou": inter / (union + 1e-10), "see_accuracy": correct / total, "queries": total}


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def same_outputs(a: Path, b: Path) -> None:
    ra, rb = lines(a / "predictions.jsonl"), lines(b / "predictions.jsonl")
    assert ra == rb
    for r in ra:
        za, zb = np.load(a / r["mask_file"]), np.load(b / r["mask_file"])
        assert np.array_equal(za["pred"], zb["pred"]) and np.array_equal(za["gt"], zb["gt"])


@pytest.fixture(scope="module")
def resumed_run(ckpt, synthetic_root, tmp_path_factory) -> tuple[Path, list[int]]:
    """A run interrupted while on its second image, a torn JSONL line, then a resume that finishes it."""
    out = tmp_path_factory.mktemp("resume") / "out"
    calls: list[int] = []
    real = test_read.answer_image_queries

    def interrupting(*args, **kwargs):
        calls.append(len(args[4]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(test_read, "answer_image_queries", interrupting)
    try:
        assert test_read.main(["run", *run_args(ckpt, synthetic_root, out)]) == 130
    finally:
        mp.undo()
    first = lines(out / "predictions.jsonl")
    assert [r["index"] for r in first] == [0] and not (out / "predictions.done.json").exists()
    with open(out / "predictions.jsonl", "ab") as f:  # a write cut short by the kill
        f.write(b'{"key": "000001_')

    resumed: list[int] = []

    def counting(*args, **kwargs):
        resumed.append(len(args[4]))
        return real(*args, **kwargs)

    mp.setattr(test_read, "answer_image_queries", counting)
    try:
        assert test_read.main(["run", *run_args(ckpt, synthetic_root, out)]) == 0
    finally:
        mp.undo()
    return out, resumed


def test_run_scores_match_independent_computation(resumed_run, synthetic_root, capsys) -> None:
    out, _ = resumed_run
    ds = FPTestDataset(synthetic_root, ImagePreprocessor(), DATASET, split=SPLIT, template="vicuna_v1", seed=42)
    records = lines(out / "predictions.jsonl")
    assert [r["index"] for r in records] == list(range(len(ds))) == [0, 1]
    for r in records:
        item = ds[r["index"]]
        z = np.load(out / r["mask_file"])
        assert r["mask_file"] == f"masks/{r['key']}.npz" and r["key"].startswith(f"{r['index']:06d}_")
        assert np.array_equal(z["gt"], item.gt_masks.numpy()) and z["pred"].shape == z["gt"].shape
        assert set(np.unique(z["pred"])) <= {0, 1}
        assert r["gt_exists"] == item.exists and False in r["gt_exists"]
        assert r["questions"] == item.questions and r["sentences"] == item.sentences
        assert r["pred_sent"] == ["[SEG]"] * len(item.prompts) and r["num_seg"] == [1] * len(item.prompts)
        # "see": a [SEG] was generated and its mask is non-empty
        assert r["pred_exists"] == [bool(m.any()) for m in z["pred"]]
    expected = independent_scores(out)
    assert expected["queries"] == 13 and 0 < expected["ciou"] < 1
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["num_queries"] == 13 and saved["num_images"] == 2
    assert saved["ciou"] == pytest.approx(expected["ciou"], abs=1e-12)
    assert saved["see_accuracy"] == pytest.approx(expected["see_accuracy"], abs=1e-12)

    (out / "metrics.json").unlink()
    capsys.readouterr()
    assert test_read.main(["--cmd=metrics", "--pred_dir", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == (f"[Final Result - {DATASET}] cIoU: {expected['ciou']:.4f} | "
                       f"See Accuracy: {expected['see_accuracy']:.4f}")
    assert json.loads((out / "metrics.json").read_text())["ciou"] == pytest.approx(expected["ciou"], abs=1e-12)


def test_interrupted_run_resumes_without_redoing_finished_images(resumed_run) -> None:
    out, resumed = resumed_run
    assert resumed == [5]  # only the second image (5 queries) ran again; the first (8 queries) was kept
    assert (out / "predictions.done.json").exists()
    assert [r["index"] for r in lines(out / "predictions.jsonl")] == [0, 1]  # the torn line was dropped


def test_two_shards_merged_equal_one_run(resumed_run, ckpt, synthetic_root, tmp_path) -> None:
    single, _ = resumed_run
    out = tmp_path / "sharded"
    assert test_read.main(["run", *run_args(ckpt, synthetic_root, out), "--shard_id", "1", "--num_shards", "2"]) == 0
    assert not (out / "predictions.jsonl").exists()
    with pytest.raises(SystemExit, match=r"shard\(s\) \[0\] of 2 are not finished"):
        test_read.main(["merge", "--pred_dir", str(out)])
    # the original's spelling; this shard finishes last and merges
    assert test_read.main(["--cmd=inference", *run_args(ckpt, synthetic_root, out), "--process_num", "0",
                           "--world_size", "2"]) == 0
    assert [r["index"] for r in lines(out / "predictions.shard0of2.jsonl")] == [0]
    assert [r["index"] for r in lines(out / "predictions.shard1of2.jsonl")] == [1]
    same_outputs(single, out)
    (out / "predictions.jsonl").unlink()
    assert test_read.main(["merge", "--pred_dir", str(out)]) == 0
    same_outputs(single, out)
    assert json.loads((out / "metrics.json").read_text()) == json.loads((single / "metrics.json").read_text())


def test_shard_slices_and_run_config_guard(tmp_path) -> None:
    shards = [test_read.shard_indices(10, test_read.Shard(k, 3)) for k in range(3)]
    assert shards == [list(c) for c in np.array_split(np.arange(10), 3)]
    assert test_read.resolve_shard(None, None, {"RANK": "2", "WORLD_SIZE": "4"}) == test_read.Shard(2, 4)
    assert test_read.resolve_shard(None, None, {}) == test_read.Shard(0, 1)
    with pytest.raises(SystemExit, match="--shard_id"):
        test_read.resolve_shard(3, 3, {})
    test_read.check_run_config(tmp_path, {"val_dataset": "fprefcoco", "split": "val"})
    with pytest.raises(SystemExit, match=r"split: 'val' -> 'test'"):
        test_read.check_run_config(tmp_path, {"val_dataset": "fprefcoco", "split": "test"})
    with pytest.raises(SystemExit, match="no predictions"):
        test_read.main(["metrics", "--pred_dir", str(tmp_path)])
    (tmp_path / "predictions.jsonl").write_text("")
    with pytest.raises(SystemExit, match="the run is not finished"):
        test_read.main(["metrics", "--pred_dir", str(tmp_path)])
