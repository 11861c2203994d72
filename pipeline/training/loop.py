"""The training loop: one epoch of training, one pass of validation. Nothing else lives here."""
from __future__ import annotations

import contextlib
import sys
from collections import defaultdict

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


def train_one_epoch(model, loader, loss_fn, opt, schedule, scaler, device, amp="off", accumulate=1,
                    clip_grad=None, cutmix_p=0.0, rng=None, channels_last=False, desc="train", ema=None,
                    sides=None) -> dict[str, float]:
    """One pass over `loader`; returns mean loss (and each loss term) per image.
    ema: an AveragedModel updated after every optimizer step; sides: input sides (multi-scale
    training), one drawn per batch from `rng`, the batch resized to it (masks nearest)."""
    model.train()
    sums, n = defaultdict(float), 0
    opt.zero_grad(set_to_none=True)
    for i, (x, y, _) in enumerate(_bar(loader, desc, len(loader))):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if sides:
            x, y = rescale(x, y, int(sides[rng.integers(len(sides))]))
        if cutmix_p:
            cutmix(x, y, rng, cutmix_p)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        step = (i + 1) % accumulate == 0 or i + 1 == len(loader)
        # Under DDP, gradients are all-reduced only on the micro-batch that steps.
        with contextlib.nullcontext() if step or not hasattr(model, "no_sync") else model.no_sync():
            with autocast(device, amp):
                logits = model(x)
            loss = loss_fn(logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss is {loss.item()} at batch {i}; the last good checkpoint is kept")
            scaler.scale(loss / accumulate).backward()
        if step:
            if clip_grad:
                scaler.unscale_(opt)  # clip the true gradients, not the fp16-scaled ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            schedule.step_batch()
            if ema is not None:
                ema.update_parameters(model)
        sums["loss"] += loss.item() * len(x)
        for k, v in loss_fn.last.items():
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


@torch.no_grad()
def validate(model, loader, table, loss_fn, num_classes, device, amp="off", channels_last=False,
             keep=(), metric: Metric | None = None) -> tuple[float, ConfusionMatrix, dict[int, np.ndarray], torch.Tensor]:
    """Loss at model resolution; confusion matrix at each cached mask's own resolution (softmax
    probabilities upsampled bilinearly, exactly as inference does), so the score does not depend on
    train.image_size and inference reproduces it.
    Returns (mean loss, confusion matrix, {row index: (H, W) uint8 prediction} for rows in `keep`,
    (len(table), C, C) int64 per-image confusions: zeros for rows the loader does not hold).
    metric: counts at its size (metric.size 256: both maps resized to 256 x 256 first)."""
    metric = metric or Metric()
    model.eval()
    cm = ConfusionMatrix(num_classes)
    per_image = torch.zeros(len(table), num_classes, num_classes, dtype=torch.int64)
    kept: dict[int, np.ndarray] = {}
    loss_sum, n = 0.0, 0
    for x, y, idx in _bar(loader, "val", len(loader)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
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
