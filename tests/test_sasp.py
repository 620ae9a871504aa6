"""SasP: the released outputs (fixture), geometry, paper mode by hand, gradients, edge cases and the API."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.sasp import (
    SasPConfig,
    _full_map,
    _normalised_grid,
    _window_map,
    aspect_pad,
    discrete_points,
    dtoc_on_map,
    seg_image_similarity,
    similarity_as_points,
    similarity_heatmap,
)

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "sasp-released-7b.json"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These tensors are small: one thread avoids OpenMP spin-waits on the shared 2-core CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fixture() -> dict:
    if not FIXTURE.exists():
        pytest.skip(f"{FIXTURE} not present")
    return json.loads(FIXTURE.read_text())


def _fixture_cases() -> list[int]:
    return list(range(len(json.loads(FIXTURE.read_text())["cases"]))) if FIXTURE.exists() else []


# --------------------------------------------------------------------------------------------------
# the original's numbers


@pytest.mark.parametrize("dtoc", ["window", "exact"])
@pytest.mark.parametrize("case", _fixture_cases())
def test_released_fixture(case: int, dtoc: str) -> None:
    data = _fixture()
    assert data["settings"] == {"down_sample": 2, "num_points": 30, "t_pos": 0.8, "t_neg": 0.2}
    c = data["cases"][case]
    sim = torch.tensor(c["similarity"], dtype=torch.float64).to(getattr(torch, c["dtype"]))[None]
    assert torch.equal(sim.double()[0], torch.tensor(c["similarity"], dtype=torch.float64))
    points, labels = similarity_as_points(sim, [tuple(c["image_size"])], SasPConfig.preset("read-7b", dtoc=dtoc))
    assert points.dtype == torch.float32 and labels.dtype == torch.int64
    assert labels[0].tolist() == c["labels"]
    torch.testing.assert_close(points[0], torch.tensor(c["points"]), atol=1e-3, rtol=0)


def test_fixture_covers_the_crop_cases() -> None:
    sizes = [tuple(c["image_size"]) for c in _fixture()["cases"]]
    assert aspect_pad((333, 500), 336).pad_h == -1 and (333, 500) in sizes
    assert any(aspect_pad(s, 12).crop_h or aspect_pad(s, 12).crop_w for s in sizes)


# --------------------------------------------------------------------------------------------------
# geometry (model.md §4.3-4.4, §9)


@pytest.mark.parametrize(
    "size,side,expected",
    [
        ((480, 640), 12, (0, 2, 12, 16)),
        ((427, 640), 12, (0, 2, 12, 16)),
        ((1024, 1024), 12, (0, 0, 12, 12)),
        ((321, 481), 12, (-1, 2, 10, 16)),
        ((333, 500), 336, (-1, 84, 334, 504)),
        ((427, 640), 336, (0, 83, 336, 502)),
        ((480, 640), 336, (0, 56, 336, 448)),
        ((500, 47), 24, (115, -1, 254, 22)),  # int(500·24/47) = 255
    ],
)
def test_aspect_pad_table(size: tuple[int, int], side: int, expected: tuple[int, int, int, int]) -> None:
    g = aspect_pad(size, side)
    assert (g.pad_h, g.pad_w, g.height, g.width) == expected
    assert g.scale_h == size[0] / g.height and g.scale_w == size[1] / g.width


def test_negative_pad_counts_from_the_spec() -> None:
    """476 short sides in 1..20000 crop at T=336 and 903 at T=12 (the same 903 at T=24)."""
    crop = {t: [s for s in range(1, 20001) if aspect_pad((s, 40000), t).pad_h < 0] for t in (336, 12, 24)}
    assert len(crop[336]) == 476 and crop[336][:10] == [79, 158, 165, 285, 291, 316, 321, 330, 333, 570]
    assert len(crop[12]) == 903 and crop[12] == crop[24]
    assert {47, 94, 147, 173, 188, 294, 307, 321} <= set(crop[12])
    assert all(aspect_pad((s, 40000), 336).pad_h == -1 for s in crop[336])


def test_downsample_by_two_is_average_pooling() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 1, 24, 24)
    resized = F.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized, F.avg_pool2d(x, 2), atol=1e-6, rtol=0)


def test_first_points_for_a_fixed_map() -> None:
    """Hand-checkable geometry: the top cell of a ramp map lands at the centre of its padded cell."""
    sim = torch.arange(576, dtype=torch.float32).reshape(1, 576)  # largest value in the last cell
    pts, labels = discrete_points(sim, [(480, 640)], SasPConfig.preset("read-7b", num_points=40))
    # 12x12 map, pad_w 2 -> padded 12x16, 40 px per cell; last cell (11, 11) -> padded (11, 13)
    assert pts[0, 0].tolist() == [int((13 + 0.5) * 40.0), int((11 + 0.5) * 40.0)] == [540, 460]
    assert labels[0, 0] == 1
    # normalised cell value (48i + 2j) / 550: 32 cells reach 0.8, then the smallest cell (0, 0) -> padded (0, 2)
    assert labels[0].tolist()[:33] == [1] * 32 + [0]
    first_neg = 32
    assert pts[0, first_neg].tolist() == [100, 20]


# --------------------------------------------------------------------------------------------------
# full-resolution map: the window look-up equals F.interpolate's map


@pytest.mark.parametrize("size", [(480, 640), (333, 500), (427, 640), (79, 120), (500, 47), (336, 336), (1, 1), (7, 3)])
def test_window_lookup_equals_full_map(size: tuple[int, int]) -> None:
    torch.manual_seed(1)
    grid = _normalised_grid(torch.randn(2, 576), 24)
    h, w = size
    rows = torch.arange(h).expand(2, 1, h)
    cols = torch.arange(w).expand(2, 1, w)
    got = _window_map(grid, [size, size], rows, cols, 336)[:, 0]
    for b in range(2):
        torch.testing.assert_close(got[b], _full_map(grid[b], size, 336), atol=1e-6, rtol=0)


def test_heatmap_values_and_margins() -> None:
    torch.manual_seed(2)
    sim = torch.randn(576, dtype=torch.bfloat16)
    m = similarity_heatmap(sim, (100, 1000))
    assert m.shape == (100, 1000) and m.dtype == torch.float32
    assert m.min() >= 0 and m.max() <= 1
    # the 24x24 grid covers the central 100x100 square; the side margins are zero pad
    assert m[:, :440].abs().max() == 0 and m[:, 560:].abs().max() == 0
    assert m[:, 460:540].max() > 0.5


# --------------------------------------------------------------------------------------------------
# paper mode, worked out by hand


def _hand_map() -> torch.Tensor:
    v = torch.full((16,), 0.5)
    v[2], v[9], v[4], v[11] = 1.0, 0.7, 0.3, 0.0
    return v.reshape(1, 16)


def test_paper_thresholds_by_hand() -> None:
    """4x4 map, down_sample 1, image 4x4 (one pixel per cell, x = column, y = row).

    Values: cell 2 = 1.0, cell 9 = 0.7, cell 4 = 0.3, cell 11 = 0.0, the other twelve 0.5. Min-max keeps them.
    μ = 8/16 = 0.5; Σ(v-μ)² = 0.25 + 0.04 + 0.04 + 0.25 = 0.58; σ = sqrt(0.58/15) = 0.19664 (unbiased).
    ε = 0.5: thresholds 0.5 ± 0.0983 -> positives {2 (1.0), 9 (0.7)}, negatives {11 (0.0), 4 (0.3)}.
    """
    sim = _hand_map()
    order_rest = [0, 1, 3, 5, 6, 7, 8, 10, 12, 13, 14, 15]
    cfg = SasPConfig(mode="paper", epsilon=0.5, down_sample=1, num_points=16)
    pts, labels = discrete_points(sim, [(4, 4)], cfg)
    cells = [y * 4 + x for x, y in pts[0].tolist()]
    assert cells == [2, 9, 11, 4] + order_rest
    assert labels[0].tolist() == [1, 1, 0, 0] + [-1] * 12

    # ε = 1.03: μ + εσ = 0.70254 > 0.7, so cell 9 turns neutral (a population σ, 0.19039, would keep it
    # positive: 0.5 + 1.03·0.19039 = 0.6961); μ - εσ = 0.29746 < 0.3, so cell 4 turns neutral too.
    pts, labels = discrete_points(sim, [(4, 4)], SasPConfig(mode="paper", epsilon=1.03, down_sample=1, num_points=16))
    assert [y * 4 + x for x, y in pts[0].tolist()] == [2, 11, 0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15]
    assert labels[0].tolist() == [1, 0] + [-1] * 14

    # the released fixed thresholds (0.8, 0.2) on the same map: only 1.0 and 0.0 qualify
    pts, labels = discrete_points(sim, [(4, 4)], SasPConfig(down_sample=1, num_points=4))
    assert [y * 4 + x for x, y in pts[0].tolist()] == [2, 11, 0, 1]
    assert labels[0].tolist() == [1, 0, -1, -1]


def test_dtoc_weights_by_hand() -> None:
    """ω ∝ kernel(d)·softmax(M): exp(-d) in paper mode, exp(-d²) in released mode."""
    e = math.exp
    zeros = torch.zeros(1, 3)
    point = torch.tensor([[0, 0]])
    got = dtoc_on_map(zeros, point, "paper")[0]
    assert got[0].item() == pytest.approx((e(-1) + 2 * e(-2)) / (1 + e(-1) + e(-2)), abs=1e-6)
    assert got[1].item() == 0
    got = dtoc_on_map(zeros, point, "released")[0]
    assert got[0].item() == pytest.approx((e(-1) + 2 * e(-4)) / (1 + e(-1) + e(-4)), abs=1e-6)
    # the map tilts the weights: M = [0, 1, 0] -> paper weights [1, e^-1·e, e^-2]
    got = dtoc_on_map(torch.tensor([[0.0, 1.0, 0.0]]), point, "paper")[0]
    assert got[0].item() == pytest.approx((1 + 2 * e(-2)) / (2 + e(-2)), abs=1e-6)
    # 2x2, point at the origin: distances 0, 1, 1, √2 (the L2 distance, not d² or L1)
    got = dtoc_on_map(torch.zeros(2, 2), point, "paper")[0]
    expected = (e(-1) + e(-math.sqrt(2))) / (1 + 2 * e(-1) + e(-math.sqrt(2)))
    assert got.tolist() == pytest.approx([expected, expected], abs=1e-6)


def test_paper_window_equals_exact() -> None:
    torch.manual_seed(3)
    sim = torch.randn(2, 576)
    sizes = [(333, 500), (300, 280)]
    win = similarity_as_points(sim, sizes, SasPConfig(mode="paper"))
    exact = similarity_as_points(sim, sizes, SasPConfig(mode="paper", dtoc="exact"))
    assert torch.equal(win[1], exact[1])
    torch.testing.assert_close(win[0], exact[0], atol=1e-3, rtol=0)
    assert SasPConfig(mode="paper").radius == 104 and SasPConfig().radius == 10


# --------------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("mode", ["released", "paper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_window_equal_exact(dtype: torch.dtype, mode: str) -> None:
    torch.manual_seed(4)
    image = torch.randn(3, 576, 32).to(dtype)
    seg = torch.randn(3, 32).to(dtype)
    sizes = [(480, 640), (333, 500), (94, 200)]
    results = {}
    for dtoc in ("window", "exact"):
        img, s = image.clone().requires_grad_(), seg.clone().requires_grad_()
        points, labels = similarity_as_points(seg_image_similarity(img, s), sizes, SasPConfig(mode=mode, dtoc=dtoc))
        coef = torch.linspace(-1, 1, points.numel()).reshape(points.shape)
        (points * coef).sum().backward()
        results[dtoc] = (points.detach(), labels, img.grad.float(), s.grad.float())
    (pw, lw, giw, gsw), (pe, le, gie, gse) = results["window"], results["exact"]
    assert torch.equal(lw, le)
    torch.testing.assert_close(pw, pe, atol=1e-3, rtol=0)
    tol = 3e-3 if dtype == torch.float32 else 2e-2
    for a, b in ((giw, gie), (gsw, gse)):
        assert a.abs().max() > 0 and a.abs().sum(1).gt(0).all()  # every SEG token gets a gradient
        torch.testing.assert_close(a, b, atol=tol * b.abs().max().item(), rtol=0)


def test_only_dtoc_weights_carry_gradient() -> None:
    """Points move by a sub-pixel amount from the integer positions; labels and integer points take no gradient."""
    torch.manual_seed(5)
    sim = torch.randn(2, 576, requires_grad=True)
    sizes = [(480, 640), (600, 800)]
    points, labels = similarity_as_points(sim, sizes)
    ints, int_labels = discrete_points(sim, sizes)
    assert points.requires_grad and not labels.requires_grad and not ints.requires_grad
    assert torch.equal(labels, int_labels)
    shift = (points - ints.float()).abs()
    assert shift.max() < 0.5 and shift.max() > 0


# --------------------------------------------------------------------------------------------------
# batching, edge cases, API


def test_batch_uses_each_rows_own_image_size() -> None:
    torch.manual_seed(6)
    sim = torch.randn(3, 576, dtype=torch.bfloat16)
    sizes = [(480, 640), (79, 120), (1080, 1920)]
    points, labels = similarity_as_points(sim, sizes)
    for b, size in enumerate(sizes):
        p, l = similarity_as_points(sim[b : b + 1], [size])
        assert torch.equal(labels[b], l[0])
        torch.testing.assert_close(points[b], p[0], atol=1e-5, rtol=0)
        assert (points[b, :, 0] <= size[1] - 1).all() and (points[b, :, 1] <= size[0] - 1).all()


@pytest.mark.parametrize("dtoc", ["window", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_constant_map_is_defined(dtype: torch.dtype, dtoc: str) -> None:
    """0/0 in the original; here all neutral, the first P cells in row-major order, no NaN."""
    sim = torch.full((1, 576), 3.0, dtype=dtype, requires_grad=True)
    points, labels = similarity_as_points(sim, [(480, 640)], SasPConfig(dtoc=dtoc))
    assert labels.tolist() == [[-1] * 30]
    assert torch.isfinite(points).all()
    ints, _ = discrete_points(sim, [(480, 640)])
    # cells (0, 0..11) then (1, 0..11) ... of the 12x12 map, padded by 2 columns, 40 px per cell
    expected = [[int((j + 2.5) * 40), int((i + 0.5) * 40)] for i in range(3) for j in range(12)][:30]
    assert ints[0].tolist() == expected
    points.sum().backward()
    assert torch.isfinite(sim.grad).all()


def test_discrete_constant_but_full_map_not() -> None:
    """A map whose 2x2 averages are all equal: the discrete path is degenerate, DtoC still runs on M."""
    checker = (torch.arange(24)[:, None] + torch.arange(24)[None, :]) % 2
    sim = checker.float().reshape(1, 576)
    points, labels = similarity_as_points(sim, [(480, 640)])
    assert (labels == -1).all() and torch.isfinite(points).all()


def test_window_mode_handles_huge_images() -> None:
    """30000 x 40000 (1.2 GP): a full map alone would take 4.8 GB; the window path never builds it."""
    torch.manual_seed(7)
    sim = torch.randn(2, 576, requires_grad=True)
    sizes = [(30000, 40000), (40000, 30000)]
    points, _ = similarity_as_points(sim, sizes)
    ints, _ = discrete_points(sim, sizes)
    assert ((points - ints.float()).abs() < 0.5).all()
    points.sum().backward()
    assert torch.isfinite(sim.grad).all()


def test_seg_image_similarity_is_the_dot_product() -> None:
    torch.manual_seed(8)
    image = torch.randn(2, 576, 64, dtype=torch.bfloat16)
    seg = torch.randn(2, 64, dtype=torch.bfloat16)
    sim = seg_image_similarity(image, seg)
    assert sim.shape == (2, 576) and sim.dtype == torch.bfloat16
    assert torch.equal(sim, (image * seg[:, None, :]).sum(-1))
    exact = torch.einsum("nth,nh->nt", image.double(), seg.double())
    torch.testing.assert_close(sim.double(), exact, atol=0.25, rtol=1e-2)
    # the CLIP-Surgery weight turns NaN when the first token's logit overflows, as in the original
    image = image.float()
    image[0, 0, 0] = float("inf")
    sim = seg_image_similarity(image, seg.float())
    assert torch.isnan(sim[0]).all() and torch.isfinite(sim[1]).all()


def test_presets() -> None:
    assert SasPConfig() == SasPConfig.preset("read-7b")
    table = {
        "read-7b": (2, 30, 0.8, 0.2),
        "read-13b": (1, 60, 0.6, 0.2),
        "read-13b-stage1": (1, 10, 0.8, 0.2),
        "read-13b-stage2": (1, 30, 0.8, 0.2),
    }
    for name, values in table.items():
        c = SasPConfig.preset(name)
        assert (c.down_sample, c.num_points, c.t_pos, c.t_neg) == values and c.mode == "released"
    assert SasPConfig.preset("read-13b", dtoc="exact").dtoc == "exact"
    with pytest.raises(ValueError, match="unknown SasP preset 'read-70b'"):
        SasPConfig.preset("read-70b")
    with pytest.raises(ValueError, match="unknown field"):
        SasPConfig.preset("read-7b", points=3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="fancy"), "SasPConfig.mode"),
        (dict(dtoc="fast"), "SasPConfig.dtoc"),
        (dict(num_points=0), "num_points"),
        (dict(t_pos=0.2, t_neg=0.3), "t_neg < t_pos"),
        (dict(epsilon=-1.0), "epsilon"),
        (dict(window_radius=-2), "window_radius"),
    ],
)
def test_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SasPConfig(**kwargs)


def test_input_errors_and_empty_batch() -> None:
    sim = torch.randn(2, 576)
    with pytest.raises(ValueError, match="image_sizes"):
        similarity_as_points(sim, [(480, 640)])
    with pytest.raises(ValueError, match="image_sizes"):
        similarity_as_points(sim, [(480, 640), (0, 5)])
    with pytest.raises(ValueError, match="not a square number"):
        similarity_as_points(torch.randn(1, 575), [(480, 640)])
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        similarity_as_points(torch.randn(576), [(480, 640)])
    with pytest.raises(ValueError, match="exceeds the 100 candidate cells of a 47x47 image"):
        similarity_as_points(torch.randn(1, 576), [(47, 47)], SasPConfig(num_points=101))
    with pytest.raises(ValueError, match="seg_hidden"):
        seg_image_similarity(torch.randn(2, 576, 8), torch.randn(3, 8))
    points, labels = similarity_as_points(torch.zeros(0, 576), [])
    assert points.shape == (0, 30, 2) and labels.shape == (0, 30)
    assert points.dtype == torch.float32 and labels.dtype == torch.int64


def test_all_presets_fill_num_points_on_the_smallest_maps() -> None:
    """The smallest candidate sets (square crop: 10x10 cells at ds 2, 22x22 at ds 1) still hold P points."""
    torch.manual_seed(9)
    sim = torch.randn(1, 576)
    for name in SasPConfig.preset_names():
        cfg = SasPConfig.preset(name)
        points, labels = similarity_as_points(sim, [(47, 47)], cfg)
        assert points.shape == (1, cfg.num_points, 2)
        seq = labels[0].tolist()
        assert seq[0] == 1 and seq == sorted(seq, reverse=True)  # positives, then negatives, then neutrals


def test_autocast_does_not_change_the_numbers() -> None:
    torch.manual_seed(10)
    sim = torch.randn(2, 576)
    plain = similarity_as_points(sim, [(480, 640), (333, 500)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = similarity_as_points(sim, [(480, 640), (333, 500)])
    assert torch.equal(plain[0], cast[0]) and torch.equal(plain[1], cast[1])


def test_readme_snippet_runs_and_trains_through_sam_prompts() -> None:
    """The README's "SasP for any <SEG>-token model" code, run as written against a real SAM prompt encoder."""
    from segment_anything.modeling import PromptEncoder

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("<!-- section:sasp -->")[1].split("<!-- /section:sasp -->")[0]
    code = section.split("```python")[1].split("```")[0]
    torch.manual_seed(11)
    image_states = torch.randn(2, 576, 16, requires_grad=True)
    seg_states = torch.randn(2, 16, requires_grad=True)
    sam = torch.nn.Module()
    sam.prompt_encoder = PromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
    )
    scope = dict(
        torch=torch, image_states=image_states, seg_states=seg_states, image_sizes=[(480, 640), (333, 500)],
        sam=sam, i=1, h=333, w=500,
    )
    exec(code, scope)
    sparse = scope["sparse"]
    assert sparse.shape == (1, 30 + 1, 256)  # P points + SAM's pad point
    sparse.sum().backward()
    assert image_states.grad[1].abs().sum() > 0 and seg_states.grad[1].abs().sum() > 0
