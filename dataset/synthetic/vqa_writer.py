"""Synthetic LLaVA-Instruct file (``llava_dataset/llava_instruct_150k.json``) with its COCO 2017 images.

The records cover the shapes the loader must normalise: ``<image>`` before or after the question text, multi-turn
conversations, and a record that opens with an assistant message (dropped by the loader). The summary gives the
(question, answer) turns each record must turn into.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dataset.synthetic.shapes import COLORS, paint_image, random_shape, random_size, write_image
from utils.io import atomic_write_json

N_RECORDS = 4


def _record(k: int, image: str, color: str, kind: str, n_shapes: int) -> tuple[dict, list[tuple[str, str]]]:
    """One record and the turns it must normalise to (first question starts with ``<image>\\n``)."""
    q1 = f"What colour is the {kind} in the picture?"
    a1 = f"The {kind} is {color}."
    q2 = "How many shapes can you see?"
    a2 = f"I can see {n_shapes} shape{'s' if n_shapes != 1 else ''}."
    if k % 4 == 0:  # image first, one turn
        conv = [("human", f"<image>\n{q1}"), ("gpt", a1)]
        turns = [(f"<image>\n{q1}", a1)]
    elif k % 4 == 1:  # image after the text, two turns
        conv = [("human", f"{q1}\n<image>"), ("gpt", a1), ("human", q2), ("gpt", a2)]
        turns = [(f"<image>\n{q1}", a1), (q2, a2)]
    elif k % 4 == 2:  # opens with an assistant message, which is dropped
        conv = [("gpt", "Hello! Ask me about the image."), ("human", f"<image>\n  {q2} "), ("gpt", a2)]
        turns = [(f"<image>\n{q2}", a2)]
    else:  # three turns
        q3 = "Is the background plain?"
        a3 = "No, it has a light noise texture."
        conv = [("human", f" {q2}<image>"), ("gpt", a2), ("human", q1), ("gpt", a1), ("human", q3), ("gpt", a3)]
        turns = [(f"<image>\n{q2}", a2), (q1, a1), (q3, a3)]
    record = {"id": image.split(".")[0], "image": image,
              "conversations": [{"from": f, "value": v} for f, v in conv]}
    return record, turns


def write_vqa(root: Path, rng: np.random.Generator) -> dict:
    """Write the json and its images under ``root``; return ``{"json", "items": [{"image", "turns"}]}``."""
    root = Path(root)
    records, items = [], []
    for k in range(N_RECORDS):
        image = f"{300001 + k:012d}.jpg"
        h, w = random_size(rng)
        color = list(COLORS)[int(rng.integers(len(COLORS) - 2))]
        shape = random_shape(rng, h, w)
        write_image(root / "coco/train2017" / image, paint_image(rng, h, w, [(shape.mask(h, w), color)]))
        kind = "rectangle" if shape.notch is None else "L-shaped block"
        record, turns = _record(k, image, color, kind, 1)
        records.append(record)
        items.append({"image": root / "coco/train2017" / image, "turns": turns})
    json_path = root / "llava_dataset/llava_instruct_150k.json"
    atomic_write_json(json_path, records)
    return {"json": json_path, "items": items}
