"""Throughput of test-style READ inference: the original's way against ours.

- ``no-cache, batch 1`` (the original ``evaluate``, spec scripts.md §4.4 / model.md §5): one query at a time, the
  SAM image encoder run for every query, and greedy decoding that re-runs CLIP and the whole sequence at every
  step (no KV cache);
- ``kv-cache, batched`` (test_read.py): SAM features computed once per image, the image's queries decoded
  together with the KV cache (``model.generate_masks``).

Both produce the same greedy tokens (checked and printed). The last line is ``speedup=<x>`` (wall time of the
first over the second; the target is >= 5x).

Default: the tiny random READ (config preset "tiny") with random prompts of realistic length. ``--version`` (+
``--vision_tower``) benchmarks a real released checkpoint with its tokenizer and FP-RefCOCO-style prompts.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from test_read import answer_image_queries  # noqa: E402


@dataclass
class Workload:
    images: list[torch.Tensor]  # SAM inputs [3,1024,1024]
    images_clip: list[torch.Tensor]  # [3,336,336]
    shapes: list[list]  # [(h_in, w_in), (H, W)]
    prompts: list[list[list[int]]]  # per image, per query: token ids with one -200


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--version", default=None, help="released READ directory (default: the tiny random model)")
    p.add_argument("--vision_tower", default=None, help="CLIP directory for --version (default: from its config)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=2, help="number of images")
    p.add_argument("--queries", type=int, default=8, help="queries per image (FP-RefCOCO images have ~5-10)")
    p.add_argument("--max_new_tokens", type=int, default=32, help="answer length limit")
    p.add_argument("--prompt_len", type=int, default=64, help="text tokens per prompt (random prompts only)")
    p.add_argument("--seed", type=int, default=0)
    return p


def load(args: argparse.Namespace) -> tuple[Any, Optional[Any]]:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    if args.version:
        from model.builder import load_read_for_inference

        tok, model = load_read_for_inference(args.version, vision_tower=args.vision_tower, dtype=dtype,
                                             device=args.device)
        return model, tok
    from model.config import READConfig
    from model.read import READForCausalLM

    config = READConfig.from_preset("tiny", attn_implementation="sdpa")
    model = READForCausalLM(config).to(device=args.device, dtype=dtype).eval()
    return model, None


def make_workload(args: argparse.Namespace, model: Any, tokenizer: Optional[Any]) -> Workload:
    g = torch.Generator().manual_seed(args.seed)
    cfg = model.config
    sizes = [(int(h), int(w)) for h, w in torch.randint(300, 640, (args.images, 2), generator=g).tolist()]
    shapes = [[(round(1024 * h / max(h, w)), round(1024 * w / max(h, w))), (h, w)] for h, w in sizes]
    images = [torch.randn(3, 1024, 1024, generator=g) for _ in sizes]
    images_clip = [torch.randn(3, 336, 336, generator=g) for _ in sizes]
    prompts = []
    if tokenizer is not None:
        from dataset.conversation import render_prompt
        from test_read import prompt_ids

        objects = ["the man in the red shirt", "a white dog", "the left car", "a blue umbrella", "the tallest tree"]
        texts = [render_prompt([(f"<image>\nCan you segment {objects[q % len(objects)]} in this image?", None)],
                               "vicuna_v1") for q in range(args.queries)]
        ids = prompt_ids(texts, tokenizer, bool(cfg.mm_use_im_start_end))
        prompts = [ids for _ in sizes]
    else:
        low, high = 3, min(cfg.vocab_size, 1000)  # ordinary tokens of the tiny vocabulary
        image_part = [IMAGE_TOKEN_INDEX]
        if cfg.mm_use_im_start_end and cfg.im_start_token_idx is not None and cfg.im_end_token_idx is not None:
            image_part = [cfg.im_start_token_idx, IMAGE_TOKEN_INDEX, cfg.im_end_token_idx]
        for _ in sizes:
            rows = []
            for _ in range(args.queries):
                n = args.prompt_len + int(torch.randint(-8, 9, (1,), generator=g))
                text = torch.randint(low, high, (n,), generator=g).tolist()
                cut = n // 3
                rows.append([1] + text[:cut] + image_part + text[cut:])
            prompts.append(rows)
    return Workload(images, images_clip, shapes, prompts)


@torch.no_grad()
def original_query(model: Any, image: torch.Tensor, image_clip: torch.Tensor, ids: list[int], shape: list,
                   max_new_tokens: int) -> list[int]:
    """One query as the original evaluate() ran it: SAM encoder per query; CLIP + full sequence every step."""
    device = next(model.parameters()).device
    eos = model.config.eos_token_id
    seg_id = model.config.seg_token_idx
    seq = torch.tensor([ids], device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        feats = model.model.encode_images(image_clip[None].to(device))
        hidden = model.language_model_forward(model.model.prepare_multimodal(seq, feats)).last_hidden_state
        nxt = model.lm_head(hidden[:, -1]).argmax(-1)
        new.append(int(nxt))
        seq = torch.cat([seq, nxt[:, None]], 1)
        if new[-1] == eos:
            break
    embedding = model.encode_images_sam(image[None].to(device))
    n_img = model.model.vision_tower.num_patches
    pos = (seq[0, 1:] == seg_id).nonzero().flatten()  # [SEG] at column c+1 <- the state at column c
    if pos.numel():
        mm_start = int((seq[0] == IMAGE_TOKEN_INDEX).nonzero()[0])
        shift = n_img - 1
        states = hidden[0, pos + shift]
        image_states = hidden[0, mm_start : mm_start + n_img][None].expand(len(pos), -1, -1)
        prompts = model.seg_prompts(states, image_states, [shape[1]] * len(pos))
        model.decode_masks(embedding, prompts["points"], prompts["labels"], prompts["text_embeds"], shape[0], shape[1])
    return new


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_original(model: Any, w: Workload, max_new_tokens: int) -> tuple[float, list[list[int]]]:
    device = next(model.parameters()).device
    sync(device)
    t0 = time.perf_counter()
    out = [original_query(model, img, clip, ids, shape, max_new_tokens)
           for img, clip, shape, rows in zip(w.images, w.images_clip, w.shapes, w.prompts) for ids in rows]
    sync(device)
    return time.perf_counter() - t0, out


def run_fast(model: Any, w: Workload, max_new_tokens: int, batch: int) -> tuple[float, list[list[int]]]:
    device = next(model.parameters()).device
    sync(device)
    t0 = time.perf_counter()
    out = []
    for img, clip, shape, rows in zip(w.images, w.images_clip, w.shapes, w.prompts):
        out += [r.token_ids for r in answer_image_queries(model, img, clip, shape, rows, max_new_tokens, batch)]
    sync(device)
    return time.perf_counter() - t0, out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.images, args.queries, args.max_new_tokens, args.prompt_len) < 1:
        raise SystemExit("--images, --queries, --max_new_tokens and --prompt_len must be >= 1")
    torch.manual_seed(args.seed)
    model, tok = load(args)
    w = make_workload(args, model, tok)
    warm = Workload(w.images[:1], w.images_clip[:1], w.shapes[:1], [w.prompts[0][:1]])
    run_original(model, warm, 2)
    run_fast(model, warm, 2, 1)

    t_ref, ref = run_original(model, w, args.max_new_tokens)
    t_new, new = run_fast(model, w, args.max_new_tokens, args.queries)
    queries = args.images * args.queries
    tokens = sum(len(t) for t in new)
    print(f"workload: {args.images} images x {args.queries} queries, max_new_tokens={args.max_new_tokens}, "
          f"{tokens} generated tokens, device={args.device}, precision={args.precision}")
    for name, t in (("no-cache, batch 1 (original)", t_ref), ("kv-cache, batched (test_read)", t_new)):
        print(f"{name:32s} time={t:8.2f}s  tokens/s={tokens / t:9.1f}  queries/s={queries / t:7.2f}")
    print(f"outputs_match={ref == new}")
    print(f"speedup={t_ref / t_new:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
