"""train_read.py without a launcher: flags, bad input (one message, no model built), the DeepSpeed config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train_read
from tests.helpers.models import save_tiny_clip, save_tiny_released_checkpoint, tiny_read_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_ckpt")
    model = tiny_read_model(seed=0)
    clip = save_tiny_clip(root / "clip", model)
    ckpt = save_tiny_released_checkpoint(root / "ckpt", model, clip)
    return {"ckpt": ckpt, "clip": clip}


@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model would be built (bad input must stop before)."""

    def forbidden(*a, **k):
        raise AssertionError("a model was built despite bad input")

    monkeypatch.setattr(train_read, "build_model", forbidden)
    monkeypatch.setattr(train_read, "setup_distributed", forbidden)


def _base(tiny_dirs: dict, root: Path, tmp_path: Path) -> list[str]:
    return ["--version", str(tiny_dirs["ckpt"]), "--vision_tower", str(tiny_dirs["clip"]), "--dataset_dir", str(root),
            "--dataset", "reason_seg||refer_seg", "--sample_rates", "1,1", "--log_base_dir", str(tmp_path)]


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert train_read.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[0].startswith("train_read.py: error: "), err
    return "\n".join(err)


@pytest.mark.parametrize(
    "change, expected",
    [
        (("--dataset_dir", "/nonexistent/data"), "--dataset_dir: directory not found: '/nonexistent/data'"),
        (("--version", "/nonexistent/ckpt"), "--version: checkpoint (READ / SESAME / LLaVA-1.5) directory not found"),
        (("--vision_tower", "/nonexistent/clip"), "--vision_tower: CLIP vision tower directory not found"),
        (("--sample_rates", "1,2,3"), "--sample_rates has 3 weight(s) ('1,2,3') but --dataset names 2 sub-dataset(s)"),
        (("--dataset", "reason_seg||cats"), "--dataset: unknown sub-dataset(s) 'cats'"),
        (("--resume", "/nonexistent/run"), "--resume: checkpoint directory not found"),
        (("--deepspeed_config", "/nonexistent/ds.json"), "--deepspeed_config: file not found"),
        (("--val_batch_size", "2"), "--val_batch_size must be 1"),
        (("--val_dataset", "pascal"), "--val_dataset: 'pascal' cannot be validated with teacher forcing"),
        (("--val_dataset", "fprefcoco"), "false-premise / negative sets are scored by generation: use test_read.py"),
        (("--val_dataset", "R-refcoco+"), "false-premise / negative sets are scored by generation: use test_read.py"),
        (("--no-use_released_param",), "already holds SAM weights"),
    ],
)
def test_bad_input_one_message_before_model(tiny_dirs, synthetic_root, tmp_path, capsys, no_model, change, expected):
    argv = _base(tiny_dirs, synthetic_root, tmp_path)
    flag = change[0]
    if flag in argv:
        i = argv.index(flag)
        argv[i + 1] = change[1]
    else:
        argv += list(change)
    msg = _error(capsys, argv)
    assert expected in msg
    assert "Traceback" not in msg


def test_missing_source_files_listed(tiny_dirs, synthetic_root, tmp_path, capsys, no_model):
    empty = tmp_path / "empty_data"
    empty.mkdir()
    argv = _base(tiny_dirs, empty, tmp_path)
    msg = _error(capsys, argv)
    assert f"--dataset_dir {empty}" in msg
    assert str(empty / "reason_seg/ReasonSeg/train") in msg and str(empty / "refer_seg/refcoco/instances.json") in msg


def test_plain_llava_needs_sam_file(tiny_dirs, synthetic_root, tmp_path, capsys, no_model):
    plain = tmp_path / "llava"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llava"}))
    index = {"weight_map": {"model.embed_tokens.weight": "x.bin", "lm_head.weight": "x.bin"}}
    (plain / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    argv = _base(tiny_dirs, synthetic_root, tmp_path)
    argv[argv.index("--version") + 1] = str(plain)
    assert "add --no-use_released_param --vision_pretrained" in _error(capsys, argv)
    argv += ["--no-use_released_param", "--vision_pretrained", str(tmp_path / "sam.pth")]
    assert "--vision_pretrained: SAM checkpoint file not found" in _error(capsys, argv)


def test_booleans_take_no_form():
    args = train_read.parse_args(["--no-use_released_param", "--no-gradient_checkpointing", "--no-use_mm_start_end",
                                  "--no-train_mask_decoder", "--auto_resume", "--eval_only"])
    assert (args.use_released_param, args.gradient_checkpointing, args.use_mm_start_end, args.train_mask_decoder) == (
        False, False, False, False)
    assert args.auto_resume and args.eval_only
    d = train_read.parse_args([])
    assert d.use_released_param and d.gradient_checkpointing and d.use_mm_start_end and d.train_mask_decoder
    assert d.log_dir == "./runs/read_referseg"
    help_text = train_read.build_parser().format_help()
    for action in train_read.build_parser()._actions:
        assert action.help, f"flag {action.option_strings} has no help"
    assert "--sasp_preset" in help_text and "--deepspeed_config" in help_text


def test_ds_config_matches_original_and_override():
    args = train_read.parse_args(["--batch_size", "2", "--grad_accumulation_steps", "10", "--lr", "1e-4",
                                  "--epochs", "8", "--steps_per_epoch", "500", "--precision", "bf16"])
    cfg = train_read.build_ds_config(args)
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 10
    assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.95],
                                                           "torch_adam": True}}
    assert cfg["scheduler"] == {"type": "WarmupDecayLR", "params": {
        "total_num_steps": 4000, "warmup_min_lr": 0, "warmup_max_lr": 1e-4, "warmup_num_steps": 100,
        "warmup_type": "linear"}}
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    released = train_read.parse_args(["--epochs", "8", "--lr_schedule_epochs", "20", "--steps_per_epoch", "500"])
    assert train_read.build_ds_config(released)["scheduler"]["params"]["total_num_steps"] == 10000
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"] == {"stage": 2, "contiguous_gradients": True, "overlap_comm": True,
                                        "reduce_scatter": True, "reduce_bucket_size": 5e8,
                                        "allgather_bucket_size": 5e8}
    args.ds_override = json.loads((REPO / "scripts/ds_configs/zero3_offload.json").read_text())
    args.ds_override["train_micro_batch_size_per_gpu"] = "auto"
    merged = train_read.build_ds_config(args)
    assert merged["zero_optimization"]["stage"] == 3
    assert merged["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert merged["zero_optimization"]["allgather_bucket_size"] == 5e8  # kept from the built-in config
    assert merged["train_micro_batch_size_per_gpu"] == 2  # "auto" keeps ours
    assert merged["optimizer"] == cfg["optimizer"]
    ev = train_read.build_ds_config(args, eval_only=True)
    assert "optimizer" not in ev and "scheduler" not in ev and ev["zero_optimization"]["stage"] == 3
    args.ds_override = {}
    assert train_read.build_ds_config(args, eval_only=True)["zero_optimization"] == {"stage": 0}


def test_sasp_flags_override_preset(tiny_dirs):
    args = train_read.parse_args(["--version", str(tiny_dirs["ckpt"]), "--sasp_preset", "read-13b-stage1",
                                  "--num_points", "12", "--sasp_mode", "paper"])
    cfg = train_read.build_sasp_config(args)
    assert (cfg.num_points, cfg.down_sample, cfg.t_pos, cfg.t_neg, cfg.mode) == (12, 1, 0.8, 0.2, "paper")
    bad = train_read.parse_args(["--version", str(tiny_dirs["ckpt"]), "--t_pos", "0.1", "--t_neg", "0.5"])
    with pytest.raises(train_read.UsageError, match="t_neg < t_pos"):
        train_read.build_sasp_config(bad)


class _OracleEngine:
    """Stands in for the DeepSpeed engine: perfect masks for short queries, empty masks for long ones."""

    def __init__(self, long_paths: set[str]) -> None:
        self.long_paths = long_paths
        self.calls = 0

    def eval(self) -> None:
        pass

    def train(self) -> None:
        pass

    def __call__(self, **batch):
        self.calls += 1
        gt = batch["masks_list"][0]
        if batch["image_paths"][0] in self.long_paths:
            return {"pred_masks": [torch.full(gt.shape, -1.0)]}
        return {"pred_masks": [torch.where(gt == 1, 1.0, -1.0)]}


def test_validate_reports_short_and_long_subsets(tiny_dirs, synthetic_dataset, tmp_path):
    from utils.distributed import DistEnv
    from utils.logging import RunLogger
    from utils.io import read_jsonl

    args = train_read.parse_args(["--version", str(tiny_dirs["ckpt"]), "--dataset_dir", str(synthetic_dataset["root"]),
                                  "--val_subsets", "--workers", "0", "--log_base_dir", str(tmp_path),
                                  "--save_masks", str(tmp_path / "masks")])
    val = train_read.build_val_data(args)
    items = synthetic_dataset["reason_seg"]["splits"]["val"]
    assert val.subset_of == ["long" if it["is_sentence"] else "short" for it in items]
    engine = _OracleEngine({str(it["image"]) for it in items if it["is_sentence"]})
    from model.tokenizer import READTokenizer

    tokenizer = READTokenizer.from_pretrained(tiny_dirs["ckpt"])
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    logger = RunLogger(Path(args.log_dir), True)
    report = train_read.validate(engine, val, tokenizer, args, env, logger, torch.float32, step=5, epoch=1)
    logger.close()
    n_short = sum(not it["is_sentence"] for it in items)
    n_long = len(items) - n_short
    assert engine.calls == len(items)
    assert report["subsets"]["short"] == pytest.approx({"giou": n_short / (n_short + 1e-5), "ciou": 1.0,
                                                        "num_masks": n_short})
    assert report["subsets"]["long"]["giou"] == 0.0 and report["subsets"]["long"]["num_masks"] == n_long
    fg = [int((it["mask"] == 1).sum()) for it in items]
    short_fg = sum(f for f, it in zip(fg, items) if not it["is_sentence"])
    assert report["ciou"] == pytest.approx(short_fg / sum(fg))
    assert report["giou"] == pytest.approx(n_short / (len(items) + 1e-5))
    saved = json.loads((Path(args.log_dir) / "val_metrics.json").read_text())
    assert saved["subsets"]["short"]["num_masks"] == n_short and saved["global_step"] == 5
    rec = [r for r in read_jsonl(Path(args.log_dir) / "log.jsonl") if r["kind"] == "val"][0]
    assert rec["step"] == 5 and rec["giou_short"] == pytest.approx(report["subsets"]["short"]["giou"])
    assert len(list((tmp_path / "masks").glob("*.npz"))) == len(items)


def test_validation_on_fixed_draws_from_the_training_mix(tiny_dirs, synthetic_dataset, tmp_path):
    from dataset.train_val import TrainValDataset
    from model.tokenizer import READTokenizer
    from utils.distributed import DistEnv
    from utils.logging import RunLogger

    args = train_read.parse_args(["--version", str(tiny_dirs["ckpt"]), "--dataset_dir", str(synthetic_dataset["root"]),
                                  "--val_dataset", "train_mix", "--max_val_samples", "3", "--dataset",
                                  "reason_seg||refer_seg", "--sample_rates", "1,1", "--workers", "0",
                                  "--log_base_dir", str(tmp_path)])
    val = train_read.build_val_data(args)
    assert isinstance(val.dataset, TrainValDataset) and len(val.dataset) == 3
    engine = _OracleEngine(long_paths=set())  # perfect masks for every query
    tokenizer = READTokenizer.from_pretrained(tiny_dirs["ckpt"])
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    logger = RunLogger(Path(args.log_dir), True)
    report = train_read.validate(engine, val, tokenizer, args, env, logger, torch.float32, step=1, epoch=0)
    logger.close()
    n = sum(val.dataset[i][4].shape[0] for i in range(3))
    assert engine.calls == 3 and report["num_masks"] == n
    assert report["ciou"] == pytest.approx(1.0) and report["giou"] == pytest.approx(n / (n + 1e-5))


def test_resumed_run_supplies_its_lora_settings(tiny_dirs, synthetic_root, tmp_path, capsys, no_model):
    """--eval_only --resume on an r=4/alpha=8 run: unset LoRA flags take the run's values, a conflicting one stops."""
    run = tmp_path / "run"
    (run / "ckpt_model" / "global_step3").mkdir(parents=True)
    (run / "ckpt_model" / "latest").write_text("global_step3")
    (run / "run_args.json").write_text(json.dumps({"lora_r": 4, "lora_alpha": 8, "lora_target_modules": "q_proj"}))
    argv = _base(tiny_dirs, synthetic_root, tmp_path) + ["--eval_only", "--resume", str(run / "ckpt_model")]
    args = train_read.parse_args(argv)
    train_read.check_args(args)
    assert (args.lora_r, args.lora_alpha, args.lora_target_modules) == (4, 8, "q_proj")
    fresh = train_read.parse_args(_base(tiny_dirs, synthetic_root, tmp_path))
    train_read.check_args(fresh)
    assert (fresh.lora_r, fresh.lora_alpha, fresh.lora_target_modules) == (8, 16, "q_proj,v_proj")
    msg = _error(capsys, argv + ["--lora_alpha", "16"])
    assert "--lora_alpha 16 differs from the resumed run's 8" in msg
