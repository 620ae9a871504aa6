"""READTokenizer against the ids of the original transformers 4.31 slow/legacy LLaMA tokenizer."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from model.tokenizer import READTokenizer
from tests.helpers.tokenizer import TINY_VOCAB_SIZE, golden_tokens, tiny_spm_path, tiny_tokenizer

GOLDEN = golden_tokens()


@pytest.fixture(scope="module")
def tok() -> READTokenizer:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def raw_sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tiny_spm_path()))


def _dir_with_model(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(tiny_spm_path(), d / "tokenizer.model")
    return d


# ---------------------------------------------------------------- ids of the special tokens


def test_special_ids_and_vocab_size(tok: READTokenizer) -> None:
    special = GOLDEN["special_ids"]
    assert tok.seg_token_id == special["[SEG]"] == 1000
    assert tok.im_start_token_id == special["<im_start>"] == 1001
    assert tok.im_end_token_id == special["<im_end>"] == 1002
    assert tok.pad_token_id == special["pad"] == tok.unk_token_id == 0
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert len(tok) == special["vocab_size_after_adding"] == TINY_VOCAB_SIZE
    assert tok.vocab_size == 1000
    # the original derives seg_token_idx as the first id of tokenizing "[SEG]" without BOS
    assert tok.encode("[SEG]", add_bos=False) == [1000]


def test_add_read_tokens_order_and_idempotence() -> None:
    t = READTokenizer.from_pretrained(tiny_spm_path())
    assert len(t) == 1000
    with pytest.raises(KeyError, match="add_read_tokens"):
        _ = t.seg_token_id
    assert t.add_read_tokens(use_mm_start_end=False) == 1
    assert t.added_tokens == {"[SEG]": 1000}
    assert t.add_read_tokens() == 2
    assert t.add_read_tokens() == 0
    assert t.added_tokens == {"[SEG]": 1000, "<im_start>": 1001, "<im_end>": 1002}
    assert t.add_tokens("<s>") == 0  # already a SentencePiece piece


# ---------------------------------------------------------------- encoding


@pytest.mark.parametrize("text", sorted(GOLDEN["plain_strings"]))
def test_plain_strings_match_golden(tok: READTokenizer, text: str) -> None:
    assert tok.encode(text) == GOLDEN["plain_strings"][text]


def test_each_chunk_gets_its_own_dummy_prefix(tok: READTokenizer, raw_sp: spm.SentencePieceProcessor) -> None:
    # "is [SEG]." = "is" + [SEG] + "." encoded on its own, i.e. "▁." and not "."
    expected = [1] + raw_sp.encode("is") + [1000] + raw_sp.encode(".")
    assert tok.encode("is [SEG].") == expected
    assert raw_sp.id_to_piece(expected[-2]) == "▁"  # "▁." is split as "▁" + "." by this tiny model
    assert tok.tokenize("is [SEG].") == raw_sp.encode("is", out_type=str) + ["[SEG]"] + raw_sp.encode(".", out_type=str)


def test_added_tokens_strip_whitespace_but_control_tokens_do_not(
    tok: READTokenizer, raw_sp: spm.SentencePieceProcessor
) -> None:
    # newline and tab around <im_end>/[SEG] disappear; whitespace next to </s>, <s>, <unk> stays
    assert tok.encode("x \n<im_end>\n\ty", add_bos=False) == raw_sp.encode("x") + [1002] + raw_sp.encode("y")
    assert tok.encode("a </s> b", add_bos=False) == raw_sp.encode("a ") + [2] + raw_sp.encode(" b")
    # produced by transformers 4.31.0 LlamaTokenizer(legacy=True) with the same added tokens
    assert tok.encode("Hello\n<s>x</s> <unk>  [SEG]\t\n<im_end>") == [
        1, 548, 380, 314, 13, 1, 858, 904, 2, 351, 0, 1000, 1002
    ]
    assert tok.encode("[SEG] [SEG]", add_bos=False) == [1000, 1000]
    assert tok.encode("", add_bos=True) == [1]
    assert tok("[SEG][SEG") == [1] + [1000] + raw_sp.encode("[SEG")


# ---------------------------------------------------------------- decoding

# (ids, skip_special_tokens=True, skip_special_tokens=False) as decoded by transformers 4.31.0
DECODE_431 = [
    ([1, 779, 880, 467, 305, 1000, 858, 875], "Sure, it is [SEG] .", "<s>Sure, it is [SEG] ."),
    ([1, 1002, 768, 305, 467, 938], "<im_end> What is it?", "<s> <im_end> What is it?"),
    ([1, 351, 261, 887, 865, 858, 290, 589, 450], "  two  spaces", "<s>  two  spaces"),
    (
        [779, 880, 273, 480, 673, 305, 1000, 858, 875, 2],
        "Sure, the segmentation result is [SEG] .",
        "Sure, the segmentation result is [SEG]  .</s>",
    ),
    ([1000, 1000, 2, 0, 0], "[SEG] [SEG]", "[SEG] [SEG] </s><unk><unk>"),
    ([1, 401, 1, 2, 875, 0, 1001, 1002], "A. <im_start> <im_end>", "<s> A<s></s> .<unk> <im_start> <im_end>"),
]


@pytest.mark.parametrize("ids,skipped,kept", DECODE_431)
def test_decode_matches_431(tok: READTokenizer, ids: list[int], skipped: str, kept: str) -> None:
    assert tok.decode(ids) == skipped
    assert tok.decode(ids, skip_special_tokens=True) == skipped
    assert tok.decode(ids, skip_special_tokens=False) == kept


def test_decode_keeps_seg_ignores_negative_ids_and_takes_tensors(tok: READTokenizer) -> None:
    answer = tok.encode("It is [SEG].", add_bos=False) + [tok.eos_token_id]
    text = tok.decode(answer)
    assert "[SEG]" in text and "</s>" not in text
    with_image = [1, 1001, -200, 1002] + answer
    assert tok.decode(with_image) == tok.decode([1, 1001, 1002] + answer)
    assert tok.decode(torch.tensor(with_image)) == tok.decode(with_image)
    assert tok.batch_decode(torch.tensor([answer, answer])) == [text, text]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([1003])


# ---------------------------------------------------------------- saving and loading


def test_save_load_roundtrip(tok: READTokenizer, tmp_path: Path) -> None:
    tok2 = tiny_tokenizer(model_max_length=2048)
    paths = tok2.save_pretrained(tmp_path / "saved")
    names = sorted(Path(p).name for p in paths)
    assert names == ["added_tokens.json", "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    saved = tmp_path / "saved"
    assert json.loads((saved / "added_tokens.json").read_text()) == {"[SEG]": 1000, "<im_start>": 1001, "<im_end>": 1002}
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 2048 and config["legacy"] is True
    assert (saved / "tokenizer.model").read_bytes() == tiny_spm_path().read_bytes()

    loaded = READTokenizer.from_pretrained(saved, model_max_length=None)
    assert loaded.model_max_length == 2048
    assert READTokenizer.from_pretrained(saved).model_max_length == 512
    assert len(loaded) == TINY_VOCAB_SIZE and loaded.add_read_tokens() == 0
    for conv in GOLDEN["conversations"].values():
        text = conv["prompt"].replace("<image>", "<im_start><im_end>")
        assert loaded.encode(text) == tok.encode(text)


def test_pickle_roundtrip(tok: READTokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert len(clone) == len(tok)
    assert clone.encode("Sure, it is [SEG].") == GOLDEN["plain_strings"]["Sure, it is [SEG]."]


def test_loads_431_checkpoint_layout(tok: READTokenizer, tmp_path: Path) -> None:
    """A directory as transformers 4.31 saved it for a READ checkpoint (no added_tokens_decoder)."""
    d = _dir_with_model(tmp_path)
    (d / "added_tokens.json").write_text(json.dumps({"<im_end>": 1002, "<im_start>": 1001, "[SEG]": 1000}))
    control = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False, "special": False}
    (d / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", **control}, "eos_token": {"content": "</s>", **control},
        "pad_token": "<unk>", "unk_token": {"content": "<unk>", **control},
    }))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False, "legacy": True,
        "bos_token": {"__type": "AddedToken", "content": "<s>", **control},
        "eos_token": {"__type": "AddedToken", "content": "</s>", **control},
        "unk_token": {"__type": "AddedToken", "content": "<unk>", **control},
        "model_max_length": 512, "pad_token": None, "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
    }))
    loaded = READTokenizer.from_pretrained(d, model_max_length=2048)
    assert loaded.model_max_length == 2048
    assert loaded.added_tokens == tok.added_tokens and loaded.add_read_tokens() == 0
    for text, ids in GOLDEN["plain_strings"].items():
        assert loaded.encode(text) == ids


@pytest.mark.parametrize("layout", ["added_tokens_decoder", "tokenizer_json"])
def test_loads_newer_layouts(tok: READTokenizer, tmp_path: Path, layout: str) -> None:
    d = _dir_with_model(tmp_path)
    entries = {i: t for t, i in {"<unk>": 0, "<s>": 1, "</s>": 2, **tok.added_tokens}.items()}
    if layout == "added_tokens_decoder":
        decoder = {str(i): {"content": t, "special": i != 1000} for i, t in entries.items()}
        (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    else:
        added = [{"id": i, "content": t, "special": i != 1000} for i, t in entries.items()]
        (d / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    loaded = READTokenizer.from_pretrained(d)
    assert loaded.added_tokens == {"[SEG]": 1000, "<im_start>": 1001, "<im_end>": 1002}
    assert loaded.encode("Sure, it is [SEG].") == GOLDEN["plain_strings"]["Sure, it is [SEG]."]


def test_special_tokens_missing_from_vocab_are_appended_like_431(tmp_path: Path) -> None:
    d = _dir_with_model(tmp_path)
    (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>", "additional_special_tokens": ["<extra>"]}))
    t = READTokenizer.from_pretrained(d)
    assert t.added_tokens == {"<pad>": 1000, "<extra>": 1001}
    assert t.add_read_tokens() == 3 and t.seg_token_id == 1002 and t.pad_token_id == 0
    ids = t.encode("a <extra> b [SEG] <pad>c")
    assert ids == [1, 264, 1001, 294, 1002, 1000, 280]  # transformers 4.31.0
    assert t.decode(ids) == "a b [SEG] <pad> c"  # additional specials are skipped, <pad> (not special) is kept


# ---------------------------------------------------------------- errors


def test_missing_tokenizer_model_names_the_path(tmp_path: Path) -> None:
    d = tmp_path / "v5_dir"
    d.mkdir()
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.model") as e:
        READTokenizer.from_pretrained(d)
    assert str(d / "tokenizer.model") in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        READTokenizer.from_pretrained(tmp_path / "nowhere")


def test_corrupt_tokenizer_model_names_the_path(tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model") as e:
        READTokenizer.from_pretrained(d)
    assert str(d / "tokenizer.model") in str(e.value)


def test_gap_in_added_token_ids_is_rejected(tmp_path: Path) -> None:
    d = _dir_with_model(tmp_path)
    (d / "added_tokens.json").write_text(json.dumps({"[SEG]": 1001}))
    with pytest.raises(ValueError, match="consecutive from 1000"):
        READTokenizer.from_pretrained(d)
    (d / "added_tokens.json").write_text(json.dumps({"[SEG]": 5}))
    with pytest.raises(ValueError, match="added_tokens.json maps '\\[SEG\\]' to id 5"):
        READTokenizer.from_pretrained(d)
    (d / "added_tokens.json").write_text(json.dumps({"[SEG]": 1000, "</s>": 1001}))
    with pytest.raises(ValueError, match="'</s>' of .* is already in the vocabulary"):
        READTokenizer.from_pretrained(d)
