"""READ losses against numbers computed by hand with plain Python math."""

from __future__ import annotations

import math

import pytest
import torch

from model.losses import (
    LossWeights,
    causal_lm_ce,
    dice_per_mask,
    mask_losses,
    read_total_loss,
    sigmoid_bce_per_mask,
)


def _bce(x: float, y: float) -> float:
    p = 1 / (1 + math.exp(-x))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def _bce_mask(logits: list[list[float]], gt: list[list[float]]) -> float:
    vals = [_bce(x, y) for lr, gr in zip(logits, gt) for x, y in zip(lr, gr)]
    return sum(vals) / len(vals)


def _dice_mask(logits: list[list[float]], gt: list[list[float]]) -> float:
    p = [1 / (1 + math.exp(-x)) for row in logits for x in row]
    g = [y for row in gt for y in row]
    num = 2 * sum(pi / 1000 * gi for pi, gi in zip(p, g))
    den = sum(pi / 1000 for pi in p) + sum(gi / 1000 for gi in g)
    return 1 - (num + 1e-6) / (den + 1e-6)


LOGITS_A = [[2.0, -1.0, 0.5], [-3.0, 0.0, 1.5]]
GT_A = [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
LOGITS_B = [[-0.5, 4.0, -2.0], [1.0, -1.0, 0.25]]
GT_B = [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
LOGITS_C = [[0.375, -0.75], [2.25, -4.0]]  # exact in float32, so float64 checks are exact
GT_C = [[1.0, 1.0], [0.0, 0.0]]


def _t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_per_mask_bce_and_dice_by_hand():
    logits, gt = _t(LOGITS_A, LOGITS_B), _t(GT_A, GT_B)
    bce = sigmoid_bce_per_mask(logits, gt)
    dice = dice_per_mask(logits, gt)
    assert bce.shape == dice.shape == (2,)
    torch.testing.assert_close(bce, torch.tensor([_bce_mask(LOGITS_A, GT_A), _bce_mask(LOGITS_B, GT_B)]))
    torch.testing.assert_close(dice, torch.tensor([_dice_mask(LOGITS_A, GT_A), _dice_mask(LOGITS_B, GT_B)]))


def test_dice_smoothing_is_the_scaled_eps():
    # An empty ground truth with confident background: (0 + 1e-6) / (sum(p)/1000 + 1e-6), not 1 - 1.
    logits = torch.full((1, 2, 2), -20.0)
    gt = torch.zeros(1, 2, 2)
    p = 1 / (1 + math.exp(20.0))
    expected = 1 - 1e-6 / (4 * p / 1000 + 1e-6)
    torch.testing.assert_close(dice_per_mask(logits, gt), torch.tensor([expected]))


def test_mask_losses_mix_of_empty_and_full_images():
    preds = [torch.zeros(0, 4, 5), _t(LOGITS_A, LOGITS_B).requires_grad_(), _t(LOGITS_C).requires_grad_()]
    gts = [torch.zeros(0, 4, 5), _t(GT_A, GT_B), _t(GT_C)]
    bce, dice = mask_losses(preds, gts)

    def batch(per_mask_fn):
        per_image = [
            0.0,
            (per_mask_fn(LOGITS_A, GT_A) + per_mask_fn(LOGITS_B, GT_B)) / (2 + 1e-8) * 2,
            per_mask_fn(LOGITS_C, GT_C) / (1 + 1e-8) * 1,
        ]
        return sum(per_image) / (3 + 1e-8)

    torch.testing.assert_close(bce, torch.tensor(batch(_bce_mask)), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dice, torch.tensor(batch(_dice_mask)), rtol=1e-6, atol=1e-7)
    # a mean over the three masks, not over the two images that have masks
    per_image_mean = (
        (_bce_mask(LOGITS_A, GT_A) + _bce_mask(LOGITS_B, GT_B)) / 2 + _bce_mask(LOGITS_C, GT_C)
    ) / 2
    assert abs(bce.item() - per_image_mean) > 1e-3
    (bce + dice).backward()
    assert preds[1].grad.abs().sum() > 0 and preds[2].grad.abs().sum() > 0

    # In float64 the original's 1e-8 normalisers are visible (about 1e-8 relative); they are kept.
    bce64, dice64 = mask_losses([p.detach().double() for p in preds], [g.double() for g in gts])
    assert bce64.dtype == torch.float64
    assert abs(bce64.item() - batch(_bce_mask)) < 1e-14
    assert abs(dice64.item() - batch(_dice_mask)) < 1e-14
    without_eps = (_bce_mask(LOGITS_A, GT_A) + _bce_mask(LOGITS_B, GT_B) + _bce_mask(LOGITS_C, GT_C)) / 3
    assert abs(bce64.item() - without_eps) > 1e-9


def test_mask_losses_without_masks_are_zero():
    bce, dice = mask_losses([], [])
    assert bce.item() == 0.0 and dice.item() == 0.0
    pred = torch.zeros(0, 3, 3, requires_grad=True)
    bce, dice = mask_losses([pred, torch.zeros(0, 2, 2)], [torch.zeros(0, 3, 3), torch.zeros(0, 2, 2)])
    assert bce.item() == 0.0 and dice.item() == 0.0 and math.isfinite(bce.item())
    assert bce.requires_grad  # still a tensor in the graph


def test_mask_losses_count_mismatch_is_reported():
    with pytest.raises(ValueError, match="image 0 has 2 predicted and 1 ground-truth masks"):
        mask_losses([torch.zeros(2, 3, 3)], [torch.zeros(1, 3, 3)])
    with pytest.raises(ValueError, match=r"must both be \[n, H, W\]"):
        sigmoid_bce_per_mask(torch.zeros(1, 3, 3), torch.zeros(1, 3, 4))


def test_causal_lm_ce_is_plain_mean_over_shifted_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, 1, 3, -100], [-100, -100, 4, 0]])
    # shifted targets: row0 positions 0..2 -> [1, 3, -100]; row1 -> [-100, 4, 0]
    pairs = [(0, 0, 1), (0, 1, 3), (1, 1, 4), (1, 2, 0)]
    terms = []
    for b, t, y in pairs:
        row = logits[b, t].tolist()
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        terms.append(lse - row[y])
    torch.testing.assert_close(causal_lm_ce(logits, labels), torch.tensor(sum(terms) / len(terms)))


def test_read_total_loss_weights_and_keys():
    ce, bce, dice = torch.tensor(1.5), torch.tensor(0.4), torch.tensor(0.2)
    out = read_total_loss(ce, bce, dice, LossWeights())
    assert set(out) == {"loss", "ce_loss", "mask_bce_loss", "mask_dice_loss", "mask_loss"}
    assert out["ce_loss"].item() == pytest.approx(1.5)
    assert out["mask_bce_loss"].item() == pytest.approx(0.8)
    assert out["mask_dice_loss"].item() == pytest.approx(0.1)
    assert out["mask_loss"].item() == pytest.approx(0.9)
    assert out["loss"].item() == pytest.approx(2.4)
    out = read_total_loss(ce, bce, dice, LossWeights(ce=0.5, bce=1.0, dice=4.0))
    assert out["loss"].item() == pytest.approx(0.75 + 0.4 + 0.8)
