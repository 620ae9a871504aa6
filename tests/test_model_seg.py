"""Image splicing and the SEG-state selection (the state of the token *before* each [SEG]) on hand-built rows."""

from __future__ import annotations

import torch
from torch import nn

from model.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from model.llava import splice_image_features
from model.read import seg_state_mask
from tests.helpers.models import sam_input_size, tiny_read_model

SEG, IM_START, IM_END, PAD = 1000, 1001, 1002, 0
I = IMAGE_TOKEN_INDEX


def _original_mask(input_ids: torch.Tensor, n_img: int) -> torch.Tensor:
    """The original's construction: (ids[:, 1:] == SEG), 575 False on the left, one False on the right."""
    m = input_ids[:, 1:] == SEG
    t = input_ids.shape[0]
    return torch.cat([torch.zeros(t, n_img - 1, dtype=torch.bool), m, torch.zeros(t, 1, dtype=torch.bool)], 1)


def _embedder(vocab: int = 1003, dim: int = 4) -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(vocab, dim)


ROWS = torch.tensor(
    [
        [1, 5, IM_START, I, IM_END, 7, 8, SEG, 9, 2, PAD, PAD],
        [1, IM_START, I, IM_END, 6, SEG, 4, 3, SEG, 2, PAD, PAD],  # two [SEG]
        [1, 5, 6, IM_START, I, IM_END, 7, 8, 9, 10, 11, 2],  # none
    ]
)


def test_seg_state_is_the_token_before_seg_and_equals_the_original_mask() -> None:
    for n_img in (4, 576):
        feats = torch.randn(3, n_img, 4)
        mm = splice_image_features(ROWS, feats, _embedder(), attention_mask=ROWS != PAD)
        mask = seg_state_mask(mm.expanded_ids, SEG)
        assert torch.equal(mask, _original_mask(ROWS, n_img))
        rows, cols = mask.nonzero(as_tuple=True)
        # by hand: row 0 token 8 (index 6), row 1 tokens 6 (4) and 3 (7), all after the image -> + n_img - 1
        assert rows.tolist() == [0, 1, 1]
        assert cols.tolist() == [6 + n_img - 1, 4 + n_img - 1, 7 + n_img - 1]
        assert mm.expanded_ids[rows, cols + 1].tolist() == [SEG, SEG, SEG]
        assert mm.expanded_ids[rows, cols].tolist() == [8, 6, 3]


def test_splice_maps_tokens_image_labels_mask_and_positions() -> None:
    n_img = 4
    feats = torch.randn(3, n_img, 4)
    emb = _embedder()
    labels = torch.where(ROWS == I, IGNORE_INDEX, ROWS)
    mm = splice_image_features(ROWS, feats, emb, attention_mask=ROWS != PAD, labels=labels)
    q = [3, 2, 4]
    assert mm.image_start.tolist() == q
    for r in range(3):
        ids = ROWS[r]
        exp = torch.cat([ids[: q[r]], torch.full((n_img,), I), ids[q[r] + 1 :]])
        assert torch.equal(mm.expanded_ids[r], exp)
        assert torch.equal(mm.inputs_embeds[r, q[r] : q[r] + n_img], feats[r])
        text = torch.cat([emb(ids[: q[r]]), emb(ids[q[r] + 1 :])])
        torch.testing.assert_close(
            torch.cat([mm.inputs_embeds[r, : q[r]], mm.inputs_embeds[r, q[r] + n_img :]]), text
        )
        assert (mm.labels[r, q[r] : q[r] + n_img] == IGNORE_INDEX).all()
        # right padding: the original prepends n_img - 1 ones to the mask
        assert torch.equal(mm.attention_mask[r], torch.cat([torch.ones(n_img - 1, dtype=torch.bool), ids != PAD]))

    left = torch.tensor([[PAD, PAD, 1, IM_START, I, IM_END, 9], [1, 5, 6, IM_START, I, IM_END, 9]])
    mm = splice_image_features(left, torch.randn(2, n_img, 4), emb, attention_mask=left != PAD)
    assert mm.attention_mask[0].tolist() == [False, False] + [True] * (5 + n_img - 1)
    assert mm.position_ids[0, 2:].tolist() == list(range(5 + n_img - 1))
    assert mm.position_ids[1].tolist() == list(range(7 + n_img - 1))


def test_forward_feeds_the_before_seg_states_to_the_projection() -> None:
    """End to end: text_hidden_fcs sees the final normed states at (index before [SEG]) + 575."""
    model = tiny_read_model(seed=1)
    captured = {}
    h1 = model.model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("hidden", o))
    h2 = model.model.text_hidden_fcs[0].register_forward_hook(lambda m, i, o: captured.__setitem__("seg", i[0]))
    ids = ROWS[:2]
    g = torch.Generator().manual_seed(0)
    shape = [sam_input_size(40, 30), (40, 30)]
    with torch.no_grad():
        out = model(
            images=torch.randn(1, 3, 1024, 1024, generator=g),
            images_clip=torch.randn(1, 3, 336, 336, generator=g),
            input_ids=ids,
            labels=None,
            attention_masks=ids != PAD,
            offset=torch.tensor([0, 2]),
            masks_list=[torch.zeros(3, 40, 30)],
            sam_mask_shape_list=[shape],
            inference=True,
        )
    h1.remove()
    h2.remove()
    hidden = captured["hidden"]
    expected = torch.stack([hidden[0, 6 + 575], hidden[1, 4 + 575], hidden[1, 7 + 575]])
    torch.testing.assert_close(captured["seg"], expected, rtol=0, atol=0)
    assert [tuple(p.shape) for p in out["pred_masks"]] == [(3, 40, 30)]
    assert set(out) == {"pred_masks", "gt_masks"}
