"""The training loop: one epoch of training, one pass of validation. Nothing else lives here."""
from __future__ import annotations

import contextlib
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline.data.dataset import full_masks
from pipeline.data.mix import cutmix
from pipeline.devices import autocast
from pipeline.evaluation.metrics import ConfusionMatrix, Metric


def _bar(it, desc: str, total: int):
    return tqdm(it, desc=desc, total=total, leave=False, disable=not sys.stderr.isatty(), dynamic_ncols=True)


@dataclass
class Step:
    """What one training micro-batch needs: the model and its loss, the optimizer with its schedule
    and AMP scaler, and how batches are treated. `__call__` runs one micro-batch (forward, backward,
    and every `accumulate` micro-batches an optimizer step, then `after_step`: an EMA update)."""
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    opt: torch.optim.Optimizer
    schedule: Any
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: str = "off"
    accumulate: int = 1
    clip_grad: Optional[float] = None
    cutmix: float = 0.0
    channels_last: bool = False
    sides: Optional[list[int]] = None            # multi-scale training: one side drawn per batch
    after_step: Optional[Callable[[], None]] = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rng, steps: bool) -> torch.Tensor:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.sides:
            x, y = rescale(x, y, int(self.sides[rng.integers(len(self.sides))]))
        if self.cutmix:
            cutmix(x, y, rng, self.cutmix)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Under DDP, gradients are all-reduced only on the micro-batch that steps.
        with contextlib.nullcontext() if steps or not hasattr(self.model, "no_sync") else self.model.no_sync():
            with autocast(self.device, self.amp):
                logits = self.model(x)
            loss = self.loss_fn(logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()}")
            self.scaler.scale(loss / self.accumulate).backward()
        if steps:
            if self.clip_grad:
                self.scaler.unscale_(self.opt)  # clip the true gradients, not the fp16-scaled ones
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
            self.schedule.step_batch()
            if self.after_step is not None:
                self.after_step()
        return loss


def train_one_epoch(step: Step, loader, rng=None, desc: str = "train") -> dict[str, float]:
    """One pass over `loader`; returns mean loss (and each loss term) per image."""
    step.model.train()
    sums, n = defaultdict(float), 0
    step.opt.zero_grad(set_to_none=True)
    for i, (x, y, _) in enumerate(_bar(loader, desc, len(loader))):
        try:
            loss = step(x, y, rng, (i + 1) % step.accumulate == 0 or i + 1 == len(loader))
        except FloatingPointError as e:
            raise FloatingPointError(f"{desc}: {e} at batch {i}; the last good checkpoint is kept") from None
        sums["loss"] += loss.item() * len(x)
        for k, v in step.loss_fn.last.items():
            sums[f"loss/{k}"] += v * len(x)
        n += len(x)
    return {k: v / max(n, 1) for k, v in sums.items()}


def rescale(x: torch.Tensor, y: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch resized to side x side: images bilinear, masks nearest (labels stay labels, 255 stays ignored)."""
    if tuple(x.shape[-2:]) == (side, side):
        return x, y
    x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    y = F.interpolate(y[:, None].float(), size=(side, side), mode="nearest")[:, 0].to(y.dtype)
    return x, y


@dataclass(frozen=True)
class Evaluation:
    """How validation runs: classes counted, device, autocast, memory format, the metric's counting."""
    num_classes: int
    device: torch.device
    amp: str = "off"
    channels_last: bool = False
    metric: Metric = field(default_factory=Metric)


@torch.no_grad()
def validate(model, loader, table, loss_fn, ev: Evaluation,
             keep=()) -> tuple[float, ConfusionMatrix, dict[int, np.ndarray], torch.Tensor]:
    """Loss at model resolution; confusion matrix at each cached mask's own resolution (softmax
    probabilities upsampled bilinearly, exactly as inference does), so the score does not depend on
    train.image_size and inference reproduces it.
    Returns (mean loss, confusion matrix, {row index: (H, W) uint8 prediction} for rows in `keep`,
    (len(table), C, C) int64 per-image confusions: zeros for rows the loader does not hold).
    ev.metric counts at its size (metric.size 256: both maps resized to 256 x 256 first)."""
    metric, num_classes, device = ev.metric, ev.num_classes, ev.device
    model.eval()
    cm = ConfusionMatrix(num_classes)
    per_image = torch.zeros(len(table), num_classes, num_classes, dtype=torch.int64)
    kept: dict[int, np.ndarray] = {}
    loss_sum, n = 0.0, 0
    for x, y, idx in _bar(loader, "val", len(loader)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if ev.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, ev.amp):
            logits = model(x)
        loss_sum += loss_fn(logits, y).item() * len(x)
        n += len(x)
        for prob, full, i in zip(logits.float().softmax(1), full_masks(table, idx), idx.tolist()):
            if prob.shape[-2:] != full.shape:   # probabilities, as the ensembles upsample them
                prob = F.interpolate(prob[None], size=full.shape, mode="bilinear", align_corners=False)[0]
            pred = prob.argmax(0).to(torch.uint8).cpu()
            per_image[i] = metric.count(pred.numpy(), full, num_classes)
            cm.merge(per_image[i])
            if i in keep:
                kept[i] = pred.numpy()
    return loss_sum / max(n, 1), cm, kept, per_image
