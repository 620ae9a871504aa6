"""train_read.sh / val_read.sh: every preset expands to a train_read.py command with the recipe's values."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

import train_read

REPO = Path(__file__).resolve().parents[1]


def dry_run(script: str, *args: str, **env: str) -> tuple[list[str], "object"]:
    proc = subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True,
                          env=dict(os.environ, DRY_RUN="1", **env), timeout=30)
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout.strip().splitlines()[-1])
    i = words.index("train_read.py")
    return words[:i], train_read.parse_args(words[i + 1 :])


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("read7b-from-sesame", dict(use_released_param=True, lora_r=8, lr=1e-4, sample_rates="10,1,1,1,1,10",
                                    sasp_preset="read-7b", dice_loss_weight=0.5)),
        ("read7b-from-scratch", dict(use_released_param=False, lora_r=64, lr=1e-4, dice_loss_weight=4.0,
                                     sasp_preset="read-7b", sample_rates="10,1,1,1,1,10")),
        ("read13b-stage1", dict(use_released_param=False, lora_r=64, lr=3e-4, sample_rates="10,10,2,3,1,1",
                                sasp_preset="read-13b-stage1")),
        ("read13b-stage2", dict(use_released_param=True, lora_r=64, lr=1e-4, sample_rates="3,10,2,3,1,10",
                                sasp_preset="read-13b-stage2")),
        ("referseg", dict(dataset="refer_seg||correct_refer_seg||vqa||neg_refer_seg", sample_rates="12,2,2,1")),
    ],
)
def test_train_presets(preset, expected):
    launch, args = dry_run("train_read.sh", preset, "--epochs", "3", DATASET_DIR="/data", SAM_CKPT="/dev/null")
    assert launch[:3] == ["deepspeed", "--include", "localhost:0"] and "--master_port" in launch
    for key, value in expected.items():
        assert getattr(args, key) == value, key
    assert args.epochs == 3  # extra flags come last and win
    assert args.dataset_dir == "/data" and args.vision_tower == "/data/clip-vit-large-patch14-336"
    assert (args.batch_size, args.grad_accumulation_steps, args.model_max_length) == (2, 10, 2048)
    assert args.auto_resume and args.num_classes_per_sample == 3
    if not args.use_released_param:
        assert args.vision_pretrained == "/dev/null"
    if preset != "referseg":
        assert args.dataset == "sem_seg||refer_seg||correct_refer_seg||vqa||neg_refer_seg||reason_seg"


def test_train_multinode_and_gpus():
    launch, _ = dry_run("train_read.sh", "read7b-from-sesame", HOSTFILE="/etc/hostfile", MASTER_ADDR="10.0.0.1",
                        NUM_NODES="2", MASTER_PORT="29999", LAUNCHER="openmpi")
    assert launch == ["deepspeed", "--hostfile", "/etc/hostfile", "--launcher", "openmpi", "--num_nodes", "2",
                      "--master_addr", "10.0.0.1", "--master_port", "29999"]
    launch, args = dry_run("train_read.sh", "read7b-from-sesame", GPUS="localhost:0,1,2,3",
                           DS_CONFIG="scripts/ds_configs/zero3.json")
    assert launch[1:3] == ["--include", "localhost:0,1,2,3"]
    assert args.deepspeed_config == "scripts/ds_configs/zero3.json"


@pytest.mark.parametrize(
    "argv, dataset, split, version_var",
    [
        (["reasonseg-val"], "ReasonSeg", "val", "READ_7B_VAL"),
        (["reasonseg-test"], "ReasonSeg", "test", "READ_7B_TEST"),
        (["reasonseg-test-13b"], "ReasonSeg", "test", "READ_13B_TEST"),
        (["refcoco"], "refcoco", "val", "READ_7B_REFER"),
        (["refcoco+", "testA"], "refcoco+", "testA", "READ_7B_REFER"),
        (["refcocog", "test", "--workers", "2"], "refcocog", "test", "READ_7B_REFER"),
    ],
)
def test_val_presets(argv, dataset, split, version_var):
    _, args = dry_run("val_read.sh", *argv, **{version_var: "/ckpt/x"})
    assert args.eval_only and args.version == "/ckpt/x"
    assert (args.val_dataset, args.val_split) == (dataset, split)
    assert args.val_subsets == (dataset == "ReasonSeg")
    assert args.sasp_preset == ("read-13b" if argv[0].endswith("13b") else "read-7b")
    if "--workers" in argv:
        assert args.workers == 2


@pytest.mark.parametrize("script, argv", [("train_read.sh", ["nope"]), ("val_read.sh", ["nope"]),
                                          ("val_read.sh", ["refcoco", "train"]), ("train_read.sh", [])])
def test_bad_preset_or_split(script, argv):
    proc = subprocess.run(["bash", str(REPO / script), *argv], capture_output=True, text=True,
                          env=dict(os.environ, DRY_RUN="1"), timeout=30)
    assert proc.returncode == 1
    assert "deepspeed" not in proc.stdout
