"""One fold's run: the object that carries it (FoldRun), its images (load_fold) and its loaders
(FoldData), and the fingerprint that decides whether a checkpoint may be resumed or reused."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from pipeline.code import import_closure
from pipeline.config import ConfigError, ParamsView
from pipeline.data.augment import build_transform, train_transform
from pipeline.data.dataset import SegDataset, fold_tables, round2_table, worker_init
from pipeline.data.masks import read_classes
from pipeline.evaluation.metrics import ConfusionMatrix, Metric
from pipeline.inference.slide import SlidingWindow
from pipeline.models.checkpoint import InputSpec
from pipeline.workspace import Member, Workspace
from pipeline.training import distributed
from pipeline.training.loop import Evaluation, validate

if TYPE_CHECKING:
    from pipeline.config import Train


@dataclass
class FoldRun:
    """One model being trained: which fold, seed and round; its images; where it writes; how it reports.
    Under torchrun every rank holds one; only rank 0 (`d.main`) has an MLflow run and writes."""
    fold: int
    seed: int
    p: ParamsView
    round2: bool
    classes: list[str]
    train_tab: pd.DataFrame     # mask-index rows it trains on (+ pseudo-labelled ones in round 2)
    val_tab: pd.DataFrame       # its validation fold
    epochs: int
    inputs: list[Path]          # files whose content, with the code, fingerprints the run
    max_side: Optional[int] = None   # the mask cache's cap on the long side (classes.json)
    run: Any = None             # MLflow child run
    d: distributed.Dist = field(default_factory=distributed.Dist)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def ws(self) -> Workspace:
        return Workspace(self.p.paths)

    @property
    def member(self) -> Member:
        """Its folder and files: <models or models_round2>/fold_<k>/seed_<s>/."""
        return self.ws.member(self.fold, self.seed, 2 if self.round2 else 1)

    @property
    def out(self) -> Path:
        return self.member.dir

    @property
    def name(self) -> str:
        return f"fold {self.fold} seed {self.seed}"

    @property
    def tag(self) -> str:
        return "train_round2" if self.round2 else "train"

    def identity(self) -> dict[str, str]:
        """What a checkpoint must match to be resumed or reused: params, fold, seed, data and code."""
        return {**{k: str(v) for k, v in self.p.flat().items() if k not in ("train.folds", "train.seeds")},
                "fold": str(self.fold), "seed": str(self.seed), "data": fingerprint(*self.inputs),
                "round": "2" if self.round2 else "1"}

    def evaluation(self) -> Evaluation:
        t = self.p.train
        return Evaluation(len(self.classes), self.device, t.amp, t.channels_last, Metric.of(self.p.metric))

    def input_spec(self) -> dict:
        """How this run's inputs are made (InputSpec), as checkpoints store it."""
        t = self.p.train
        crop = t.input == "crop"
        return InputSpec(tuple(self.classes), self.max_side, t.eval_size, t.image_size if crop else None,
                         t.slide_overlap if crop else 0.0, crop and t.crop_infer == "whole").to_dict()

    def log(self, rows: list[dict]) -> None:
        for row in rows if self.run else []:
            self.run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row.get("epoch"))

    def say(self, message: str) -> None:
        if self.d.main:
            print(message, flush=True)


def load_fold(fold: int, seed: int, p: ParamsView, round2: bool) -> FoldRun:
    """The fold's images and the files that fingerprint it (round 2 adds its pseudo-labels and round 1's model)."""
    ws = Workspace(p.paths)   # class names and every image's content (digests), then the folds
    train_tab, val_tab = fold_tables(ws.masks, ws.split, fold)
    epochs, inputs = p.train.epochs, [ws.mask_index, ws.classes_json, ws.folds_csv]
    if round2:
        folds = pd.read_csv(ws.folds_csv)
        train_tab = round2_table(train_tab, ws.pseudo_index(fold), set(val_tab.key), set(folds.key[folds.holdout]))
        epochs, inputs = p.pseudo.epochs, inputs + [ws.pseudo_index(fold), ws.member(fold, seed).checkpoint("best")]
    cache = read_classes(ws.masks)
    return FoldRun(fold, seed, p, round2, cache["classes"], train_tab, val_tab, epochs, inputs,
                   max_side=cache.get("max_side"))


class FoldData:
    """The fold's loaders. Training: one seeded permutation per epoch cut into global batches, each
    rank taking its share; images resized whole or cropped at random scales (train.input).
    Validation: all images (reports, SWA) and this rank's shard, resized as in training or whole and
    seen through sliding windows — exactly as inference will see them."""

    def __init__(self, f: FoldRun):
        t, d = f.p.train, f.d
        self.f, self.gen = f, torch.Generator().manual_seed(f.seed)
        pixels = f.train_tab[[f"px_{c}" for c in range(len(f.classes))]].sum().to_numpy()
        paste = paste_class_ids(t.copy_paste_classes, f.classes, pixels)
        donors = [i for i, row in f.train_tab.iterrows() if any(row[f"px_{c}"] > 0 for c in paste)]
        self.train_ds = SegDataset(f.train_tab, train_transform(t, f.seed), t.copy_paste, paste, donors, f.seed)
        self.sampler = DistributedSampler(self.train_ds, d.world, d.rank, shuffle=True, seed=f.seed)
        opts = dict(num_workers=t.workers, pin_memory=f.device.type == "cuda", persistent_workers=t.workers > 0)
        self.train_dl = DataLoader(self.train_ds, t.batch_size // d.world, sampler=self.sampler, generator=self.gen,
                                   drop_last=len(self.train_ds) > t.batch_size, worker_init_fn=worker_init, **opts)
        self.eval_batch = t.batch_size if t.eval_size else 1   # whole images differ in size
        val_ds = SegDataset(f.val_tab, build_transform([], t.eval_size))
        self.val_dl = DataLoader(val_ds, self.eval_batch, **opts)
        self.shard = DataLoader(Subset(val_ds, range(d.rank, len(val_ds), d.world)), self.eval_batch, **opts)

    def epoch(self, epoch: int) -> DataLoader:
        """The training loader for `epoch`: its order and augmentations depend on the seed and epoch alone."""
        seed = self.f.seed * 1000 + epoch
        self.gen.manual_seed(seed)
        self.sampler.set_epoch(epoch)
        self.train_ds.reseed(seed)
        return self.train_dl

    def validate(self, net: torch.nn.Module, loss_fn) -> tuple[float, ConfusionMatrix, torch.Tensor]:
        """Validation over every rank's shard: summed confusion, mean loss and every image's own
        confusion (N, C, C) — as one process would."""
        f, t = self.f, self.f.p.train
        loss, cm, _, per_image = validate(as_validated(net, t), self.shard, f.val_tab, loss_fn, f.evaluation())
        n = len(self.shard.dataset)
        total = f.d.sum(torch.tensor([loss * n, n], dtype=torch.float64))
        cm.mat = f.d.sum(cm.mat)
        return float(total[0] / max(total[1], 1)), cm, f.d.sum(per_image)


def as_validated(net: torch.nn.Module, t: "Train") -> torch.nn.Module:
    """The model as validation and inference run it: itself, or over sliding windows if it trained on crops."""
    if t.input != "crop":
        return net
    return SlidingWindow(net, t.image_size, t.slide_overlap, t.batch_size, t.crop_infer == "whole")


def training_code() -> list[Path]:
    """The files of the training code: pipeline/training/run.py and everything it imports."""
    run = Path(__file__).with_name("run.py")
    return sorted({run} | import_closure(run))


def paste_class_ids(names: Optional[list[str]], classes: list[str], pixels: np.ndarray) -> list[int]:
    """Class ids to copy-paste: the named ones, or the rarest third of present classes by pixels."""
    if names is not None:
        missing = sorted(set(names) - set(classes[1:]))
        if missing:
            raise ConfigError(f"train.copy_paste_classes: unknown class(es) {missing}; classes are {classes[1:]}")
        return [classes.index(n) for n in names]
    present = [c for c in range(1, len(classes)) if pixels[c] > 0]
    return sorted(present, key=lambda c: pixels[c])[: max(1, len(present) // 3)]


def fingerprint(*files: Path) -> str:
    """What the run was trained on, and with which code: a checkpoint from other data or other
    training code is never resumed or reused. The index files name every image and mask with a
    digest of their content, so hashing them covers the pixels without rereading them. The code is
    the training entry's import closure: editing the report or the leaderboard retrains nothing."""
    h = hashlib.md5()
    for f in [*files, *training_code()]:
        h.update(Path(f).read_bytes())
    return h.hexdigest()
