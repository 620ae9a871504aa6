"""SasP against a deliberately plain re-derivation of the released code (model.md §4.3-4.6).

The reference below loops over points, builds the full-resolution map and the full-grid DtoC for every
point, uses 0-d tensors and Python `min`/`int` where the original did, and shares no code with
model/sasp.py. It is compared on many random maps, image sizes (including the negative-pad crop cases),
both dtypes and every preset.
"""

from __future__ import annotations

from collections.abc import Iterator

import random

import pytest
import torch
import torch.nn.functional as F

from model.sasp import SasPConfig, discrete_points, similarity_as_points

CLIP = 336


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These tensors are small: one thread avoids OpenMP spin-waits on the shared 2-core CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pads(h: int, w: int, side: int) -> tuple[int, int]:
    scale = side / min(h, w)
    return (int(h * scale) - side) // 2, (int(w * scale) - side) // 2


def ref_full_map(sim: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """§4.3: min-max in the input dtype, float32, 336x336, zero pad (negative crops), H x W."""
    sm = sim.reshape(1, -1, 1)
    sm = (sm - sm.min(1, keepdim=True)[0]) / (sm.max(1, keepdim=True)[0] - sm.min(1, keepdim=True)[0])
    side = int(sm.shape[1] ** 0.5)
    sm = sm.reshape(1, side, side, 1).permute(0, 3, 1, 2).float()
    sm = F.interpolate(sm, (CLIP, CLIP), mode="bilinear", align_corners=False)
    pad_h, pad_w = _pads(h, w, CLIP)
    sm = F.pad(sm, (pad_w, pad_w, pad_h, pad_h), value=0)
    return F.interpolate(sm, (h, w), mode="bilinear", align_corners=False)[0, 0]


def ref_points(sim: torch.Tensor, h: int, w: int, cfg: SasPConfig) -> tuple[list[list[int]], list[int]]:
    """§4.4 steps 2-9 with the original's per-point loop."""
    side = int(sim.numel() ** 0.5)
    t = side // cfg.down_sample
    x = sim.reshape(1, 1, side, side).float()
    x = F.interpolate(x, (t, t), mode="bilinear", align_corners=False)
    x = (x - x.min()) / (x.max() - x.min())
    pad_h, pad_w = _pads(h, w, t)
    x = F.pad(x, (pad_w, pad_w, pad_h, pad_h), value=-1)
    hp, wp = x.shape[-2:]
    scale_h, scale_w = h / hp, w / wp
    flat = x.flatten()
    if cfg.mode == "released":
        t_pos, t_neg = cfg.t_pos, cfg.t_neg
    else:
        cells = flat[flat >= 0]
        t_pos = cells.mean() + cfg.epsilon * cells.std()
        t_neg = cells.mean() - cfg.epsilon * cells.std()
    pos = torch.nonzero(flat >= t_pos).flatten()
    pos = pos[torch.sort(flat[pos], descending=True, stable=True).indices]
    neg = torch.nonzero((flat >= 0) & (flat <= t_neg)).flatten()
    neg = neg[torch.sort(flat[neg], stable=True).indices]
    neutral = torch.nonzero((flat > t_neg) & (flat < t_pos)).flatten()
    selected = torch.cat([pos, neg, neutral])[: cfg.num_points]
    points, labels = [], []
    for idx in selected:
        col, row = idx % wp, idx // wp
        px = min((col + 0.5) * scale_w, w - 1)
        py = min((row + 0.5) * scale_h, h - 1)
        points.append([int(px), int(py)])
        labels.append(1 if idx in pos else 0 if idx in neg else -1)
    return points, labels


def ref_dtoc(full_map: torch.Tensor, points: list[list[int]], mode: str) -> torch.Tensor:
    """§4.6 per point over the whole grid."""
    h, w = full_map.shape
    pi = torch.softmax(full_map.flatten(), dim=0)
    gx, gy = torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy")
    gx, gy = gx.flatten().to(full_map.dtype), gy.flatten().to(full_map.dtype)
    out = []
    for px, py in points:
        d2 = (gx - px) ** 2 + (gy - py) ** 2
        kernel = torch.exp(-d2) if mode == "released" else torch.exp(-torch.sqrt(d2))
        weight = kernel * pi
        weight = weight / weight.sum()
        out.append(torch.stack([(weight * gx).sum(), (weight * gy).sum()]))
    return torch.stack(out)


CROP_SIZES = [(79, 120), (158, 300), (333, 500), (47, 60), (94, 200), (321, 481), (500, 47), (165, 165), (188, 250)]
PLAIN_SIZES = [(480, 640), (427, 640), (640, 480), (1, 1), (24, 24), (36, 500), (336, 336), (97, 131)]


def _cases() -> list[tuple[str, str, tuple[int, int], int]]:
    rng = random.Random(0)
    sizes = CROP_SIZES + PLAIN_SIZES + [(rng.randint(2, 520), rng.randint(2, 520)) for _ in range(8)]
    combos = [(p, d) for p in SasPConfig.preset_names() for d in ("bfloat16", "float32")]
    # every (preset, dtype) pair meets at least three sizes, crop cases included
    return [(*combos[(3 * i) % len(combos)], size, i) for i, size in enumerate(sizes)]


def _random_similarity(seed: int, dtype: torch.dtype) -> torch.Tensor:
    """A smooth blob plus noise: realistic maps with clear maxima, and plenty of near-ties in bf16."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    cy, cx = torch.rand(2, generator=g) * 24
    blob = 30 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40)
    noise = 4 * torch.randn(24, 24, generator=g)
    return (blob + noise - 5).reshape(1, 576).to(dtype)


@pytest.mark.parametrize("preset,dtype,size,seed", _cases())
def test_matches_plain_reference(preset: str, dtype: str, size: tuple[int, int], seed: int) -> None:
    sim = _random_similarity(seed, getattr(torch, dtype))
    cfg = SasPConfig.preset(preset)
    h, w = size
    ref_int, ref_labels = ref_points(sim[0], h, w, cfg)
    got_int, got_labels = discrete_points(sim, [size], cfg)
    assert got_labels[0].tolist() == ref_labels
    assert got_int[0].tolist() == ref_int
    points, labels = similarity_as_points(sim, [size], cfg)
    assert torch.equal(labels, got_labels)
    expected = ref_dtoc(ref_full_map(sim[0], h, w), ref_int, cfg.mode)
    torch.testing.assert_close(points[0], expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "size,dtype,dtoc",
    [
        ((333, 500), torch.bfloat16, "window"),
        ((240, 320), torch.float32, "window"),
        ((94, 200), torch.bfloat16, "exact"),
        ((640, 47), torch.float32, "window"),
    ],
)
def test_paper_mode_matches_plain_reference(size: tuple[int, int], dtype: torch.dtype, dtoc: str) -> None:
    sim = _random_similarity(size[0] + size[1], dtype)
    h, w = size
    cfg = SasPConfig(mode="paper", epsilon=0.5, num_points=60, dtoc=dtoc)
    ref_int, ref_labels = ref_points(sim[0], h, w, cfg)
    points, labels = similarity_as_points(sim, [size], cfg)
    assert labels[0].tolist() == ref_labels
    assert (torch.tensor(ref_labels) == 1).any() and (torch.tensor(ref_labels) == 0).any()
    expected = ref_dtoc(ref_full_map(sim[0], h, w), ref_int, "paper")
    torch.testing.assert_close(points[0], expected, atol=1e-3, rtol=0)


def test_crop_short_sides_from_the_spec_are_covered() -> None:
    """The reference cases include sizes whose discrete (12/24) or 336 pad is negative (model.md §4.3-4.4)."""
    crops_336 = {s for s in (79, 158, 165, 333) if _pads(s, 10_000, CLIP)[0] == -1}
    crops_12 = {s for s in (47, 94, 188) if _pads(s, 10_000, 12)[0] == -1 and _pads(s, 10_000, 24)[0] == -1}
    assert crops_336 == {79, 158, 165, 333} and crops_12 == {47, 94, 188}
    short = {min(s) for s in CROP_SIZES}
    assert crops_336 <= short and crops_12 <= short


def test_window_gradient_matches_float64_full_grid() -> None:
    """∂(points)/∂similarity through DtoC, against the plain full-grid formula evaluated in float64."""
    torch.manual_seed(0)
    sim = _random_similarity(7, torch.float32).requires_grad_()
    size = (158, 300)  # a negative-pad crop case of the 336 map
    cfg = SasPConfig.preset("read-7b", num_points=12)
    coef = torch.randn(cfg.num_points, 2)
    points, _ = similarity_as_points(sim, [size], cfg)
    (points[0] * coef).sum().backward()
    got = sim.grad.clone()

    sim64 = sim.detach().double().requires_grad_()
    ref_int, _ = ref_points(sim.detach()[0], *size, cfg)
    sm = (sim64 - sim64.min()) / (sim64.max() - sim64.min())
    sm = F.interpolate(sm.reshape(1, 1, 24, 24), (CLIP, CLIP), mode="bilinear", align_corners=False)
    pad_h, pad_w = _pads(*size, CLIP)
    full = F.interpolate(F.pad(sm, (pad_w, pad_w, pad_h, pad_h)), size, mode="bilinear", align_corners=False)[0, 0]
    (ref_dtoc(full, ref_int, "released") * coef.double()).sum().backward()
    assert got.abs().max() > 1e-3
    torch.testing.assert_close(got.double(), sim64.grad, atol=1e-3 * got.abs().max().item(), rtol=0)
