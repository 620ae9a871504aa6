"""SAM side of READ: builders vs the released key layout, checkpoint errors, prompt encoding, decoding."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model.sam import (
    SAM_VARIANTS,
    build_sam,
    dense_positional_encoding,
    embed_prompts,
    load_sam_checkpoint,
    postprocess_masks,
    predict_masks,
    scale_points_to_sam_frame,
)
from tests.helpers.tokenizer import shared_dir

FIXTURE = shared_dir() / "fixtures" / "read-7b-state-dict.json"
PREFIX = "model.visual_model."


@pytest.fixture(scope="session")
def tiny_sam():
    torch.manual_seed(0)
    sam = build_sam("tiny")
    # Non-trivial prompt/decoder parameters, so every term of the comparisons below matters.
    with torch.no_grad():
        for p in sam.prompt_encoder.parameters():
            p.normal_()
    return sam


@pytest.fixture(scope="session")
def image_embedding():
    torch.manual_seed(1)
    return torch.randn(1, 256, 64, 64)


def _prompts(n: int, p: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(n, p, 2, generator=g) * 1000
    labels = torch.randint(-1, 2, (n, p), generator=g)
    labels[:, 0] = 1  # at least one positional point per row
    text = torch.randn(n, 1, 256, generator=g)
    return points, labels, text


# ------------------------------------------------------------------------------------------------ build


def test_vit_h_on_meta_matches_released_checkpoint_layout():
    with torch.device("meta"):
        sam = build_sam("vit_h")
    assert all(t.is_meta for t in sam.parameters())
    ours = {k: list(v.shape) for k, v in sam.state_dict().items()}
    released = json.loads(FIXTURE.read_text())["checkpoint"]
    theirs = {k[len(PREFIX):]: v for k, v in released.items() if k.startswith(PREFIX)}
    assert len(theirs) == 594
    assert ours == theirs


@pytest.mark.parametrize(
    ("variant", "width", "depth", "global_blocks"),
    [("vit_l", 1024, 24, (5, 11, 17, 23)), ("vit_b", 768, 12, (2, 5, 8, 11))],
)
def test_other_sizes_on_meta(variant, width, depth, global_blocks):
    with torch.device("meta"):
        sam = build_sam(variant, dtype=torch.bfloat16)
    sd = sam.state_dict()
    head_dim = width // SAM_VARIANTS[variant].encoder_num_heads
    assert list(sd["image_encoder.pos_embed"].shape) == [1, 64, 64, width]
    assert len(sam.image_encoder.blocks) == depth
    for i in range(depth):
        rows = 127 if i in global_blocks else 27
        assert list(sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape) == [rows, head_dim]
    assert sd["mask_decoder.mask_tokens.weight"].dtype == torch.bfloat16
    assert list(sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape) == [2048, 256]


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown SAM variant 'vit_x'.*'tiny'"):
        build_sam("vit_x")


def test_tiny_encoder_gives_real_embedding_shape(tiny_sam):
    torch.manual_seed(2)
    with torch.no_grad():
        out = tiny_sam.image_encoder(torch.randn(1, 3, 1024, 1024))
    assert out.shape == (1, 256, 64, 64)


# ------------------------------------------------------------------------------------------- checkpoint


def test_checkpoint_round_trip_and_meta_materialisation(tiny_sam, tmp_path):
    path = tmp_path / "sam_tiny.pth"
    torch.save(tiny_sam.state_dict(), path)
    loaded = build_sam("tiny", checkpoint=path)
    for k, v in tiny_sam.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.device("meta"):
        on_meta = build_sam("tiny", checkpoint=path, dtype=torch.bfloat16)
    sd = on_meta.state_dict()
    assert not any(t.is_meta for t in sd.values())
    assert sd["mask_decoder.iou_token.weight"].dtype == torch.bfloat16
    assert torch.equal(sd["mask_decoder.iou_token.weight"], tiny_sam.mask_decoder.iou_token.weight.bfloat16())
    assert not on_meta.pixel_mean.is_meta


def test_missing_checkpoint_names_the_file(tmp_path):
    missing = tmp_path / "sam_vit_h_4b8939.pth"
    with pytest.raises(FileNotFoundError, match="sam_vit_h_4b8939.pth"):
        build_sam("tiny", checkpoint=missing)


def test_mismatched_checkpoint_lists_keys(tiny_sam, tmp_path):
    sd = dict(tiny_sam.state_dict())
    del sd["mask_decoder.iou_token.weight"]
    sd["mask_decoder.extra.weight"] = torch.zeros(3)
    sd["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 128)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as err:
        build_sam("tiny", checkpoint=path)
    msg = str(err.value)
    assert "bad.pth" in msg and "'tiny'" in msg
    assert "1 missing keys: mask_decoder.iou_token.weight" in msg
    assert "1 unexpected keys: mask_decoder.extra.weight" in msg
    assert "prompt_encoder.no_mask_embed.weight (file [1, 128], model [1, 256])" in msg


def test_checkpoint_of_another_size_is_rejected(tmp_path):
    with torch.device("meta"):
        big = build_sam("vit_b")
    # A small fake "vit_b" file: right names, zero-size placeholders are enough for the key check.
    sd = {k: torch.zeros(1) for k in big.state_dict()}
    path = tmp_path / "sam_vit_b.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"sam_vit_b\.pth.*does not match SAM variant 'tiny'.*unexpected keys"):
        load_sam_checkpoint(build_sam("tiny"), path, variant="tiny")


# --------------------------------------------------------------------------------------------- prompts


def test_embed_prompts_matches_upstream_points_plus_text(tiny_sam):
    pe = tiny_sam.prompt_encoder
    points, labels, text = _prompts(3, 6)
    sparse, dense = embed_prompts(pe, points, labels, text)
    assert sparse.shape == (3, 8, 256) and dense.shape == (3, 256, 64, 64)
    with torch.no_grad():
        expected_points = pe._embed_points(points, labels, pad=True)
    torch.testing.assert_close(sparse[:, :7], expected_points, rtol=0, atol=1e-6)
    assert torch.equal(sparse[:, 7:], text)
    # label -1 carries no position: equal to the pad token whatever its coordinates
    neutral = labels == -1
    assert neutral.any()
    assert torch.equal(sparse[:, :6][neutral], pe.not_a_point_embed.weight.expand(int(neutral.sum()), -1))
    assert torch.equal(dense, pe.no_mask_embed.weight.reshape(1, 256, 1, 1).expand(3, -1, 64, 64))


def test_embed_prompts_hand_computed_single_point(tiny_sam):
    pe = tiny_sam.prompt_encoder
    g = pe.pe_layer.positional_encoding_gaussian_matrix
    point = torch.tensor([[[100.0, 700.0]]])
    sparse, _ = embed_prompts(pe, point, torch.tensor([[0]]), torch.zeros(1, 1, 256))
    u = [2 * (100.5 / 1024) - 1, 2 * (700.5 / 1024) - 1]
    angles = [2 * math.pi * (u[0] * g[0, j].item() + u[1] * g[1, j].item()) for j in range(128)]
    by_hand = torch.tensor([math.sin(a) for a in angles] + [math.cos(a) for a in angles])
    torch.testing.assert_close(sparse[0, 0], by_hand + pe.point_embeddings[0].weight[0], atol=1e-4, rtol=0)


def test_embed_prompts_rejects_bad_text_shape(tiny_sam):
    points, labels, _ = _prompts(2, 3)
    with pytest.raises(ValueError, match=r"text_embeds must be \[2, 1, 256\]"):
        embed_prompts(tiny_sam.prompt_encoder, points, labels, torch.zeros(2, 256))


def test_dense_pe_matches_upstream_in_fp32(tiny_sam):
    pe = tiny_sam.prompt_encoder
    torch.testing.assert_close(dense_positional_encoding(pe), pe.get_dense_pe(), rtol=0, atol=1e-6)


def test_bf16_positional_encoding_is_computed_in_bf16():
    torch.manual_seed(3)
    pe = build_sam("tiny").prompt_encoder.to(torch.bfloat16)
    g = pe.pe_layer.positional_encoding_gaussian_matrix
    with torch.no_grad():
        g.normal_(0, 8)  # larger frequencies make bf16 rounding visible
    points = torch.tensor([[[123.25, 456.75], [900.0, 10.0]]])
    labels = torch.tensor([[1, 0]])
    text = torch.randn(1, 1, 256, dtype=torch.bfloat16)
    sparse, _ = embed_prompts(pe, points, labels, text)
    assert sparse.dtype == torch.bfloat16

    # Reference: the fork's order (2c-1 in fp32, then bf16 matmul, 2*pi and sin/cos in bf16).
    c = (points + 0.5) / 1024
    proj = (2 * math.pi) * ((2 * c - 1).bfloat16() @ g)
    ref = torch.cat([proj.sin(), proj.cos()], -1)
    ref = ref + torch.stack([pe.point_embeddings[1].weight[0], pe.point_embeddings[0].weight[0]])
    assert torch.equal(sparse[0, :2], ref[0])
    proj32 = (2 * math.pi) * ((2 * c - 1) @ g.float())
    ref32 = torch.cat([proj32.sin(), proj32.cos()], -1) + torch.stack(
        [pe.point_embeddings[1].weight[0].float(), pe.point_embeddings[0].weight[0].float()]
    )
    assert not torch.equal(sparse[0, :2], ref32[0].bfloat16())

    dense_pe = dense_positional_encoding(pe)
    assert dense_pe.dtype == torch.bfloat16 and dense_pe.shape == (1, 256, 64, 64)
    grid = (torch.arange(64, dtype=torch.bfloat16) + 0.5) / 64
    xy = torch.stack([grid.expand(64, 64), grid[:, None].expand(64, 64)], -1)
    proj = (2 * math.pi) * ((2 * xy - 1) @ g)
    assert torch.equal(dense_pe[0], torch.cat([proj.sin(), proj.cos()], -1).permute(2, 0, 1))
    # upstream forces fp32 coordinates and cannot run this model at all
    with pytest.raises(RuntimeError):
        pe._embed_points(points, labels, pad=True)


# -------------------------------------------------------------------------------- coordinates and masks


def test_scale_points_to_sam_frame_by_hand():
    pts = torch.tensor([[[320.0, 240.0], [0.0, 479.0]]], requires_grad=True)
    out = scale_points_to_sam_frame(pts, (480, 640))  # s=1.6 -> 768 x 1024
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[[512.0, 384.0], [0.0, 479 * 1.6]]]))
    out = scale_points_to_sam_frame(pts, (333, 500))  # s=2.048 -> new_h=int(681.984+0.5)=682, new_w=1024
    torch.testing.assert_close(out[0, 0], torch.tensor([320 * 1024 / 500, 240 * 682 / 333]))
    out[..., 1].sum().backward()
    torch.testing.assert_close(pts.grad[0, :, 1], torch.full((2,), 682 / 333))
    assert torch.equal(pts.grad[0, :, 0], torch.zeros(2))
    empty = torch.zeros(0, 5, 2, dtype=torch.long)
    assert scale_points_to_sam_frame(empty, (10, 20)) is empty


def test_postprocess_masks_matches_upstream_and_returns_fp32(tiny_sam):
    torch.manual_seed(4)
    low = torch.randn(2, 1, 256, 256)
    out = postprocess_masks(low.bfloat16(), (683, 1024), (400, 600))
    assert out.dtype == torch.float32 and out.shape == (2, 400, 600)
    expected = tiny_sam.postprocess_masks(low.bfloat16().float(), (683, 1024), (400, 600))[:, 0]
    assert torch.equal(out, expected)
    assert postprocess_masks(low[:0], (683, 1024), (400, 600)).shape == (0, 400, 600)


# ---------------------------------------------------------------------------------------- predict_masks


def test_predict_masks_matches_upstream_composition(tiny_sam, image_embedding):
    points, labels, text = _prompts(2, 4, seed=5)
    original, input_size = (300, 500), (614, 1024)
    with torch.no_grad():
        out = predict_masks(tiny_sam, image_embedding, points, labels, text[:, 0], input_size, original)
        scaled = points * torch.tensor([1024 / 500, 614 / 300])
        sparse = torch.cat([tiny_sam.prompt_encoder._embed_points(scaled, labels, pad=True), text], 1)
        dense = tiny_sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(2, -1, 64, 64)
        low, _ = tiny_sam.mask_decoder(image_embedding, tiny_sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
        expected = tiny_sam.postprocess_masks(low, input_size, original)[:, 0]
    assert out.shape == (2, 300, 500) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_predict_masks_gradients_reach_points_and_text(tiny_sam, image_embedding):
    points, labels, text = _prompts(2, 4, seed=6)
    labels[1, 3] = -1
    points.requires_grad_(True)
    text = text[:, 0].clone().requires_grad_(True)
    out = predict_masks(tiny_sam, image_embedding, points, labels, text, (512, 1024), (256, 512))
    out.sigmoid().mean().backward()
    assert points.grad.abs()[labels != -1].min() > 0
    assert torch.equal(points.grad[1, 3], torch.zeros(2))  # a neutral point has no position to move
    assert text.grad.abs().sum(-1).min() > 0


def test_predict_masks_empty(tiny_sam, image_embedding):
    text = torch.zeros(0, 256, requires_grad=True)
    out = predict_masks(tiny_sam, image_embedding, torch.zeros(0, 7, 2), torch.zeros(0, 7, dtype=torch.long),
                        text, (768, 1024), (480, 640))
    assert out.shape == (0, 480, 640) and out.dtype == torch.float32
    out.sum().backward()  # still a graph through the decoder, with nothing to learn
    assert text.grad.shape == (0, 256)
    legacy = predict_masks(tiny_sam, image_embedding, torch.empty(0, dtype=torch.long),
                           torch.empty(0, dtype=torch.long), torch.zeros(0, 256), (20, 30), (20, 30))
    assert legacy.shape == (0, 20, 30)


def test_predict_masks_bf16_decoder(image_embedding):
    torch.manual_seed(7)
    sam = build_sam("tiny", dtype=torch.bfloat16)
    points, labels, text = _prompts(2, 3, seed=8)
    out = predict_masks(sam, image_embedding, points, labels, text.bfloat16(), (512, 1024), (100, 200))
    assert out.dtype == torch.float32 and out.shape == (2, 100, 200)
    assert torch.isfinite(out).all()


def test_predict_masks_rejects_count_mismatch(tiny_sam, image_embedding):
    points, labels, text = _prompts(2, 3)
    with pytest.raises(ValueError, match="2 point sets for 1 text embeddings"):
        predict_masks(tiny_sam, image_embedding, points, labels, text[:1], (512, 1024), (100, 200))
