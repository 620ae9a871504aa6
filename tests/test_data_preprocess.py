"""Image loading and the CLIP/SAM transforms: sizes, padding, normalisation and fidelity to the original pipeline."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from dataset.errors import DatasetError
from dataset.preprocess import (
    ImagePreprocessor,
    clip_preprocess,
    load_rgb_image,
    sam_mask_shape,
    sam_preprocess,
    sam_target_shape,
)

SAM_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
SAM_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@pytest.mark.parametrize(
    "h, w, expected",
    [
        (97, 143, (695, 1024)),  # 97 * 1024/143 = 694.6 -> int(695.1) = 695
        (160, 64, (1024, 410)),  # 64 * 6.4 = 409.6 -> int(410.1) = 410
        (100, 100, (1024, 1024)),
        (3, 2000, (2, 1024)),  # 3 * 0.512 = 1.536 -> int(2.036) = 2
        (480, 640, (768, 1024)),
    ],
)
def test_sam_target_shape_by_hand(h: int, w: int, expected: tuple[int, int]) -> None:
    assert sam_target_shape(h, w) == expected


def test_sam_constant_image_values_and_zero_padding() -> None:
    rgb = np.empty((2, 4, 3), dtype=np.uint8)
    rgb[:] = (10, 200, 30)
    x, shape = sam_preprocess(rgb, size=16)
    assert shape == (8, 16)
    assert x.dtype == torch.float32 and x.shape == (3, 16, 16)
    expected = (np.array([10, 200, 30], dtype=np.float32) - SAM_MEAN) / SAM_STD  # (10-123.675)/58.395 = -1.9467...
    assert expected[0] == pytest.approx(-1.94666, abs=1e-4)
    for c in range(3):
        assert torch.allclose(x[c, :8, :], torch.full((8, 16), float(expected[c])), atol=1e-6)
    assert torch.count_nonzero(x[:, 8:, :]) == 0  # bottom padding is exactly zero after normalising


def test_sam_right_padding_for_portrait() -> None:
    rgb = np.full((40, 10, 3), 255, dtype=np.uint8)
    x, shape = sam_preprocess(rgb, size=32)
    assert shape == (32, 8)
    assert torch.count_nonzero(x[:, :, 8:]) == 0
    assert torch.allclose(x[:, :, :8], torch.from_numpy((255 - SAM_MEAN) / SAM_STD).view(3, 1, 1).expand(3, 32, 8))


def test_sam_resize_matches_torchvision_on_pil() -> None:
    """The original resized with torchvision's resize on a PIL image: ours must be bit-identical."""
    tvf = pytest.importorskip("torchvision.transforms.functional")
    rgb = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    x, (nh, nw) = sam_preprocess(rgb, size=128)
    ref = np.array(tvf.resize(Image.fromarray(rgb), [nh, nw]))
    mean, std = torch.from_numpy(SAM_MEAN).view(3, 1, 1), torch.from_numpy(SAM_STD).view(3, 1, 1)
    ref_norm = (torch.from_numpy(ref).permute(2, 0, 1).float() - mean) / std
    assert torch.equal(x[:, :nh, :nw], ref_norm)


def test_clip_constant_white_image() -> None:
    rgb = np.full((50, 80, 3), 255, dtype=np.uint8)
    x = clip_preprocess(rgb, size=24)
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    expected = (1.0 - CLIP_MEAN) / CLIP_STD  # (1 - 0.48145466) / 0.26862954 = 1.93036...
    assert expected[0] == pytest.approx(1.930336, abs=1e-5)
    assert torch.allclose(x, torch.from_numpy(expected).view(3, 1, 1).expand(3, 24, 24), atol=1e-6)


def test_clip_centre_crop_offset_without_resize() -> None:
    """Shortest edge already equals the crop size: no resampling, crop starts at (700 - 336) // 2 = 182."""
    rgb = np.random.default_rng(2).integers(0, 256, (336, 700, 3), dtype=np.uint8)
    x = clip_preprocess(rgb)
    crop = rgb[:, 182:518].astype(np.float64) / 255
    expected = ((crop.astype(np.float32) - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)
    assert torch.allclose(x, torch.from_numpy(expected), atol=1e-6)


@pytest.mark.parametrize("shape", [(97, 143, 3), (160, 64, 3), (30, 31, 3)])
def test_clip_matches_hf_clip_processor(shape: tuple[int, int, int]) -> None:
    """Same numbers as transformers' PIL-backed CLIP processor configured like clip-vit-large-patch14-336."""
    mod = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    proc = mod.CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    rgb = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    ref = proc(rgb, return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(clip_preprocess(rgb), ref, atol=1e-6)


def test_preprocessor_default_sizes_and_mask_shape() -> None:
    rgb = np.random.default_rng(4).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    p = ImagePreprocessor()(rgb)
    assert p.image.shape == (3, 1024, 1024) and p.image_clip.shape == (3, 336, 336)
    assert p.sam_input_shape == (768, 1024) and p.original_size == (90, 120)
    assert sam_mask_shape(p) == [(768, 1024), (90, 120)]


def test_load_rgb_image_channel_order(tmp_path) -> None:
    rgb = np.zeros((5, 6, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # red
    rgb[..., 2] = 17
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), rgb[..., ::-1])  # OpenCV writes BGR
    assert np.array_equal(load_rgb_image(path, "demo"), rgb)


def test_load_rgb_image_missing_file(tmp_path) -> None:
    path = tmp_path / "nope.jpg"
    with pytest.raises(DatasetError, match=r"demo: image file not found: .*nope\.jpg"):
        load_rgb_image(path, "demo")


def test_load_rgb_image_corrupt_file(tmp_path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(DatasetError, match=r"ReasonSeg: cannot decode image .*broken\.jpg"):
        ImagePreprocessor().load(path, "ReasonSeg")


def test_rejects_non_rgb_arrays() -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        sam_preprocess(np.zeros((4, 4), dtype=np.uint8))
