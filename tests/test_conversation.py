"""Prompt rendering, image-token insertion, batch tokenisation and label masking against the original's ids."""

from __future__ import annotations

import pytest
import torch

from dataset.conversation import (
    TEMPLATE_NAMES,
    TEMPLATES,
    build_labels,
    get_template,
    insert_image_tokens,
    render_prompt,
    tokenize_conversations,
    tokenize_with_image,
    training_max_length,
)
from model.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from model.tokenizer import READTokenizer
from tests.helpers.tokenizer import golden_tokens, tiny_tokenizer

GOLDEN = golden_tokens()
CONVS = GOLDEN["conversations"]
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@pytest.fixture(scope="module")
def tok() -> READTokenizer:
    return tiny_tokenizer()


def _turns(conv: dict) -> list[tuple[str, str]]:
    return [(q, a) for q, a in conv["turns"]]


# ---------------------------------------------------------------- templates and rendering


def test_template_texts() -> None:
    assert set(TEMPLATE_NAMES) == {"llava_v1", "vicuna_v1", "llava_llama_2"}
    v1, vicuna = get_template("llava_v1"), get_template("vicuna_v1")
    assert v1.system == LLAVA_SYSTEM
    assert vicuna.system == LLAVA_SYSTEM.replace("curious human", "curious user").replace("human's", "user's")
    assert (v1.sep, v1.sep2, v1.roles, v1.answer_sep) == (" ", "</s>", ("USER", "ASSISTANT"), " ASSISTANT: ")
    assert TEMPLATES["llava_llama_2"].answer_sep == "[/INST] "
    with pytest.raises(ValueError, match="unknown conversation template 'llava_v2'.*llava_v1"):
        get_template("llava_v2")


@pytest.mark.parametrize("name", sorted(CONVS))
def test_render_matches_golden(name: str) -> None:
    assert render_prompt(_turns(CONVS[name]), "llava_v1") == CONVS[name]["prompt"]


def test_render_generation_and_multi_turn_layout() -> None:
    q = "<image>\nWhat is red car in this image? Please output segmentation mask."
    assert render_prompt([(q, None)], "llava_v1") == GOLDEN["generation_prompt"]["prompt"]
    assert render_prompt([("q1", "a1"), ("q2", "a2")], "vicuna_v1") == (
        get_template("vicuna_v1").system + " USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>"
    )
    with pytest.raises(ValueError, match="only the last turn may have no answer"):
        render_prompt([("q1", None), ("q2", "a2")], "llava_v1")
    with pytest.raises(ValueError, match="at least one"):
        render_prompt([], "llava_v1")


def test_render_llava_llama_2() -> None:
    sys_text = get_template("llava_llama_2").system
    head = f"[INST] <<SYS>>\n{sys_text}\n<</SYS>>\n\n<image>\nq1 [/INST]"
    assert render_prompt([("<image>\nq1", None)], "llava_llama_2") == head
    assert render_prompt([("<image>\nq1", "a1"), ("q2", "a2")], "llava_llama_2") == (
        head + " a1 </s><s>[INST] q2 [/INST] a2 </s>"
    )


# ---------------------------------------------------------------- image tokens


def test_insert_image_tokens() -> None:
    assert insert_image_tokens("USER: <image>\nhi") == "USER: <im_start><image><im_end>\nhi"
    assert insert_image_tokens("USER: <image>\nhi", use_mm_start_end=False) == "USER: <image>\nhi"


def test_tokenize_with_image(tok: READTokenizer) -> None:
    conv = CONVS["short_seg"]
    ids = tokenize_with_image(insert_image_tokens(conv["prompt"]), tok)
    assert ids == conv["input_ids"]
    q = ids.index(IMAGE_TOKEN_INDEX)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids[q - 1] == 1001 and ids[q + 1] == 1002 and ids[0] == 1
    # without start/end tokens the chunks still join with exactly one -200 and a single BOS
    plain = tokenize_with_image("look <image> here <image>", tok)
    assert plain == [1] + tok.encode("look ", add_bos=False) + [-200] + tok.encode(" here ", add_bos=False) + [-200]
    assert tokenize_with_image("no image", tok) == tok.encode("no image")


# ---------------------------------------------------------------- batches and labels


@pytest.mark.parametrize("name", sorted(CONVS))
def test_ids_and_labels_match_golden(tok: READTokenizer, name: str) -> None:
    conv = CONVS[name]
    prompt = insert_image_tokens(render_prompt(_turns(conv), "llava_v1"))
    batch = tokenize_conversations([prompt], tok, template="llava_v1")
    assert batch["input_ids"].dtype == torch.int64 and batch["labels"].dtype == torch.int64
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["input_ids"][0].tolist() == conv["input_ids"]
    assert batch["labels"][0].tolist() == conv["labels"]
    assert bool(batch["attention_mask"].all())


def test_right_padded_batch(tok: READTokenizer) -> None:
    names = sorted(CONVS)
    prompts = [insert_image_tokens(CONVS[n]["prompt"]) for n in names]
    batch = tokenize_conversations(prompts, tok)
    width = max(len(CONVS[n]["input_ids"]) for n in names)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (len(names), width)
    for row, n in enumerate(names):
        k = len(CONVS[n]["input_ids"])
        assert batch["input_ids"][row].tolist() == CONVS[n]["input_ids"] + [0] * (width - k)
        assert batch["labels"][row].tolist() == CONVS[n]["labels"] + [IGNORE_INDEX] * (width - k)
        assert batch["attention_mask"][row].tolist() == [True] * k + [False] * (width - k)


def test_left_padded_batch(tok: READTokenizer) -> None:
    gen = GOLDEN["generation_prompt"]
    seg = CONVS["short_seg"]
    prompts = [insert_image_tokens(gen["prompt"]), insert_image_tokens(seg["prompt"])]
    batch = tokenize_conversations(prompts, tok, template="vicuna_v1", padding="left", with_labels=False)
    assert batch["labels"] is None
    width = len(seg["input_ids"])
    pad = width - len(gen["input_ids"])
    assert batch["input_ids"][0].tolist() == [0] * pad + gen["input_ids"]
    assert batch["input_ids"][1].tolist() == seg["input_ids"]
    assert batch["attention_mask"][0].tolist() == [False] * pad + [True] * len(gen["input_ids"])
    # labels of a left-padded row are the unpadded labels shifted right, with -100 on the pads
    labelled = tokenize_conversations([prompts[1], insert_image_tokens(CONVS["two_segs"]["prompt"])], tok, padding="left")
    shift = width - len(CONVS["two_segs"]["input_ids"])
    assert labelled["labels"][1].tolist() == [IGNORE_INDEX] * shift + CONVS["two_segs"]["labels"]


def test_truncation(tok: READTokenizer) -> None:
    prompts = [insert_image_tokens(CONVS[n]["prompt"]) for n in ("short_seg", "vqa_two_rounds")]
    full = tokenize_conversations(prompts, tok)
    cut = tokenize_conversations(prompts, tok, max_length=50)
    assert cut["input_ids"].shape == (2, 50)
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(cut[key], full[key][:, :50])
    small = tiny_tokenizer(model_max_length=300)
    assert training_max_length(small) == 45
    train = tokenize_conversations(prompts, small, train_truncation=True)
    assert torch.equal(train["labels"], full["labels"][:, :45])
    wide = tokenize_conversations(prompts, tok, max_length=10_000)
    assert torch.equal(wide["input_ids"], full["input_ids"])
    with pytest.raises(ValueError, match="not both"):
        tokenize_conversations(prompts, small, max_length=10, train_truncation=True)


def test_multi_turn_labels_supervise_answers_and_eos_only(tok: READTokenizer) -> None:
    answers = ["A red [SEG] mug.", "Two, both blue.", "It is [SEG]."]
    turns = [("<image>\nWhat is on the desk?", answers[0]), ("How many?", answers[1]), ("And the lamp?", answers[2])]
    prompt = insert_image_tokens(render_prompt(turns, "llava_v1"))
    batch = tokenize_conversations([prompt], tok)
    labels = batch["labels"][0]
    supervised = labels[labels != IGNORE_INDEX].tolist()
    expected = [i for a in answers for i in tok.encode(a, add_bos=False) + [tok.eos_token_id]]
    assert supervised == expected
    # the supervised positions carry the same ids as the input
    ids = batch["input_ids"][0]
    assert torch.equal(ids[labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX])


def test_llava_llama_2_labels(tok: READTokenizer) -> None:
    for turns, total, n_supervised in (
        ([("<image>\nWhat is it?", "It is [SEG].")], 132, 8),
        ([("<image>\nWhat is it?", "A cat."), ("Where?", "There [SEG].")], 156, 14),
    ):  # totals and supervised counts: the original algorithm run with transformers 4.31.0
        prompt = insert_image_tokens(render_prompt(turns, "llava_llama_2"))
        ids = tokenize_with_image(prompt, tok)
        labels = build_labels(prompt, ids, tok, "llava_llama_2")
        assert len(ids) == total
        supervised = [x for x in labels if x != IGNORE_INDEX]
        assert len(supervised) == n_supervised
        assert supervised == [i for _, a in turns for i in tok.encode(a + " ", add_bos=False) + [tok.eos_token_id]]


def test_label_mismatch_raises(tok: READTokenizer) -> None:
    conv = CONVS["short_seg"]
    prompt = insert_image_tokens(conv["prompt"])
    ids = tokenize_with_image(prompt, tok)
    with pytest.raises(ValueError, match="tokenization mismatch"):
        build_labels(prompt, ids[:10] + ids[11:], tok, "llava_v1")
    # wrong template: the llama-2 separator is absent from a llava_v1 prompt
    with pytest.raises(ValueError, match=r"separator '\[/INST\] '"):
        build_labels(prompt, ids, tok, "llava_llama_2")
    # a generation prompt has no answer to supervise
    with pytest.raises(ValueError, match="cannot be labelled"):
        tokenize_conversations([insert_image_tokens(GOLDEN["generation_prompt"]["prompt"])], tok)
    # the original counts non-pad tokens, so a literal <unk> (id 0 = pad) breaks the check, as it did there
    with pytest.raises(ValueError, match="tokenization mismatch"):
        tokenize_conversations([prompt.replace("Found it", "Found <unk> it")], tok)
    # the check only runs while the covered length is below model_max_length (original behaviour)
    short = tiny_tokenizer(model_max_length=20)
    labels = build_labels(prompt, ids[:10] + ids[11:], short, "llava_v1")
    assert labels[:5] == [IGNORE_INDEX] * 5


def test_bad_arguments(tok: READTokenizer) -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        tokenize_conversations([], tok)
    with pytest.raises(ValueError, match="padding must be"):
        tokenize_conversations(["x"], tok, padding="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown conversation template"):
        tokenize_conversations(["x"], tok, template="chatml")
