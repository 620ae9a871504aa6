"""LoRA on READ as the original set it up (spec §6.2) and the trainable parameter set.

- Targets: every ``nn.Linear`` whose full name contains one of the comma-separated ``target_modules`` substrings
  (default ``"q_proj,v_proj"``) and none of ``visual_model``, ``vision_tower``, ``mm_projector``,
  ``text_hidden_fcs`` (SAM's mask decoder also has ``q_proj``/``v_proj``). In practice: the LLaMA layers' q/v
  projections. The explicit sorted list goes into ``LoraConfig(task_type="CAUSAL_LM", bias="none")``, so the
  PEFT names are the original's (``base_model.model.model.layers.N.self_attn.q_proj.lora_A.default.weight``).
- Trainable after wrapping: the LoRA A/B weights plus every parameter whose name contains ``lm_head``,
  ``embed_tokens``, ``mask_decoder`` or ``text_hidden_fcs`` (full matrices, as the original).
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

LORA_EXCLUDED = ("visual_model", "vision_tower", "mm_projector", "text_hidden_fcs")
TRAINABLE_MARKERS = ("lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs")


@dataclass
class LoraSettings:
    """Defaults of ``train_read.py``: r 8, alpha 16, dropout 0.05, q_proj/v_proj (README: r 64 for some models)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str = "q_proj,v_proj"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA r must be >= 1, got {self.r}")
        if not self.targets():
            raise ValueError(f"lora_target_modules {self.target_modules!r} names no module")

    def targets(self) -> list[str]:
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]


def lora_target_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Sorted names of the Linear layers LoRA wraps (see module docstring)."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and all(x not in name for x in LORA_EXCLUDED)
        and any(t in name for t in targets)
    ]
    if not names:
        raise ValueError(f"no nn.Linear outside SAM/CLIP/projector/text_hidden_fcs matches lora targets {targets}")
    return sorted(names)


def apply_lora(model: nn.Module, settings: LoraSettings) -> PeftModel:
    """Wrap ``model`` with PEFT LoRA exactly as the original (this freezes everything except LoRA)."""
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        target_modules=lora_target_names(model, settings.targets()),
        lora_dropout=settings.dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def set_trainable(model: nn.Module) -> list[str]:
    """Make the original's extra parameters trainable (``lm_head``, ``embed_tokens``, SAM mask decoder,
    ``text_hidden_fcs``); returns the names of all trainable parameters."""
    for name, param in model.named_parameters():
        if any(marker in name for marker in TRAINABLE_MARKERS):
            param.requires_grad_(True)
    return [name for name, param in model.named_parameters() if param.requires_grad]


def merge_lora(model: nn.Module) -> nn.Module:
    """``W <- W + (alpha / r) B A`` in the weights' dtype, then drop the PEFT wrapper (the merge script's step)."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"merge_lora expects a PEFT-wrapped model, got {type(model).__name__}")
    return model.merge_and_unload()


__all__ = ["LoraSettings", "lora_target_names", "apply_lora", "set_trainable", "merge_lora", "TRAINABLE_MARKERS"]
