"""Tiny READ models, CLIP directories, released-layout checkpoints and batches for CPU tests.

Everything is random but seeded. The tiny preset matches ``tests/helpers/tokenizer.py`` (vocabulary 1003,
[SEG] = 1000, <im_start> = 1001, <im_end> = 1002) and keeps the real interfaces: 336x336 CLIP input with 24x24
patches, 1024x1024 SAM input with a 256x64x64 embedding and 256-d prompts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig, CLIPModel

from dataset.conversation import insert_image_tokens, render_prompt, tokenize_conversations
from model import READConfig, READForCausalLM
from model.constants import SAM_IMAGE_SIZE

from .tokenizer import tiny_tokenizer

# the tiny CLIP's text half, only so that the saved directory has the real CLIPModel layout
_TINY_CLIP_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
    max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def tiny_read_config(**overrides: Any) -> READConfig:
    """The "tiny" preset (SDPA attention) with optional field overrides."""
    overrides.setdefault("attn_implementation", "sdpa")
    return READConfig.from_preset("tiny", **overrides)


def tiny_read_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> READForCausalLM:
    """A seeded random tiny READ in eval mode.

    The SAM prompt-encoder / decoder embeddings are redrawn from N(0,1) so that the prompts (points, labels,
    SEG embedding) visibly change the masks.
    """
    torch.manual_seed(seed)
    model = READForCausalLM(tiny_read_config(**overrides))
    with torch.no_grad():
        for p in model.model.visual_model.prompt_encoder.parameters():
            p.normal_()
    return model.to(dtype).eval()


def save_tiny_clip(directory: str | Path, model: READForCausalLM) -> Path:
    """Write ``model``'s CLIP tower as a full CLIPModel directory, like openai/clip-vit-large-patch14-336."""
    directory = Path(directory)
    vision = model.model.vision_tower.clip
    cfg = CLIPConfig(text_config=_TINY_CLIP_TEXT, vision_config=vision.config.to_dict(), projection_dim=16)
    torch.manual_seed(0)
    clip = CLIPModel(cfg)
    clip.vision_model.load_state_dict(vision.state_dict())
    clip.save_pretrained(directory)
    return directory


def inv_freq(config: READConfig) -> torch.Tensor:
    """The legacy ``rotary_emb.inv_freq`` buffer 4.31 saved: 1 / 10000^(2k/d)."""
    dim = config.hidden_size // config.num_attention_heads
    return 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))


def save_tiny_released_checkpoint(
    directory: str | Path,
    model: READForCausalLM,
    clip_dir: str | Path,
    num_shards: int = 2,
    fmt: str = "bin",
    architecture: str = "READForCausalLM",
    with_tokenizer: bool = True,
) -> Path:
    """Write ``model`` as the 4.31 merge script did: config.json (model_type "llava"), sharded weights + index,
    legacy ``rotary_emb.inv_freq`` keys, no CLIP keys, and the tokenizer files.

    ``fmt`` is ``"bin"`` (``pytorch_model-0000x-of-0000y.bin``, as released) or ``"safetensors"``.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_released_dict()
    cfg.pop("seg_token_idx", None)  # released configs carry no ids; they come from the tokenizer
    cfg.pop("im_start_token_idx", None)
    cfg.pop("im_end_token_idx", None)
    cfg["architectures"] = [architecture]
    cfg["mm_vision_tower"] = cfg["vision_tower"] = str(clip_dir)
    cfg["torch_dtype"] = "float32"
    cfg["transformers_version"] = "4.31.0"
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if "vision_tower" not in k}
    legacy = {}
    for i in range(model.config.num_hidden_layers):
        legacy[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq(model.config)
    keys = list(state)
    # insert the legacy buffers after each layer's weights, as the 4.31 state dict ordered them
    ordered: dict[str, torch.Tensor] = {}
    for k in keys:
        ordered[k] = state[k]
        if k.endswith("post_attention_layernorm.weight"):
            layer = k.split(".")[2]
            ordered[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = legacy[
                f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"
            ]
    names = list(ordered)
    per = -(-len(names) // num_shards)
    weight_map: dict[str, str] = {}
    ext = "bin" if fmt == "bin" else "safetensors"
    stem = "pytorch_model" if fmt == "bin" else "model"
    for s in range(num_shards):
        chunk = {k: ordered[k] for k in names[s * per : (s + 1) * per]}
        fname = f"{stem}-{s + 1:05d}-of-{num_shards:05d}.{ext}"
        if fmt == "bin":
            torch.save(chunk, directory / fname)
        else:
            save_file(chunk, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in chunk})
    total = sum(t.numel() * t.element_size() for t in ordered.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(directory)
    return directory


def save_tiny_plain_llava(directory: str | Path, model: READForCausalLM, clip_dir: str | Path) -> Path:
    """A plain LLaVA-1.5-style directory from ``model``: no SAM / text_hidden_fcs keys, the vocabulary before
    READ's three tokens (1000 rows), a LLaVA config (no ``train_mask_decoder``) and a tokenizer without them."""
    from model.tokenizer import READTokenizer

    from .tokenizer import tiny_spm_path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_released_dict()
    for key in ("seg_token_idx", "im_start_token_idx", "im_end_token_idx", "train_mask_decoder", "out_dim",
                "sam_variant", "sasp", "sasp_preset", "ce_loss_weight", "bce_loss_weight", "dice_loss_weight"):
        cfg.pop(key, None)
    vocab = model.config.vocab_size - 3
    cfg.update(architectures=["LlavaLlamaForCausalLM"], vocab_size=vocab, mm_use_im_start_end=False,
               mm_vision_tower=str(clip_dir), vision_tower=str(clip_dir), torch_dtype="float32")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    state = {
        k: v.detach().clone().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith(("model.visual_model.", "model.text_hidden_fcs.")) and "vision_tower" not in k
    }
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:vocab].clone()
    state["lm_head.weight"] = state["lm_head.weight"][:vocab].clone()
    torch.save(state, directory / "pytorch_model.bin")
    READTokenizer.from_pretrained(tiny_spm_path()).save_pretrained(directory)
    return directory


def sam_input_size(height: int, width: int) -> tuple[int, int]:
    """The resized (pre-pad) SAM input size of an H x W image: longest side 1024, +0.5 rounding."""
    scale = SAM_IMAGE_SIZE * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def make_tiny_batch(
    conversations: Sequence[Sequence[tuple[str, str]]],
    image_sizes: Sequence[tuple[int, int]],
    seed: int = 0,
    inference: bool = False,
) -> dict[str, Any]:
    """A collate-format batch (docs/interfaces.md) for the tiny tokenizer.

    ``conversations[i]`` lists (question, answer) rows of image i; questions start with "<image>\\n". Each image
    gets as many random ground-truth masks as its answers hold ``[SEG]`` tokens.
    """
    tok = tiny_tokenizer()
    g = torch.Generator().manual_seed(seed)
    prompts, offset, masks, shapes = [], [0], [], []
    for rows, (h, w) in zip(conversations, image_sizes):
        n_seg = 0
        for question, answer in rows:
            prompts.append(insert_image_tokens(render_prompt([(question, answer)])))
            n_seg += answer.count("[SEG]")
        offset.append(offset[-1] + len(rows))
        masks.append((torch.rand(n_seg, h, w, generator=g) > 0.5).float())
        shapes.append([sam_input_size(h, w), (h, w)])
    batch = tokenize_conversations(prompts, tok)
    b = len(image_sizes)
    return {
        "image_paths": [f"img{i}.jpg" for i in range(b)],
        "images": torch.randn(b, 3, SAM_IMAGE_SIZE, SAM_IMAGE_SIZE, generator=g),
        "images_clip": torch.randn(b, 3, 336, 336, generator=g),
        "input_ids": batch["input_ids"],
        "labels": batch["labels"],
        "attention_masks": batch["attention_mask"],
        "offset": torch.tensor(offset, dtype=torch.long),
        "masks_list": masks,
        "sam_mask_shape_list": shapes,
        "inference": inference,
        "conversation_list": prompts,
    }


__all__ = [
    "tiny_read_config",
    "tiny_read_model",
    "save_tiny_clip",
    "save_tiny_released_checkpoint",
    "save_tiny_plain_llava",
    "inv_freq",
    "sam_input_size",
    "make_tiny_batch",
]
