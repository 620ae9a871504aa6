"""Conversation templates, prompt rendering and batch tokenisation with the original label masking.

One template, selected by name, is used end to end: training and ``--eval_only`` validation of the
original use ``llava_v1`` ("curious human"); its demo and FP-RefCOCO test use ``vicuna_v1`` ("curious user").
Label masking reproduces the original exactly, including its length arithmetic, because the supervised span
of every training sample depends on it.

Typical use::

    prompt = render_prompt([("<image>\\nWhat is this?", "It is [SEG].")], "llava_v1")
    prompt = insert_image_tokens(prompt, use_mm_start_end=True)
    batch = tokenize_conversations([prompt], tokenizer, template="llava_v1")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch

from model.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)
from model.tokenizer import READTokenizer

# The original truncates training batches to model_max_length - 255 token columns (255 = 256 CLIP-224
# patches minus the placeholder; kept as is, see data.md §4.6 / §8 item 17).
TRAIN_TRUNCATION_MARGIN = 255

DEFAULT_TRAIN_TEMPLATE = "llava_v1"  # train_read.py --conv_type default, also used by --eval_only validation
DEFAULT_INFERENCE_TEMPLATE = "vicuna_v1"  # module default that demo.py and test_read.py never change


@dataclass(frozen=True)
class ConversationTemplate:
    """A LLaVA conversation template: system text, role names and separators."""

    name: str
    system: str
    roles: tuple[str, str]
    style: Literal["two", "llama_2"]
    sep: str
    sep2: str

    @property
    def answer_sep(self) -> str:
        """Text that separates a round's instruction from its answer when building labels."""
        if self.style == "two":
            return self.sep + self.roles[1] + ": "
        return "[/INST] "

    def render(self, turns: Sequence[tuple[str, Optional[str]]]) -> str:
        """Prompt for (user, assistant) turns; ``None`` as the last answer leaves the assistant turn open."""
        if not turns:
            raise ValueError(f"conversation template {self.name!r}: at least one (user, assistant) turn is required")
        for k, (user, answer) in enumerate(turns):
            if not isinstance(user, str) or not user:
                raise ValueError(f"conversation template {self.name!r}: turn {k} has an empty user message")
            if answer is None and k != len(turns) - 1:
                raise ValueError(
                    f"conversation template {self.name!r}: only the last turn may have no answer (turn {k} has None)"
                )
        messages = [m for user, answer in turns for m in ((self.roles[0], user), (self.roles[1], answer))]
        if self.style == "two":
            seps = (self.sep, self.sep2)
            out = self.system + self.sep
            for i, (role, message) in enumerate(messages):
                out += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
            return out
        # LLaMA-2 chat layout: [INST] <<SYS>>...<</SYS>> q [/INST] a </s><s>[INST] q2 [/INST] a2 </s>
        out = ""
        for i, (_, message) in enumerate(messages):
            if not message:
                continue
            if i == 0:
                message = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{message}"
            if i % 2 == 0:
                out += f"{self.sep}[INST] {message} [/INST]"
            else:
                out += f" {message} {self.sep2}"
        return out[len(self.sep):]  # the original lstrips the leading "<s>"


TEMPLATES: dict[str, ConversationTemplate] = {
    "llava_v1": ConversationTemplate(
        name="llava_v1",
        system="A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        roles=("USER", "ASSISTANT"),
        style="two",
        sep=" ",
        sep2="</s>",
    ),
    "vicuna_v1": ConversationTemplate(
        name="vicuna_v1",
        system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        roles=("USER", "ASSISTANT"),
        style="two",
        sep=" ",
        sep2="</s>",
    ),
    "llava_llama_2": ConversationTemplate(
        name="llava_llama_2",
        system="You are a helpful language and vision assistant. "
        "You are able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.",
        roles=("USER", "ASSISTANT"),
        style="llama_2",
        sep="<s>",
        sep2="</s>",
    ),
}
TEMPLATE_NAMES: tuple[str, ...] = tuple(TEMPLATES)


def get_template(name: str) -> ConversationTemplate:
    """The template called ``name`` (e.g. from ``--conv_type``); one clear error for an unknown name."""
    if isinstance(name, ConversationTemplate):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; expected one of {', '.join(TEMPLATE_NAMES)}")
    return TEMPLATES[name]


def render_prompt(turns: Sequence[tuple[str, Optional[str]]], template: str = DEFAULT_TRAIN_TEMPLATE) -> str:
    """Render (user, assistant) turns with the named template (style TWO: ``system USER: q ASSISTANT: a</s>``)."""
    return get_template(template).render(turns)


def insert_image_tokens(prompt: str, use_mm_start_end: bool = True) -> str:
    """Wrap every ``<image>`` as ``<im_start><image><im_end>`` when the model uses image start/end tokens."""
    if not use_mm_start_end:
        return prompt
    return prompt.replace(DEFAULT_IMAGE_TOKEN, DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN)


def tokenize_with_image(prompt: str, tokenizer: READTokenizer) -> list[int]:
    """Ids of ``prompt`` with each ``<image>`` as -200: chunks encoded separately, one BOS at the front."""
    ids = [tokenizer.bos_token_id]
    for k, chunk in enumerate(prompt.split(DEFAULT_IMAGE_TOKEN)):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(tokenizer.encode(chunk, add_bos=False))
    return ids


def build_labels(
    prompt: str, input_ids: Sequence[int], tokenizer: READTokenizer, template: str = DEFAULT_TRAIN_TEMPLATE
) -> list[int]:
    """Labels for one row: only answers and their closing ``</s>`` are supervised (the original's algorithm).

    ``input_ids`` may carry right padding. Each round (text between ``sep2``) is re-tokenised: the round
    advances by its length (its BOS stands in for the removed ``</s>``) and the instruction part, minus 2,
    is masked. A total that disagrees with the row's non-pad token count raises ValueError, as the
    original's assert did (checked only while the count stays below ``model_max_length``).
    """
    tmpl = get_template(template)
    sep = tmpl.answer_sep
    labels = [int(t) for t in input_ids]
    total = sum(1 for t in labels if t != tokenizer.pad_token_id)

    def ignore(start: int, stop: Optional[int]) -> None:
        span = labels[start:stop]  # Python slicing == the original's tensor slicing, negative stops included
        labels[start:stop] = [IGNORE_INDEX] * len(span)

    cur = 1
    ignore(0, cur)
    for rnd in prompt.split(tmpl.sep2):
        if rnd == "":
            break
        parts = rnd.split(sep)
        if len(parts) != 2:
            raise ValueError(
                f"build_labels ({tmpl.name}): a round must contain the separator {sep!r} exactly once, found "
                f"{len(parts) - 1} in {rnd!r}; prompts without an answer cannot be labelled"
            )
        round_len = len(tokenize_with_image(rnd, tokenizer))
        instruction_len = len(tokenize_with_image(parts[0] + sep, tokenizer)) - 2
        ignore(cur, cur + instruction_len)
        cur += round_len
    ignore(cur, None)
    if cur < tokenizer.model_max_length and cur != total:
        raise ValueError(
            f"build_labels ({tmpl.name}): tokenization mismatch, the rounds cover {cur} tokens but the row has "
            f"{total} non-pad tokens; check that the prompt was rendered with template {tmpl.name!r} and "
            f"tokenized with tokenize_with_image: {prompt!r}"
        )
    return labels


def training_max_length(tokenizer: READTokenizer) -> int:
    """Column limit of training batches in the original: ``model_max_length - 255``."""
    return tokenizer.model_max_length - TRAIN_TRUNCATION_MARGIN


def tokenize_conversations(
    conversations: Sequence[str],
    tokenizer: READTokenizer,
    template: str = DEFAULT_TRAIN_TEMPLATE,
    padding: Literal["right", "left"] = "right",
    with_labels: bool = True,
    max_length: Optional[int] = None,
    train_truncation: bool = False,
) -> dict[str, Optional[torch.Tensor]]:
    """Tokenise rendered prompts (after ``insert_image_tokens``) into a padded batch.

    Returns ``input_ids`` int64 [T,L] padded with the pad id (0) on ``padding``'s side, ``labels`` int64
    [T,L] (-100 outside answers and on padding) or None, and ``attention_mask`` bool [T,L]
    (``input_ids != pad``, as in the original). ``max_length`` cuts columns; ``train_truncation=True`` uses
    the original training limit ``model_max_length - 255`` instead.
    """
    if isinstance(conversations, str) or len(conversations) == 0:
        raise ValueError("tokenize_conversations: expected a non-empty list of prompt strings")
    if padding not in ("right", "left"):
        raise ValueError(f"tokenize_conversations: padding must be 'right' or 'left', got {padding!r}")
    if train_truncation:
        if max_length is not None:
            raise ValueError("tokenize_conversations: give either max_length or train_truncation=True, not both")
        max_length = training_max_length(tokenizer)
    if max_length is not None and max_length < 1:
        raise ValueError(f"tokenize_conversations: max_length must be >= 1, got {max_length}")
    get_template(template)

    pad = tokenizer.pad_token_id
    rows = [tokenize_with_image(c, tokenizer) for c in conversations]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long) if with_labels else None
    for i, (row, prompt) in enumerate(zip(rows, conversations)):
        n = len(row)
        if padding == "right":
            padded = row + [pad] * (width - n)
            ids[i] = torch.tensor(padded, dtype=torch.long)
            if labels is not None:  # labelled on the padded row, exactly as the original
                labels[i] = torch.tensor(build_labels(prompt, padded, tokenizer, template), dtype=torch.long)
        else:
            ids[i, width - n:] = torch.tensor(row, dtype=torch.long)
            if labels is not None:
                labels[i, width - n:] = torch.tensor(build_labels(prompt, row, tokenizer, template), dtype=torch.long)
    attention_mask = ids.ne(pad)
    if max_length is not None and width > max_length:
        ids, attention_mask = ids[:, :max_length], attention_mask[:, :max_length]
        labels = labels[:, :max_length] if labels is not None else None
    return {"input_ids": ids, "labels": labels, "attention_mask": attention_mask}
