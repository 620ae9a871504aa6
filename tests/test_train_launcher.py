"""train_read.py through the ``deepspeed`` launcher on the CPU (gloo): training, kill + resume, 2-process eval.

One reference run (2 epochs x 2 steps, validation each epoch) is shared: its fixed-batch loss must fall, a run
killed after its first checkpoint must resume to the same weights and optimizer state, and a two-process
``--eval_only`` run must report the reference's single-process metrics and match gIoU/cIoU recomputed here with
numpy from the masks it saved.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_read
from tests.helpers.models import save_tiny_clip, save_tiny_released_checkpoint, tiny_read_model
from utils.distributed import DistEnv, seed_everything
from utils.io import read_jsonl

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS, EPOCHS = 2, 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(nproc: int) -> list[str]:
    exe = shutil.which("deepspeed")
    base = [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]
    return base + ["--num_gpus", str(nproc), "--master_port", str(_port()), "train_read.py"]


def run_env() -> dict[str, str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_ckpt")
    model = tiny_read_model(seed=0)
    clip = save_tiny_clip(root / "clip", model)
    return {"ckpt": save_tiny_released_checkpoint(root / "ckpt", model, clip), "clip": clip}


def train_argv(dirs: dict, data: Path, log_base: Path, exp: str, *extra: str) -> list[str]:
    return [
        "--version", str(dirs["ckpt"]), "--vision_tower", str(dirs["clip"]), "--dataset_dir", str(data),
        "--dataset", "reason_seg||refer_seg", "--sample_rates", "1,1", "--precision", "fp32",
        "--epochs", str(EPOCHS), "--steps_per_epoch", str(STEPS), "--batch_size", "1", "--workers", "0",
        "--lr", "0.002", "--warmup_steps", "2", "--print_freq", "1", "--no-gradient_checkpointing",
        "--seed", "7", "--log_base_dir", str(log_base), "--exp_name", exp, *extra,
    ]


def run_to_end(cmd: list[str], log: Path, timeout: float = 240) -> None:
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=REPO, env=run_env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    assert proc.returncode == 0, log.read_text()[-4000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dirs, synthetic_root) -> dict:
    base = tmp_path_factory.mktemp("runs")
    argv = train_argv(tiny_dirs, synthetic_root, base, "ref")
    run_to_end(launcher(1) + argv, base / "ref.log")
    return {"argv": argv, "base": base, "dir": base / "ref"}


def load_states(run_dir: Path, tag: str) -> tuple[dict, dict]:
    d = run_dir / "ckpt_model" / tag
    model = torch.load(d / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    optim = torch.load(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu", weights_only=False)
    return model, optim


def fixed_batch_loss(model: torch.nn.Module, batch: dict) -> float:
    with torch.no_grad():
        return float(model(**batch)["loss"])


def test_launcher_training_loss_falls_on_fixed_batch(reference):
    run_dir = reference["dir"]
    records = read_jsonl(run_dir / "log.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in val] == [2, 4]
    # WarmupDecayLR, the LR each step used: 0 -> lr over 2 warm-up steps, then linear decay towards 0 at step 4.
    assert [r["lr"] for r in train] == pytest.approx([0.0, 0.001, 0.002, 0.001])
    assert (run_dir / "ckpt_model" / "last").read_text().strip() == "global_step4"
    best = (run_dir / "ckpt_model" / "latest").read_text().strip()
    best_val = max(val, key=lambda r: r["ciou"])
    assert best == f"global_step{best_val['step']}"
    metas = sorted(p.name for p in run_dir.glob("*_meta_log_*.pth"))
    first = f"epoch0_meta_log_ciou{val[0]['ciou']:.3f}_giou{val[0]['giou']:.3f}.pth"
    assert metas[0] == first and torch.load(run_dir / first)["epoch"] == 0
    assert list(run_dir.glob("events.out.tfevents.*"))
    saved_args = json.loads((run_dir / "run_args.json").read_text())
    assert saved_args["sasp"]["num_points"] == 30 and saved_args["lr"] == 0.002  # read-7b SasP (the default)

    # The loss of the first training batch, before and after the run, with the run's own model construction.
    from dataset.collate import collate_train

    args = train_read.parse_args(reference["argv"])
    train_read.check_args(args)
    seed_everything(args.seed)
    tokenizer, model = train_read.build_model(args, None)
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    data = train_read.build_train_dataset(args, env, train_read.check_train_data(args))
    data.set_epoch(0)
    batch = collate_train([data[0], data[1]], tokenizer, max_length=args.model_max_length)
    model.eval()
    before = fixed_batch_loss(model, batch)
    state, _ = load_states(run_dir, "global_step4")
    model.load_state_dict(state["module"], strict=True)
    after = fixed_batch_loss(model, batch)
    assert after < before - 0.05, (before, after)


def test_killed_run_resumes_at_saved_step_with_same_optimizer_state(reference, tiny_dirs, synthetic_root):
    base = reference["base"]
    argv = train_argv(tiny_dirs, synthetic_root, base, "killed", "--no_eval", "--auto_resume")
    last = base / "killed" / "ckpt_model" / "last"
    with open(base / "killed.log", "w") as out:
        proc = subprocess.Popen(launcher(1) + argv, cwd=REPO, env=run_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 240
        while not (last.is_file() and last.read_text().strip() == f"global_step{STEPS}"):
            assert proc.poll() is None, (base / "killed.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within the time limit"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # mid epoch 1: the next checkpoint does not exist yet
        proc.wait()
    assert not (base / "killed" / "ckpt_model" / f"global_step{2 * STEPS}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").exists()

    run_to_end(launcher(1) + argv, base / "resumed.log")
    records = read_jsonl(base / "killed" / "log.jsonl")
    resume = [r for r in records if r["kind"] == "resume"]
    assert len(resume) == 1 and resume[0]["global_step"] == STEPS and resume[0]["tag"] == f"global_step{STEPS}"
    after_resume = [r["step"] for r in records[records.index(resume[0]):] if r["kind"] == "train"]
    assert after_resume == [3, 4]
    ref_train = {r["step"]: r for r in read_jsonl(reference["dir"] / "log.jsonl") if r["kind"] == "train"}
    for r in records[records.index(resume[0]):]:
        if r["kind"] == "train":  # same data, weights, optimizer and LR after the resume
            assert r["loss"] == pytest.approx(ref_train[r["step"]]["loss"], abs=1e-5)
            assert r["lr"] == pytest.approx(ref_train[r["step"]]["lr"])

    ref_model, ref_optim = load_states(reference["dir"], "global_step4")
    res_model, res_optim = load_states(base / "killed", "global_step4")
    assert ref_model["module"].keys() == res_model["module"].keys()
    for key, value in ref_model["module"].items():
        torch.testing.assert_close(res_model["module"][key], value, rtol=0, atol=1e-6, msg=key)
    assert res_model["lr_scheduler"] == ref_model["lr_scheduler"]
    assert res_model["global_steps"] == ref_model["global_steps"] == 4
    ref_state = ref_optim["optimizer_state_dict"]["base_optimizer_state"]["state"]
    res_state = res_optim["optimizer_state_dict"]["base_optimizer_state"]["state"]
    for ref_w, res_w in zip(ref_optim["optimizer_state_dict"]["single_partition_of_fp32_groups"],
                            res_optim["optimizer_state_dict"]["single_partition_of_fp32_groups"]):
        torch.testing.assert_close(res_w, ref_w, rtol=0, atol=1e-6)
    for group, values in ref_state.items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(res_state[group][name], values[name], rtol=0, atol=1e-7)


def _independent_metrics(mask_dir: Path) -> tuple[float, float, int]:
    """gIoU / cIoU from saved masks, written from the formulas (not with utils.metrics)."""
    ious, inter_sum, union_sum = [], 0.0, 0.0
    for f in sorted(mask_dir.glob("*.npz")):
        z = np.load(f)
        for pred, gt in zip(z["pred"].astype(np.int64), z["gt"].astype(np.int64)):
            valid = gt != 255
            p, g = (pred == 1) & valid, (gt == 1) & valid
            inter, union = float((p & g).sum()), float((p | g).sum())
            ious.append(1.0 if union == 0 else inter / (union + 1e-5))
            inter_sum += inter
            union_sum += union
    return sum(ious) / (len(ious) + 1e-5), inter_sum / (union_sum + 1e-10), len(ious)


def test_two_process_eval_only_matches_single_process_and_saved_masks(reference, tiny_dirs, synthetic_dataset):
    base = reference["base"]
    masks = base / "masks2"
    argv = train_argv(tiny_dirs, synthetic_dataset["root"], base, "eval2", "--eval_only", "--resume",
                      str(reference["dir"] / "ckpt_model"), "--save_masks", str(masks))
    run_to_end(launcher(2) + argv, base / "eval2.log")
    report = json.loads((base / "eval2" / "val_metrics.json").read_text())
    best_tag = (reference["dir"] / "ckpt_model" / "latest").read_text().strip()
    assert report["global_step"] == int(best_tag.removeprefix("global_step"))
    single = [r for r in read_jsonl(reference["dir"] / "log.jsonl") if r["kind"] == "val"
              and r["step"] == report["global_step"]]
    assert len(single) == 1
    assert report["giou"] == pytest.approx(single[0]["giou"], abs=1e-9)
    assert report["ciou"] == pytest.approx(single[0]["ciou"], abs=1e-9)

    # Every validation image exactly once (3 images over 2 ranks: one rank pads, the repeat is not counted).
    val_items = synthetic_dataset["reason_seg"]["splits"]["val"]
    files = sorted(masks.glob("*.npz"))
    assert [f.name for f in files] == [f"{i:06d}.npz" for i in range(len(val_items))]
    assert report["num_masks"] == len(val_items)
    for f, item in zip(files, val_items):
        z = np.load(f)
        assert str(z["image_path"]) == str(item["image"])
        np.testing.assert_array_equal(z["gt"][0], item["mask"])
    giou, ciou, n = _independent_metrics(masks)
    assert n == len(val_items)
    assert report["giou"] == pytest.approx(giou, abs=1e-9)
    assert report["ciou"] == pytest.approx(ciou, abs=1e-9)


def test_zero3_cpu_offload_through_config_file(reference, tiny_dirs, synthetic_root):
    base = reference["base"]
    cfg = REPO / "scripts" / "ds_configs" / "zero3_offload.json"
    argv = train_argv(tiny_dirs, synthetic_root, base, "zero3", "--no_eval", "--deepspeed_config", str(cfg))
    argv[argv.index("--epochs") + 1] = "1"
    run_to_end(launcher(1) + argv, base / "zero3.log")
    tag_dir = base / "zero3" / "ckpt_model" / f"global_step{STEPS}"
    model_states = torch.load(tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu",
                              weights_only=False)
    assert model_states["ds_config"]["zero_optimization"]["stage"] == 3
    assert model_states["ds_config"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert (tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    train = [r for r in read_jsonl(base / "zero3" / "log.jsonl") if r["kind"] == "train"]
    ref = {r["step"]: r for r in read_jsonl(reference["dir"] / "log.jsonl") if r["kind"] == "train"}
    assert [r["step"] for r in train] == [1, 2]
    # Same data and start; the first step has LR 0, so the second step's loss must equal the ZeRO-2 run's.
    for r in train:
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], rel=1e-4)
