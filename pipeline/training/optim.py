"""Optimizers and learning-rate schedules by name; the EMA's averaging rule.

Parameter groups: encoder vs everything else (decoder, head, skip scorers...), each split into
decayed weights and undecayed biases/norm parameters. `param_groups` checks that every trainable
parameter lands in exactly one group — forgetting the decoder (the team notes' bug: only
`model.encoder.parameters()` passed to Adam) fails loudly instead of silently not training it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
from timm.optim import create_optimizer_v2
from torch import nn

if TYPE_CHECKING:
    from pipeline.config import Train
from torch.optim.lr_scheduler import (CosineAnnealingLR, LinearLR, LRScheduler, OneCycleLR, PolynomialLR,
                                      ReduceLROnPlateau, SequentialLR)

OPTIMIZERS = {"adamw": "adamw", "sgd": "sgd", "radam": "radam", "adamp": "adamp"}  # params name -> timm name


def param_groups(model: nn.Module, encoder: nn.Module, lr: float, encoder_lr: float,
                 weight_decay: float) -> list[dict]:
    """Four groups (encoder/rest x decay/no-decay) covering each trainable parameter exactly once."""
    enc_ids = {id(p) for p in encoder.parameters()}
    groups = {(e, d): [] for e in (True, False) for d in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias")
        groups[(id(p) in enc_ids, not no_decay)].append(p)
    out = [{"params": ps, "lr": encoder_lr if enc else lr, "weight_decay": weight_decay if decay else 0.0,
            "name": f"{'encoder' if enc else 'decoder'}{'' if decay else '_no_decay'}"}
           for (enc, decay), ps in groups.items() if ps]
    check_groups(model, out)
    return out


def check_groups(model: nn.Module, groups: list[dict]) -> None:
    """Raise if a trainable parameter is in no group, or in more than one."""
    seen: dict[int, int] = {}
    for g in groups:
        for p in g["params"]:
            seen[id(p)] = seen.get(id(p), 0) + 1
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    twice = [n for n, p in model.named_parameters() if seen.get(id(p), 0) > 1]
    if missing or twice:
        raise ValueError(f"optimizer groups: {len(missing)} trainable parameters in no group (e.g. {missing[:3]}), "
                         f"{len(twice)} in several (e.g. {twice[:3]})")


def build_optimizer(model: nn.Module, encoder: nn.Module, t: "Train") -> torch.optim.Optimizer:
    """t.optimizer over every parameter in groups (encoder at t.encoder_lr, the rest at t.lr; no weight
    decay on norms and biases), wrapped in Lookahead when t.lookahead."""
    name, lr, weight_decay, lookahead = t.optimizer, t.lr, t.weight_decay, t.lookahead
    encoder_lr = t.encoder_lr
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(sorted(OPTIMIZERS))}")
    groups = param_groups(model, encoder, lr, encoder_lr or lr, weight_decay)
    opt = ("lookahead_" if lookahead else "") + OPTIMIZERS[name]
    kwargs = {"momentum": 0.9, "nesterov": True} if name == "sgd" else {}
    return create_optimizer_v2(groups, opt=opt, lr=lr, weight_decay=weight_decay, **kwargs)


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


def use_slow_weights(opt: torch.optim.Optimizer) -> None:
    """With Lookahead, make the model's weights the slow ones before it is validated or saved
    (timm's own recipe, once per epoch); the fast weights are a probe, not the model. No-op otherwise."""
    if hasattr(opt, "sync_lookahead"):
        opt.sync_lookahead()


@dataclass
class Schedule:
    """A per-batch scheduler and, for plateau, a per-epoch one stepped on validation mIoU."""

    per_batch: Optional[LRScheduler]
    per_epoch: Optional[ReduceLROnPlateau] = None
    warmup_steps: int = 0
    steps: int = 0

    def step_batch(self) -> None:
        self.steps += 1
        if self.per_batch is not None and (self.per_epoch is None or self.steps <= self.warmup_steps):
            self.per_batch.step()

    def step_epoch(self, val_miou: float) -> None:
        if self.per_epoch is not None and self.steps >= self.warmup_steps:
            self.per_epoch.step(val_miou)

    def state_dict(self) -> dict:
        return {"steps": self.steps,
                "per_batch": self.per_batch.state_dict() if self.per_batch else None,
                "per_epoch": self.per_epoch.state_dict() if self.per_epoch else None}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        if self.per_batch is not None:
            self.per_batch.load_state_dict(state["per_batch"])
        if self.per_epoch is not None:
            self.per_epoch.load_state_dict(state["per_epoch"])


def _warm(opt, warmup: int) -> LinearLR:
    return LinearLR(opt, start_factor=1e-3, end_factor=1.0, total_iters=max(warmup, 1))


def _then(opt, warmup: int, after: LRScheduler) -> LRScheduler:
    return SequentialLR(opt, [_warm(opt, warmup), after], milestones=[warmup]) if warmup else after


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer, int, int], Schedule]] = {
    "cosine": lambda opt, total, warmup: Schedule(
        _then(opt, warmup, CosineAnnealingLR(opt, T_max=max(total - warmup, 1), eta_min=0.0)), warmup_steps=warmup),
    "poly": lambda opt, total, warmup: Schedule(
        _then(opt, warmup, PolynomialLR(opt, total_iters=max(total - warmup, 1), power=0.9)), warmup_steps=warmup),
    "onecycle": lambda opt, total, warmup: Schedule(
        OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=max(total, 2),
                   pct_start=min(max(warmup / max(total, 1), 0.01), 0.99), anneal_strategy="cos",
                   cycle_momentum=False), warmup_steps=warmup),
    "plateau": lambda opt, total, warmup: Schedule(
        _warm(opt, warmup) if warmup else None, ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=1),
        warmup_steps=warmup),
}


def build_schedule(opt: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int) -> Schedule:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; available: {', '.join(sorted(SCHEDULERS))}")
    return SCHEDULERS[name](opt, total_steps, min(warmup_steps, max(total_steps - 1, 0)))
