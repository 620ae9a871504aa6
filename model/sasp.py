"""SasP (Similarity as Points) with Discrete-to-Continuous (DtoC) point refinement, as released with READ.

Given the raw `<SEG>`-to-image-token similarities of a `<SEG>`-token model, SasP picks prompt points for SAM:
the most similar cells of the (down-sampled, min-max normalised) 24x24 map become positive points, the least
similar negative, the rest neutral; DtoC then shifts each integer point by a softmax-weighted local average
over the full-resolution similarity map, which is what lets the mask loss reach the LLM through the points.

Two modes (see `SasPConfig`):

- ``"released"`` reproduces the released code number for number (model.md §4): the bf16/fp32 dtype steps,
  the side -> side // down_sample bilinear resize, min-max normalisation, the aspect padding with -1
  (including the negative-pad crop), the candidate ordering, the float32 coordinate formula with ``int()``
  truncation, the full-resolution map and DtoC with exp(-d²) weights.
- ``"paper"`` follows the paper's Algorithm 1: thresholds μ ± ε·σ of the normalised map's valid cells
  (σ is the unbiased sample standard deviation, torch's default) and DtoC weights exp(-d), d the L2 distance.

Two DtoC evaluations give the same numbers (up to float summation order):

- ``"exact"`` builds the full-resolution map M [H, W] and the global softmax over all H·W pixels, as the
  original does; the per-point weighted sums are matrix-vector products over the whole grid. Time and
  memory grow with P·H·W (about 1.4 GB for 30 points at 12 MP). It is the reference path.
- ``"window"`` (default) uses that the global softmax constant cancels in the normalisation, so
  ω ∝ kernel(d)·exp(M), and that the float32 kernel underflows to exactly 0 beyond the window radius
  (d² ≥ 104 for exp(-d²), d ≥ 104 for exp(-d)). M is evaluated only at the (2r+1)² window pixels of each
  point: both bilinear resizes (24 -> 336, then the zero-padded map -> H x W) are separable, so M on a
  window is Wy·grid·Wxᵀ with per-axis weight rows built from F.interpolate's own index and weight
  arithmetic (equal to the full map within 1-2 float32 ulp). Neither time nor memory depends on H·W.

Deviations from the original, all deliberate:

- each row uses its own image size (the original's training loop could take another row's size, §4.5);
- ties are ordered by a stable sort (flattened-index order), where the original's argsort left them open;
- a constant map, where the original divides 0 by 0 and crashes, gives a defined result without NaN: the
  normalised map is taken as all zeros, every valid cell is neutral, so the P points are the first P
  (uncropped) cells in row-major order with label -1 (SAM treats -1 as "not a point"), and DtoC runs on
  M = 0. The two normalisations are guarded separately (a map can be constant after the 2x2 pooling only);
- `num_points` larger than the candidate cells (impossible with the shipped presets) is a ValueError;
- points and labels are returned on the similarity's device (the original built labels on the CPU).

Only torch is imported, so this file can be copied into any project.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Optional, Union

import torch
import torch.nn.functional as F

__all__ = [
    "AspectPad",
    "SasPConfig",
    "aspect_pad",
    "discrete_points",
    "dtoc_on_map",
    "seg_image_similarity",
    "similarity_as_points",
    "similarity_heatmap",
]

SizeLike = Union[Sequence[int], torch.Size, torch.Tensor]

# Smallest radius at which the float32 DtoC kernel is exactly 0 outside the window:
# exp(-x) is 0 in float32 for x >= 104 (model.md §4.6); exp(-d²) needs |dx| <= 10, exp(-d) needs |dx| <= 103.
_EXACT_RADIUS = {"released": 10, "paper": 104}

_MODES = ("released", "paper")
_DTOC = ("window", "exact")

# (down_sample, num_points, t_pos, t_neg) found in the released code and README (model.md §4.7).
_PRESETS: dict[str, dict[str, float]] = {
    "read-7b": dict(down_sample=2, num_points=30, t_pos=0.8, t_neg=0.2),
    "read-13b": dict(down_sample=1, num_points=60, t_pos=0.6, t_neg=0.2),
    "read-13b-stage1": dict(down_sample=1, num_points=10, t_pos=0.8, t_neg=0.2),
    "read-13b-stage2": dict(down_sample=1, num_points=30, t_pos=0.8, t_neg=0.2),
}


@dataclass(frozen=True)
class SasPConfig:
    """SasP settings; the defaults are the released READ-7B ones (``SasPConfig.preset("read-7b")``).

    mode: ``"released"`` (fixed thresholds t_pos/t_neg, exp(-d²) weights) or ``"paper"`` (μ ± epsilon·σ,
        exp(-d) weights).
    num_points: P, points per `<SEG>` token (positives first, then negatives, then neutrals).
    down_sample: the side x side similarity map is resized to side // down_sample before point selection.
    dtoc: ``"window"`` (fast, same numbers) or ``"exact"`` (full-grid reference).
    window_radius: half-width of the DtoC window; None picks the smallest radius that gives exactly the
        full-grid result (10 for released, 104 for paper). Smaller values approximate.
    clip_input_size: side of the CLIP input the similarity grid covers (336 for CLIP ViT-L/14-336).
    """

    mode: str = "released"
    num_points: int = 30
    t_pos: float = 0.8
    t_neg: float = 0.2
    down_sample: int = 2
    epsilon: float = 0.5
    dtoc: str = "window"
    window_radius: Optional[int] = None
    clip_input_size: int = 336

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"SasPConfig.mode must be one of {_MODES}, got {self.mode!r}")
        if self.dtoc not in _DTOC:
            raise ValueError(f"SasPConfig.dtoc must be one of {_DTOC}, got {self.dtoc!r}")
        if not isinstance(self.num_points, int) or self.num_points < 1:
            raise ValueError(f"SasPConfig.num_points must be a positive int, got {self.num_points!r}")
        if not isinstance(self.down_sample, int) or self.down_sample < 1:
            raise ValueError(f"SasPConfig.down_sample must be a positive int, got {self.down_sample!r}")
        if not self.t_neg < self.t_pos:
            raise ValueError(
                f"SasPConfig needs t_neg < t_pos so that no cell is both positive and negative, "
                f"got t_neg={self.t_neg} t_pos={self.t_pos}"
            )
        if not (isinstance(self.epsilon, (int, float)) and self.epsilon >= 0):
            raise ValueError(f"SasPConfig.epsilon must be a number >= 0, got {self.epsilon!r}")
        if self.window_radius is not None and (not isinstance(self.window_radius, int) or self.window_radius < 0):
            raise ValueError(f"SasPConfig.window_radius must be None or an int >= 0, got {self.window_radius!r}")
        if not isinstance(self.clip_input_size, int) or self.clip_input_size < 1:
            raise ValueError(f"SasPConfig.clip_input_size must be a positive int, got {self.clip_input_size!r}")

    @property
    def radius(self) -> int:
        """The DtoC window radius actually used."""
        return _EXACT_RADIUS[self.mode] if self.window_radius is None else self.window_radius

    @classmethod
    def preset_names(cls) -> tuple[str, ...]:
        return tuple(_PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides: object) -> "SasPConfig":
        """Per-checkpoint settings: "read-7b", "read-13b", "read-13b-stage1", "read-13b-stage2"."""
        if name not in _PRESETS:
            raise ValueError(f"unknown SasP preset {name!r}; expected one of {sorted(_PRESETS)}")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"SasPConfig.preset({name!r}): unknown field(s) {bad}; expected some of {sorted(known)}")
        return replace(cls(**_PRESETS[name]), **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True)
class AspectPad:
    """Geometry of the aspect padding that maps a side x side map onto an image (model.md §4.3 step 4, §4.4 step 5).

    The padded map is height x width = (side + 2·pad_h) x (side + 2·pad_w); a negative pad crops.
    scale_h / scale_w are image pixels per padded cell (Hi / height, Wi / width), as Python floats.
    """

    side: int
    pad_h: int
    pad_w: int
    height: int
    width: int
    scale_h: float
    scale_w: float

    @property
    def crop_h(self) -> int:
        """Rows cut from each of the top and bottom of the side x side map (negative pad)."""
        return max(-self.pad_h, 0)

    @property
    def crop_w(self) -> int:
        return max(-self.pad_w, 0)

    @property
    def num_cells(self) -> int:
        """Cells of the side x side map that survive the crop (the candidate count)."""
        return (self.side - 2 * self.crop_h) * (self.side - 2 * self.crop_w)


def aspect_pad(image_size: SizeLike, side: int) -> AspectPad:
    """The original's pad formulas in Python float arithmetic (truncating int(), floor division)."""
    h, w = (int(v) for v in image_size)
    scale = side / min(h, w)
    new_h, new_w = int(h * scale), int(w * scale)
    pad_h, pad_w = (new_h - side) // 2, (new_w - side) // 2
    height, width = side + 2 * pad_h, side + 2 * pad_w
    return AspectPad(side, pad_h, pad_w, height, width, h / height, w / width)


# --------------------------------------------------------------------------------------------------
# similarity


def seg_image_similarity(image_hidden: torch.Tensor, seg_hidden: torch.Tensor) -> torch.Tensor:
    """[N, T, H] image-token states x [N, H] SEG states -> [N, T] similarities (the released formula).

    This is the CLIP-Surgery form with one text: w = softmax(2·⟨F_0, t⟩) / mean = 1 and S_i = Σ_c F_ic·t_c·w,
    i.e. the plain dot product computed in the input dtype (an elementwise product, then a sum). Keeping w
    reproduces the original's NaN when the first token's logit is not finite.
    """
    if image_hidden.dim() != 3 or seg_hidden.dim() != 2:
        raise ValueError(
            "seg_image_similarity expects image_hidden [N, T, H] and seg_hidden [N, H], "
            f"got {tuple(image_hidden.shape)} and {tuple(seg_hidden.shape)}"
        )
    if image_hidden.shape[0] != seg_hidden.shape[0] or image_hidden.shape[2] != seg_hidden.shape[1]:
        raise ValueError(
            "seg_image_similarity: N and H of image_hidden [N, T, H] and seg_hidden [N, H] must agree, "
            f"got {tuple(image_hidden.shape)} and {tuple(seg_hidden.shape)}"
        )
    if image_hidden.dtype != seg_hidden.dtype:
        raise ValueError(
            f"seg_image_similarity: image_hidden and seg_hidden must share a dtype, "
            f"got {image_hidden.dtype} and {seg_hidden.dtype}"
        )
    logit = 2 * (image_hidden[:, :1, :] * seg_hidden[:, None, :]).sum(-1)  # [N, 1]
    prob = logit.softmax(-1)
    weight = prob / prob.mean(-1, keepdim=True)  # 1 (or NaN)
    return (image_hidden * (seg_hidden * weight)[:, None, :]).sum(-1)


# --------------------------------------------------------------------------------------------------
# input checks


def _check_similarity(similarity: torch.Tensor, config: SasPConfig) -> int:
    """Validate [N, T] with T = side²; returns side."""
    if not isinstance(similarity, torch.Tensor) or similarity.dim() != 2 or not similarity.is_floating_point():
        got = tuple(similarity.shape) if isinstance(similarity, torch.Tensor) else type(similarity).__name__
        raise ValueError(
            "similarity_as_points: `similarity` must be a floating [N, T] tensor with T = side² image tokens "
            f"(576 for CLIP ViT-L/14-336), got {got}"
        )
    t = similarity.shape[1]
    side = math.isqrt(t)
    if side * side != t or side == 0:
        raise ValueError(f"similarity_as_points: T = {t} image tokens is not a square number (576 = 24² expected)")
    if side // config.down_sample < 1:
        raise ValueError(f"SasPConfig.down_sample = {config.down_sample} is larger than the map side {side}")
    return side


def _check_image_sizes(image_sizes: Sequence[SizeLike], n: int) -> list[tuple[int, int]]:
    if isinstance(image_sizes, torch.Tensor):
        image_sizes = image_sizes.tolist()
    try:
        sizes = [(int(s[0]), int(s[1])) for s in image_sizes]
        lengths_ok = all(len(s) == 2 for s in image_sizes)
    except (TypeError, IndexError, ValueError):
        sizes, lengths_ok = [], False
    if not lengths_ok or len(sizes) != n or any(h < 1 or w < 1 for h, w in sizes):
        raise ValueError(
            f"similarity_as_points: `image_sizes` must hold one (H, W) pair of positive ints per similarity row "
            f"({n} rows), got {image_sizes!r}"
        )
    return sizes


# --------------------------------------------------------------------------------------------------
# discrete map and point selection (model.md §4.4)


def _row_tensor(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=dtype, device=device)[:, None]


def discrete_points(
    similarity: torch.Tensor, image_sizes: Sequence[SizeLike], config: Optional[SasPConfig] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer points before DtoC: int64 [N, P, 2] (x, y) in image pixels and int64 labels [N, P]."""
    config = config or SasPConfig()
    side = _check_similarity(similarity, config)
    n, device = similarity.shape[0], similarity.device
    sizes = _check_image_sizes(image_sizes, n)
    p = config.num_points
    if n == 0:
        empty = torch.zeros(0, p, dtype=torch.int64, device=device)
        return empty[..., None].expand(0, p, 2).contiguous(), empty
    ds = side // config.down_sample
    geos = [aspect_pad(s, ds) for s in sizes]
    for (h, w), g in zip(sizes, geos):
        if g.num_cells < p:
            raise ValueError(
                f"SasPConfig.num_points = {p} exceeds the {g.num_cells} candidate cells of a {h}x{w} image "
                f"at down_sample {config.down_sample}"
            )

    # 1. side x side raw similarities in float32 -> ds x ds bilinear (2x2 average pooling for ds=2) -> min-max.
    grid = similarity.detach().float().reshape(n, 1, side, side)
    cells = F.interpolate(grid, size=(ds, ds), mode="bilinear", align_corners=False).reshape(n, ds * ds)
    lo, hi = cells.amin(1, keepdim=True), cells.amax(1, keepdim=True)
    span = hi - lo
    flat = ~(span > 0)  # constant map: the original's 0/0
    value = (cells - lo) / torch.where(flat, torch.ones_like(span), span)

    # 2. Which cells survive the aspect padding (a negative pad crops rows/columns on both sides).
    idx = torch.arange(ds * ds, device=device)
    row, col = idx // ds, idx % ds
    crop_h = _row_tensor([g.crop_h for g in geos], torch.int64, device)
    crop_w = _row_tensor([g.crop_w for g in geos], torch.int64, device)
    valid = (row >= crop_h) & (row < ds - crop_h) & (col >= crop_w) & (col < ds - crop_w)  # [N, C]

    # 3. Thresholds and groups: 0 positive, 1 negative, 2 neutral, 3 not a cell (cropped).
    if config.mode == "released":
        t_hi = torch.full((n, 1), float(config.t_pos), device=device)
        t_lo = torch.full((n, 1), float(config.t_neg), device=device)
        is_neg = (value >= 0) & (value <= t_lo)
    else:
        count = valid.sum(1, keepdim=True)
        mean = torch.where(valid, value, 0).sum(1, keepdim=True) / count
        var = torch.where(valid, (value - mean) ** 2, 0).sum(1, keepdim=True) / (count - 1).clamp_min(1)
        spread = config.epsilon * var.sqrt()
        t_hi, t_lo = mean + spread, mean - spread
        is_neg = value <= t_lo
    group = torch.full_like(idx, 2).expand(n, -1).clone()
    group = torch.where(is_neg, 1, group)
    group = torch.where(value >= t_hi, 0, group)
    group = torch.where(flat, 2, group)
    group = torch.where(valid, group, 3)

    # 4. Order: positives by value descending, negatives ascending, neutrals by index; ties by index.
    key = torch.where(group == 0, -value, torch.where(group == 1, value, torch.zeros_like(value)))
    by_key = torch.sort(key, dim=1, stable=True).indices
    by_group = torch.sort(group.gather(1, by_key), dim=1, stable=True).indices
    chosen = by_key.gather(1, by_group)[:, :p]  # [N, P] cell indices
    label_of_group = torch.tensor([1, 0, -1, -1], dtype=torch.int64, device=device)
    labels = label_of_group[group.gather(1, chosen)]

    # 5. Cell centre in image pixels, float32 as in the original, clamped to the last pixel, truncated.
    pad_row = chosen // ds + _row_tensor([g.pad_h for g in geos], torch.int64, device)
    pad_col = chosen % ds + _row_tensor([g.pad_w for g in geos], torch.int64, device)
    x = (pad_col.float() + 0.5) * _row_tensor([g.scale_w for g in geos], torch.float32, device)
    y = (pad_row.float() + 0.5) * _row_tensor([g.scale_h for g in geos], torch.float32, device)
    x = torch.minimum(x, _row_tensor([w - 1 for _, w in sizes], torch.float32, device))
    y = torch.minimum(y, _row_tensor([h - 1 for h, _ in sizes], torch.float32, device))
    points = torch.stack([x.long(), y.long()], dim=-1)  # values >= 0, so long() is int() truncation
    return points, labels


# --------------------------------------------------------------------------------------------------
# full-resolution map (model.md §4.3)


def _normalised_grid(similarity: torch.Tensor, side: int) -> torch.Tensor:
    """Min-max over each row in the input dtype (bf16 for the released model), then float32: [N, side, side]."""
    lo, hi = similarity.amin(1, keepdim=True), similarity.amax(1, keepdim=True)
    span = hi - lo
    norm = (similarity - lo) / torch.where(span > 0, span, torch.ones_like(span))  # constant map -> 0
    return norm.float().reshape(-1, side, side)


def _full_map(grid: torch.Tensor, image_size: tuple[int, int], clip_input_size: int) -> torch.Tensor:
    """[side, side] grid -> bilinear to 336x336 -> zero aspect pad (a negative pad crops) -> bilinear to H x W."""
    c = clip_input_size
    square = F.interpolate(grid[None, None], size=(c, c), mode="bilinear", align_corners=False)
    g = aspect_pad(image_size, c)
    padded = F.pad(square, (g.pad_w, g.pad_w, g.pad_h, g.pad_h), value=0.0)
    return F.interpolate(padded, size=image_size, mode="bilinear", align_corners=False)[0, 0]


def similarity_heatmap(
    similarity_row: torch.Tensor, image_size: SizeLike, config: Optional[SasPConfig] = None
) -> torch.Tensor:
    """The full-resolution map M [H, W] float32 in [0, 1] of one SEG token (the map DtoC tilts by)."""
    config = config or SasPConfig()
    row = similarity_row.detach().reshape(1, -1)
    side = _check_similarity(row, config)
    (size,) = _check_image_sizes([image_size], 1)
    return _full_map(_normalised_grid(row, side)[0], size, config.clip_input_size)


def _source_index(
    dst: torch.Tensor, scale: torch.Tensor, in_size: Union[int, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """F.interpolate's bilinear (align_corners=False) taps along one axis, in its float32 arithmetic.

    scale = float32(in) / float32(out); src = max(scale·(dst + 0.5) - 0.5, 0); the second tap is clamped
    to the last input index. Returns (i0, i1, w0, w1).
    """
    src = ((dst.float() + 0.5) * scale - 0.5).clamp_min(0)
    last = in_size - 1
    i0 = torch.minimum(src.long(), last) if isinstance(last, torch.Tensor) else src.long().clamp_max(last)
    lam1 = (src - i0.float()).clamp(0, 1)
    i1 = i0 + (i0 < last).long()
    return i0, i1, 1 - lam1, lam1


def _axis_weights(
    pixels: torch.Tensor, image_len: torch.Tensor, geo: tuple[torch.Tensor, torch.Tensor], side: int, clip: int
) -> torch.Tensor:
    """Rows of the linear map grid-axis -> image-axis at the given pixels: [..., L] -> [..., L, side].

    Two bilinear look-ups along one axis: image pixel -> padded 336-space (taps u0, u1), where a tap in the
    pad is 0 and a tap inside reads the 336-map at u - pad, itself grid -> 336 bilinear (a fixed table).
    """
    padded_len, pad = geo
    device = pixels.device
    scale = padded_len.float() / image_len.float()
    u0, u1, w0, w1 = _source_index(pixels, scale, padded_len)
    # the side -> clip resize as a [clip, side] matrix (two taps per row; equal taps at the edge add up)
    g = torch.arange(clip, device=device)
    a0, a1, l0, l1 = _source_index(g, torch.tensor(side, dtype=torch.float32, device=device) / clip, side)
    table = torch.zeros(clip, side, device=device)
    table.index_put_((g, a0), l0, accumulate=True)
    table.index_put_((g, a1), l1, accumulate=True)

    def rows_of(u: torch.Tensor) -> torch.Tensor:
        v = u - pad
        inside = ((v >= 0) & (v < clip))[..., None]
        return torch.where(inside, table[v.clamp(0, clip - 1)], torch.zeros((), device=device))

    return rows_of(u0) * w0[..., None] + rows_of(u1) * w1[..., None]


def _window_map(
    grid: torch.Tensor, sizes: list[tuple[int, int]], rows: torch.Tensor, cols: torch.Tensor, clip: int
) -> torch.Tensor:
    """M (the `_full_map` of each row's grid) on the pixel grid rows x cols, without building M.

    grid [N, side, side]; rows [N, P, Ly], cols [N, P, Lx] integer pixels -> [N, P, Ly, Lx] float32.
    The map is separable in its two resizes, so M[rows, cols] = Wy · grid · Wxᵀ.
    """
    n, side = grid.shape[0], grid.shape[-1]
    device = grid.device
    geos = [aspect_pad(s, clip) for s in sizes]

    def per_row(values: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(values), dtype=torch.int64, device=device).reshape(n, 1, 1)

    wy = _axis_weights(
        rows, per_row([h for h, _ in sizes]), (per_row([g.height for g in geos]), per_row([g.pad_h for g in geos])),
        side, clip,
    )
    wx = _axis_weights(
        cols, per_row([w for _, w in sizes]), (per_row([g.width for g in geos]), per_row([g.pad_w for g in geos])),
        side, clip,
    )
    return wy @ grid[:, None] @ wx.transpose(-1, -2)


# --------------------------------------------------------------------------------------------------
# DtoC (model.md §4.6)


def _kernel(d2: torch.Tensor, mode: str) -> torch.Tensor:
    """exp(-d²) (released) or exp(-d) (paper), in place on the constant d² tensor."""
    return d2.neg_().exp_() if mode == "released" else d2.sqrt_().neg_().exp_()


def dtoc_on_map(full_map: torch.Tensor, points: torch.Tensor, mode: str = "released") -> torch.Tensor:
    """Full-grid DtoC of integer points [P, 2] (x, y) on one full-resolution map [H, W] -> float32 [P, 2].

    π = softmax over all H·W values of the map; ω_k = kernel(d_k)·π normalised, with kernel exp(-d²)
    ("released") or exp(-d) ("paper"); (x̂, ŷ)_k = Σ ω_k·(gx, gy). Only π carries gradient.
    """
    if mode not in _MODES:
        raise ValueError(f"dtoc_on_map: mode must be one of {_MODES}, got {mode!r}")
    if full_map.dim() != 2 or points.dim() != 2 or points.shape[-1] != 2:
        raise ValueError(
            "dtoc_on_map expects full_map [H, W] and points [P, 2], "
            f"got {tuple(full_map.shape)} and {tuple(points.shape)}"
        )
    h, w = full_map.shape
    pi = torch.softmax(full_map.float().reshape(-1), dim=0)
    gx = torch.arange(w, dtype=torch.float32, device=full_map.device)
    gy = torch.arange(h, dtype=torch.float32, device=full_map.device)
    px, py = points[:, 0].float(), points[:, 1].float()
    d2 = (gy[None, :, None] - py[:, None, None]) ** 2 + (gx[None, None, :] - px[:, None, None]) ** 2
    weight = _kernel(d2, mode).reshape(len(px), h * w)  # [P, H·W], no gradient
    # Σ kernel·π·g / Σ kernel·π as matrix-vector products: no second P x H x W tensor.
    total = weight @ pi
    x_hat = (weight @ (pi * gx.repeat(h))) / total
    y_hat = (weight @ (pi * gy.repeat_interleave(w))) / total
    return torch.stack([x_hat, y_hat], dim=-1)


def _dtoc_exact(
    grid: torch.Tensor, sizes: list[tuple[int, int]], points: torch.Tensor, mode: str, clip: int
) -> torch.Tensor:
    """The reference path: build each SEG token's H x W map (sizes differ per row) and run full-grid DtoC."""
    maps = (_full_map(grid[b], size, clip) for b, size in enumerate(sizes))
    return torch.stack([dtoc_on_map(m, points[b], mode) for b, m in enumerate(maps)])


def _dtoc_window(
    grid: torch.Tensor, sizes: list[tuple[int, int]], points: torch.Tensor, mode: str, radius: int, clip: int
) -> torch.Tensor:
    """Windowed DtoC: ω ∝ kernel(d)·exp(M - max) over a (2r+1)² window; the global softmax constant cancels."""
    device = grid.device
    offsets = torch.arange(-radius, radius + 1, device=device)
    px, py = points[..., 0:1], points[..., 1:2]  # [N, P, 1]
    rows, cols = py + offsets, px + offsets  # [N, P, L]
    n = grid.shape[0]
    hs = torch.tensor([h for h, _ in sizes], device=device).reshape(n, 1, 1)
    ws = torch.tensor([w for _, w in sizes], device=device).reshape(n, 1, 1)
    inside = ((rows >= 0) & (rows < hs))[..., :, None] & ((cols >= 0) & (cols < ws))[..., None, :]
    m = _window_map(grid, sizes, rows, cols, clip)  # [N, P, L, L]
    d = offsets.float()
    kernel = _kernel(d[:, None] ** 2 + d[None, :] ** 2, mode)  # [L, L]
    top = m.detach().masked_fill(~inside, float("-inf")).amax((-2, -1), keepdim=True)
    weight = torch.where(inside, kernel * torch.exp(m - top), torch.zeros((), device=device))
    weight = weight / weight.sum((-2, -1), keepdim=True)
    # x + Σ ω·dx: the same value as Σ ω·gx, with less rounding at large coordinates.
    x_hat = px[..., 0].float() + (weight.sum(-2) * d).sum(-1)
    y_hat = py[..., 0].float() + (weight.sum(-1) * d).sum(-1)
    return torch.stack([x_hat, y_hat], dim=-1)


def similarity_as_points(
    similarity: torch.Tensor, image_sizes: Sequence[SizeLike], config: Optional[SasPConfig] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SasP + DtoC for N SEG tokens.

    similarity: [N, T] raw SEG-to-image-token similarities (from `seg_image_similarity`), T = side².
    image_sizes: N original image sizes (H, W), one per row.
    Returns points float32 [N, P, 2] (x, y) in original-image pixels, differentiable with respect to
    `similarity` through the DtoC weights, and labels int64 [N, P] (1 positive, 0 negative, -1 neutral).
    """
    config = config or SasPConfig()
    side = _check_similarity(similarity, config)
    sizes = _check_image_sizes(image_sizes, similarity.shape[0])
    int_points, labels = discrete_points(similarity, sizes, config)
    if similarity.shape[0] == 0:
        return int_points.float(), labels
    # The released arithmetic is float32 after the min-max; an enclosing autocast must not lower it.
    with torch.autocast(device_type=similarity.device.type, enabled=False):
        grid = _normalised_grid(similarity, side)
        if config.dtoc == "exact":
            points = _dtoc_exact(grid, sizes, int_points, config.mode, config.clip_input_size)
        else:
            points = _dtoc_window(grid, sizes, int_points, config.mode, config.radius, config.clip_input_size)
    return points, labels
