"""The Trainer: one fold and seed's training run as hooks over an explicit run state.

Like nnU-Net's trainer, the class is the recipe: `fit` walks the states, each state is a method,
and the hooks fire in this order —

    on_train_start                       build model, loss, optimizer, loaders; read last.pt
    per epoch:  train_step (each batch, loop.Step), on_optimizer_step (EMA),
                on_validation_end (best.pt), on_epoch_end (SWA, history, last.pt)
    on_average (each of SWA, EMA)        <name>.pt and val_confusion_<name>.npy
    on_train_end                         the best checkpoint's reports and metrics

The run state, saved in last.pt after every step that costs time, is one of

    training  -> averaging -> finishing -> done

A run killed in any state resumes in it: finished epochs are never retrained, a finished average
never recomputed. `done` is reused as is (its reports are written again: DVC removed them).
Round 2 (fine-tuning on pseudo-labels) is the subclass `Round2Trainer`.
"""
from __future__ import annotations

import json
import math
import shutil
import time

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import DataLoader

from pipeline import cli
from pipeline.config import ConfigError
from pipeline.data.augment import build_transform
from pipeline.data.dataset import SegDataset
from pipeline.evaluation.metrics import Metric, flat_scores, scores
from pipeline.io import atomic_file, write_json
from pipeline.models.checkpoint import UnverifiedCheckpoint, load_checkpoint, save_checkpoint, verify_checkpoints
from pipeline.models.factory import encoder_of
from pipeline.training.finish import EPOCH_S, finish_fold
from pipeline.training.fold import FoldData, FoldRun
from pipeline.training.loop import Step, train_one_epoch
from pipeline.training.nets import build_fold_loss, build_net, ema_average, seed_everything
from pipeline.training.optim import build_optimizer, build_schedule, use_slow_weights

STATES = ("training", "averaging", "finishing", "done")


class Trainer:
    def __init__(self, f: FoldRun):
        self.f, self.t = f, f.p.train
        self.state, self.history, self.best, self.epoch, self.averaged, self.scores = "training", [], -1.0, 0, [], {}
        self.reused = False   # a finished run: its files stay byte for byte (DVC sees nothing changed)

    def fit(self) -> dict:
        self.on_train_start()
        run_state = {"training": self.train, "averaging": self.average, "finishing": self.on_train_end}
        while self.state != "done":
            run_state[self.state]()
        return self.scores

    # ---- what a round trains from and averages (Round2Trainer overrides)
    def initial_weights(self) -> dict | None:
        return None

    def build_averages(self, model: torch.nn.Module) -> dict[str, AveragedModel]:
        t, out = self.t, {}
        if t.swa_epochs:
            out["swa"] = AveragedModel(model)
        if t.ema:
            out["ema"] = AveragedModel(model, multi_avg_fn=ema_average(t.ema.decay, t.ema.warmup), use_buffers=True)
        return out

    # ---- hooks
    def on_train_start(self) -> None:
        f, t = self.f, self.t
        if t.batch_size % f.d.world:
            raise ConfigError(f"train.batch_size {t.batch_size} must be a multiple of the {f.d.world} processes")
        seed_everything(f.seed, t.deterministic)
        self.model, trained = build_net(f, self.initial_weights())
        loss_fn = build_fold_loss(f)
        opt = build_optimizer(self.model, encoder_of(self.model), t)
        self.data = FoldData(f)
        steps = math.ceil(len(self.data.train_dl) / t.accumulate)
        schedule = build_schedule(opt, t.scheduler, steps * f.epochs, round(t.warmup_epochs * steps))
        scaler = torch.amp.GradScaler("cuda", enabled=f.device.type == "cuda" and t.amp == "fp16")
        self.averages = self.build_averages(self.model)
        self.step = Step(trained, loss_fn, opt, schedule, scaler, f.device, t.amp, t.accumulate, t.clip_grad,
                         t.cutmix, t.channels_last, [t.batch_side(x) for x in t.scales] if t.scales else None,
                         self.on_optimizer_step)
        self.metric = Metric.of(f.p.metric)
        self.restore(self.read_last())

    def on_optimizer_step(self) -> None:
        if "ema" in self.averages:
            self.averages["ema"].update_parameters(self.model)

    def on_validation_end(self, epoch: int, s: dict, cm, per_image: torch.Tensor) -> None:
        self.step.schedule.step_epoch(s["metric"])   # plateau, best.pt: by the metric the leaderboard scores
        if s["metric"] > self.best and self.f.d.main:
            save_checkpoint(self.f.member.checkpoint("best"), model=self.model.state_dict(), epoch=epoch + 1,
                            classes=self.f.classes, params=self.f.identity(), scores=s, confusion=cm.mat.cpu().clone(),
                            image_confusions=per_image, input_spec=self.f.input_spec())
        self.best = max(self.best, s["metric"])

    def on_epoch_end(self, epoch: int, row: dict, seconds: float) -> None:
        f = self.f
        if "swa" in self.averages and epoch >= f.epochs - self.t.swa_epochs:
            self.averages["swa"].update_parameters(self.model)
        self.history.append({**row, **{f"lr/{g['name']}": g["lr"] for g in self.step.opt.param_groups},
                             EPOCH_S: seconds})
        f.log(self.history[-1:])
        f.say(f"{f.name} epoch {epoch + 1}/{f.epochs}: train loss {row['train/loss']:.4f}" + (
            f"  val loss {row['val/loss']:.4f}  val mIoU {row['val/mIoU']:.4f}" if "val/mIoU" in row else ""))
        self.epoch = epoch + 1
        self.save("training" if self.epoch < f.epochs else "averaging")
        if f.d.main:
            cli.kept(f"{f.name}: {f.member.checkpoint('last')} holds epoch {self.epoch} of {f.epochs}; `dvc repro` resumes from there")

    def on_average(self, name: str, avg: AveragedModel) -> None:
        """The averaged weights validated and saved as <name>.pt with val_confusion_<name>.npy. SWA
        recomputes BN statistics from the training images (no augmentation; every rank alike); EMA
        averaged the BN buffers along with the weights (use_buffers)."""
        f, t = self.f, self.t
        if name == "swa":
            update_bn(DataLoader(SegDataset(f.train_tab, build_transform([], t.eval_size)), self.data.eval_batch),
                      avg, f.device)
        _, cm, per_image = self.data.validate(avg.module, self.step.loss_fn)
        s = {**scores(cm.numpy(), f.classes), "metric": self.metric.value(per_image.numpy())}
        if f.d.main:
            how = {"swa_epochs": t.swa_epochs} if name == "swa" else {"ema_decay": t.ema.decay,
                                                                      "steps": int(avg.n_averaged)}
            save_checkpoint(f.member.checkpoint(name), model=avg.module.state_dict(), epoch=f.epochs, classes=f.classes,
                            params=f.identity(), input_spec=f.input_spec(), scores=s, **how)
            with atomic_file(f.member.val_confusion(name)) as tmp:
                np.save(tmp, cm.numpy())
            what = f"over the last {t.swa_epochs} epochs" if name == "swa" else f"decay {t.ema.decay}"
            f.say(f"{f.name} {name.upper()} {what}: val mIoU {s['mIoU']:.4f}")
        self.log_average(name, s)

    def log_average(self, name: str, s: dict) -> None:
        if self.f.run:
            self.f.run.log_metrics({f"{name}/{k}": v for k, v in flat_scores(s, "val").items()})

    def on_train_end(self) -> None:
        """State finishing: the best checkpoint's reports and metrics (rank 0), then done."""
        if self.f.d.main:
            if self.reused:   # a reused run's stage run shows its averages' scores too (kept in <name>.pt)
                for name in self.averaged:
                    self.log_average(name, load_checkpoint(self.f.member.checkpoint(name))["scores"])
            last = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.scores = finish_fold(self.f, self.model, self.data.val_dl, self.step.loss_fn, self.history)
            self.model.load_state_dict(last)   # finish_fold predicted the gallery with best.pt's weights
            if not self.reused:
                self.save("done")   # last.pt keeps the last epoch's weights (the `last` checkpoint)
        self.f.d.barrier()
        self.state = "done"

    # ---- the states
    def train(self) -> None:
        f, t = self.f, self.t
        for epoch in range(self.epoch, f.epochs):
            began = time.perf_counter()
            tr = f.d.mean(train_one_epoch(self.step, self.data.epoch(epoch), np.random.default_rng(f.seed * 1000 + epoch),
                                          desc=f"{f.name} epoch {epoch + 1}"))
            use_slow_weights(self.step.opt)   # Lookahead: validate, average and save the slow weights
            row = {"epoch": epoch + 1, **{f"train/{k}": v for k, v in tr.items()}}
            if t.validates(epoch, f.epochs):
                val_loss, cm, per_image = self.data.validate(self.model, self.step.loss_fn)
                s = {**scores(cm.numpy(), f.classes), "metric": self.metric.value(per_image.numpy())}
                row.update({"val/loss": val_loss, **flat_scores(s, "val")})
                self.on_validation_end(epoch, s, cm, per_image)
            self.on_epoch_end(epoch, row, time.perf_counter() - began)
        self.state = "averaging"

    def average(self) -> None:
        for name, avg in self.averages.items():
            if name not in self.averaged:
                self.on_average(name, avg)
                self.averaged.append(name)
                self.save("averaging")
        self.save("finishing")
        self.state = "finishing"

    # ---- last.pt
    def save(self, state: str) -> None:
        """last.pt in `state`: while training or averaging, everything resuming needs; after, the
        final weights and the history (the optimizer state was only needed to resume)."""
        if not self.f.d.main:
            return
        f, step = self.f, self.step
        full = {} if state in ("finishing", "done") else dict(
            optimizer=step.opt.state_dict(), schedule=step.schedule.state_dict(), scaler=step.scaler.state_dict(),
            rng=torch.get_rng_state(), averages={k: v.state_dict() for k, v in self.averages.items()})
        write_json(f.member.epoch_seconds, [h.get(EPOCH_S) for h in self.history])
        history = [{k: v for k, v in h.items() if k != EPOCH_S} for h in self.history]
        save_checkpoint(f.member.checkpoint("last"), state=state, model=self.model.state_dict(), epoch=self.epoch,
                        history=history, best_miou=self.best, averaged=self.averaged, classes=f.classes,
                        params=f.identity(), input_spec=f.input_spec(), **full)

    def read_last(self) -> dict:
        """last.pt, verified, and every other checkpoint of this run with it: a damaged file is an
        error naming it before anything is trained, reused or deleted (one with no digest, from an
        older release, is not this run's: training starts afresh)."""
        f = self.f
        last = f.member.checkpoint("last")
        try:
            ck = load_checkpoint(last, f.device) if last.exists() else {}
        except UnverifiedCheckpoint:
            return {}
        if ck.get("params") == f.identity():
            verify_checkpoints(p for p in sorted(f.out.glob("*.pt")) if p != last and not p.name.startswith("."))
        return ck

    def restore(self, ck: dict) -> None:
        """Resume the state last.pt holds if it is this run's (same identity); else start afresh."""
        f = self.f
        if ck.get("params") != f.identity() or ck.get("state") not in STATES:
            f.d.barrier()  # every rank has read last.pt before rank 0 clears the folder
            if f.d.main:
                shutil.rmtree(f.out, ignore_errors=True)
            f.out.mkdir(parents=True, exist_ok=True)
            return
        self.state, self.epoch, self.history = ck["state"], ck["epoch"], ck["history"]
        seconds = json.loads(f.member.epoch_seconds.read_text()) if f.member.epoch_seconds.exists() else []
        for row, s in zip(self.history, seconds):
            if s is not None:
                row[EPOCH_S] = s
        self.best, self.averaged = ck["best_miou"], list(ck["averaged"])
        self.model.load_state_dict(ck["model"])
        if self.state in ("training", "averaging"):
            for name, avg in self.averages.items():
                avg.load_state_dict(ck["averages"][name])
            self.step.opt.load_state_dict(ck["optimizer"])
            self.step.schedule.load_state_dict(ck["schedule"])
            self.step.scaler.load_state_dict(ck["scaler"])
            torch.set_rng_state(ck["rng"])
        f.log(self.history)   # a resumed run still shows its whole curve
        if self.state == "done":
            f.say(f"{f.name}: already trained with these params, data and code; reusing it")
            self.state, self.reused = "finishing", True   # its reports and metrics again: DVC removed them before the stage ran
        else:
            f.say(f"{f.name}: resuming after epoch {self.epoch}, in state {self.state}"
                  + (f" (averages done: {', '.join(self.averaged)})" if self.averaged else ""))


class Round2Trainer(Trainer):
    """Round 2: fine-tune round 1's best model of this fold and seed on its training images plus the
    fold's pseudo-labelled test images (validation unchanged), no weight averages."""

    def initial_weights(self) -> dict:
        f = self.f
        return load_checkpoint(f.ws.member(f.fold, f.seed, 1).checkpoint("best"), f.device)["model"]

    def build_averages(self, model: torch.nn.Module) -> dict[str, AveragedModel]:
        return {}
