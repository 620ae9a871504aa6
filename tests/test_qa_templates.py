"""Template lists: sizes, placeholders, [SEG] counts, the exact LISA strings, and the sampling helpers."""

from __future__ import annotations

import re
import string

import numpy as np
import pytest

from dataset import qa_templates as qa


def _fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


def test_counts() -> None:
    assert len(qa.SHORT_QUESTION_TEMPLATE) == 100
    assert len(qa.LONG_QUESTION_TEMPLATE) == 49
    assert len(qa.NEG_ANSWER_TEMPLATE) == 100
    assert len(qa.LONG_ANSWER_TEMPLATE) == 35
    assert len(qa.SHORT_ANSWER_TEMPLATE) == 81
    assert len(qa.CORRECT_ANSWER_TEMPLATE) == 99


def test_questions_start_with_image_and_use_their_placeholder() -> None:
    for t in qa.SHORT_QUESTION_TEMPLATE:
        assert t.startswith("<image>\n") and _fields(t) == {"class_name"}, t
    for t in qa.LONG_QUESTION_TEMPLATE:
        assert t.startswith("<image>\n{sent} ") and _fields(t) == {"sent"}, t
        assert t.count("<image>") == 1


def test_negative_answers() -> None:
    named = [t for t in qa.NEG_ANSWER_TEMPLATE if "{class_name}" in t]
    it = [t for t in qa.NEG_ANSWER_TEMPLATE if "{class_name}" not in t]
    assert len(named) == 76 and len(it) == 24
    assert all(re.search(r"\b[Ii]t\b", t) for t in it)
    assert all("[SEG]" not in t and _fields(t) <= {"class_name"} for t in qa.NEG_ANSWER_TEMPLATE)


def test_seg_answers_have_exactly_one_seg() -> None:
    for t in qa.LONG_ANSWER_TEMPLATE:
        assert t.count("[SEG]") == 1 and _fields(t) == set(), t
    for t in qa.SHORT_ANSWER_TEMPLATE:
        assert t.count("[SEG]") == 1 and _fields(t) <= {"class_name"}, t
    assert sum("{class_name}" in t for t in qa.SHORT_ANSWER_TEMPLATE[:51]) == 50
    assert qa.SHORT_ANSWER_TEMPLATE[51:] == qa.LONG_ANSWER_TEMPLATE[:30]


def test_lisa_strings_are_exact() -> None:
    assert qa.LONG_ANSWER_TEMPLATE[-5:] == [
        "It is [SEG].",
        "Sure, [SEG].",
        "Sure, it is [SEG].",
        "Sure, the segmentation result is [SEG].",
        "[SEG].",
    ]
    assert qa.LISA_SHORT_QUESTION == "<image>\nWhat is {class_name} in this image? Please output segmentation mask."
    assert qa.LISA_LONG_QUESTION == "<image>\n{sent} Please output segmentation mask."
    assert qa.LISA_ANSWER == "Sure, the segmentation result is [SEG]."


def test_corrections_name_both_objects_and_have_no_seg() -> None:
    for t in qa.CORRECT_ANSWER_TEMPLATE:
        assert _fields(t) == {"class_name", "gt_name"} and "[SEG]" not in t, t
    filled = qa.CORRECT_ANSWER_TEMPLATE[5].format(class_name="a cat", gt_name="a dog")
    assert "a cat" in filled and "a dog" in filled


def test_own_wording_not_the_originals() -> None:
    """The first entries quoted in the spec are the original's prose; ours must be different sentences."""
    originals = {
        "<image>\nCan you confirm if {class_name} is present in this image? If it is, kindly provide the segmentation map. If it isn't, please state so and, if appropriate, mention any objects that might be mistaken for {class_name}.",
        "<image>\n{sent} Could you provide a segmentation map for the indicated area if it's present?",
        "No presence of {class_name} detected in this image.",
        "Confirmed, here's the segmentation: [SEG].",
        "While the {class_name} is not present, the image does include {gt_name}.",
    }
    ours = set(
        qa.SHORT_QUESTION_TEMPLATE + qa.LONG_QUESTION_TEMPLATE + qa.NEG_ANSWER_TEMPLATE + qa.LONG_ANSWER_TEMPLATE
        + qa.SHORT_ANSWER_TEMPLATE + qa.CORRECT_ANSWER_TEMPLATE
    )
    assert not ours & originals


def test_no_determiner_right_before_a_placeholder() -> None:
    """Referring expressions already carry their article ("the red car"), so templates must not add one."""
    pattern = re.compile(r"\b(no|any|a|an|the|some)\s+\{(class_name|gt_name)\}", re.IGNORECASE)
    every = qa.SHORT_QUESTION_TEMPLATE + qa.NEG_ANSWER_TEMPLATE + qa.SHORT_ANSWER_TEMPLATE + qa.CORRECT_ANSWER_TEMPLATE
    assert [t for t in every if pattern.search(t)] == []


def test_all_templates_format_cleanly() -> None:
    every = (
        qa.SHORT_QUESTION_TEMPLATE + qa.LONG_QUESTION_TEMPLATE + qa.NEG_ANSWER_TEMPLATE + qa.LONG_ANSWER_TEMPLATE
        + qa.SHORT_ANSWER_TEMPLATE + qa.CORRECT_ANSWER_TEMPLATE
    )
    for t in every:
        out = t.format(class_name="X", gt_name="Y", sent="S")
        assert "{" not in out and "}" not in out


def test_select_items_rule() -> None:
    rng = np.random.default_rng(0)
    assert qa.select_items(rng, ["a", "b"], 3) == ["a", "b"]  # fewer than n: all, in order
    picked = qa.select_items(rng, list(range(10)), 3)
    assert len(picked) == 3 and len(set(picked)) == 3
    a = qa.select_items(np.random.default_rng(5), list(range(10)), 4)
    b = qa.select_items(np.random.default_rng(5), list(range(10)), 4)
    assert a == b


def test_choose_covers_the_list() -> None:
    rng = np.random.default_rng(0)
    seen = {qa.choose(rng, qa.LONG_ANSWER_TEMPLATE) for _ in range(2000)}
    assert seen == set(qa.LONG_ANSWER_TEMPLATE)


@pytest.mark.parametrize("name", ["SHORT_QUESTION_TEMPLATE", "NEG_ANSWER_TEMPLATE", "CORRECT_ANSWER_TEMPLATE"])
def test_lists_are_unique(name: str) -> None:
    values = getattr(qa, name)
    assert len(set(values)) == len(values)
