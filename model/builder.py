"""Building READ for training (`init_read_model`, shared by train_read.py and the LoRA merge script) and for
inference (`load_read_for_inference`, shared by test_read.py and demo.py).

Training initialiser, in the original's order (spec §6.2):

1. tokenizer from ``version`` + ``[SEG]``, ``<im_start>``, ``<im_end>`` (no-op when already there);
2. model from ``version`` (READ/SESAME directory, or plain LLaVA-1.5 + ``sam_checkpoint``), ids from the tokenizer,
   loss weights and SasP settings into the config; input embeddings require grad; LLM activation checkpointing;
3. CLIP and ``mm_projector`` frozen;
4. LoRA on the LLaMA q/v projections (``lora_r > 0``), which freezes everything else (``lora_r = 0`` keeps the
   whole LLM trainable, as the original; SAM's image and prompt encoders are frozen in both cases);
5. embeddings resized to ``len(tokenizer)``, new rows N(0, 0.02) in ``embed_tokens`` and ``lm_head`` (what 4.31's
   ``resize_token_embeddings`` did; transformers 5's default mean-resizing is not used);
6. ``lm_head``, ``embed_tokens``, SAM mask decoder and ``text_hidden_fcs`` trainable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import READConfig
from .constants import DEFAULT_IM_START_TOKEN
from .loading import load_read, parse_dtype
from .lora import LoraSettings, apply_lora, set_trainable
from .read import READForCausalLM
from .sasp import SasPConfig
from .tokenizer import READTokenizer

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class READInitArgs:
    """What `init_read_model` needs (the train_read.py flags of the same names)."""

    version: str  # LLaVA-1.5 / SESAME / READ directory (config.json + weights + tokenizer)
    vision_tower: str  # local CLIP ViT-L/14-336 directory
    precision: str = "bf16"  # bf16 | fp16 | fp32
    model_max_length: int = 512
    sam_checkpoint: str | None = None  # sam_vit_h_4b8939.pth, required when ``version`` is a plain LLaVA-1.5
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str = "q_proj,v_proj"
    ce_loss_weight: float = 1.0
    bce_loss_weight: float = 2.0
    dice_loss_weight: float = 0.5
    use_mm_start_end: bool = True
    sasp_preset: str = "read-7b"
    sasp_config: SasPConfig | None = None  # overrides sasp_preset when given
    gradient_checkpointing: bool = True
    attn_implementation: str | None = None
    device: str = "cpu"
    sam_variant: str | None = None  # SAM size; None: the checkpoint's config (vit_h for released ones)

    def dtype(self) -> torch.dtype:
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        return PRECISIONS[self.precision]


def _set_token_config(config: READConfig, tokenizer: READTokenizer) -> None:
    config.seg_token_idx = tokenizer.seg_token_id
    use_start_end = DEFAULT_IM_START_TOKEN in tokenizer.added_tokens
    if use_start_end:
        config.im_start_token_idx = tokenizer.im_start_token_id
        config.im_end_token_idx = tokenizer.im_end_token_id
    config.mm_use_im_start_end = use_start_end
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id


@torch.no_grad()
def resize_token_embeddings(model: READForCausalLM, new_size: int, std: float = 0.02) -> bool:
    """Grow (or shrink) ``embed_tokens`` and ``lm_head`` to ``new_size`` rows; new rows ~ N(0, std).

    Returns whether anything changed. Trainability and dtype/device of the old matrices are kept.
    """
    old_embed, old_head = model.model.embed_tokens, model.lm_head
    old_size, hidden = old_embed.weight.shape
    if new_size == old_size:
        return False
    keep = min(old_size, new_size)
    w = old_embed.weight
    embed = nn.Embedding(new_size, hidden, padding_idx=old_embed.padding_idx, device=w.device, dtype=w.dtype)
    embed.weight.normal_(0.0, std)
    embed.weight[:keep] = w[:keep]
    head = nn.Linear(hidden, new_size, bias=False, device=w.device, dtype=old_head.weight.dtype)
    head.weight.normal_(0.0, std)
    head.weight[:keep] = old_head.weight[:keep]
    embed.weight.requires_grad_(old_embed.weight.requires_grad)
    head.weight.requires_grad_(old_head.weight.requires_grad)
    model.set_input_embeddings(embed)
    model.set_output_embeddings(head)
    model.config.vocab_size = new_size
    model.model.vocab_size = new_size
    return True


def init_read_model(args: READInitArgs) -> tuple[READTokenizer, nn.Module]:
    """Tokenizer + READ ready for training (PEFT-wrapped when ``lora_r > 0``); see the module docstring."""
    version = Path(args.version)
    tokenizer = READTokenizer.from_pretrained(version, model_max_length=args.model_max_length)
    tokenizer.add_read_tokens(use_mm_start_end=args.use_mm_start_end)
    sasp = args.sasp_config or SasPConfig.preset(args.sasp_preset)
    model = load_read(
        version,
        vision_tower=args.vision_tower,
        dtype=args.dtype(),
        sam_checkpoint=args.sam_checkpoint,
        attn_implementation=args.attn_implementation,
        device=args.device,
        seg_token_idx=tokenizer.seg_token_id,
        sasp_config=sasp,
        sam_variant=args.sam_variant,
    )
    config = model.config
    _set_token_config(config, tokenizer)
    config.ce_loss_weight = args.ce_loss_weight
    config.bce_loss_weight = args.bce_loss_weight
    config.dice_loss_weight = args.dice_loss_weight
    config.use_cache = False
    model.train()

    model.enable_input_require_grads()
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.model.vision_tower.requires_grad_(False)
    model.model.mm_projector.requires_grad_(False)
    model.model.visual_model.image_encoder.requires_grad_(False)
    model.model.visual_model.prompt_encoder.requires_grad_(False)
    model.model.vision_tower.eval()

    wrapped: nn.Module = model
    if args.lora_r > 0:
        wrapped = apply_lora(model, LoraSettings(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules))
    resize_token_embeddings(model, len(tokenizer))
    set_trainable(wrapped)
    return tokenizer, wrapped


def load_read_for_inference(
    ckpt_dir: str | Path,
    vision_tower: str | Path,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str = "cpu",
    model_max_length: int = 512,
    attn_implementation: str | None = None,
    sasp_config: SasPConfig | None = None,
) -> tuple[READTokenizer, READForCausalLM]:
    """Tokenizer and eval-mode READ from a released directory (the original ``load_pretrained_model_READ``)."""
    ckpt_dir = Path(ckpt_dir)
    tokenizer = READTokenizer.from_pretrained(ckpt_dir, model_max_length=model_max_length)
    tokenizer.add_read_tokens()
    model = load_read(
        ckpt_dir,
        vision_tower=vision_tower,
        dtype=parse_dtype(dtype),
        attn_implementation=attn_implementation,
        device=device,
        seg_token_idx=tokenizer.seg_token_id,
        sasp_config=sasp_config,
    )
    _set_token_config(model.config, tokenizer)
    if len(tokenizer) != model.config.vocab_size:
        raise ValueError(
            f"{ckpt_dir}: the tokenizer has {len(tokenizer)} tokens but the checkpoint's embeddings have "
            f"{model.config.vocab_size} rows; is this a READ/SESAME/LISA checkpoint with its own tokenizer?"
        )
    return tokenizer, model.eval()


__all__ = ["READInitArgs", "init_read_model", "load_read_for_inference", "resize_token_embeddings"]
