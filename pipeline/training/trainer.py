"""The Trainer: one fold and seed's training run, top to bottom in one class.

Like nnU-Net's trainer, the class is the recipe and its methods are the run:

    setup            seed; build the model, loss, optimizer, schedule, loaders, averages; read last.pt
    train            each epoch: train_epoch (train_step per micro-batch), validate (validation_step
                     per batch), keep_best (best.pt), end_epoch (SWA, history, last.pt)
    average          each of SWA, EMA: average_model -> <name>.pt and val_confusion_<name>.npy
    finish           write_reports: the best checkpoint's scores, plots and metrics

A variant overrides one method: round 2 (`Round2Trainer`) starts from round 1's weights
(`initial_weights`) and keeps no weight averages (`build_averages`).

The run state, saved in last.pt after every step that costs time (epochs: every
runtime.save_every_s), is one of

    training  -> averaging (SWA, EMA; skipped when there are none) -> finishing -> done

A run killed in any state resumes in it: saved epochs are never retrained, a finished average
never recomputed. `done` is reused as is (its reports are written again: DVC removed them).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections import defaultdict

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from pipeline import entrypoint
from pipeline.config import ConfigError
from pipeline.data.augment import build_transform, train_transform
from pipeline.data.dataset import SegDataset, full_masks, worker_init
from pipeline.data.masks import read_image
from pipeline.data.mix import cutmix
from pipeline.devices import autocast
from pipeline.evaluation.metrics import ConfusionMatrix, Metric, flat_scores, scores, worst_per_class
from pipeline.evaluation.plots import plot_confusion, plot_curves, plot_gallery, plot_iou, write_image_scores
from pipeline.inference.slide import SlidingWindow
from pipeline.io import atomic_file, write_json
from pipeline.models.checkpoint import UnverifiedCheckpoint, load_checkpoint, save_checkpoint, verify_checkpoints
from pipeline.models.factory import build_model, encoder_of
from pipeline.models.losses import NO_CLASS_WEIGHTS, build_loss, class_weights_from_pixels
from pipeline.training import distributed
from pipeline.training.fold import FoldJob, paste_class_ids
from pipeline.training.optim import build_optimizer, build_schedule, ema_average, use_slow_weights

STATES = ("training", "averaging", "finishing", "done")
EPOCH_S = "time/epoch_s"   # a history row's wall seconds: kept beside last.pt, not in it (Member.epoch_seconds)


class Trainer:
    def __init__(self, job: FoldJob):
        self.job, self.train_params, self.dist, self.device = job, job.params.train, job.dist, job.device
        self.state, self.epoch, self.history, self.best_metric = "training", 0, [], -1.0
        self.averaged: list[str] = []   # the averages already validated and saved
        self.scores: dict = {}          # the best checkpoint's, once finished
        self.reused = False             # a finished run: its files stay byte for byte (DVC sees nothing changed)
        self.saved_at = time.monotonic()  # when last.pt was last written (runtime.save_every_s)

    def fit(self) -> dict:
        """Run (or resume) the states to `done`; return the best checkpoint's scores."""
        self.setup()
        run_state = {"training": self.train, "averaging": self.average, "finishing": self.finish}
        while self.state != "done":
            run_state[self.state]()
        return self.scores

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        job, tp = self.job, self.train_params
        if tp.batch_size % self.dist.world:
            raise ConfigError(f"train.batch_size {tp.batch_size} must be a multiple of the {self.dist.world} processes")
        seed_everything(job.seed, tp.deterministic)
        self.model, self.trained_model = self.build_model()
        self.loss_fn = self.build_loss()
        self.optimizer = build_optimizer(self.model, encoder_of(self.model), tp)
        self.build_loaders()
        steps = math.ceil(len(self.train_loader) / tp.accumulate)
        self.schedule = build_schedule(self.optimizer, tp.scheduler, steps * job.epochs, round(tp.warmup_epochs * steps))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda" and tp.amp == "fp16")
        self.averages = self.build_averages()
        self.sides = [tp.batch_side(s) for s in tp.scales] if tp.scales else None   # multi-scale: one per batch
        self.metric = Metric.of(job.params.metric)
        self.restore(self.read_last())

    def initial_weights(self) -> dict | None:
        """A state dict to start from (round 2: round 1's best); None: the encoder's own initialisation."""
        return None

    def build_model(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(the model, what trains it: DDP- and torch.compile-wrapped as params say; same parameters)."""
        job, tp = self.job, self.train_params
        weights = self.initial_weights()
        model = build_model(job.params.model, job.params.encoder, job.params.encoder_weights,
                            len(job.classes)).to(self.device)
        if weights is not None:
            model.load_state_dict(weights)
        if tp.dropout is not None:
            for m in model.modules():
                if isinstance(m, torch.nn.modules.dropout._DropoutNd):
                    m.p = tp.dropout
        if tp.channels_last:
            model = model.to(memory_format=torch.channels_last)
        trained = distributed.wrap(model, self.dist, self.device)  # DDP when distributed; `model` stays the plain module
        return model, torch.compile(trained) if tp.compile else trained

    def build_loss(self) -> torch.nn.Module:
        """params' weighted sum of losses, class-weighted by the training images' pixel counts."""
        job, tp = self.job, self.train_params
        cw = class_weights_from_pixels(torch.tensor(self.class_pixels().astype(np.int64)), tp.class_weights)
        unweighted = sorted(n for n, w in tp.loss.items() if w > 0 and n in NO_CLASS_WEIGHTS)
        if cw is not None and unweighted:
            job.say(f"note: train.class_weights {tp.class_weights!r} apply to every loss but {', '.join(unweighted)}")
        return build_loss(tp.loss, cw.to(self.device) if cw is not None else None, tp.boundary_width,
                          tp.boundary_weight).to(self.device)

    def class_pixels(self) -> np.ndarray:
        """(C,) int64 pixels of each class over the training images."""
        return self.job.train_table[[f"px_{c}" for c in range(len(self.job.classes))]].sum().to_numpy()

    def build_loaders(self) -> None:
        """Training: one seeded permutation per epoch cut into global batches, each rank taking its share;
        images resized whole or cropped at random scales (train.input). Validation: all images (reports,
        SWA) and this rank's shard, resized as in training or whole and seen through sliding windows —
        exactly as inference will see them."""
        job, tp, dist = self.job, self.train_params, self.dist
        self.generator = torch.Generator().manual_seed(job.seed)
        paste = paste_class_ids(tp.copy_paste_classes, job.classes, self.class_pixels())
        donors = [i for i, row in job.train_table.iterrows() if any(row[f"px_{c}"] > 0 for c in paste)]
        self.train_set = SegDataset(job.train_table, train_transform(tp, job.seed), tp.copy_paste, paste, donors, job.seed)
        self.sampler = DistributedSampler(self.train_set, dist.world, dist.rank, shuffle=True, seed=job.seed)
        opts = dict(num_workers=tp.workers, pin_memory=self.device.type == "cuda", persistent_workers=tp.workers > 0)
        self.train_loader = DataLoader(self.train_set, tp.batch_size // dist.world, sampler=self.sampler,
                                       generator=self.generator, drop_last=len(self.train_set) > tp.batch_size,
                                       worker_init_fn=worker_init, **opts)
        self.eval_batch = tp.batch_size if tp.eval_size else 1   # whole images differ in size
        val_set = SegDataset(job.val_table, build_transform([], tp.eval_size))
        self.val_loader = DataLoader(val_set, self.eval_batch, **opts)
        self.val_shard = DataLoader(Subset(val_set, range(dist.rank, len(val_set), dist.world)), self.eval_batch, **opts)

    def build_averages(self) -> dict[str, AveragedModel]:
        tp, out = self.train_params, {}
        if tp.swa_epochs:
            out["swa"] = AveragedModel(self.model)
        if tp.ema:
            out["ema"] = AveragedModel(self.model, multi_avg_fn=ema_average(tp.ema.decay, tp.ema.warmup), use_buffers=True)
        return out

    # ------------------------------------------------------------------ state: training
    def train(self) -> None:
        job = self.job
        for epoch in range(self.epoch, job.epochs):
            began = time.perf_counter()
            losses = self.train_epoch(epoch)
            use_slow_weights(self.optimizer)   # Lookahead: validate, average and save the slow weights
            row = {"epoch": epoch + 1, **{f"train/{k}": v for k, v in losses.items()}}
            if self.train_params.validates(epoch, job.epochs):
                val_loss, confusion, per_image = self.validate(self.model)
                s = {**scores(confusion.numpy(), job.classes), "metric": self.metric.value(per_image.numpy())}
                row.update({"val/loss": val_loss, **flat_scores(s, "val")})
                self.keep_best(epoch, s, confusion, per_image)
            self.end_epoch(epoch, row, time.perf_counter() - began)
        self.state = self.after_training

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training images; mean loss (and each loss term) per image, over every rank."""
        job, accumulate = self.job, self.train_params.accumulate
        loader = self.epoch_loader(epoch)
        rng = np.random.default_rng(job.seed * 1000 + epoch)
        desc = f"{job.name} epoch {epoch + 1}"
        self.trained_model.train()
        sums, n = defaultdict(float), 0
        self.optimizer.zero_grad(set_to_none=True)
        for i, (x, y, _) in enumerate(progress(loader, desc)):
            try:
                loss = self.train_step(x, y, rng, steps=(i + 1) % accumulate == 0 or i + 1 == len(loader))
            except FloatingPointError as e:
                raise FloatingPointError(f"{desc}: {e} at batch {i}; the last good checkpoint is kept") from None
            sums["loss"] += loss.item() * len(x)
            for k, v in self.loss_fn.last.items():
                sums[f"loss/{k}"] += v * len(x)
            n += len(x)
        return self.dist.mean({k: v / max(n, 1) for k, v in sums.items()})

    def epoch_loader(self, epoch: int) -> DataLoader:
        """The training loader for `epoch`: its order and augmentations depend on the seed and epoch alone."""
        seed = self.job.seed * 1000 + epoch
        self.generator.manual_seed(seed)
        self.sampler.set_epoch(epoch)
        self.train_set.reseed(seed)
        return self.train_loader

    def train_step(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, steps: bool) -> torch.Tensor:
        """One micro-batch, (B, 3, H, W) float32 images and (B, H, W) int64 labels: forward, backward,
        and when `steps` (every train.accumulate micro-batches) an optimizer step and the EMA's update.
        Returns the scalar loss."""
        tp, model = self.train_params, self.trained_model
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.sides:
            x, y = rescale(x, y, int(self.sides[rng.integers(len(self.sides))]))
        if tp.cutmix:
            cutmix(x, y, rng, tp.cutmix)
        if tp.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Under DDP, gradients are all-reduced only on the micro-batch that steps.
        with contextlib.nullcontext() if steps or not hasattr(model, "no_sync") else model.no_sync():
            with autocast(self.device, tp.amp):
                logits = model(x)
            loss = self.loss_fn(logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()}")
            self.scaler.scale(loss / tp.accumulate).backward()
        if steps:
            if tp.clip_grad:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), tp.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.schedule.step_batch()
            if "ema" in self.averages:
                self.averages["ema"].update_parameters(self.model)
        return loss

    def validate(self, model: torch.nn.Module) -> tuple[float, ConfusionMatrix, torch.Tensor]:
        """`model` over the validation fold, every rank its shard: (mean loss, summed confusion,
        (N, C, C) int64 every image's own confusion) — as one process would."""
        loss, confusion, _, per_image = self.evaluate(model, self.val_shard)
        n = len(self.val_shard.dataset)
        total = self.dist.sum(torch.tensor([loss * n, n], dtype=torch.float64))
        confusion.mat = self.dist.sum(confusion.mat)
        return float(total[0] / max(total[1], 1)), confusion, self.dist.sum(per_image)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: DataLoader,
                 keep=()) -> tuple[float, ConfusionMatrix, dict[int, np.ndarray], torch.Tensor]:
        """Loss at model resolution; confusions at each cached mask's own resolution, counted as
        params.metric says. Returns (mean loss, confusion matrix, {row: (H, W) uint8 prediction} for
        the validation rows in `keep`, (N, C, C) int64 per-image confusions: zeros for rows not in `loader`)."""
        table, n_classes = self.job.val_table, len(self.job.classes)
        model = self.as_validated(model).eval()
        confusion = ConfusionMatrix(n_classes)
        per_image = torch.zeros(len(table), n_classes, n_classes, dtype=torch.int64)
        kept: dict[int, np.ndarray] = {}
        loss_sum, n = 0.0, 0
        for x, y, idx in progress(loader, "val"):
            loss, probs = self.validation_step(model, x, y)
            loss_sum, n = loss_sum + loss * len(x), n + len(x)
            for prob, full, i in zip(probs, full_masks(table, idx), idx.tolist()):
                if prob.shape[-2:] != full.shape:   # probabilities, as the ensembles upsample them
                    prob = F.interpolate(prob[None], size=full.shape, mode="bilinear", align_corners=False)[0]
                pred = prob.argmax(0).to(torch.uint8).cpu()
                per_image[i] = self.metric.count(pred.numpy(), full, n_classes)
                confusion.merge(per_image[i])
                if i in keep:
                    kept[i] = pred.numpy()
        return loss_sum / max(n, 1), confusion, kept, per_image

    def validation_step(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
        """One batch: (its mean loss at model resolution, (B, C, h, w) float32 softmax probabilities)."""
        tp = self.train_params
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if tp.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, tp.amp):
            logits = model(x)
        return self.loss_fn(logits, y).item(), logits.float().softmax(1)

    def as_validated(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as validation and inference run it: itself, or over sliding windows if it trained on crops."""
        tp = self.train_params
        if tp.input != "crop":
            return model
        return SlidingWindow(model, tp.image_size, tp.slide_overlap, tp.batch_size, tp.crop_infer == "whole")

    def keep_best(self, epoch: int, s: dict, confusion: ConfusionMatrix, per_image: torch.Tensor) -> None:
        """Step a plateau schedule and save best.pt, both by the metric the leaderboard scores."""
        job = self.job
        self.schedule.step_epoch(s["metric"])
        if s["metric"] > self.best_metric and self.dist.main:
            save_checkpoint(job.member.checkpoint("best"), model=self.model.state_dict(), epoch=epoch + 1,
                            classes=job.classes, params=job.identity(), scores=s, confusion=confusion.mat.cpu().clone(),
                            image_confusions=per_image, input_spec=job.input_spec())
        self.best_metric = max(self.best_metric, s["metric"])

    def end_epoch(self, epoch: int, row: dict, seconds: float) -> None:
        """SWA's update, the history row (MLflow, console) and last.pt (the last epoch's always; an
        earlier one's when runtime.save_every_s have passed since the last save)."""
        job = self.job
        if "swa" in self.averages and epoch >= job.epochs - self.train_params.swa_epochs:
            self.averages["swa"].update_parameters(self.model)
        self.history.append({**row, **{f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups},
                             EPOCH_S: seconds})
        job.log(self.history[-1:])
        job.say(f"{job.name} epoch {epoch + 1}/{job.epochs}: train loss {row['train/loss']:.4f}" + (
            f"  val loss {row['val/loss']:.4f}  val mIoU {row['val/mIoU']:.4f}" if "val/mIoU" in row else ""))
        self.epoch = epoch + 1
        if self.epoch < job.epochs and time.monotonic() - self.saved_at < self.train_params.save_every_s:
            return   # last.pt costs about a second on CPU: short epochs are saved every save_every_s
        self.save("training" if self.epoch < job.epochs else self.after_training)
        if self.dist.main:
            entrypoint.kept(f"{job.name}: {job.member.checkpoint('last')} holds epoch {self.epoch} of {job.epochs}; "
                     "`dvc repro` resumes from there")

    @property
    def after_training(self) -> str:
        """The state the last epoch leads to: averaging (SWA, EMA), or finishing when there is nothing to average."""
        return "averaging" if self.averages else "finishing"

    # ------------------------------------------------------------------ state: averaging
    def average(self) -> None:
        for name, averaged_model in self.averages.items():
            if name not in self.averaged:
                self.average_model(name, averaged_model)
                self.averaged.append(name)
                if len(self.averaged) < len(self.averages):   # after the last one, straight to finishing
                    self.save("averaging")
        self.save("finishing")
        self.state = "finishing"

    def average_model(self, name: str, averaged_model: AveragedModel) -> None:
        """The averaged weights validated and saved as <name>.pt with val_confusion_<name>.npy. SWA
        recomputes BN statistics from the training images (no augmentation; every rank alike); EMA
        averaged the BN buffers along with the weights (use_buffers)."""
        job, tp = self.job, self.train_params
        if name == "swa":
            update_bn(DataLoader(SegDataset(job.train_table, build_transform([], tp.eval_size)), self.eval_batch),
                      averaged_model, self.device)
        _, confusion, per_image = self.validate(averaged_model.module)
        s = {**scores(confusion.numpy(), job.classes), "metric": self.metric.value(per_image.numpy())}
        if self.dist.main:
            how = ({"swa_epochs": tp.swa_epochs} if name == "swa"
                   else {"ema_decay": tp.ema.decay, "steps": int(averaged_model.n_averaged)})
            save_checkpoint(job.member.checkpoint(name), model=averaged_model.module.state_dict(), epoch=job.epochs,
                            classes=job.classes, params=job.identity(), input_spec=job.input_spec(), scores=s, **how)
            with atomic_file(job.member.val_confusion(name)) as tmp:
                np.save(tmp, confusion.numpy())
            what = f"over the last {tp.swa_epochs} epochs" if name == "swa" else f"decay {tp.ema.decay}"
            job.say(f"{job.name} {name.upper()} {what}: val mIoU {s['mIoU']:.4f}")
        self.log_average(name, s)

    def log_average(self, name: str, s: dict) -> None:
        if self.job.mlflow_run:
            self.job.mlflow_run.log_metrics({f"{name}/{k}": v for k, v in flat_scores(s, "val").items()})

    # ------------------------------------------------------------------ state: finishing
    def finish(self) -> None:
        """The best checkpoint's reports and metrics (rank 0), then done."""
        if self.dist.main:
            if self.reused:   # a reused run's stage run shows its averages' scores too (kept in <name>.pt)
                for name in self.averaged:
                    self.log_average(name, load_checkpoint(self.job.member.checkpoint(name))["scores"])
            last = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.scores = self.write_reports()
            self.model.load_state_dict(last)   # the reports predicted the gallery with best.pt's weights
            if not self.reused:
                self.save("done")   # last.pt keeps the last epoch's weights (the `last` checkpoint)
        self.dist.barrier()
        self.state = "done"

    def write_reports(self) -> dict:
        """The best checkpoint's scores (its epoch's validation confusion, kept in best.pt: the fold is
        not validated twice) and every report; only the gallery's few images are predicted again."""
        job = self.job
        member, classes = job.member, job.classes
        best = load_checkpoint(member.checkpoint("best"), self.device)
        self.model.load_state_dict(best["model"])
        confusion, per_image = best["confusion"].numpy(), best["image_confusions"].numpy()
        s = {**scores(confusion, classes), "metric": self.metric.value(per_image)}
        with atomic_file(member.val_confusion()) as tmp:
            np.save(tmp, confusion)
        with atomic_file(member.image_confusions) as tmp:   # per validation image: cv's bootstrap, paired tests
            np.savez(tmp, keys=np.asarray(job.val_table.key, dtype=str), confusions=per_image)
        write_image_scores(per_image, job.val_table, classes, member.val_images)
        member.reports.mkdir(exist_ok=True)
        plot_confusion(confusion, classes, member.confusion_png, f"{job.name}, best epoch {best['epoch']}")
        plot_iou(s["IoU"], member.iou_png, f"{job.name}: mIoU {s['mIoU']:.3f}")
        plot_curves(self.history, member.curves_png)
        self.plot_worst(per_image)
        with atomic_file(job.workspace.history_csv(job.stage, job.fold, job.seed)) as tmp:
            pd.DataFrame(self.history).to_csv(tmp, index=False)
        summary = {"fold": job.fold, "seed": job.seed, "best_epoch": best["epoch"], "val_images": len(job.val_table),
                   "train_s": round(sum(h.get(EPOCH_S, 0.0) for h in self.history), 1),   # wall: not reproducible
                   **{k: v for k, v in s.items() if k in ("metric", "mIoU", "pixel_acc", "mean_acc", "fwIoU")},
                   "IoU": {k: v for k, v in s["IoU"].items() if v is not None}}
        write_json(job.workspace.member_metrics(job.stage, job.fold, job.seed), {"val": summary})
        if job.mlflow_run:
            job.mlflow_run.log_metrics({f"best/{k}": v for k, v in flat_scores(s, "val").items()})
            job.mlflow_run.log_artifacts(member.reports, "reports")
        return s

    def plot_worst(self, per_image: np.ndarray) -> None:
        """The gallery: each class's worst validation image (image | truth | prediction | per class),
        predicted again by the best model (only these few images)."""
        job = self.job
        worst, table = worst_per_class(per_image, self.train_params.gallery), job.val_table
        shown = [i for i, _, _ in worst]
        if not shown:
            return
        gallery = DataLoader(Subset(self.val_loader.dataset, shown), self.val_loader.batch_size)
        preds = self.evaluate(self.model, gallery, keep=set(shown))[2]
        plot_gallery([read_image(table["image"][i], (table["height"][i], table["width"][i])) for i in shown],
                     [cv2.imread(table["mask"][i], cv2.IMREAD_UNCHANGED) for i in shown], [preds[i] for i in shown],
                     job.classes, job.member.gallery_png,
                     [(f"worst {job.classes[c]}: IoU {v:.2f}", c) for _, c, v in worst])

    # ------------------------------------------------------------------ last.pt
    def save(self, state: str) -> None:
        """last.pt in `state`: while training, everything resuming needs (optimizer, schedule, scaler,
        averages, RNG); while averaging, the averages and the RNG; after, the final weights and the
        history (the optimizer state is only needed to train on)."""
        self.saved_at = time.monotonic()
        if not self.dist.main:
            return
        job = self.job
        resume = {} if state in ("finishing", "done") else dict(
            rng=torch.get_rng_state(), averages={k: v.state_dict() for k, v in self.averages.items()})
        if state == "training":
            resume.update(optimizer=self.optimizer.state_dict(), schedule=self.schedule.state_dict(),
                          scaler=self.scaler.state_dict())
        write_json(job.member.epoch_seconds, [h.get(EPOCH_S) for h in self.history])
        history = [{k: v for k, v in h.items() if k != EPOCH_S} for h in self.history]
        save_checkpoint(job.member.checkpoint("last"), state=state, model=self.model.state_dict(), epoch=self.epoch,
                        history=history, best_miou=self.best_metric, averaged=self.averaged, classes=job.classes,
                        params=job.identity(), input_spec=job.input_spec(), **resume)

    def read_last(self) -> dict:
        """last.pt, verified, and every other checkpoint of this run with it: a damaged file is an
        error naming it before anything is trained, reused or deleted (one with no digest, from an
        older release, is not this run's: training starts afresh)."""
        job = self.job
        last = job.member.checkpoint("last")
        try:
            ck = load_checkpoint(last, self.device) if last.exists() else {}
        except UnverifiedCheckpoint:
            return {}
        if ck.get("params") == job.identity():
            verify_checkpoints(p for p in sorted(job.out.glob("*.pt")) if p != last and not p.name.startswith("."))
        return ck

    def restore(self, ck: dict) -> None:
        """Resume the state last.pt holds if it is this run's (same identity); else start afresh."""
        job = self.job
        if ck.get("params") != job.identity() or ck.get("state") not in STATES:
            self.dist.barrier()  # every rank has read last.pt before rank 0 clears the folder
            if self.dist.main:
                shutil.rmtree(job.out, ignore_errors=True)
            job.out.mkdir(parents=True, exist_ok=True)
            return
        self.state, self.epoch, self.history = ck["state"], ck["epoch"], ck["history"]
        seconds = json.loads(job.member.epoch_seconds.read_text()) if job.member.epoch_seconds.exists() else []
        for row, s in zip(self.history, seconds):
            if s is not None:
                row[EPOCH_S] = s
        self.best_metric, self.averaged = ck["best_miou"], list(ck["averaged"])
        self.model.load_state_dict(ck["model"])
        if self.state in ("training", "averaging"):
            for name, averaged_model in self.averages.items():
                averaged_model.load_state_dict(ck["averages"][name])
            torch.set_rng_state(ck["rng"])
        if self.state == "training":
            self.optimizer.load_state_dict(ck["optimizer"])
            self.schedule.load_state_dict(ck["schedule"])
            self.scaler.load_state_dict(ck["scaler"])
        job.log(self.history)   # a resumed run still shows its whole curve
        if self.state == "done":
            job.say(f"{job.name}: already trained with these params, data and code; reusing it")
            self.state, self.reused = "finishing", True   # its reports and metrics again: DVC removed them before the stage ran
        else:
            job.say(f"{job.name}: resuming after epoch {self.epoch}, in state {self.state}"
                    + (f" (averages done: {', '.join(self.averaged)})" if self.averaged else ""))


class Round2Trainer(Trainer):
    """Round 2: fine-tune round 1's best model of this fold and seed on its training images plus the
    fold's pseudo-labelled test images (validation unchanged), no weight averages."""

    def initial_weights(self) -> dict:
        job = self.job
        return load_checkpoint(job.workspace.member(job.fold, job.seed, 1).checkpoint("best"), self.device)["model"]

    def build_averages(self) -> dict[str, AveragedModel]:
        return {}


def rescale(x: torch.Tensor, y: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch resized to side x side: images bilinear, masks nearest (labels stay labels, 255 stays ignored)."""
    if tuple(x.shape[-2:]) == (side, side):
        return x, y
    x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    y = F.interpolate(y[:, None].float(), size=(side, side), mode="nearest")[:, 0].to(y.dtype)
    return x, y


def seed_everything(seed: int, deterministic: bool) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def progress(it, desc: str):
    return tqdm(it, desc=desc, total=len(it), leave=False, disable=not sys.stderr.isatty(), dynamic_ncols=True)
