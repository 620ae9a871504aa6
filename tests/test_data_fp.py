"""The see + segment test set (FP-/R-/RefCOCO and ReasonSeg false-premise queries) used by test inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataset.errors import DatasetError
from dataset.fp_test import FP_TEST_DATASETS, FPTestDataset, collate_fp_items
from dataset.preprocess import ImagePreprocessor
from dataset.synthetic.reason_writer import write_reason_seg
from dataset.synthetic.refer_writer import write_refer

SMALL = ImagePreprocessor(sam_size=64, clip_size=28)
SYSTEM_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("fp")
    rng = np.random.default_rng(3)
    return root, write_refer(root, rng), write_reason_seg(root, rng)


def _original_question(prompt: str) -> str:
    """How the original test script recovered the question from a prompt."""
    return prompt.split("\n")[1].split("ASSISTANT:")[0].strip()


@pytest.mark.parametrize("name", ["fprefcoco", "fprefcoco+", "fprefcocog"])
def test_fp_refcoco_queries(data, name: str) -> None:
    root, refer, _ = data
    ds = FPTestDataset(root, SMALL, name, split="val")
    refs = [r for r in refer["datasets"][name]["refs"] if r["split"] == "val"]
    assert len(ds) == len({r["image_id"] for r in refs})
    item = ds[0]
    sents = [s for r in refs for s in r["sentences"]]
    assert item.sentences == [s["sent"] for s in sents]
    assert item.exists == [not s["is_false_premise"] for s in sents] and False in item.exists
    assert item.ref_ids == [r["ref_id"] for r in refs for _ in r["sentences"]]
    assert item.sent_ids == [k for r in refs for k in range(len(r["sentences"]))]
    assert item.gt_masks.dtype == torch.uint8 and item.gt_masks.shape[0] == len(sents)
    anns = [r["ann_id"] for r in refs for _ in r["sentences"]]
    for m, ex, ann in zip(item.gt_masks, item.exists, anns):
        expected = refer["coco"]["ann_masks"][ann] if ex else np.zeros_like(refer["coco"]["ann_masks"][ann])
        assert np.array_equal(m.numpy(), expected)  # false premise: all-zero ground truth
    for prompt, question, sent in zip(item.prompts, item.questions, item.sentences):
        assert prompt.startswith(SYSTEM_USER + " USER: <image>\n") and prompt.endswith(" ASSISTANT:")
        assert "[SEG]" not in prompt
        assert question == _original_question(prompt) and sent.lower() in question
    assert item.sam_mask_shape[1] == tuple(item.gt_masks.shape[1:])


def test_r_refcoco_and_plain_refcoco(data) -> None:
    root, refer, _ = data
    r = FPTestDataset(root, SMALL, "R-refcoco", split="testA")
    refs = [x for x in refer["datasets"]["R-refcoco"]["refs"] if "A" in x["split"]]
    assert r[0].exists == [s["exist"] for x in refs for s in x["sentences"]]
    plain = FPTestDataset(root, SMALL, "refcoco", split="val")
    assert all(plain[0].exists)


def test_eval_tuple_and_template_choice(data) -> None:
    root, _, _ = data
    ds = FPTestDataset(root, SMALL, "fprefcocog", split="test", template="llava_v1")
    item = ds[1]
    tup = item.as_eval_tuple()
    assert len(tup) == 10 and tup[0] == item.image_path and tup[3] == item.prompts
    assert torch.equal(tup[4], item.gt_masks) and tup[6] == item.exists and tup[9] == {item.image_path: item.prompts}
    assert "curious human" in item.prompts[0]


def test_prompts_are_deterministic_and_seeded(data) -> None:
    root, _, _ = data
    a = FPTestDataset(root, SMALL, "fprefcoco", split="val", seed=0)[0].prompts
    b = FPTestDataset(root, SMALL, "fprefcoco", split="val", seed=0)[0].prompts
    assert a == b
    lisa = FPTestDataset(root, SMALL, "fprefcoco", split="val", question_style="lisa")[0]
    assert all(q.startswith("What is ") and q.endswith("Please output segmentation mask.") for q in lisa.questions)


def test_reasonseg_with_false_premise_queries(data) -> None:
    root, _, reason = data
    ds = FPTestDataset(root, SMALL, "ReasonSeg", split="val")
    items = reason["splits"]["val"]
    assert len(ds) == len(items)
    for idx, expected in enumerate(items):
        item = ds[idx]
        fps = expected["false_premise_QA"] or []
        assert item.exists == [True] + [False] * len(fps)
        assert item.sentences == [expected["texts"][0]] + [t[0] for t in fps]
        assert np.array_equal(item.gt_masks[0].numpy(), expected["mask"])  # keeps 255 = ignore
        assert item.gt_masks[1:].sum() == 0
        assert all(p.endswith(" ASSISTANT:") for p in item.prompts)
        for (query, is_sentence, _), q in zip(fps, item.questions[1:]):
            assert q == (f"{query} Please output segmentation mask." if is_sentence
                         else f"What is {query.lower()} in this image? Please output segmentation mask.")
    without = FPTestDataset(root, SMALL, "ReasonSeg", split="val", include_false_premise=False)
    assert all(len(without[i].prompts) == 1 for i in range(len(without)))


def test_reasonseg_subset_and_split(data) -> None:
    root, _, reason = data
    ds = FPTestDataset(root, SMALL, "ReasonSeg", split="test", query_subset="long")
    assert [str(p) for p in ds.images] == [str(i["image"]) for i in reason["splits"]["test"] if i["is_sentence"]]
    with pytest.raises(ValueError, match="applies to ReasonSeg only"):
        FPTestDataset(root, SMALL, "fprefcoco", query_subset="short")


def test_dataloader_keeps_items(data) -> None:
    root, _, _ = data
    ds = FPTestDataset(root, SMALL, "R-refcocog", split="val")
    batches = list(DataLoader(ds, batch_size=1, shuffle=False, collate_fn=collate_fp_items))
    assert len(batches) == len(ds) and batches[0][0].image_path == ds[0].image_path


def test_unknown_and_missing(data, tmp_path) -> None:
    root, _, _ = data
    assert len(FP_TEST_DATASETS) == 10
    with pytest.raises(DatasetError, match="unknown test dataset 'refclef'"):
        FPTestDataset(root, SMALL, "refclef")
    with pytest.raises(DatasetError, match=r"fprefcoco\+: dataset folder not found: .*refer_seg/fprefcoco\+"):
        FPTestDataset(tmp_path, SMALL, "fprefcoco+")
    with pytest.raises(DatasetError, match="no refs with split 'testA'"):
        FPTestDataset(root, SMALL, "fprefcocog", split="testA")
