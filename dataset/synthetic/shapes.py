"""Seeded shapes with exact pixel masks, and images painted with them, for the synthetic datasets.

Rectangles and L-shapes are axis-aligned with integer corners, so the pixel set each annotation format must
decode to is known without any rasteriser: COCO polygons (pycocotools) cover the half-open box
``[x0, x1) x [y0, y1)`` of their vertices, while LabelMe points drawn with OpenCV (outline + fill) cover their
vertices inclusively, so LabelMe vertices are written one pixel in. Ellipses are only stored as RLE, whose
decoding is exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 30),
    "purple": (140, 40, 170),
    "orange": (240, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}


@dataclass(frozen=True)
class Box:
    """Pixels ``[x0, x1) x [y0, y1)``."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def area(self) -> int:
        return (self.x1 - self.x0) * (self.y1 - self.y0)


@dataclass(frozen=True)
class Shape:
    """A rectangle (one box) or an L-shape (an outer box minus its bottom-right corner)."""

    kind: str  # "rectangle" | "l-shape"
    outer: Box
    notch: tuple[int, int] | None = None  # (xm, ym): the L keeps [x0,x1)x[y0,ym) and [x0,xm)x[y0,y1)

    def mask(self, h: int, w: int) -> np.ndarray:
        m = np.zeros((h, w), dtype=np.uint8)
        b = self.outer
        if self.notch is None:
            m[b.y0 : b.y1, b.x0 : b.x1] = 1
        else:
            xm, ym = self.notch
            m[b.y0 : ym, b.x0 : b.x1] = 1
            m[b.y0 : b.y1, b.x0 : xm] = 1
        return m

    def _vertices(self, inset: int) -> list[tuple[int, int]]:
        b = self.outer
        x1, y1 = b.x1 - inset, b.y1 - inset
        if self.notch is None:
            return [(b.x0, b.y0), (x1, b.y0), (x1, y1), (b.x0, y1)]
        xm, ym = self.notch[0] - inset, self.notch[1] - inset
        return [(b.x0, b.y0), (x1, b.y0), (x1, ym), (xm, ym), (xm, y1), (b.x0, y1)]

    def coco_polygon(self) -> list[float]:
        """Flat ``[x1, y1, x2, y2, ...]`` that pycocotools rasterises to exactly :meth:`mask`."""
        return [float(v) for xy in self._vertices(0) for v in xy]

    def labelme_points(self, rng: np.random.Generator | None = None) -> list[list[float]]:
        """``[[x, y], ...]`` that OpenCV (int32-truncated, outline + fill) draws as exactly :meth:`mask`.

        With ``rng`` each coordinate gets a fractional part in [0, 0.9), which truncation must drop.
        """
        pts = [[float(x), float(y)] for x, y in self._vertices(1)]
        if rng is not None:
            pts = [[x + round(float(rng.uniform(0, 0.9)), 3), y + round(float(rng.uniform(0, 0.9)), 3)] for x, y in pts]
        return pts

    def describe(self, color: str) -> str:
        return f"{color} {'rectangle' if self.notch is None else 'l-shaped block'}"


def random_size(rng: np.random.Generator, low: int = 64, high: int = 160) -> tuple[int, int]:
    """(h, w) with independent sides, so aspect ratios vary (portrait and landscape)."""
    return int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))


def random_box(rng: np.random.Generator, h: int, w: int, min_side: int = 8, max_frac: float = 0.6) -> Box:
    bw = int(rng.integers(min_side, max(min_side + 1, int(w * max_frac))))
    bh = int(rng.integers(min_side, max(min_side + 1, int(h * max_frac))))
    x0 = int(rng.integers(0, w - bw + 1))
    y0 = int(rng.integers(0, h - bh + 1))
    return Box(x0, y0, x0 + bw, y0 + bh)


def random_shape(rng: np.random.Generator, h: int, w: int, kind: str | None = None) -> Shape:
    """A rectangle or an L-shape fully inside an h x w image."""
    kind = kind or ("rectangle" if rng.random() < 0.5 else "l-shape")
    if kind == "rectangle":
        return Shape("rectangle", random_box(rng, h, w))
    b = random_box(rng, h, w, min_side=12)
    xm = int(rng.integers(b.x0 + 4, b.x1 - 3))
    ym = int(rng.integers(b.y0 + 4, b.y1 - 3))
    return Shape("l-shape", b, (xm, ym))


def ellipse_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """uint8 mask of a random axis-aligned ellipse inside the image (vectorised)."""
    ry = float(rng.uniform(5, h / 4))
    rx = float(rng.uniform(5, w / 4))
    cy = float(rng.uniform(ry, h - ry))
    cx = float(rng.uniform(rx, w - rx))
    yy, xx = np.mgrid[0:h, 0:w]
    return ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1.0).astype(np.uint8)


def paint_image(rng: np.random.Generator, h: int, w: int, layers: list[tuple[np.ndarray, str]]) -> np.ndarray:
    """RGB uint8 image: noisy background, then each (mask, colour name) painted in order."""
    base = rng.integers(60, 200, size=3)
    img = np.clip(base + rng.integers(-20, 21, size=(h, w, 3)), 0, 255).astype(np.uint8)
    for mask, color in layers:
        img[mask.astype(bool)] = COLORS[color]
    return img


def write_image(path: Path, rgb: np.ndarray) -> None:
    """Write RGB as .jpg (quality 95) or .png, creating folders; OpenCV so the loaders decode what was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix.lower() in (".jpg", ".jpeg") else []
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params):
        raise OSError(f"could not write image {path}")
