"""demo.py with a tiny released-layout checkpoint whose answers hold a [SEG] (see tests/test_test_read.py)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import demo
from dataset.conversation import render_prompt
from dataset.preprocess import ImagePreprocessor, sam_mask_shape
from model.builder import load_read_for_inference
from test_read import prompt_ids
from tests.test_test_read import write_seg_answering_checkpoint

REPO = Path(__file__).resolve().parents[1]
H, W = 60, 80


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("demo")
    ckpt, _ = write_seg_answering_checkpoint(root)
    rng = np.random.default_rng(0)
    image = root / "street.scene.png"  # a dot in the stem: outputs must keep it apart from the extension
    cv2.imwrite(str(image), rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    return {"ckpt": ckpt, "image": image, "root": root}


def base_args(setup: dict, out: Path) -> list[str]:
    return ["--version", str(setup["ckpt"]), "--precision", "fp32", "--device", "cpu", "--max_new_tokens", "3",
            "--out", str(out)]


def read_png(path: Path, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    img = cv2.imread(str(path), flags)
    assert img is not None, path
    return img


def test_non_interactive_writes_mask_overlay_and_heatmap(setup, tmp_path) -> None:
    out = tmp_path / "out"
    printed = io.StringIO()
    question = "Where is the red car?"
    rc = demo.main([*base_args(setup, out), "--image", str(setup["image"]), "--prompt", question], out=printed)
    assert rc == 0
    text = printed.getvalue()
    assert "ASSISTANT: [SEG]" in text
    files = {kind: out / f"street.scene_{kind}.png" for kind in ("mask", "overlay", "heatmap")}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files.values())
    for p in files.values():
        assert f"saved {p}" in text

    # the same question through the model API directly
    tok, model = load_read_for_inference(setup["ckpt"], vision_tower=None, dtype=torch.float32)
    rgb = cv2.cvtColor(cv2.imread(str(setup["image"])), cv2.COLOR_BGR2RGB)
    prep = ImagePreprocessor()(rgb)
    ids = prompt_ids([render_prompt([("<image>\n" + question, None)], "vicuna_v1")], tok, True)
    (res,) = model.generate_masks(prep.image_clip[None], prep.image[None], ids, [sam_mask_shape(prep)], max_new_tokens=3)
    assert tok.decode(res.token_ids) == "[SEG]"

    mask = read_png(files["mask"])
    assert mask.shape == (H, W) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask == 255, res.mask.numpy())
    assert f"See (object present): {bool(res.mask.any())}" in text

    overlay = cv2.cvtColor(read_png(files["overlay"], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert overlay.shape == (H, W, 3)
    pts, labels = res.points[0].numpy(), res.point_labels[0].numpy()
    centres = np.rint(pts).astype(int)
    assert (labels == 1).any()
    # positives are painted last, so every positive centre is green
    assert (overlay[centres[labels == 1, 1], centres[labels == 1, 0]] == (0, 200, 0)).all()
    outside = ~(mask == 255)
    far = np.ones((H, W), bool)
    for x, y in centres:  # pixels away from every point and outside the mask are the untouched image
        far[max(0, y - 3) : y + 4, max(0, x - 3) : x + 4] = False
    assert (outside & far).any()
    assert np.array_equal(overlay[outside & far], rgb[outside & far])

    heat = read_png(files["heatmap"], cv2.IMREAD_COLOR)
    assert heat.shape == (H, W, 3) and not np.array_equal(cv2.cvtColor(heat, cv2.COLOR_BGR2RGB), rgb)


def test_interactive_over_stdin_answers_two_questions_and_exits_on_eof(setup, tmp_path) -> None:
    out = tmp_path / "chat"
    stdin = f"{tmp_path / 'missing.jpg'}\n{setup['image']}\nWhat is this?\nSegment the car.\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "demo.py"), *base_args(setup, out)], input=stdin,
                          capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Cannot use this image: image not found:" in proc.stdout and "missing.jpg" in proc.stdout
    assert proc.stdout.count("ASSISTANT: [SEG]") == 2
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{t:03d}_street.scene_{k}.png" for t in (1, 2) for k in ("mask", "overlay", "heatmap"))


def test_loop_controls_and_no_seg_message(tmp_path) -> None:
    """`exit` ends the loop with 0; an answer without [SEG] is reported and writes nothing."""
    answer = demo.DemoAnswer(text="I cannot find it.", num_seg=0, present=False, mask=np.zeros((4, 5), bool))
    assert demo.save_answer(tmp_path, "x", np.zeros((4, 5, 3), np.uint8), answer) == []
    printed = io.StringIO()
    demo.report(answer, [], printed)
    assert printed.getvalue() == ("ASSISTANT: I cannot find it.\n"
                                  "(no [SEG] in the answer: nothing was segmented, no files written)\n")
    assert list(tmp_path.iterdir()) == []
    printed = io.StringIO()
    assert demo.interactive(None, tmp_path, io.StringIO("\nexit\nnever read\n"), printed) == 0  # type: ignore[arg-type]
    assert printed.getvalue().count("Image path: ") == 2
