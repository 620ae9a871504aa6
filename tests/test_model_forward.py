"""Teacher-forced forward of a LoRA-wrapped tiny READ: losses recomputed independently, gradient paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from model.lora import LoraSettings, apply_lora, set_trainable
from tests.helpers.models import make_tiny_batch, tiny_read_model

N_IMG = 576
CONVERSATIONS = [
    [  # image 0: one segmentation row, one VQA row (no [SEG]) in between... and after
        ("<image>\nWhat is in the picture?", "A kitchen with a fridge."),
        ("<image>\nWhere is the fridge? Please segment it.", "Sure, it is [SEG]."),
    ],
    [  # image 1: one row holding two [SEG] (each gets its own SasP points and mask)
        ("<image>\nSegment the cup and the plate.", "The cup [SEG] and the plate [SEG]."),
    ],
]
SIZES = [(60, 80), (90, 50)]


@pytest.fixture(scope="module")
def step():
    """One training forward + backward (LoRA, LLM activation checkpointing, as in training); the final (normed)
    hidden states keep their gradient."""
    model = tiny_read_model(seed=0)
    model.enable_input_require_grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.model.vision_tower.requires_grad_(False)
    model.model.mm_projector.requires_grad_(False)
    model.model.visual_model.image_encoder.requires_grad_(False)
    model.model.visual_model.prompt_encoder.requires_grad_(False)
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    set_trainable(peft_model)
    peft_model.train()
    captured = {}

    def keep_hidden(module, inputs, output):
        output.retain_grad()
        captured["hidden"] = output

    handle = model.model.norm.register_forward_hook(keep_hidden)
    batch = make_tiny_batch(CONVERSATIONS, SIZES, seed=3)
    torch.manual_seed(0)
    out = peft_model(**batch)
    handle.remove()
    out["loss"].backward()
    return {"model": model, "peft": peft_model, "batch": batch, "out": out, "hidden": captured["hidden"]}


def _expected_labels(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    rows = []
    for ids, lab in zip(input_ids, labels):
        q = int((ids == IMAGE_TOKEN_INDEX).nonzero())
        rows.append(torch.cat([lab[:q], torch.full((N_IMG,), IGNORE_INDEX), lab[q + 1 :]]))
    return torch.stack(rows)


def test_losses_match_independent_formulas(step) -> None:
    out, batch = step["out"], step["batch"]
    for key in ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss", "mask_loss"):
        assert torch.isfinite(out[key]).item(), key

    labels = _expected_labels(batch["input_ids"], batch["labels"])
    logits = out["logits"].detach()
    assert logits.shape == (3, batch["input_ids"].shape[1] + N_IMG - 1, 1003)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 1003), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)

    preds = [p.detach() for p in out["pred_masks"]]
    assert [tuple(p.shape) for p in preds] == [(1, 60, 80), (2, 90, 50)]
    assert all(p.dtype == torch.float32 for p in preds)
    bce_terms, dice_terms = [], []
    for pred, gt in zip(preds, batch["masks_list"]):
        for s, g in zip(pred, gt):
            bce_terms.append(F.binary_cross_entropy_with_logits(s, g))
            p = s.sigmoid()
            dice_terms.append(1 - (2 * (p * g).sum() + 1e-3) / (p.sum() + g.sum() + 1e-3))  # scale-1000 form
    bce, dice = torch.stack(bce_terms).mean(), torch.stack(dice_terms).mean()

    torch.testing.assert_close(out["ce_loss"].detach(), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["mask_bce_loss"].detach(), 2.0 * bce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["mask_dice_loss"].detach(), 0.5 * dice, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"].detach(), ce + 2.0 * bce + 0.5 * dice, rtol=1e-5, atol=1e-5)


def test_gradients_reach_lora_mask_decoder_and_projection(step) -> None:
    named = dict(step["peft"].named_parameters())
    lora_b = [n for n in named if "lora_B" in n]
    assert {n.split(".self_attn.")[1].split(".")[0] for n in lora_b} == {"q_proj", "v_proj"}
    assert all(named[n].grad is not None and named[n].grad.abs().sum() > 0 for n in lora_b)
    for marker in ("mask_decoder.transformer", "mask_decoder.output_upscaling", "text_hidden_fcs", "lm_head",
                   "embed_tokens"):
        grads = [p.grad for n, p in named.items() if marker in n]
        assert grads and all(g is not None for g in grads), marker
        assert sum(float(g.abs().sum()) for g in grads) > 0, marker
    # multimask_output=False: only mask token 0's hypernetwork MLP is used (the IoU head never is)
    assert named["base_model.model.model.visual_model.mask_decoder.output_hypernetworks_mlps.0.layers.0.weight"].grad is not None
    assert all(named[n].requires_grad for n in named if "mask_decoder" in n)
    for marker in ("vision_tower", "mm_projector", "image_encoder", "prompt_encoder", "q_proj.base_layer"):
        assert all(p.grad is None for n, p in named.items() if marker in n), marker


def test_mask_loss_reaches_llm_through_dtoc(step) -> None:
    """Image-token states feed nothing but SasP (their LM targets are ignored), so a gradient on them can only
    come through the DtoC point coordinates; rows without [SEG] get none."""
    grad = step["hidden"].grad
    input_ids = step["batch"]["input_ids"]
    q = (input_ids == IMAGE_TOKEN_INDEX).float().argmax(1)
    image_grad = torch.stack([grad[r, int(q[r]) : int(q[r]) + N_IMG].abs().sum() for r in range(3)])
    assert image_grad[0] == 0  # the VQA row
    assert image_grad[1] > 0 and image_grad[2] > 0


def test_mask_count_mismatch_stops_early() -> None:
    model = tiny_read_model(seed=0)
    batch = make_tiny_batch(CONVERSATIONS[1:], SIZES[1:], seed=1)
    batch["masks_list"] = [batch["masks_list"][0][:1]]
    with pytest.raises(ValueError, match="image 0 has 2 \\[SEG\\] tokens but 1 ground-truth masks"):
        model(**batch)


def test_batch_without_seg_gives_zero_mask_losses_and_keeps_the_graph() -> None:
    model = tiny_read_model(seed=0).train()
    batch = make_tiny_batch([[("<image>\nWhat is this?", "A dog."), ("<image>\nWhich colour?", "Brown.")]], [(60, 80)])
    out = model(**batch)
    assert [tuple(p.shape) for p in out["pred_masks"]] == [(0, 60, 80)]
    assert float(out["mask_bce_loss"]) == 0.0 and float(out["mask_dice_loss"]) == 0.0
    assert torch.isfinite(out["ce_loss"]) and torch.equal(out["loss"], out["ce_loss"] + out["mask_loss"])
    out["loss"].backward()
    # SAM's decoder and the projection stay in the graph (zero gradients), as with the original's empty batches
    assert float(model.model.text_hidden_fcs[0][0].weight.grad.abs().sum()) == 0.0
    assert model.model.visual_model.mask_decoder.transformer.layers[0].self_attn.q_proj.weight.grad is not None
