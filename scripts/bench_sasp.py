"""Benchmark SasP + DtoC: the full-grid `exact` evaluation (the original's cost) against the `window` one.

    python scripts/bench_sasp.py [--preset read-7b] [--dtype bfloat16] [--window-repeats 30]

For each image size it prints, for `exact` and `window`:

- time per SEG token: the wall time of one forward + backward of `similarity_as_points` for a single
  SEG token (similarity [1, 576] requiring grad, the loss a weighted sum of the points), after a warm-up
  call, with torch's default CPU threads. The best of the repeats is the reported time and the one the
  speedup uses (timeit's convention: on a shared machine the slower runs measure the other processes);
  the median is printed beside it;
- peak extra memory: the peak, during that forward + backward, of the running total of bytes that
  PyTorch's CPU allocator handed out minus those it took back, read from torch.profiler's allocation
  events (profile_memory=True). Tensors alive before the call (the input) do not count; the points and
  gradients made by the call do. Python objects and the C allocator's own slack are not tensors and are
  not counted, so this is the tensor working set, independent of how much freed memory glibc keeps.

The last line is machine-readable: `speedup_1080p=<exact/window time at 1920x1080>
window_peak_mb_4000x3000=<window peak MB at 4000x3000>`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.sasp import SasPConfig, similarity_as_points  # noqa: E402

SIZES = [(480, 640), (1080, 1920), (3000, 4000)]  # (H, W)
EXACT_REPEATS = {(480, 640): 5, (1080, 1920): 3, (3000, 4000): 1}


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence writes to file descriptor 2 made by native code (Python's own stderr is flushed first)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_tensor_bytes(fn: Callable[[], None]) -> int:
    """Peak of (allocated - freed) tensor bytes while fn runs, from the profiler's allocation events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr():  # kineto prints a "profiler_start/stop" line per session
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.typed[0] == _EventType.Allocation:
            events.append((node.start_time_ns, node.typed[1].alloc_size))
        stack.extend(node.children)
    events.sort()
    current = peak = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    return peak


def make_step(size: tuple[int, int], cfg: SasPConfig, dtype: torch.dtype) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, 576, generator=gen).to(dtype)
    coef = torch.randn(1, cfg.num_points, 2, generator=gen)

    def step() -> None:
        sim = base.clone().requires_grad_()
        points, _ = similarity_as_points(sim, [size], cfg)
        (points * coef).sum().backward()

    return step


def time_seconds(step: Callable[[], None], repeats: int, rounds: int = 1) -> tuple[float, float]:
    """(best, median) wall time of step over rounds x repeats runs after one warm-up run.

    The rounds are 0.2 s apart so that a burst of load from other processes does not cover every run.
    """
    step()
    times = []
    for r in range(rounds):
        if r:
            time.sleep(0.2)
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="read-7b", choices=SasPConfig.preset_names())
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--window-repeats", type=int, default=20, help="window runs per round (5 rounds)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"SasP benchmark: preset {args.preset}, {args.dtype} similarity, forward + backward, 1 SEG token, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    results: dict[tuple[tuple[int, int], str], tuple[float, float]] = {}
    for size in SIZES:
        h, w = size
        for dtoc in ("exact", "window"):
            cfg = SasPConfig.preset(args.preset, dtoc=dtoc)
            step = make_step(size, cfg, dtype)
            repeats, rounds = (EXACT_REPEATS[size], 1) if dtoc == "exact" else (args.window_repeats, 5)
            seconds, median = time_seconds(step, repeats, rounds)
            peak_mb = peak_tensor_bytes(step) / 2**20
            results[(size, dtoc)] = (seconds, peak_mb)
            runs = repeats * rounds
            print(
                f"{w}x{h:<5} {dtoc:>6}: {seconds * 1e3:10.2f} ms/SEG (best of {runs}; median {median * 1e3:.2f})"
                f"   peak extra {peak_mb:9.2f} MB",
                flush=True,
            )
        speedup = results[(size, "exact")][0] / results[(size, "window")][0]
        print(f"{w}x{h:<5} speedup {speedup:.1f}x", flush=True)
    speedup_1080p = results[((1080, 1920), "exact")][0] / results[((1080, 1920), "window")][0]
    print(f"speedup_1080p={speedup_1080p:.1f} window_peak_mb_4000x3000={results[((3000, 4000), 'window')][1]:.2f}")


if __name__ == "__main__":
    main()
