"""Ensembles of fold models: mean of softmax over members (optionally weighted), each with TTA.

Members are loaded from checkpoints alone (weights_only=True): the checkpoint names its model,
encoder, classes and how it saw images (whole and resized, or crops: then it runs by sliding
windows), so any ensemble can be rebuilt without the params that trained it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from pipeline.data.augment import build_transform
from pipeline.data.masks import prepare_image
from pipeline.inference.postprocess import Refiner
from pipeline.inference.slide import SlidingWindow
from pipeline.inference.tta import tta_proba
from pipeline.models.factory import build_model
from pipeline.models.checkpoint import InputSpec, load_checkpoint
from pipeline.devices import autocast

if TYPE_CHECKING:
    from pipeline.config import Infer
    from pipeline.models.checkpoint import ModelSet


def load_member(path: str | Path, device: torch.device, window_batch: int = 8) -> tuple[torch.nn.Module, InputSpec]:
    """A trained model from its checkpoint, in eval mode, and its InputSpec. A model trained on
    crops comes wrapped in SlidingWindow, exactly as the train stage validated it."""
    ck = load_checkpoint(path, device)
    p, spec = ck["params"], InputSpec.of(path, ck)
    model = build_model(p["model"], p["encoder"], None, len(spec.classes))  # weights come from the checkpoint
    model.load_state_dict(ck["model"])
    if spec.window:
        model = SlidingWindow(model, spec.window, spec.overlap, window_batch, spec.whole)
    return model.to(device).eval(), spec


class ImageFiles(Dataset):
    """Items: (image (3, S, S) float32 normalised, index), or (3, H, W) whole images when size is None
    (models trained on crops); `read(i)` gives (H, W, 3) uint8 RGB."""

    def __init__(self, read: Callable[[int], np.ndarray], n: int, size: Optional[int]):
        self.read, self.n, self.size, self.transform = read, n, size, build_transform([], size)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.transform(image=self.read(i))["image"], i


def image_files(images: pd.DataFrame, image_size: Optional[int], max_side: Optional[int]) -> ImageFiles:
    """Model inputs for the rows of `images` (path, height, width), prepared exactly as validation
    images are: prepare_image with the mask cache's max_side, then the validation transform."""
    return ImageFiles(lambda i: prepare_image(images.path[i], images.height[i], images.width[i], max_side),
                      len(images), image_size)


class Ensemble:
    """Members (model, weight); `predict_proba` yields mean softmax probabilities per image, `predict`
    class maps: their argmax, or what `refine` (CRF, fitted post-processing rules) makes of them."""

    def __init__(self, members: list[tuple[torch.nn.Module, float]], views: list[str], scales: list[float],
                 device: torch.device, amp: str = "off", refine: Optional[Refiner] = None,
                 spec: Optional[InputSpec] = None):
        """spec: how its members' inputs are made (the InputSpec they share; from_files reads it from
        the checkpoints)."""
        self.spec = spec
        total = sum(w for _, w in members)
        self.members = [(m, w / total) for m, w in members]
        self.views, self.scales, self.device, self.amp = list(views), list(scales), device, amp
        self.refine = refine if refine is not None and refine.active else None

    @classmethod
    def from_files(cls, members: list[tuple[Path, float]], infer: "Infer", device: torch.device,
                   refine: Optional[Refiner] = None, load: Optional[Callable] = None) -> "Ensemble":
        """The ensemble of checkpoint files (file, weight) with `infer`'s TTA views, scales and amp;
        `spec`: the InputSpec its members share (they must). load(file): a loader that keeps models
        already loaded (default: load_member)."""
        load = load or (lambda f: load_member(f, device, infer.batch_size))
        loaded = [(load(f), w) for f, w in members]
        spec = InputSpec.common([s for (_, s), _ in loaded], ", ".join(sorted({str(f) for f, _ in members})))
        return cls([(m, w) for (m, _), w in loaded], infer.tta, infer.scales, device, infer.amp, refine, spec)

    def proba(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, C, S, S) float32 probabilities."""
        x = x.to(self.device)
        return sum(w * tta_proba(m, x, self.views, self.scales, autocast(self.device, self.amp))
                   for m, w in self.members)

    def predict_proba(self, dataset: ImageFiles, sizes: list[tuple[int, int]], batch_size: int = 8,
                      workers: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (index, (C, H, W) float32 probabilities at sizes[index], bilinear) for every item of
        `dataset` (whole images of differing sizes go one at a time; their windows are batched)."""
        for x, idx in DataLoader(dataset, batch_size if dataset.size else 1, num_workers=workers):
            probs = self.proba(x)
            for p, i in zip(probs, idx.tolist()):
                yield i, at_size(p, sizes[i])

    def predict(self, dataset: ImageFiles, sizes: list[tuple[int, int]], batch_size: int = 8,
                workers: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (index, (H, W) uint8 class map at sizes[index]): the argmax of predict_proba, or refined."""
        for i, p in self.predict_proba(dataset, sizes, batch_size, workers):
            if self.refine is None:
                yield i, p.argmax(0).to(torch.uint8).cpu().numpy()
            else:
                yield i, self.refine(p.cpu().numpy(), lambda i=i: dataset.read(i))


def at_size(p: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) probabilities bilinearly resized to `size` (H, W), as every prediction path does."""
    if tuple(p.shape[-2:]) == tuple(size):
        return p
    return F.interpolate(p[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


def final_ensemble(infer: "Infer", models: "ModelSet", device: torch.device) -> Ensemble:
    """The ensemble the submission and `predict` use: `models` (ModelSet.final: folds x seeds x
    infer.checkpoints of infer.round, fold-weighted) with infer's TTA."""
    return Ensemble.from_files(models.weighted(), infer, device)
