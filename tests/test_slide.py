"""Crop-based training and sliding-window inference: framings with known answers, and a model
trained on crops is predicted exactly as it was validated."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.data.augment import build_transform
from pipeline.labels import IGNORE_INDEX
from pipeline.inference.slide import SlidingWindow, window_starts
from pipeline.inference.tta import tta_proba


def test_window_starts_known_answers():
    assert window_starts(64, 64, 43) == [0]
    assert window_starts(40, 64, 43) == [0]                  # smaller than a window: one, padded
    assert window_starts(100, 64, 43) == [0, 36]             # the last window flush with the end
    assert window_starts(200, 64, 43) == [0, 43, 86, 129, 136]
    assert window_starts(128, 64, 64) == [0, 64]             # no overlap: tiles


class PixelModel(nn.Module):
    """A 1x1 convolution: what it says of a pixel does not depend on the window around it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        assert x.shape[-2:] == (32, 32), "every window is the training size"
        return self.conv(x)


@pytest.mark.parametrize("hw", [(32, 32), (20, 50), (75, 33), (150, 97)])
@pytest.mark.parametrize("overlap", [0.0, 1 / 3, 0.5])
def test_sliding_windows_of_a_pixelwise_model_equal_the_model_on_the_whole_image(hw, overlap):
    x = torch.randn(2, 3, *hw)
    model = PixelModel().eval()
    slid = SlidingWindow(model, 32, overlap, batch=3)(x)
    assert slid.shape == (2, 4, *hw)
    assert torch.allclose(slid, model.conv(x), atol=1e-5)


def test_sliding_windows_compose_with_tta_and_scales():
    """Flips, rotations (non-square images turn) and rescales before the windows, undone after."""
    x = torch.randn(1, 3, 70, 45)
    model = PixelModel().eval()
    plain = tta_proba(model.conv, x)
    assert torch.allclose(tta_proba(SlidingWindow(model, 32, 1 / 3), x, ["d4"]), plain, atol=1e-5)
    multi = tta_proba(SlidingWindow(model, 32, 1 / 3), x, ["identity"], [0.75, 1.0, 1.5])
    assert multi.shape == plain.shape and torch.allclose(multi.sum(1), torch.ones(1, 70, 45), atol=1e-5)


def coordinates(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An image whose red channel is the row and green the column (and a mask of ones)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.arange(h)[:, None]
    img[..., 1] = np.arange(w)[None, :]
    return img, np.ones((h, w), np.uint8)


def steps(out: dict) -> tuple[float, float]:
    """Mean step of the row code down the rows and of the column code along the columns, in pixels."""
    std, mean = np.array([0.229, 0.224, 0.225]) * 255, np.array([0.485, 0.456, 0.406]) * 255
    img = out["image"].numpy()
    rows, cols = img[0] * std[0] + mean[0], img[1] * std[1] + mean[1]
    return float(np.diff(rows, axis=0).mean()), float(np.diff(cols, axis=1).mean())


def test_crops_keep_the_aspect_and_resizing_squashes_it():
    img, mask = coordinates(60, 200)
    out = build_transform([], 32, seed=1, crop_scale=(1.0, 1.0))(image=img, mask=mask)
    assert out["image"].shape == (3, 32, 32)
    assert steps(out) == pytest.approx((1.0, 1.0), abs=1e-3)          # a window of the image as it is
    doubled = build_transform([], 32, seed=1, crop_scale=(2.0, 2.0))(image=img, mask=mask)
    assert steps(doubled) == pytest.approx((0.5, 0.5), abs=0.03)      # scaled, both sides alike
    squashed = build_transform([], 32)(image=img, mask=mask)
    assert steps(squashed) == pytest.approx((60 / 32, 200 / 32), rel=0.05)   # aspect lost
    whole = build_transform([], None)(image=img, mask=mask)
    assert whole["image"].shape == (3, 60, 200) and steps(whole) == pytest.approx((1.0, 1.0), abs=1e-3)


def test_a_crop_larger_than_the_image_pads_with_ignored_pixels():
    img, mask = coordinates(20, 24)
    out = build_transform([], 32, seed=0, crop_scale=(1.0, 1.0))(image=img, mask=mask)
    m = out["mask"].numpy()
    assert m.shape == (32, 32) and (m == 1).sum() == 20 * 24 and (m == IGNORE_INDEX).sum() == 32 * 32 - 20 * 24


def test_random_scales_cover_the_range():
    img, mask = coordinates(100, 100)
    t = build_transform([], 32, seed=3, crop_scale=(0.5, 2.0))
    found = [1 / steps(t(image=img, mask=mask))[0] for _ in range(40)]
    assert 0.45 < min(found) < 0.8 and 1.5 < max(found) < 2.1


@pytest.mark.parametrize("hw", [(32, 32), (20, 50), (75, 33)])
def test_whole_mode_is_one_pass_over_the_padded_image(hw):
    calls = []
    model = PixelModel().eval()
    model.forward = lambda x: calls.append(x.shape[-2:]) or model.conv(x)
    x = torch.randn(1, 3, *hw)
    out = SlidingWindow(model, 32, 1 / 3, whole=True)(x)
    assert torch.allclose(out, model.conv(x), atol=1e-5) and len(calls) == 1
    assert all(d % 32 == 0 and d >= 32 for d in calls[0])
