"""Checkpoints: plain tensors and Python values only, so they load with weights_only=True.

A checkpoint carries the class names and the params it was trained with, and everything needed to
resume: optimizer, schedule, AMP scaler, epoch, history, best score and RNG state.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(path: str | Path, **state: Any) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load without unpickling arbitrary objects (safe for checkpoints from strangers)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def member_dir(models_dir: str | Path, fold: int, seed: int) -> Path:
    """Where one trained model lives: <models>/fold_<k>/seed_<s>/ (stage train@<k>-<s>)."""
    return Path(models_dir) / f"fold_{fold}" / f"seed_{seed}"


def member_name(fold: int, seed: int) -> str:
    """The file stem of a model's metrics and history: fold_<k>_seed_<s>."""
    return f"fold_{fold}_seed_{seed}"
