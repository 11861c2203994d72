"""Checkpoints: plain tensors and Python values only, so they load with weights_only=True.

A checkpoint carries the class names and the params it was trained with, and everything needed to
resume: optimizer, schedule, AMP scaler, epoch, history, best score and RNG state.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from pipeline.config import ConfigError
from pipeline.data.coco import DataError
from pipeline.io import write_bytes
from pipeline.labels import NORMALISE
from pipeline.workspace import Member, Workspace

if TYPE_CHECKING:
    from pipeline.config import Infer, Train


DIGEST = "digest"   # every checkpoint's own key: sha256 of the rest of its contents (content_digest)


class CheckpointError(DataError):
    """A checkpoint that cannot be trusted (damaged, truncated, or written without a digest)."""


class UnverifiedCheckpoint(CheckpointError):
    """A checkpoint with no digest: written by an older release (or not by this pipeline)."""


def content_digest(state: Any) -> str:
    """sha256 over a checkpoint's contents: every tensor's dtype, shape and bytes and every plain
    value, keys in sorted order — the same for a state and for what torch.load gives back."""
    h = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
            h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
        elif isinstance(obj, dict):
            h.update(f"D{len(obj)}".encode())
            for k in sorted(obj, key=repr):
                feed(k)
                feed(obj[k])
        elif isinstance(obj, (list, tuple)):
            h.update(f"L{len(obj)}".encode())
            for v in obj:
                feed(v)
        else:
            h.update(f"V{type(obj).__name__}:{obj!r};".encode())

    feed(state)
    return h.hexdigest()


def save_checkpoint(path: str | Path, **state: Any) -> None:
    """Write atomically (a crash mid-write leaves the previous checkpoint intact) with the digest of
    its contents inside. Serialised in memory first: torch.save to a file names its archive after
    the (temporary) file, so an identical retrain would not give identical bytes; and a full disk
    is then one line naming the file (io.WriteFailed), not a C++ stream error."""
    state[DIGEST] = content_digest(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes(path, buf.getbuffer())


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: damaged checkpoint ({why}); it was not used. Restore it with "
                           f"`dvc checkout -f {path}` (if DVC has it cached), or delete it and run `dvc repro` "
                           "to train it again")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load without unpickling arbitrary objects (safe for checkpoints from strangers), and only if
    its contents match the digest written with them: a damaged or truncated file is a
    CheckpointError naming the file and what to do, never weights used silently."""
    path = Path(path)
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:   # a truncated or garbled archive: torch says so without the path
        why = str(e).split(". ")[0].splitlines()[0][:160] if str(e) else type(e).__name__
        raise _damaged(path, f"unreadable: {why}") from None
    if not isinstance(ck, dict) or DIGEST not in ck:
        raise UnverifiedCheckpoint(f"{path}: the checkpoint has no digest (written by an older release, or not by "
                                   "this pipeline), so it cannot be checked; delete it and run `dvc repro` to train it again")
    digest = ck.pop(DIGEST)
    if content_digest(ck) != digest:
        raise _damaged(path, "its contents do not match the digest written with them")
    return ck


def verify_checkpoints(paths) -> None:
    """Check each checkpoint file against its digest (CheckpointError on the first bad one)."""
    for p in paths:
        load_checkpoint(p)


@dataclass(frozen=True)
class ModelRef:
    """One trained model on disk: a models folder's fold, seed and checkpoint (best | last | swa | ema)."""
    dir: Path
    fold: int
    seed: int
    checkpoint: str = "best"

    @property
    def path(self) -> Path:
        return Member.of(self.dir, self.fold, self.seed).checkpoint(self.checkpoint)


@dataclass(frozen=True)
class ModelSet:
    """Trained models that travel together: a models folder, its folds x seeds, the checkpoints used
    of each, and the folds' weights (the final ensemble's infer.fold_weights; None = equal)."""
    dir: Path
    folds: tuple[int, ...]
    seeds: tuple[int, ...]
    checkpoints: tuple[str, ...] = ("best",)
    weights: Optional[tuple[float, ...]] = None

    @classmethod
    def final(cls, infer: "Infer", train: "Train", ws: Workspace) -> "ModelSet":
        """The final ensemble's models: infer.round's folder, train.folds x train.seeds x infer.checkpoints."""
        return cls(ws.models(infer.round), tuple(train.folds), tuple(train.seeds), tuple(infer.checkpoints),
                   tuple(fold_weights(train.folds, infer.fold_weights)))

    def member(self, fold: int, seed: int) -> Member:
        return Member.of(self.dir, fold, seed)

    def refs(self) -> list[ModelRef]:
        """Every model of the set: folds x seeds x checkpoints, fold-major."""
        return [ModelRef(self.dir, k, s, c) for k in self.folds for s in self.seeds for c in self.checkpoints]

    def files(self) -> list[Path]:
        """Checkpoint files of folds x seeds x checkpoints (in that order); an error names the missing ones."""
        paths = [r.path for r in self.refs()]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise DataError(f"missing checkpoints {missing}: run the train stages first")
        return paths

    def weighted(self) -> list[tuple[Path, float]]:
        """(checkpoint file, its fold's weight) of every member."""
        w = dict(zip(self.folds, self.weights or [1.0] * len(self.folds)))
        return [(f, w[r.fold]) for f, r in zip(self.files(), self.refs())]

    def exists(self) -> bool:
        return all(r.path.exists() for r in self.refs())

    def only(self, folds=None, seeds=None, checkpoints=None) -> "ModelSet":
        """The same models restricted to some folds, seeds or checkpoints (fold weights dropped)."""
        return replace(self, folds=tuple(folds or self.folds), seeds=tuple(seeds or self.seeds),
                       checkpoints=tuple(checkpoints or self.checkpoints), weights=None)


def fold_weights(folds: list[int], weights: Optional[list[float]]) -> list[float]:
    if weights is None:
        return [1.0] * len(folds)
    if len(weights) != len(folds) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"infer.fold_weights {weights} must be {len(folds)} non-negative numbers, not all 0")
    return list(weights)


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
