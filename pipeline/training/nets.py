"""What a fold trains: its network, its loss, the EMA's averaging rule, the seeds."""
from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch

from pipeline.config import NO_CLASS_WEIGHTS
from pipeline.models.factory import build_model
from pipeline.models.losses import build_loss, class_weights_from_pixels
from pipeline.training import distributed
from pipeline.training.fold import FoldRun


def build_net(f: FoldRun, weights: Optional[dict] = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model, what trains it: DDP- and torch.compile-wrapped as params say; same parameters).
    weights: a state dict to start from (round 2: round 1's best)."""
    t = f.p.train
    model = build_model(f.p.model, f.p.encoder, f.p.encoder_weights, len(f.classes)).to(f.device)
    if weights is not None:
        model.load_state_dict(weights)
    if t.dropout is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.dropout._DropoutNd):
                m.p = t.dropout
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trained = distributed.wrap(model, f.d, f.device)  # DDP when distributed; `model` stays the plain module
    return model, torch.compile(trained) if t.compile else trained


def build_fold_loss(f: FoldRun) -> torch.nn.Module:
    t, n_cls = f.p.train, len(f.classes)
    pixels = f.train_tab[[f"px_{c}" for c in range(n_cls)]].sum().to_numpy()
    cw = class_weights_from_pixels(torch.tensor(pixels.astype(np.int64)), t.class_weights)
    unweighted = sorted(n for n, w in t.loss.items() if w > 0 and n in NO_CLASS_WEIGHTS)
    if cw is not None and unweighted:
        f.say(f"note: train.class_weights {t.class_weights!r} apply to every loss but {', '.join(unweighted)}")
    return build_loss(t.loss, cw.to(f.device) if cw is not None else None, t.boundary_width,
                      t.boundary_weight).to(f.device)


def ema_average(decay: float, warmup: bool):
    """AveragedModel's multi-average function for an EMA: each update moves the average 1 - d of the way
    to the model, d = decay, or with warmup min(decay, (1 + n) / (10 + n)) at update n (TensorFlow's
    ExponentialMovingAverage num_updates ramp), so early averages are not dominated by random init.
    Integer buffers (BN's num_batches_tracked) are copied: torch's get_ema_multi_avg_fn would round
    a blend of counts instead."""
    @torch.no_grad()
    def average(ema_params, params, n_averaged):
        if not torch.is_floating_point(ema_params[0]):
            torch._foreach_copy_(ema_params, params)
            return
        n = int(n_averaged)
        torch._foreach_lerp_(ema_params, params, 1.0 - (min(decay, (1.0 + n) / (10.0 + n)) if warmup else decay))
    return average


def seed_everything(seed: int, deterministic: bool) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
