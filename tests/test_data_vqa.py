"""LLaVA-Instruct VQA source: record normalisation, rendered conversations, empty masks, malformed records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.errors import DatasetError
from dataset.vqa import VQADataset, conversation_turns, normalise_image_message

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")


@pytest.fixture(scope="module")
def vqa(synthetic_root: Path) -> VQADataset:
    return VQADataset(synthetic_root)


def test_turns_match_the_writer(vqa: VQADataset, synthetic_dataset: dict) -> None:
    expected = synthetic_dataset["vqa"]["items"]
    assert len(vqa.items) == len(expected)
    for (image, turns), want in zip(vqa.items, expected):
        assert image == want["image"].name and turns == want["turns"]


def test_samples_render_multi_turn_llava_v1(vqa: VQADataset, synthetic_dataset: dict) -> None:
    for k, want in enumerate(synthetic_dataset["vqa"]["items"]):
        path, image, clip, convs, masks, shape, exists = vqa.build(k)
        rounds = "".join(f"USER: {q} ASSISTANT: {a}</s>" for q, a in want["turns"])
        assert convs == [f"{SYSTEM} {rounds}"]
        assert convs[0].count("<image>") == 1 and convs[0].startswith(f"{SYSTEM} USER: <image>\n")
        h, w = Image.open(path).size[::-1]
        assert masks.shape == (0, h, w) and shape[1] == (h, w) and exists == [False]
        assert image.shape == (3, 1024, 1024) and clip.shape == (3, 336, 336)
    a, b = vqa[5], vqa[5]
    assert a[0] == b[0] and a[3] == b[3]


def test_image_token_normalisation() -> None:
    assert normalise_image_message("Describe it.\n<image>") == "<image>\nDescribe it."
    assert normalise_image_message("  <image> What?  ") == "<image>\nWhat?"
    once = normalise_image_message("Q <image>")
    assert normalise_image_message(once) == once
    assert normalise_image_message("no image here ") == "no image here "


@pytest.mark.parametrize(
    "conversation, message",
    [
        ([("human", "<image>\nq"), ("human", "q2")], r"message 1 is from 'human', expected 'gpt'"),
        ([("human", "<image>\nq"), ("gpt", "a"), ("human", "q2")], r"ending with a gpt answer"),
        ([("human", "q"), ("gpt", "a")], r"'<image>' must occur exactly once, in the first human message \(found 0\)"),
        ([("human", "q"), ("gpt", "a"), ("human", "<image>")] + [("gpt", "b")], r"exactly once, in the first human"),
        ([("human", "<image> <image>"), ("gpt", "a")], r"\(found 2\)"),
    ],
)
def test_malformed_records(conversation: list, message: str) -> None:
    record = {"id": "x", "image": "x.jpg", "conversations": [{"from": f, "value": v} for f, v in conversation]}
    with pytest.raises(DatasetError, match=message):
        conversation_turns(record, "vqa: test record")


def test_leading_assistant_message_is_dropped() -> None:
    record = {"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q <image>"},
                                {"from": "gpt", "value": "a"}]}
    assert conversation_turns(record, "r") == [("<image>\nq", "a")]


def _copy_vqa(root: Path, tmp: Path) -> Path:
    shutil.copytree(root / "llava_dataset", tmp / "llava_dataset")
    shutil.copytree(root / "coco", tmp / "coco")
    return tmp


def test_missing_json_and_images(synthetic_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"vqa: expected file not found: .*llava_dataset/llava_instruct_150k.json"):
        VQADataset(tmp_path)
    root = _copy_vqa(synthetic_root, tmp_path)
    (root / "coco/train2017/000000300002.jpg").unlink()
    with pytest.raises(DatasetError, match=r"vqa: 1 images named in .* are missing .*000000300002.jpg"):
        VQADataset(root)


def test_bad_record_fails_at_construction(synthetic_root: Path, tmp_path: Path) -> None:
    root = _copy_vqa(synthetic_root, tmp_path)
    path = root / "llava_dataset/llava_instruct_150k.json"
    records = json.loads(path.read_text())
    del records[2]["conversations"][0]["from"]
    path.write_text(json.dumps(records))
    with pytest.raises(DatasetError, match=r"record 2 \(id '000000300003'\): expected .*missing 'from'"):
        VQADataset(root)


def test_sample_uses_only_its_generator(vqa: VQADataset) -> None:
    np.random.seed(0)
    a = vqa.sample(np.random.default_rng(11))
    np.random.seed(1)
    b = vqa.sample(np.random.default_rng(11))
    assert a[0] == b[0] and torch.equal(a[2], b[2])
