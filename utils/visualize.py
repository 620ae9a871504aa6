"""PNG renderings of a READ prediction: the binary mask, an overlay with the SasP points, a similarity heatmap.

Used by demo.py (and handy for inspecting test_read.py outputs). Everything is numpy + OpenCV and vectorised;
files are written atomically so a killed demo never leaves a truncated PNG behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import cv2
import numpy as np

from utils.io import atomic_write_bytes

PathLike = Union[str, "os.PathLike[str]"]

# RGB colours of the SasP point labels: 1 positive, 0 negative, -1 neutral (model.md §4.4).
POSITIVE_RGB = (0, 200, 0)
NEGATIVE_RGB = (220, 0, 0)
NEUTRAL_RGB = (150, 150, 150)
MASK_RGB = (30, 144, 255)


@dataclass
class OverlayStyle:
    """How the overlay is drawn; sizes are in pixels of the original image."""

    mask_alpha: float = 0.5
    point_radius: Optional[int] = None  # None: ~0.8 % of the short side, at least 2
    outline: int = 1  # dark ring around each point so it stays visible on any background


def load_image_rgb(path: PathLike) -> np.ndarray:
    """Read an image file as uint8 RGB [H,W,3]; a missing or unreadable file raises ValueError naming it."""
    from dataset.errors import DatasetError
    from dataset.preprocess import load_rgb_image  # the datasets' decoder, so the demo sees what training saw

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"image not found: {path}")
    try:
        return load_rgb_image(path, "image")
    except DatasetError:
        raise ValueError(f"not a readable image file: {path}") from None


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 grey [H,W] or RGB [H,W,3] array."""
    if image.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8, got {image.dtype}")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("OpenCV could not encode the PNG")
    return buf.tobytes()


def mask_to_png(mask: np.ndarray) -> bytes:
    """A boolean / 0-1 mask [H,W] as a grey PNG with values 0 and 255."""
    return encode_png((np.asarray(mask) > 0).astype(np.uint8) * 255)


def _disc_offsets(radius: int) -> np.ndarray:
    """Integer (dy, dx) offsets of a filled disc, [K,2]."""
    r = np.arange(-radius, radius + 1)
    dy, dx = np.meshgrid(r, r, indexing="ij")
    keep = dy**2 + dx**2 <= radius**2
    return np.stack([dy[keep], dx[keep]], axis=1)


def _paint_discs(canvas: np.ndarray, points_xy: np.ndarray, colours: np.ndarray, radius: int) -> None:
    """Paint one filled disc per point in place (vectorised: all disc pixels are scattered at once)."""
    if len(points_xy) == 0 or radius < 0:
        return
    h, w = canvas.shape[:2]
    centres = np.rint(points_xy[:, ::-1]).astype(np.int64)  # (y, x)
    offsets = _disc_offsets(radius)
    pix = centres[:, None, :] + offsets[None, :, :]  # [P,K,2]
    col = np.broadcast_to(colours[:, None, :], (len(centres), len(offsets), 3))
    pix, col = pix.reshape(-1, 2), col.reshape(-1, 3)
    inside = (pix[:, 0] >= 0) & (pix[:, 0] < h) & (pix[:, 1] >= 0) & (pix[:, 1] < w)
    canvas[pix[inside, 0], pix[inside, 1]] = col[inside]


def overlay_image(
    image_rgb: np.ndarray,
    mask: Optional[np.ndarray] = None,
    points_xy: Optional[np.ndarray] = None,
    labels: Optional[np.ndarray] = None,
    style: OverlayStyle = OverlayStyle(),
) -> np.ndarray:
    """The image with the mask tinted and the SasP points drawn (green positive, red negative, grey neutral).

    points_xy are (x, y) in original-image pixels (the order SAM uses); padding rows (label < -1) are skipped.
    """
    out = image_rgb.astype(np.float32).copy()
    if mask is not None:
        m = np.asarray(mask) > 0
        if m.shape != out.shape[:2]:
            raise ValueError(f"mask shape {m.shape} does not match the image {out.shape[:2]}")
        tint = np.asarray(MASK_RGB, dtype=np.float32)
        out[m] = (1.0 - style.mask_alpha) * out[m] + style.mask_alpha * tint
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if points_xy is None or len(points_xy) == 0:
        return out
    pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    lab = np.asarray(labels, dtype=np.int64).reshape(-1) if labels is not None else np.ones(len(pts), np.int64)
    if len(lab) != len(pts):
        raise ValueError(f"{len(pts)} points but {len(lab)} labels")
    valid = lab >= -1
    pts, lab = pts[valid], lab[valid]
    palette = np.array([NEUTRAL_RGB, NEGATIVE_RGB, POSITIVE_RGB], dtype=np.uint8)  # index label + 1
    colours = palette[np.clip(lab, -1, 1) + 1]
    radius = style.point_radius if style.point_radius is not None else max(2, round(0.008 * min(out.shape[:2])))
    # Neutral first, then negative, then positive, so the informative points end up on top.
    order = np.argsort(np.clip(lab, -1, 1), kind="stable")
    pts, colours = pts[order], colours[order]
    if style.outline > 0:
        _paint_discs(out, pts, np.zeros_like(colours), radius + style.outline)
    _paint_discs(out, pts, colours, radius)
    return out


def heatmap_image(similarity: np.ndarray, image_rgb: Optional[np.ndarray] = None, alpha: float = 0.6) -> np.ndarray:
    """A JET colour map of a similarity map [H,W] (min-max normalised), blended over the image if given."""
    sim = np.asarray(similarity, dtype=np.float32)
    if sim.ndim != 2:
        raise ValueError(f"similarity map must be 2-D [H,W], got shape {sim.shape}")
    finite = np.isfinite(sim)
    lo, hi = (float(sim[finite].min()), float(sim[finite].max())) if finite.any() else (0.0, 0.0)
    norm = np.where(finite, (sim - lo) / (hi - lo), 0.0) if hi > lo else np.zeros_like(sim)
    grey = np.clip(np.rint(norm * 255.0), 0, 255).astype(np.uint8)
    colour = cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    if image_rgb is None:
        return colour
    if image_rgb.shape[:2] != sim.shape:
        colour = cv2.resize(colour, (image_rgb.shape[1], image_rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    blended = (1.0 - alpha) * image_rgb.astype(np.float32) + alpha * colour.astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def write_png(path: PathLike, image: np.ndarray) -> None:
    """Encode and write a PNG atomically."""
    atomic_write_bytes(path, encode_png(image))


def write_mask_png(path: PathLike, mask: np.ndarray) -> None:
    atomic_write_bytes(path, mask_to_png(mask))
