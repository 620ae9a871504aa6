"""READ "see + segment" testing on FP-RefCOCO(+/g), R-RefCOCO(+/g), RefCOCO(+/g) and ReasonSeg (false premise).

Three commands (the original's ``--cmd=inference|metrics`` is accepted too):

- ``run``: greedy generation with the KV cache, the queries of one image batched and its SAM image features
  computed once. Every finished image is saved at once, the mask file first and then one JSONL line, both
  atomic. A rerun therefore skips the images already in the JSONL, so an interrupted run resumes where it
  stopped. ``--shard_id/--num_shards`` (or the RANK/WORLD_SIZE that torchrun sets) pick a contiguous slice
  of the images, as the original's ``np.array_split`` did. The shard that finishes last merges the shards.
- ``merge``: combine ``predictions.shard{k}of{n}.jsonl`` into ``predictions.jsonl``, ordered by image index.
- ``metrics``: recompute the scores from the saved predictions alone (scripts.md §4.5):
  See accuracy = Σ[gt_exists == pred_exists] / #queries;
  cIoU = Σ intersection_fg / (Σ union_fg + 1e-10) over every query, false-premise ones included.

Output directory layout::

    run_config.json                       what was run (a resume must match it)
    masks/<key>.npz                       pred uint8 [N,H,W] (0/1), gt uint8 [N,H,W] (0/1, 255 = ignore)
    predictions.jsonl                     one line per image (one-shard run, or after merge)
    predictions.shard{k}of{n}.jsonl       per-shard lines; ``.done.json`` marks a finished shard
    metrics.json                          written by ``metrics`` (and at the end of a complete run)
"""

from __future__ import annotations

import argparse
import logging
import io
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

from utils.io import append_jsonl, atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl

if TYPE_CHECKING:  # heavy imports stay lazy so that `merge` / `metrics` / --help start fast
    import torch

    from model.generation import GenerationResult

COMMANDS = ("run", "merge", "metrics")
CMD_ALIASES = {"inference": "run", "run": "run", "merge": "merge", "metrics": "metrics"}
MERGED_NAME = "predictions.jsonl"
PRINT_EVERY = 50  # the original printed the running scores every 50 images


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="test_read.py",
        description="READ's evaluation helper: see + segment testing with resumable, shardable predictions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("command", nargs="?", choices=COMMANDS, help="what to do (default: run)")
    p.add_argument("--cmd", choices=sorted(CMD_ALIASES), help="the original's spelling: inference (= run) or metrics")
    g = p.add_argument_group("model")
    g.add_argument("--version", "--pretrained_model_path", dest="version", default=None,
                   help="merged READ checkpoint directory (released layout, e.g. READ-LLaVA-v1.5-7B-for-fprefcoco)")
    g.add_argument("--vision_tower", default=None,
                   help="local CLIP ViT-L/14-336 directory (the checkpoint does not contain CLIP); default: the "
                        "path stored in the checkpoint's config")
    g.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16", help="model dtype")
    g.add_argument("--device", default=None, help="torch device; default cuda:<LOCAL_RANK> if CUDA is available, else cpu")
    g.add_argument("--model_max_length", type=int, default=2048, help="tokenizer/model max length (the scripts pass 2048)")
    g.add_argument("--max_new_tokens", type=int, default=512, help="generation length limit per query (original: 512)")
    g.add_argument("--query_batch_size", type=int, default=8,
                   help="queries of one image generated together (KV cache, left padding)")
    add_sasp_flags(g)
    g = p.add_argument_group("data")
    g.add_argument("--dataset_dir", default="../dataset", help="data root holding refer_seg/ and reason_seg/ (default ../dataset, as the original scripts)")
    g.add_argument("--val_dataset", default="fprefcoco",
                   help="fprefcoco, fprefcoco+, fprefcocog, refcoco, refcoco+, refcocog, R-refcoco, R-refcoco+, "
                        "R-refcocog or ReasonSeg")
    g.add_argument("--split", default="val", help="annotation split (the original hard-coded val)")
    g.add_argument("--conv_type", default="vicuna_v1",
                   help="prompt template; vicuna_v1 is what the original test used, llava_v1 the training one")
    g.add_argument("--question_style", default="sesame", help="refer question templates: sesame (original) or lisa")
    g.add_argument("--image_size", type=int, default=1024, help="SAM input size")
    g.add_argument("--seed", type=int, default=42, help="question-template draw seed (per image: [seed, index])")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers that decode images ahead of the model")
    g.add_argument("--max_samples", type=int, default=None, help="stop after this many images of the shard (debugging)")
    g = p.add_argument_group("output / sharding")
    g.add_argument("--out", "--vis_save_path", dest="out", default="./inference_results/fprefcoco",
                   help="prediction directory (run / merge)")
    g.add_argument("--pred_dir", default=None, help="prediction directory for metrics / merge (default: --out)")
    g.add_argument("--shard_id", "--process_num", dest="shard_id", type=int, default=None,
                   help="which contiguous slice of the images this process runs (default: $RANK or 0)")
    g.add_argument("--num_shards", "--world_size", dest="num_shards", type=int, default=None,
                   help="number of slices (default: $WORLD_SIZE or 1)")
    g.add_argument("--allow_partial", action="store_true", help="merge / metrics even if some shards are unfinished")
    g.add_argument("--no_progress", action="store_true", help="disable the tqdm progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by launchers; selects the GPU")
    return p


def add_sasp_flags(group: Any) -> None:
    """SasP flags shared with demo.py; unset ones keep the checkpoint config's values."""
    group.add_argument("--sasp_preset", default=None,
                       help="SasP preset: read-7b (2, 30 points, 0.8, 0.2), read-13b (1, 60, 0.6, 0.2), read-13b-stage1, "
                            "read-13b-stage2; default: the checkpoint config's settings")
    group.add_argument("--num_points", type=int, default=None, help="SasP points per [SEG] (overrides the preset)")
    group.add_argument("--t_pos", type=float, default=None, help="SasP positive threshold on the min-max map")
    group.add_argument("--t_neg", type=float, default=None, help="SasP negative threshold on the min-max map")
    group.add_argument("--down_sample", type=int, default=None, help="SasP grid down-sampling factor (24 // d cells)")


def sasp_from_args(args: argparse.Namespace, model_config: Any) -> Any:
    """The SasPConfig to run with: preset (or the checkpoint's settings) plus explicit overrides."""
    import dataclasses

    from model.sasp import SasPConfig

    base = SasPConfig.preset(args.sasp_preset) if args.sasp_preset else model_config.sasp_config()
    overrides = {k: getattr(args, k) for k in ("num_points", "t_pos", "t_neg", "down_sample") if getattr(args, k) is not None}
    try:
        return dataclasses.replace(base, **overrides)
    except ValueError as err:
        raise SystemExit(f"bad SasP flags: {err}") from None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd = CMD_ALIASES[args.cmd] if args.cmd else None
    if args.command and cmd and args.command != cmd:
        parser.error(f"the command {args.command!r} and --cmd={args.cmd} disagree")
    args.command = args.command or cmd or "run"
    args.pred_dir = args.pred_dir or args.out
    if args.command == "run" and not args.version:
        parser.error("run needs --version (or --pretrained_model_path): the merged READ checkpoint directory")
    if args.query_batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--query_batch_size and --max_new_tokens must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------- sharding


@dataclass(frozen=True)
class Shard:
    shard_id: int
    num_shards: int

    @property
    def jsonl_name(self) -> str:
        return MERGED_NAME if self.num_shards == 1 else f"predictions.shard{self.shard_id}of{self.num_shards}.jsonl"

    @property
    def done_name(self) -> str:
        return self.jsonl_name[: -len(".jsonl")] + ".done.json"


def resolve_shard(shard_id: Optional[int], num_shards: Optional[int], env: Optional[dict] = None) -> Shard:
    """Flags first, then torchrun's RANK/WORLD_SIZE, then a single shard; one clear error for a bad pair."""
    env = os.environ if env is None else env
    if num_shards is None:
        num_shards = int(env.get("WORLD_SIZE", 1))
    if shard_id is None:
        shard_id = int(env.get("RANK", 0)) if num_shards > 1 else 0
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise SystemExit(f"--shard_id must be in [0, --num_shards) with --num_shards >= 1; got {shard_id} of {num_shards}")
    return Shard(shard_id, num_shards)


def shard_indices(num_items: int, shard: Shard) -> list[int]:
    """Contiguous near-equal slices, the first ones one longer (numpy.array_split, as the original)."""
    base, extra = divmod(num_items, shard.num_shards)
    start = shard.shard_id * base + min(shard.shard_id, extra)
    return list(range(start, start + base + (1 if shard.shard_id < extra else 0)))


# ---------------------------------------------------------------------------------------------- storage


def sample_key(index: int, image_path: str) -> str:
    """Stable per-image key: the global dataset index (shard independent) plus a readable image stem."""
    stem = re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(image_path).stem)[:80]
    return f"{index:06d}_{stem}"


def encode_masks(pred: np.ndarray, gt: np.ndarray) -> bytes:
    """One compressed .npz with ``pred`` and ``gt`` (uint8 [N,H,W]), so metrics need no dataset."""
    buf = io.BytesIO()
    np.savez_compressed(buf, pred=pred.astype(np.uint8), gt=gt.astype(np.uint8))
    return buf.getvalue()


def load_masks(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise SystemExit(f"mask file missing: {path} (rerun `test_read.py run` with the same --out to redo it)")
    with np.load(path) as z:
        return z["pred"], z["gt"]


def repair_jsonl(path: Path) -> None:
    """Cut a torn last line (a run killed mid-write) so that the next append starts on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)


class PredictionStore:
    """The files of one shard: resumable appends, a mask written before its line, a done marker at the end."""

    def __init__(self, out_dir: Path, shard: Shard) -> None:
        self.out_dir = Path(out_dir)
        self.shard = shard
        self.jsonl = self.out_dir / shard.jsonl_name
        self.done_marker = self.out_dir / shard.done_name

    def done_keys(self) -> set[str]:
        repair_jsonl(self.jsonl)
        return {r["key"] for r in read_jsonl(self.jsonl)}

    def write(self, record: dict, pred: np.ndarray, gt: np.ndarray) -> None:
        rel = f"masks/{record['key']}.npz"
        atomic_write_bytes(self.out_dir / rel, encode_masks(pred, gt))
        append_jsonl(self.jsonl, {**record, "mask_file": rel})

    def mark_done(self, num_samples: int) -> None:
        atomic_write_json(self.done_marker, {"shard_id": self.shard.shard_id, "num_shards": self.shard.num_shards,
                                             "samples": num_samples})


def check_run_config(out_dir: Path, config: dict, write: bool = True) -> None:
    """Make sure a resumed run / another shard uses the settings in run_config.json; write it if absent."""
    path = out_dir / "run_config.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
        if diff:
            lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
            raise SystemExit(f"{path} was written by a different run ({lines}); use another --out or delete it")
    elif write:
        atomic_write_json(path, config)


_SHARD_RE = re.compile(r"^predictions\.shard(\d+)of(\d+)\.jsonl$")


def find_shards(pred_dir: Path) -> dict[int, list[int]]:
    """{num_shards: [shard ids present]} for the shard files in ``pred_dir``."""
    found: dict[int, list[int]] = {}
    for f in pred_dir.iterdir() if pred_dir.is_dir() else []:
        m = _SHARD_RE.match(f.name)
        if m:
            found.setdefault(int(m.group(2)), []).append(int(m.group(1)))
    return {n: sorted(ids) for n, ids in found.items()}


def merge_shards(pred_dir: Path, num_shards: Optional[int] = None, allow_partial: bool = False,
                 write: bool = True) -> list[dict]:
    """Combine the shard files (deduplicated by key, ordered by image index) and write predictions.jsonl."""
    pred_dir = Path(pred_dir)
    found = find_shards(pred_dir)
    if num_shards is None:
        if len(found) != 1:
            detail = ", ".join(f"{n} shards" for n in sorted(found)) or "none"
            raise SystemExit(f"{pred_dir}: expected shard files of exactly one --num_shards, found: {detail}; pass --num_shards")
        (num_shards,) = found
    missing = [k for k in range(num_shards) if not (pred_dir / Shard(k, num_shards).done_name).exists()]
    if missing and not allow_partial:
        raise SystemExit(
            f"{pred_dir}: shard(s) {missing} of {num_shards} are not finished; rerun `test_read.py run --shard_id K "
            f"--num_shards {num_shards}` for them (it resumes), or pass --allow_partial"
        )
    by_key: dict[str, dict] = {}
    for k in range(num_shards):
        for r in read_jsonl(pred_dir / Shard(k, num_shards).jsonl_name):
            by_key[r["key"]] = r
    records = sorted(by_key.values(), key=lambda r: (r["index"], r["key"]))
    if write:
        atomic_write_text(pred_dir / MERGED_NAME, "".join(json.dumps(r) + "\n" for r in records))
        if not missing:
            atomic_write_json(pred_dir / Shard(0, 1).done_name, {"shard_id": 0, "num_shards": 1,
                                                                 "samples": len(records), "merged_from": num_shards})
    return records


def load_predictions(pred_dir: Path, allow_partial: bool = False) -> list[dict]:
    """predictions.jsonl if present, else the shards merged in memory."""
    pred_dir = Path(pred_dir)
    merged = pred_dir / MERGED_NAME
    if merged.exists():
        if not (pred_dir / Shard(0, 1).done_name).exists() and not allow_partial:
            raise SystemExit(f"{merged}: the run is not finished (no {Shard(0, 1).done_name}); rerun "
                             f"`test_read.py run` with the same flags (it resumes), or pass --allow_partial")
        return read_jsonl(merged)
    if not find_shards(pred_dir):
        raise SystemExit(f"no predictions in {pred_dir}: expected {MERGED_NAME} or predictions.shard*of*.jsonl")
    return merge_shards(pred_dir, allow_partial=allow_partial, write=False)


# ---------------------------------------------------------------------------------------------- metrics


@dataclass
class Scores:
    dataset: str
    num_images: int
    num_queries: int
    see_correct: int
    intersection: float
    union: float

    @property
    def see_accuracy(self) -> float:
        return self.see_correct / self.num_queries if self.num_queries else 0.0

    @property
    def ciou(self) -> float:
        from utils.metrics import CIOU_EPS  # 1e-10, the original's guard

        return self.intersection / (self.union + CIOU_EPS)

    def line(self, prefix: str) -> str:
        return f"[{prefix} - {self.dataset}] cIoU: {self.ciou:.4f} | See Accuracy: {self.see_accuracy:.4f}"

    def as_dict(self) -> dict:
        return {**asdict(self), "ciou": self.ciou, "see_accuracy": self.see_accuracy}


def compute_scores(records: Sequence[dict], pred_dir: Path, dataset: str = "",
                   log: Optional[Callable[[str], None]] = print) -> Scores:
    """See accuracy and cIoU over every query of every image, from the JSONL lines and their mask files."""
    import torch

    from utils.metrics import batch_intersection_and_union

    s = Scores(dataset, 0, 0, 0, 0.0, 0.0)
    for n, r in enumerate(records, 1):
        gt_exists, pred_exists = list(map(bool, r["gt_exists"])), list(map(bool, r["pred_exists"]))
        if len(gt_exists) != len(pred_exists):
            raise SystemExit(f"{r['key']}: {len(gt_exists)} gt_exists but {len(pred_exists)} pred_exists")
        pred, gt = load_masks(Path(pred_dir) / r["mask_file"])
        if pred.shape != gt.shape or pred.shape[0] != len(gt_exists):
            raise SystemExit(f"{r['mask_file']}: pred {pred.shape} / gt {gt.shape} do not match {len(gt_exists)} queries")
        inter, union = batch_intersection_and_union(torch.from_numpy(pred), torch.from_numpy(gt))
        s.intersection += float(inter[:, 1].sum())
        s.union += float(union[:, 1].sum())
        s.see_correct += sum(a == b for a, b in zip(gt_exists, pred_exists))
        s.num_queries += len(gt_exists)
        s.num_images = n
        if log and n % PRINT_EVERY == 0:
            log(s.line(f"(batch {n})"))
    return s


def cmd_metrics(args: argparse.Namespace) -> Scores:
    pred_dir = Path(args.pred_dir)
    records = load_predictions(pred_dir, args.allow_partial)
    cfg_path = pred_dir / "run_config.json"
    dataset = json.loads(cfg_path.read_text()).get("val_dataset", "") if cfg_path.exists() else args.val_dataset
    scores = compute_scores(records, pred_dir, dataset)
    print(scores.line("Final Result"))
    atomic_write_json(pred_dir / "metrics.json", scores.as_dict())
    return scores


def cmd_merge(args: argparse.Namespace) -> list[dict]:
    records = merge_shards(Path(args.pred_dir), args.num_shards, args.allow_partial)
    print(f"merged {len(records)} images into {Path(args.pred_dir) / MERGED_NAME}")
    return records


# ---------------------------------------------------------------------------------------------- inference


def resolve_device(device: Optional[str], local_rank: Optional[int]) -> "torch.device":
    import torch

    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        rank = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def prompt_ids(prompts: Sequence[str], tokenizer: Any, use_mm_start_end: bool) -> list[list[int]]:
    """Rendered prompts (``<image>`` still a placeholder) -> token ids with one -200 each."""
    from dataset.conversation import insert_image_tokens, tokenize_with_image

    return [tokenize_with_image(insert_image_tokens(p, use_mm_start_end), tokenizer) for p in prompts]


def answer_image_queries(
    model: Any,
    image: "torch.Tensor",
    image_clip: "torch.Tensor",
    sam_mask_shape: Sequence,
    input_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    query_batch_size: int = 8,
    sasp_config: Any = None,
    image_embedding: Optional["torch.Tensor"] = None,
) -> list["GenerationResult"]:
    """All queries of one image: SAM's image encoder runs once (or not at all when ``image_embedding``
    [1,256,64,64] is given), queries go through generation in batches."""
    device = next(model.parameters()).device
    embedding = model.encode_images_sam(image[None].to(device)) if image_embedding is None else image_embedding
    clip = image_clip[None].to(device)
    results: list[GenerationResult] = []
    for start in range(0, len(input_ids), query_batch_size):
        rows = list(input_ids[start : start + query_batch_size])
        b = len(rows)
        results += model.generate_masks(
            clip.expand(b, -1, -1, -1),
            None,
            rows,
            [sam_mask_shape] * b,
            max_new_tokens=max_new_tokens,
            image_embeddings=embedding.expand(b, -1, -1, -1),
            sasp_config=sasp_config,
        )
    return results


def load_model(args: argparse.Namespace, device: "torch.device") -> tuple[Any, Any, Any]:
    """Tokenizer, model and SasP settings for inference from a merged checkpoint directory."""
    import torch

    from model.builder import load_read_for_inference

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    try:
        tokenizer, model = load_read_for_inference(
            args.version, vision_tower=args.vision_tower, dtype=dtype, device=str(device),
            model_max_length=args.model_max_length,
        )
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--version {args.version}: {err}") from None
    return tokenizer, model, sasp_from_args(args, model.config)


def cmd_run(args: argparse.Namespace) -> Optional[Scores]:
    from dataset.errors import DatasetError
    from dataset.fp_test import FPTestDataset
    from dataset.preprocess import ImagePreprocessor

    shard = resolve_shard(args.shard_id, args.num_shards)
    out_dir = Path(args.out)
    # the data is checked before the (slow) model load
    try:
        dataset = FPTestDataset(args.dataset_dir, ImagePreprocessor(sam_size=args.image_size),
                                dataset_name=args.val_dataset, split=args.split, template=args.conv_type,
                                question_style=args.question_style, seed=args.seed)
    except (DatasetError, ValueError) as err:
        raise SystemExit(f"--val_dataset {args.val_dataset} / --dataset_dir {args.dataset_dir}: {err}") from None
    run_config = {
        "val_dataset": args.val_dataset, "split": args.split, "dataset_dir": str(Path(args.dataset_dir).resolve()),
        "num_images": len(dataset), "version": str(Path(args.version).resolve()), "conv_type": args.conv_type,
        "question_style": args.question_style, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
        "sasp": [args.sasp_preset, args.num_points, args.t_pos, args.t_neg, args.down_sample],
        "num_shards": shard.num_shards, "precision": args.precision, "query_batch_size": args.query_batch_size,
    }
    check_run_config(out_dir, run_config, write=False)  # before the slow model load
    store = PredictionStore(out_dir, shard)
    indices = shard_indices(len(dataset), shard)
    done = store.done_keys()
    keys = {i: sample_key(i, image_path_of(dataset, i)) for i in indices}
    pending = [i for i in indices if keys[i] not in done]
    print(f"[{args.val_dataset}] {len(dataset)} images; shard {shard.shard_id} of {shard.num_shards}: "
          f"{len(indices)} images, {len(indices) - len(pending)} already done", flush=True)
    if args.max_samples is not None:
        pending = pending[: max(0, args.max_samples)]

    if pending:
        run_pending(args, dataset, pending, keys, store, run_config)

    finished = store.done_keys() >= set(keys.values())
    if not finished:
        print(f"stopped early; rerun the same command to continue ({store.jsonl})")
        return None
    store.mark_done(len(indices))
    if shard.num_shards > 1:
        if any(not (out_dir / Shard(k, shard.num_shards).done_name).exists() for k in range(shard.num_shards)):
            print(f"shard {shard.shard_id} done; the last shard to finish merges (or run `test_read.py merge`)")
            return None
        merge_shards(out_dir, shard.num_shards)
    scores = compute_scores(read_jsonl(out_dir / MERGED_NAME), out_dir, args.val_dataset)
    print(scores.line("Final Result"))
    atomic_write_json(out_dir / "metrics.json", scores.as_dict())
    return scores


def run_pending(args: argparse.Namespace, dataset: Any, pending: list[int], keys: dict[int, str],
                store: PredictionStore, run_config: dict) -> None:
    """Load the model and answer the pending images; each one is saved as soon as it is done."""
    import torch
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    from dataset.fp_test import collate_fp_items

    device = resolve_device(args.device, args.local_rank)
    torch.manual_seed(args.seed)
    tokenizer, model, sasp = load_model(args, device)
    use_mm = bool(model.config.mm_use_im_start_end)
    check_run_config(store.out_dir, run_config)
    # images are decoded and preprocessed by background workers while the model runs
    loader = DataLoader(Subset(dataset, pending), batch_size=1, shuffle=False, num_workers=args.workers,
                        collate_fn=collate_fp_items)
    queries = tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(zip(pending, loader), total=len(pending), unit="sample", disable=args.no_progress,
               desc=f"{args.val_dataset} {store.shard.shard_id}/{store.shard.num_shards}", dynamic_ncols=True)
    for i, (item,) in bar:
        n = len(item.prompts)
        if n != len(item.exists):
            raise RuntimeError(f"{item.image_path}: {n} prompts but {len(item.exists)} existence flags")
        results = answer_image_queries(model, item.image, item.image_clip, item.sam_mask_shape,
                                       prompt_ids(item.prompts, tokenizer, use_mm), args.max_new_tokens,
                                       args.query_batch_size, sasp)
        pred = torch.stack([r.mask for r in results]).numpy().astype(np.uint8)
        gt = item.gt_masks.numpy().astype(np.uint8)
        record = {
            "key": keys[i],
            "index": i,
            "image_path": item.image_path,
            "questions": item.questions,
            "sentences": item.sentences,
            "pred_sent": [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in results],
            "gt_exists": [bool(e) for e in item.exists],
            "pred_exists": [bool(r.present) for r in results],
            "num_seg": [len(r.masks) for r in results],
            "ref_ids": [int(x) for x in item.ref_ids],
            "sent_ids": [int(x) for x in item.sent_ids],
        }
        store.write(record, pred, gt)
        queries += n
        tokens += sum(len(r.token_ids) for r in results)
        dt = time.perf_counter() - t0
        bar.set_postfix(q_per_s=f"{queries / dt:.2f}", tok_per_s=f"{tokens / dt:.1f}")
    bar.close()


def image_path_of(dataset: Any, index: int) -> str:
    """The image path of item ``index`` without decoding the image (for the sample key)."""
    return dataset.image_path(index)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")  # e.g. what was loaded from where
    if args.command == "run":
        try:
            cmd_run(args)
        except KeyboardInterrupt:
            print(f"\ninterrupted; finished images are saved in {args.out}: rerun the same command to resume",
                  file=sys.stderr)
            return 130
    elif args.command == "merge":
        cmd_merge(args)
    else:
        cmd_metrics(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
