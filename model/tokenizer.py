"""READTokenizer: the LLaMA SentencePiece tokenizer with READ's added tokens, as transformers 4.31 ran it.

Released READ/SESAME/LISA checkpoints were trained with the slow, legacy 4.31 ``LlamaTokenizer``
(``use_fast=False, legacy=True``) after ``add_tokens("[SEG]")`` and
``add_tokens(["<im_start>", "<im_end>"], special_tokens=True)``. Current transformers no longer reproduces
its ids (text after an added token is encoded differently), and the label masking depends on exact token
counts, so this module re-implements the behaviour directly on ``sentencepiece``:

* Added tokens (and the literal ``<s>``, ``</s>``, ``<unk>``) are cut out of the text first; longest match
  wins at the earliest position.
* Added tokens eat the whitespace on both sides of themselves; ``<s>``/``</s>``/``<unk>`` do not.
* Every remaining text chunk is encoded by SentencePiece on its own, dummy prefix included
  (so ``"[SEG]."`` gives ``[SEG]`` + ``"▁."``).
* ``encode`` prepends BOS; padding uses ``<unk>`` (id 0).
* ``decode`` follows 4.31: only BOS/EOS/UNK (and any ``additional_special_tokens`` of the checkpoint) are
  skipped; ``[SEG]``, ``<im_start>`` and ``<im_end>`` stay in the text, separated by single spaces.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import sentencepiece as spm

from model.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, SEG_TOKEN
from utils.io import atomic_write_bytes, atomic_write_json

PathLike = Union[str, "os.PathLike[str]"]

SPM_FILE = "tokenizer.model"
ADDED_TOKENS_FILE = "added_tokens.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
FAST_TOKENIZER_FILE = "tokenizer.json"

DEFAULT_MODEL_MAX_LENGTH = 512
# 4.31 writes int(1e30) when no length is known; treat anything this large as "not set".
_UNSET_LENGTH_THRESHOLD = 10**12
# Order in which 4.31 registers special tokens that are missing from the vocabulary.
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_content(value: Any) -> Optional[str]:
    """A special-token entry is a plain string or an AddedToken dict; return its text."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"READTokenizer: cannot read {path}: {e}") from None


def _load_sp_model(path: Path) -> tuple[spm.SentencePieceProcessor, bytes]:
    if not path.is_file():
        raise FileNotFoundError(
            f"READTokenizer: SentencePiece model not found: {path} (a LLaMA/LLaVA/SESAME/READ tokenizer "
            f"directory must contain {SPM_FILE}; transformers v5 saves only {FAST_TOKENIZER_FILE}, so copy "
            f"{SPM_FILE} from the base checkpoint)"
        )
    data = path.read_bytes()
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError depending on version
        raise ValueError(f"READTokenizer: {path} is not a valid SentencePiece model ({e})") from None
    if min(sp.unk_id(), sp.bos_id(), sp.eos_id()) < 0:
        raise ValueError(
            f"READTokenizer: {path} lacks <unk>/<s>/</s> (unk={sp.unk_id()}, bos={sp.bos_id()}, "
            f"eos={sp.eos_id()}); expected a LLaMA-style SentencePiece model"
        )
    return sp, data


class READTokenizer:
    """LLaMA SentencePiece tokenizer with appended added tokens, reproducing transformers 4.31 (slow, legacy)."""

    def __init__(
        self,
        sp_model_proto: bytes,
        added_tokens: Sequence[tuple[str, bool]] = (),
        additional_special_tokens: Sequence[str] = (),
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
        source: str = "<bytes>",
    ) -> None:
        """``added_tokens``: (text, special) in id order, appended after the SentencePiece vocabulary."""
        self._source = source
        self._set_sp(sp_model_proto)
        self.model_max_length = int(model_max_length)
        self._added: list[str] = []
        self._added_ids: dict[str, int] = {}
        self._added_special: set[str] = set()
        self._additional_special: list[str] = []
        for text, special in added_tokens:
            if not self._append_token(text, special):
                raise ValueError(
                    f"READTokenizer: added token {text!r} of {source} is already in the vocabulary; "
                    f"added tokens must be new and listed once, in id order"
                )
        for text in additional_special_tokens:
            if text not in self._additional_special:
                self._additional_special.append(text)
        self._rebuild()

    # ------------------------------------------------------------------ construction
    def _set_sp(self, proto: bytes) -> None:
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(proto)
        self._sp = sp
        self._sp_proto = proto
        self._sp_size = sp.get_piece_size()
        self._control_pieces = {
            sp.id_to_piece(sp.unk_id()): sp.unk_id(),
            sp.id_to_piece(sp.bos_id()): sp.bos_id(),
            sp.id_to_piece(sp.eos_id()): sp.eos_id(),
        }

    @classmethod
    def from_pretrained(
        cls, path: PathLike, model_max_length: Optional[int] = DEFAULT_MODEL_MAX_LENGTH
    ) -> "READTokenizer":
        """Load from a ``.model`` file or a checkpoint directory (4.31 or v5 layout; needs ``tokenizer.model``).

        Added tokens come from ``added_tokens.json``, ``tokenizer_config.json["added_tokens_decoder"]`` and
        ``tokenizer.json["added_tokens"]`` (whichever exist); their ids must continue the SentencePiece
        vocabulary without gaps, as 4.31 required. ``model_max_length=None`` takes the value saved in
        ``tokenizer_config.json`` (512 if absent).
        """
        path = Path(path)
        if path.is_dir():
            sp, proto = _load_sp_model(path / SPM_FILE)
            added, additional, saved_len = cls._read_dir_tokens(path, sp)
        elif path.suffix == ".model" or path.is_file():
            sp, proto = _load_sp_model(path)
            added, additional, saved_len = [], [], None
        else:
            raise FileNotFoundError(
                f"READTokenizer: {path} does not exist (expected a tokenizer directory containing {SPM_FILE}, "
                f"or a SentencePiece .model file)"
            )
        if model_max_length is None:
            model_max_length = saved_len if saved_len is not None else DEFAULT_MODEL_MAX_LENGTH
        return cls(proto, added, additional, model_max_length=model_max_length, source=str(path))

    @staticmethod
    def _read_dir_tokens(
        path: Path, sp: spm.SentencePieceProcessor
    ) -> tuple[list[tuple[str, bool]], list[str], Optional[int]]:
        """Collect added tokens (id-ordered), additional special tokens and the saved model_max_length."""
        by_id: dict[int, tuple[str, bool]] = {}
        origin: dict[int, Path] = {}

        def put(idx: Any, text: Any, special: bool, file: Path) -> None:
            if not isinstance(text, str) or isinstance(idx, bool):
                raise ValueError(f"READTokenizer: malformed added-token entry {text!r}: {idx!r} in {file}")
            try:
                idx = int(idx)
            except (TypeError, ValueError):
                raise ValueError(f"READTokenizer: non-integer id {idx!r} for {text!r} in {file}") from None
            if idx < sp.get_piece_size():
                if sp.id_to_piece(idx) != text:
                    raise ValueError(
                        f"READTokenizer: {file} maps {text!r} to id {idx}, but that id is "
                        f"{sp.id_to_piece(idx)!r} in {path / SPM_FILE}"
                    )
                return  # a SentencePiece piece listed again (v4.3x+ lists <unk>, <s>, </s>)
            if idx in by_id and by_id[idx][0] != text:
                raise ValueError(
                    f"READTokenizer: id {idx} is {by_id[idx][0]!r} in {origin[idx]} but {text!r} in {file}"
                )
            prev_special = by_id.get(idx, (text, False))[1]
            by_id[idx] = (text, special or prev_special)
            origin.setdefault(idx, file)

        config: dict = {}
        special_map: dict = {}
        f = path / ADDED_TOKENS_FILE
        if f.is_file():
            data = _read_json(f)
            if not isinstance(data, dict):
                raise ValueError(f"READTokenizer: {f} must hold a JSON object {{token: id}}")
            for text, idx in data.items():
                put(idx, text, False, f)
        f = path / CONFIG_FILE
        if f.is_file():
            config = _read_json(f)
            if not isinstance(config, dict):
                raise ValueError(f"READTokenizer: {f} must hold a JSON object")
            decoder = config.get("added_tokens_decoder") or {}
            if not isinstance(decoder, dict):
                raise ValueError(f"READTokenizer: 'added_tokens_decoder' in {f} must be an object {{id: token}}")
            for idx, entry in decoder.items():
                put(idx, _token_content(entry), bool(isinstance(entry, dict) and entry.get("special")), f)
        f = path / FAST_TOKENIZER_FILE
        if f.is_file():
            fast = _read_json(f)
            for entry in (fast.get("added_tokens") or []) if isinstance(fast, dict) else []:
                if isinstance(entry, dict):
                    put(entry.get("id"), entry.get("content"), bool(entry.get("special")), f)
        f = path / SPECIAL_TOKENS_MAP_FILE
        if f.is_file():
            special_map = _read_json(f)
            if not isinstance(special_map, dict):
                raise ValueError(f"READTokenizer: {f} must hold a JSON object")

        ordered = [by_id[i] for i in sorted(by_id)]
        expected = list(range(sp.get_piece_size(), sp.get_piece_size() + len(ordered)))
        if sorted(by_id) != expected:
            raise ValueError(
                f"READTokenizer: added-token ids in {path} are {sorted(by_id)}; they must be consecutive from "
                f"{sp.get_piece_size()} (the size of {path / SPM_FILE})"
            )

        # 4.31 re-registers every special token that the vocabulary lacks (config values override the map).
        merged = {**special_map, **{k: v for k, v in config.items() if k in _SPECIAL_KEYS and v is not None}}
        additional: list[str] = []
        for source in (special_map.get("additional_special_tokens"), config.get("additional_special_tokens")):
            for entry in source or []:
                text = _token_content(entry)
                if text is not None and text not in additional:
                    additional.append(text)
        known = {sp.id_to_piece(i) for i in range(sp.get_piece_size())} | {t for t, _ in ordered}
        for text in [_token_content(merged.get(k)) for k in _SPECIAL_KEYS] + additional:
            if text is not None and text not in known:
                ordered.append((text, True))
                known.add(text)

        saved_len = config.get("model_max_length")
        if not isinstance(saved_len, (int, float)) or isinstance(saved_len, bool) or saved_len >= _UNSET_LENGTH_THRESHOLD:
            saved_len = None
        return ordered, additional, (int(saved_len) if saved_len is not None else None)

    def _append_token(self, text: str, special: bool) -> bool:
        if not isinstance(text, str) or not text:
            raise ValueError(f"READTokenizer: added tokens must be non-empty strings, got {text!r}")
        if text in self._added_ids or self._sp.piece_to_id(text) != self._sp.unk_id() or text == self.unk_token:
            return False
        self._added_ids[text] = self._sp_size + len(self._added)
        self._added.append(text)
        if special:
            self._added_special.add(text)
        return True

    def _rebuild(self) -> None:
        """Recompute the split pattern and the ids skipped by decode after the vocabulary changed."""
        split_tokens = sorted(set(self._added) | set(self._control_pieces), key=lambda s: (-len(s), s))
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in split_tokens) + ")")
        self._skip_ids = {self.unk_token_id, self.bos_token_id, self.eos_token_id, self.pad_token_id}
        self._skip_ids |= {self._added_ids[t] for t in self._additional_special if t in self._added_ids}
        self._special_strings = set(self._control_pieces) | set(self._additional_special)

    # ------------------------------------------------------------------ vocabulary
    def add_tokens(self, tokens: Union[str, Iterable[str]], special_tokens: bool = False) -> int:
        """Append tokens absent from the vocabulary (4.31 ``add_tokens``); returns how many were added."""
        if isinstance(tokens, str):
            tokens = [tokens]
        n = sum(self._append_token(t, special_tokens) for t in list(tokens))
        if n:
            self._rebuild()
        return n

    def add_read_tokens(self, use_mm_start_end: bool = True) -> int:
        """Add ``[SEG]`` (plain), then ``<im_start>``/``<im_end>`` (special), as READ's training initialiser does."""
        n = self.add_tokens(SEG_TOKEN, special_tokens=False)
        if use_mm_start_end:
            n += self.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
        return n

    def __len__(self) -> int:
        return self._sp_size + len(self._added)

    @property
    def vocab_size(self) -> int:
        """SentencePiece vocabulary only (4.31 meaning); ``len(tokenizer)`` includes the added tokens."""
        return self._sp_size

    @property
    def added_tokens(self) -> dict[str, int]:
        return dict(self._added_ids)

    def token_to_id(self, token: str) -> int:
        """Id of an added token or SentencePiece piece; unknown strings map to ``<unk>`` like 4.31."""
        if token in self._added_ids:
            return self._added_ids[token]
        return self._sp.piece_to_id(token)

    def id_to_token(self, idx: int) -> str:
        idx = int(idx)
        if 0 <= idx < self._sp_size:
            return self._sp.id_to_piece(idx)
        if self._sp_size <= idx < len(self):
            return self._added[idx - self._sp_size]
        raise ValueError(f"READTokenizer: token id {idx} is outside the vocabulary [0, {len(self)})")

    def _required(self, token: str) -> int:
        if token not in self._added_ids:
            raise KeyError(
                f"READTokenizer: {token!r} is not in the vocabulary of {self._source}; call add_read_tokens() first"
            )
        return self._added_ids[token]

    @property
    def seg_token_id(self) -> int:
        return self._required(SEG_TOKEN)

    @property
    def im_start_token_id(self) -> int:
        return self._required(DEFAULT_IM_START_TOKEN)

    @property
    def im_end_token_id(self) -> int:
        return self._required(DEFAULT_IM_END_TOKEN)

    @property
    def unk_token(self) -> str:
        return self._sp.id_to_piece(self._sp.unk_id())

    @property
    def unk_token_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_token_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_token_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_token_id(self) -> int:
        """READ pads with ``<unk>`` (``tokenizer.pad_token = tokenizer.unk_token``)."""
        return self._sp.unk_id()

    # ------------------------------------------------------------------ encoding
    def _split(self, text: str) -> list[str]:
        """Cut out added/control tokens and strip whitespace around added tokens, in 4.31's order."""
        parts = self._split_re.split(text)  # [text, token, text, token, ..., text]
        for i in range(1, len(parts), 2):
            if parts[i] in self._control_pieces:
                continue  # <s>, </s>, <unk> are AddedTokens with lstrip=rstrip=False in 4.31
            left, right = parts[i - 1], parts[i + 1]
            if right:
                parts[i + 1] = right.lstrip()
            if left:
                parts[i - 1] = left.rstrip()
        return parts

    def tokenize(self, text: str) -> list[str]:
        """Pieces and added-token strings, without BOS."""
        out: list[str] = []
        for i, part in enumerate(self._split(text)):
            if not part:
                continue
            if i % 2:
                out.append(part)
            else:
                out.extend(self._sp.encode(part, out_type=str))
        return out

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; ``"</s>"`` in the text becomes EOS, BOS is prepended unless ``add_bos=False``."""
        if not isinstance(text, str):
            raise TypeError(f"READTokenizer.encode expects a str, got {type(text).__name__}")
        ids = [self.bos_token_id] if add_bos else []
        for i, part in enumerate(self._split(text)):
            if not part:
                continue
            if i % 2:
                ids.append(self._control_pieces[part] if part in self._control_pieces else self._added_ids[part])
            else:
                ids.extend(self._sp.piece_to_id(self._sp.encode(part, out_type=str)))
        return ids

    def __call__(self, text: str, add_bos: bool = True) -> list[int]:
        return self.encode(text, add_bos=add_bos)

    # ------------------------------------------------------------------ decoding
    def _pieces_to_string(self, tokens: list[str]) -> str:
        """4.31 ``LlamaTokenizer.convert_tokens_to_string``: specials are spliced in verbatim."""
        out, pending, prev_special = "", [], False
        for i, tok in enumerate(tokens):
            if tok in self._special_strings:
                if not prev_special and i != 0:
                    out += " "
                out += self._sp.decode(pending) + tok
                pending, prev_special = [], True
            else:
                pending.append(tok)
                prev_special = False
        return out + self._sp.decode(pending)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` as 4.31 decoded it (no clean-up, added tokens joined with spaces); ids < 0 are ignored."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        tokens = []
        for idx in ids:
            idx = int(idx)
            if idx < 0 or (skip_special_tokens and idx in self._skip_ids):
                continue
            tokens.append(self.id_to_token(idx))
        texts: list[str] = []
        run: list[str] = []
        for tok in tokens:
            if tok in self._added_ids:
                if run:
                    texts.append(self._pieces_to_string(run))
                    run = []
                texts.append(tok)
            else:
                run.append(tok)
        if run:
            texts.append(self._pieces_to_string(run))
        return " ".join(texts)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory: PathLike) -> list[str]:
        """Write a directory that this class and transformers 4.31 ``LlamaTokenizer`` both load to the same ids."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)

        def added_token(content: str, special: bool) -> dict:
            return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                    "single_word": False, "special": special}

        def control(content: str) -> dict:
            return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

        unk, bos, eos = (self._sp.id_to_piece(i) for i in (self.unk_token_id, self.bos_token_id, self.eos_token_id))
        special_map: dict[str, Any] = {"bos_token": control(bos), "eos_token": control(eos),
                                       "unk_token": control(unk), "pad_token": unk}
        decoder = {str(self._sp.unk_id()): added_token(unk, True), str(self._sp.bos_id()): added_token(bos, True),
                   str(self._sp.eos_id()): added_token(eos, True)}
        decoder.update({str(self._added_ids[t]): added_token(t, t in self._added_special or
                                                              t in self._additional_special) for t in self._added})
        config: dict[str, Any] = {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": decoder,
            "bos_token": {"__type": "AddedToken", **control(bos)},
            "clean_up_tokenization_spaces": False,
            "eos_token": {"__type": "AddedToken", **control(eos)},
            "legacy": True,
            "model_max_length": self.model_max_length,
            "pad_token": unk,
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": {"__type": "AddedToken", **control(unk)},
        }
        if self._additional_special:
            special_map["additional_special_tokens"] = list(self._additional_special)
            config["additional_special_tokens"] = list(self._additional_special)
        paths = [directory / SPM_FILE, directory / ADDED_TOKENS_FILE, directory / SPECIAL_TOKENS_MAP_FILE,
                 directory / CONFIG_FILE]
        atomic_write_bytes(paths[0], self._sp_proto)
        atomic_write_json(paths[1], dict(self._added_ids))
        atomic_write_json(paths[2], special_map)
        atomic_write_json(paths[3], config)
        return [str(p) for p in paths]

    # ------------------------------------------------------------------ pickling (DataLoader workers)
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_sp", "_split_re"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._set_sp(self._sp_proto)
        self._rebuild()

    def __repr__(self) -> str:
        return (f"READTokenizer(source={self._source!r}, sp_vocab={self._sp_size}, added={self._added_ids}, "
                f"model_max_length={self.model_max_length})")
