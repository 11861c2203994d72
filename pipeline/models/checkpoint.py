"""Checkpoints: plain tensors and Python values only, so they load with weights_only=True.

A checkpoint carries the class names and the params it was trained with, and everything needed to
resume: optimizer, schedule, AMP scaler, epoch, history, best score and RNG state.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.config import ConfigError
from pipeline.data.augment import NORMALISE
from pipeline.io import atomic_file


def save_checkpoint(path: str | Path, **state: Any) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load without unpickling arbitrary objects (safe for checkpoints from strangers)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def member_dir(models_dir: str | Path, fold: int, seed: int) -> Path:
    """Where one trained model lives: <models>/fold_<k>/seed_<s>/ (stage train@<k>-<s>)."""
    return Path(models_dir) / f"fold_{fold}" / f"seed_{seed}"


def member_name(fold: int, seed: int) -> str:
    """The file stem of a model's metrics and history: fold_<k>_seed_<s>."""
    return f"fold_{fold}_seed_{seed}"


@dataclass(frozen=True)
class InputSpec:
    """How a model's inputs were made, carried in its checkpoint so that predict, submit, oof,
    pseudo and the MLflow model prepare images exactly as training did — never from today's params."""
    classes: tuple[str, ...]
    max_side: Optional[int]      # the mask cache's cap on the long side (masks.max_side when trained)
    eval_size: Optional[int]     # square side validation resized to; None: whole images, sliding windows
    window: Optional[int]        # sliding-window side (a model trained on crops), else None
    overlap: float = 0.0         # sliding windows' overlap
    whole: bool = False          # crop-trained but run on the whole image at once (train.crop_infer)
    normalise: tuple = NORMALISE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(**{**d, "classes": tuple(d["classes"]),
                      "normalise": tuple(tuple(v) for v in d.get("normalise", NORMALISE))})

    @classmethod
    def of(cls, path: str | Path, ck: dict) -> "InputSpec":
        if "input_spec" not in ck:
            raise ConfigError(f"{path}: the checkpoint has no input spec (written by an older release); "
                              "retrain it with `dvc repro`")
        return cls.from_dict(ck["input_spec"])

    def check(self, where: str, **now: Any) -> None:
        """Stop, naming both values, if today's params/mask cache disagree with how the model was
        trained (eval_size=..., max_side=..., classes=...): a silent resize would score garbage."""
        wrong = [f"{k}: trained with {getattr(self, k)!r}, now {v!r}" for k, v in now.items()
                 if (tuple(v) if k == "classes" else v) != getattr(self, k)]
        if wrong:
            raise ConfigError(f"{where}: the models were trained on other inputs than params.yaml and the mask "
                              f"cache now describe ({'; '.join(wrong)}); rerun training (`dvc repro`) or restore "
                              "those params")

    @staticmethod
    def common(specs: list["InputSpec"], where: str) -> "InputSpec":
        """The one spec every ensemble member shares; members prepared differently cannot be averaged."""
        if any(s != specs[0] for s in specs[1:]):
            raise ConfigError(f"{where}: the ensemble's members were trained on differently prepared inputs "
                              f"({sorted(set(map(str, specs)))}); retrain them with one configuration")
        return specs[0]
