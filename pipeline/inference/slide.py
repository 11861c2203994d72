"""Sliding-window inference, mmsegmentation's `slide` mode: a model trained on size x size crops
(`train.input: crop`) sees a whole image, at the mask cache's resolution, as overlapping windows of
its training size; each pixel's logits are the mean over the windows that cover it. Images smaller
than a window are padded with zeros (the mean colour after normalisation) and cropped back.
`whole` (mmsegmentation's `whole` mode, `train.crop_infer: whole`): one pass over the whole image,
padded to a multiple of 32 — faster, when the image is not much bigger than the crops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Offsets of the windows along one side: every `stride`, the last one flush with the end."""
    if length <= size:
        return [0]
    return sorted({*range(0, length - size, stride), length - size})


class SlidingWindow(torch.nn.Module):
    """(N, 3, H, W) float32 images, any H and W -> (N, C, H, W) float32 logits of `model`, run on
    size x size windows overlapping by `overlap` of a side, `batch` windows per forward pass
    (whole: on the whole image at once, padded to a multiple of 32 and at least size)."""

    def __init__(self, model: torch.nn.Module, size: int, overlap: float, batch: int = 8, whole: bool = False):
        super().__init__()
        self.model, self.size, self.batch, self.whole = model, size, max(1, batch), whole
        self.stride = max(1, int(round(size * (1 - overlap))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.whole:
            ph, pw = (max(self.size, -(-d // 32) * 32) for d in (h, w))
            return self.model(F.pad(x, (0, pw - w, 0, ph - h))).float()[:, :, :h, :w]
        s = self.size
        ph, pw = max(h, s), max(w, s)
        if (ph, pw) != (h, w):
            x = F.pad(x, (0, pw - w, 0, ph - h))
        windows = [(y, z) for y in window_starts(ph, s, self.stride) for z in window_starts(pw, s, self.stride)]
        total, count = None, torch.zeros(1, 1, ph, pw, device=x.device)
        for i in range(0, len(windows), self.batch):
            chunk = windows[i:i + self.batch]
            logits = self.model(torch.cat([x[:, :, y:y + s, z:z + s] for y, z in chunk])).float()
            if total is None:
                total = torch.zeros(n, logits.shape[1], ph, pw, device=x.device)
            for j, (y, z) in enumerate(chunk):
                total[:, :, y:y + s, z:z + s] += logits[j * n:(j + 1) * n]
                count[:, :, y:y + s, z:z + s] += 1
        return (total / count)[:, :, :h, :w]
