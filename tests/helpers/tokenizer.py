"""The tiny LLaMA-style tokenizer from the shared fixtures, with READ's tokens added (vocabulary 1003).

``tiny_tokenizer()`` stands in for the 32003-token LLaVA tokenizer everywhere in the tests: [SEG] = 1000,
<im_start> = 1001, <im_end> = 1002, pad = unk = 0, bos = 1, eos = 2. The shared directory is
``<repo>/../shared`` unless the environment variable READ_SHARED_DIR points elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from model.tokenizer import READTokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_SPM_NAME = "tiny_llama_spm.model"
GOLDEN_NAME = "golden_tokens.json"
TINY_VOCAB_SIZE = 1003


def shared_dir() -> Path:
    """``$READ_SHARED_DIR`` or the ``shared`` directory next to the repository."""
    env = os.environ.get("READ_SHARED_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared"


def tokenizer_fixture_dir() -> Path:
    return shared_dir() / "fixtures" / "tokenizer"


def tiny_spm_path() -> Path:
    path = tokenizer_fixture_dir() / TINY_SPM_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer fixture not found: {path} (set READ_SHARED_DIR to the directory that holds fixtures/)"
        )
    return path


def golden_tokens() -> dict:
    """The ids and labels the original 4.31 pipeline produced with the tiny model (see its "about" field)."""
    path = tokenizer_fixture_dir() / GOLDEN_NAME
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer fixture not found: {path} (set READ_SHARED_DIR)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def tiny_tokenizer(model_max_length: int = 512, use_mm_start_end: bool = True) -> READTokenizer:
    """A fresh tokenizer (safe to mutate) built from the fixture model, with [SEG]/<im_start>/<im_end> added."""
    tok = READTokenizer.from_pretrained(tiny_spm_path(), model_max_length=model_max_length)
    tok.add_read_tokens(use_mm_start_end=use_mm_start_end)
    return tok
