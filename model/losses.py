"""READ's training losses (model.md §3.4): token CE + per-mask sigmoid BCE + per-mask Dice (scale 1000).

The expressions keep the original's order of operations, including its `+ 1e-8` normalisers, so the
numbers match the released training code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.constants import IGNORE_INDEX


@dataclass
class LossWeights:
    """Loss weights; defaults are `train_read.py`'s (README: dice 4.0 for READ-7B from scratch)."""

    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5


def causal_lm_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token CE: plain mean over every non-ignored shifted token of the batch (no per-item scaling).

    Computed in the logits' dtype, as the original did on bf16 logits.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"causal_lm_ce: logits {list(logits.shape)} do not match labels {list(labels.shape)}")
    shift_logits = logits[..., :-1, :].contiguous().view(-1, logits.shape[-1])
    shift_labels = labels[..., 1:].contiguous().view(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)


def _check_masks(logits: torch.Tensor, gt: torch.Tensor, what: str) -> None:
    if logits.dim() != 3 or tuple(logits.shape) != tuple(gt.shape):
        raise ValueError(
            f"{what}: predicted masks {list(logits.shape)} and ground truth {list(gt.shape)} must both be [n, H, W]"
        )


def sigmoid_bce_per_mask(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits averaged over the pixels of each mask: [n, H, W] -> [n]."""
    _check_masks(logits, gt, "sigmoid_bce_per_mask")
    loss = F.binary_cross_entropy_with_logits(logits, gt.to(logits.dtype), reduction="none")
    return loss.flatten(1, 2).mean(1)


def dice_per_mask(logits: torch.Tensor, gt: torch.Tensor, scale: float = 1000.0, eps: float = 1e-6) -> torch.Tensor:
    """1 - (2 sum(p/s * g) + eps) / (sum(p/s) + sum(g/s) + eps) with p = sigmoid(logits): [n, H, W] -> [n]."""
    _check_masks(logits, gt, "dice_per_mask")
    probs = logits.sigmoid().flatten(1, 2)
    targets = gt.to(logits.dtype).flatten(1, 2)
    numerator = 2 * (probs / scale * targets).sum(-1)
    denominator = (probs / scale).sum(-1) + (targets / scale).sum(-1)
    return 1 - (numerator + eps) / (denominator + eps)


def mask_losses(
    pred_masks: Sequence[torch.Tensor], gt_masks: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted (BCE, Dice), each the mean over every mask of the batch.

    Per image: sum_m loss_m / (n_i + 1e-8) * n_i; then summed over images and divided by
    (num_masks + 1e-8). Images without masks add exactly 0; a batch without masks gives 0.
    """
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"mask_losses: {len(pred_masks)} predicted mask sets for {len(gt_masks)} images")
    bce_sum: torch.Tensor | float = 0
    dice_sum: torch.Tensor | float = 0
    num_masks = 0
    for i, (pred, gt) in enumerate(zip(pred_masks, gt_masks)):
        if pred.shape[0] != gt.shape[0]:
            raise ValueError(f"mask_losses: image {i} has {pred.shape[0]} predicted and {gt.shape[0]} ground-truth masks")
        n = gt.shape[0]
        bce_sum = bce_sum + sigmoid_bce_per_mask(pred, gt).sum() / (n + 1e-8) * n
        dice_sum = dice_sum + dice_per_mask(pred, gt).sum() / (n + 1e-8) * n
        num_masks += n
    if not isinstance(bce_sum, torch.Tensor):  # no images at all
        zero = torch.zeros(())
        return zero, zero.clone()
    return bce_sum / (num_masks + 1e-8), dice_sum / (num_masks + 1e-8)


def read_total_loss(
    ce: torch.Tensor, bce: torch.Tensor, dice: torch.Tensor, weights: LossWeights
) -> dict[str, torch.Tensor]:
    """Weighted total: loss = w_ce*ce + w_bce*bce + w_dice*dice, plus the parts READ logs."""
    ce_loss = ce * weights.ce
    mask_bce_loss = weights.bce * bce
    mask_dice_loss = weights.dice * dice
    mask_loss = mask_bce_loss + mask_dice_loss
    return {
        "loss": ce_loss + mask_loss,
        "ce_loss": ce_loss,
        "mask_bce_loss": mask_bce_loss,
        "mask_dice_loss": mask_dice_loss,
        "mask_loss": mask_loss,
    }


__all__ = [
    "LossWeights",
    "causal_lm_ce",
    "sigmoid_bce_per_mask",
    "dice_per_mask",
    "mask_losses",
    "read_total_loss",
]
