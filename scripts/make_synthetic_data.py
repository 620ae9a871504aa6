#!/usr/bin/env python
"""Write a small synthetic dataset root in the exact on-disk formats READ reads (for tests and smoke runs).

Example:
    python scripts/make_synthetic_data.py --out /tmp/read_synth --seed 0
    python train_read.py --dataset_dir /tmp/read_synth ...   # any entry point that takes --dataset_dir
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.synthetic.writer import count_files, write_synthetic_dataset  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Write a synthetic dataset root with every source READ reads (ReasonSeg, the ten refer datasets, "
            "ADE20K, COCO-Stuff, Mapillary, PACO-LVIS, PASCAL-Part, LLaVA-Instruct) in the real file formats: "
            "a few small images with painted shapes whose masks are known exactly. Takes a few seconds; the same "
            "--seed always writes byte-identical files."
        ),
        epilog="The tree it writes is the one described in README.md, section 'Data'.",
    )
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder (the dataset root, i.e. what --dataset_dir points to); must be empty or absent")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the shapes, sizes and texts (default: 0)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        print(f"error: --out {args.out} exists and is not an empty folder; choose a new path", file=sys.stderr)
        return 2
    start = time.perf_counter()
    write_synthetic_dataset(args.out, seed=args.seed)
    counts = count_files(args.out)
    print(f"wrote synthetic dataset root {args.out} (seed {args.seed}) in {time.perf_counter() - start:.1f} s")
    for name, n in counts.items():
        print(f"  {name + '/':<16} {n:4d} files")
    print(f"  {'total':<16} {sum(counts.values()):4d} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
