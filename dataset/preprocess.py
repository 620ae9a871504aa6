"""Image loading and the two model-side image transforms (CLIP 336 and SAM 1024).

Both resizes go through Pillow on purpose: the original pipeline resized the CLIP input with
``CLIPImageProcessor`` (Pillow bicubic, ``reducing_gap=None``) and the SAM input with torchvision's ``resize`` on a
PIL image (Pillow bilinear). Calling Pillow directly reproduces both bit-for-bit, whereas OpenCV's bicubic/bilinear
kernels (no antialiasing when downscaling) would shift every pixel value a little.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

import cv2
import numpy as np
import torch
from PIL import Image

from dataset.errors import DatasetError
from model.constants import (
    CLIP_IMAGE_SIZE,
    CLIP_MEAN,
    CLIP_STD,
    SAM_IMAGE_SIZE,
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
)

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "ImagePreprocessor",
    "PreparedImage",
    "clip_preprocess",
    "load_rgb_image",
    "sam_mask_shape",
    "sam_preprocess",
    "sam_target_shape",
]


def load_rgb_image(path: PathLike, dataset_name: str) -> np.ndarray:
    """Decode an image with OpenCV (as the original did) and return it as uint8 RGB [H, W, 3]."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{dataset_name}: image file not found: {path}")
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise DatasetError(f"{dataset_name}: cannot decode image (corrupt or not an image): {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _check_rgb(rgb: np.ndarray) -> None:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB array [H, W, 3], got dtype {rgb.dtype} shape {tuple(rgb.shape)}")


def clip_preprocess(rgb: np.ndarray, size: int = CLIP_IMAGE_SIZE) -> torch.Tensor:
    """CLIP input: shortest edge -> ``size`` (bicubic), centre crop ``size``², x/255, CLIP mean/std; float32 [3,S,S].

    Sizes follow ``CLIPImageProcessor``: the long edge becomes ``int(size * long / short)`` and the crop offset is
    ``(dim - size) // 2``; rescaling is done in float64 and cast to float32 before normalising, as HF does.
    """
    _check_rgb(rgb)
    h, w = rgb.shape[:2]
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_h, new_w = size, int(size * w / h)
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), resample=Image.BICUBIC, reducing_gap=None))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top : top + size, left : left + size]
    scaled = (crop.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    normed = (scaled - mean) / std
    return torch.from_numpy(np.ascontiguousarray(normed.transpose(2, 0, 1)))


def sam_target_shape(h: int, w: int, long_side: int = SAM_IMAGE_SIZE) -> tuple[int, int]:
    """SAM's ResizeLongestSide size rule: scale = L / max(h, w); side = int(side * scale + 0.5)."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def sam_preprocess(rgb: np.ndarray, size: int = SAM_IMAGE_SIZE) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM input: longest side -> ``size`` (bilinear), SAM mean/std, zero-pad right/bottom; float32 [3,S,S]."""
    _check_rgb(rgb)
    new_h, new_w = sam_target_shape(rgb.shape[0], rgb.shape[1], size)
    resized = np.array(Image.fromarray(rgb).resize((new_w, new_h), resample=Image.BILINEAR))
    x = torch.from_numpy(resized).permute(2, 0, 1)
    mean = torch.tensor(SAM_PIXEL_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, dtype=torch.float32).view(3, 1, 1)
    out = torch.zeros(3, size, size, dtype=torch.float32)
    out[:, :new_h, :new_w] = (x - mean) / std
    return out, (new_h, new_w)


@dataclass(frozen=True)
class PreparedImage:
    """Both model inputs of one image plus the two sizes the model needs to map masks back."""

    image: torch.Tensor  # float32 [3, sam_size, sam_size]
    image_clip: torch.Tensor  # float32 [3, clip_size, clip_size]
    sam_input_shape: tuple[int, int]  # (new_h, new_w) before padding
    original_size: tuple[int, int]  # (H, W) of the decoded image = mask size


def sam_mask_shape(prepared: PreparedImage) -> list[tuple[int, int]]:
    """The per-sample ``[(new_h, new_w), (H, W)]`` pair of the batch contract."""
    return [tuple(prepared.sam_input_shape), tuple(prepared.original_size)]


def training_item(
    image_path: "str | os.PathLike[str]",
    prepared: PreparedImage,
    conversations: list[str],
    masks: torch.Tensor,
    exists: list[bool],
) -> tuple:
    """The per-sample 7-tuple every training dataset yields (docs/interfaces.md; data.md §5.2):
    ``(image_path, image, image_clip, conversations, masks, sam_mask_shape, exists)``."""
    return (str(image_path), prepared.image, prepared.image_clip, conversations, masks, sam_mask_shape(prepared),
            exists)


@dataclass(frozen=True)
class ImagePreprocessor:
    """Carries the two input sizes so every dataset prepares images identically."""

    sam_size: int = SAM_IMAGE_SIZE
    clip_size: int = CLIP_IMAGE_SIZE

    def __call__(self, rgb: np.ndarray) -> PreparedImage:
        image, shape = sam_preprocess(rgb, self.sam_size)
        return PreparedImage(
            image=image,
            image_clip=clip_preprocess(rgb, self.clip_size),
            sam_input_shape=shape,
            original_size=(int(rgb.shape[0]), int(rgb.shape[1])),
        )

    def load(self, path: PathLike, dataset_name: str) -> PreparedImage:
        return self(load_rgb_image(path, dataset_name))
