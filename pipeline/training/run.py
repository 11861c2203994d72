"""Train one fold: the stage train@<fold> calls `train_fold` and nothing else.

Writes <models>/fold_<k>/seed_<s>/: last.pt (full state, for resuming), best.pt (weights of the best epoch
by validation mIoU, with that epoch's confusion matrix), val_confusion.npy (the out-of-fold result the
cv stage sums), reports/*.png; with train.swa_epochs > 0 also swa.pt (weights averaged over the last
epochs, BN statistics recomputed on the training images) and val_confusion_swa.npy.

`fit` is the fold's whole journey on one screen; the helpers below it build its parts.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import DataLoader, Subset

from pipeline import cli
from pipeline.config import NO_CLASS_WEIGHTS, ConfigError, ParamsView
from pipeline.data.augment import build_transform
from pipeline.data.dataset import SegDataset
from pipeline.data.masks import read_image
from pipeline.devices import pick_device
from pipeline.evaluation.metrics import Metric, flat_scores, scores, worst_per_class
from pipeline.evaluation.reports import plot_confusion, plot_curves, plot_gallery, plot_iou, write_image_scores
from pipeline.io import atomic_file, write_json
from pipeline.models.checkpoint import load_checkpoint, member_dir, member_name, save_checkpoint
from pipeline.models.factory import backbone, build_model, check_input_size, encoder_of
from pipeline.models.losses import build_loss, class_weights_from_pixels
from pipeline.training import distributed
from pipeline.training.fold import FoldData, FoldRun, as_validated, load_fold
from pipeline.training.loop import train_one_epoch, validate
from pipeline.training.optim import build_optimizer, build_schedule, use_slow_weights

PARAMS = ("model", "encoder", "encoder_weights", "train", "metric", "paths")




def train_fold(fold: int, seed: int, p: ParamsView, run=None, round2: bool = False) -> dict:
    """Train, validate (every train.val_every epochs and the last), keep best/last, resume an
    interrupted run; return final scores.
    Under torchrun every rank calls this (see pipeline/training/distributed.py); only rank 0 writes.

    A finished run with the same params, data and code is reused, not retrained: adding a seed or a
    fold to train.seeds/train.folds reruns every train stage in DVC's eyes, but only the new ones train.
    round2: fine-tune round 1's best model of this fold and seed for `pseudo.epochs` on its training
    images plus the fold's pseudo-labelled test images (validation unchanged), into paths.models_round2.
    """
    f = load_fold(fold, seed, p, round2)
    check_input_size(p.model, p.train.image_size)
    used = backbone(p.model, p.encoder)
    if run:
        run.set_tags({"pipeline.backbone": used})   # what the model is built on, not just what params say
    if used != p.encoder:
        print(f"note: {p.model} is built on {used}; encoder {p.encoder!r} is not used")
    f.d, f.device = distributed.setup(pick_device(p.train.device))
    f.run = run if f.d.main else None
    try:
        return fit(f)
    finally:
        distributed.teardown()


def fit(f: FoldRun) -> dict:
    """The fold's journey: build; reuse a finished run or resume an interrupted one; train and
    validate (every val_every epochs and the last: best.pt by validation mIoU; last.pt to resume);
    average (SWA); report."""
    t, d, last = f.p.train, f.d, f.out / "last.pt"
    if t.batch_size % d.world:
        raise ConfigError(f"train.batch_size {t.batch_size} must be a multiple of the {d.world} processes")
    seed_everything(f.seed, t.deterministic)
    model, trained = build_net(f)
    loss_fn = build_fold_loss(f)
    opt = build_optimizer(model, encoder_of(model), t.optimizer, t.lr, t.encoder_lr, t.weight_decay, t.lookahead)
    data = FoldData(f)
    steps = math.ceil(len(data.train_dl) / t.accumulate)
    schedule = build_schedule(opt, t.scheduler, steps * f.epochs, round(t.warmup_epochs * steps))
    scaler = torch.amp.GradScaler("cuda", enabled=f.device.type == "cuda" and t.amp == "fp16")
    swa = AveragedModel(model) if t.swa_epochs and not f.round2 else None
    ema = AveragedModel(model, multi_avg_fn=ema_average(t.ema.decay, t.ema.warmup), use_buffers=True) \
        if t.ema and not f.round2 else None
    metric = Metric.of(f.p.metric)
    sides = [t.batch_side(x) for x in t.scales] if t.scales else None
    ck = load_checkpoint(last, f.device) if last.exists() else {}
    if is_finished(f, ck, swa is not None, ema is not None):
        f.say(f"{f.name}: already trained with these params, data and code; reusing it")
        f.log(ck["history"])
        return finish_fold(f, model, data.val_dl, loss_fn, ck["history"]) if d.main else ck.get("scores", {})
    history, best, start = resume(f, ck, model, {"swa": swa, "ema": ema}, opt, schedule, scaler)

    for epoch in range(start, f.epochs):
        began = time.perf_counter()
        tr = d.mean(train_one_epoch(trained, data.epoch(epoch), loss_fn, opt, schedule, scaler, f.device, t.amp,
                                    t.accumulate, t.clip_grad, t.cutmix, np.random.default_rng(f.seed * 1000 + epoch),
                                    t.channels_last, desc=f"{f.name} epoch {epoch + 1}", ema=ema, sides=sides))
        use_slow_weights(opt)   # Lookahead: validate, average and save the slow weights
        row = {"epoch": epoch + 1, **{f"train/{k}": v for k, v in tr.items()}}
        if t.validates(epoch, f.epochs):
            val_loss, cm, per_image = data.validate(model, loss_fn)
            s = {**scores(cm.numpy(), f.classes), "metric": metric.value(per_image.numpy())}
            schedule.step_epoch(s["metric"])   # plateau, best.pt: by the metric the leaderboard scores
            row.update({"val/loss": val_loss, **flat_scores(s, "val")})
            if s["metric"] > best and d.main:
                save_checkpoint(f.out / "best.pt", model=model.state_dict(), epoch=epoch + 1, classes=f.classes,
                                params=f.identity(), scores=s, confusion=cm.mat.cpu().clone(),
                                image_confusions=per_image)
            best = max(best, s["metric"])
        if swa is not None and epoch >= f.epochs - t.swa_epochs:
            swa.update_parameters(model)
        history.append({**row, **{f"lr/{g['name']}": g["lr"] for g in opt.param_groups},
                        "time/epoch_s": time.perf_counter() - began})
        f.log(history[-1:])
        f.say(f"{f.name} epoch {epoch + 1}/{f.epochs}: train loss {tr['loss']:.4f}" + (
            f"  val loss {row['val/loss']:.4f}  val mIoU {row['val/mIoU']:.4f}" if "val/mIoU" in row else ""))
        if d.main:
            save_checkpoint(last, model=model.state_dict(), optimizer=opt.state_dict(), schedule=schedule.state_dict(),
                            scaler=scaler.state_dict(), epoch=epoch + 1, history=history, best_miou=best,
                            rng=torch.get_rng_state(), classes=f.classes, params=f.identity(),
                            swa=swa.state_dict() if swa is not None else None,
                            ema=ema.state_dict() if ema is not None else None)
            cli.kept(f"{f.name}: {last} holds epoch {epoch + 1} of {f.epochs}; `dvc repro` resumes from there")
    for name, avg in (("swa", swa), ("ema", ema)):
        if avg is not None:
            average_weights(f, name, avg, data, loss_fn)
    if not d.main:
        d.barrier()  # rank 0 writes the reports
        return s
    # Done: the optimizer state was only needed to resume; keep the final weights and the history.
    save_checkpoint(last, model=model.state_dict(), epoch=f.epochs, history=history, best_miou=best,
                    classes=f.classes, params=f.identity())
    s = finish_fold(f, model, data.val_dl, loss_fn, history)
    d.barrier()
    return s


def build_net(f: FoldRun) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model, what trains it: DDP- and torch.compile-wrapped as params say; same parameters)."""
    t = f.p.train
    model = build_model(f.p.model, f.p.encoder, f.p.encoder_weights, len(f.classes)).to(f.device)
    if f.round2:
        model.load_state_dict(load_checkpoint(member_dir(f.p.paths.models, f.fold, f.seed) / "best.pt", f.device)["model"])
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


def is_finished(f: FoldRun, ck: dict, with_swa: bool, with_ema: bool) -> bool:
    done = [f.out / "best.pt", f.out / "val_confusion.npy"] + ([f.out / "swa.pt"] if with_swa else []) + (
        [f.out / "ema.pt"] if with_ema else [])
    return (ck.get("params") == f.identity() and ck["epoch"] == f.epochs and "optimizer" not in ck
            and all(p.exists() for p in done))


def resume(f: FoldRun, ck: dict, model, averages: dict, opt, schedule, scaler) -> tuple[list[dict], float, int]:
    """(history, best metric, epochs done): from an interrupted run of the same identity, or a fresh start.
    averages: {"swa": AveragedModel or None, "ema": ...}, restored from last.pt too."""
    if ck.get("params") == f.identity() and ck["epoch"] < f.epochs:
        model.load_state_dict(ck["model"])
        for name, avg in averages.items():
            if avg is not None:
                avg.load_state_dict(ck[name])
        opt.load_state_dict(ck["optimizer"])
        schedule.load_state_dict(ck["schedule"])
        scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"])
        f.log(ck["history"])   # a resumed run still shows its whole curve
        f.say(f"{f.name}: resuming after epoch {ck['epoch']}")
        return ck["history"], ck["best_miou"], ck["epoch"]
    f.d.barrier()  # every rank has read last.pt before rank 0 clears the folder
    if f.d.main:
        shutil.rmtree(f.out, ignore_errors=True)
    f.out.mkdir(parents=True, exist_ok=True)
    return [], -1.0, 0


def average_weights(f: FoldRun, name: str, avg: AveragedModel, data: FoldData, loss_fn) -> None:
    """The averaged weights (name swa or ema), validated and saved as <name>.pt with
    val_confusion_<name>.npy. SWA recomputes BN statistics from the training images (no augmentation;
    every rank alike); EMA averaged the BN buffers along with the weights (use_buffers)."""
    t = f.p.train
    if name == "swa":
        bn_dl = DataLoader(SegDataset(f.train_tab, build_transform([], t.eval_size)), data.eval_batch)
        update_bn(bn_dl, avg, f.device)
    _, cm, per_image = data.validate(avg.module, loss_fn)
    s = {**scores(cm.numpy(), f.classes), "metric": Metric.of(f.p.metric).value(per_image.numpy())}
    if f.d.main:
        how = {"swa_epochs": t.swa_epochs} if name == "swa" else {"ema_decay": t.ema.decay, "steps": int(avg.n_averaged)}
        save_checkpoint(f.out / f"{name}.pt", model=avg.module.state_dict(), epoch=f.epochs, classes=f.classes,
                        params=f.identity(), **how)
        with atomic_file(f.out / f"val_confusion_{name}.npy") as tmp:
            np.save(tmp, cm.numpy())
        what = f"over the last {t.swa_epochs} epochs" if name == "swa" else f"decay {t.ema.decay}"
        f.say(f"{f.name} {name.upper()} {what}: val mIoU {s['mIoU']:.4f}")
    if f.run:
        f.run.log_metrics({f"{name}/{k}": v for k, v in flat_scores(s, "val").items()})


def finish_fold(f: FoldRun, model, val_dl: DataLoader, loss_fn, history: list[dict]) -> dict:
    """The best checkpoint's scores (its epoch's validation confusion, kept in best.pt: the fold is
    not validated twice) and every report; only the gallery's few images are predicted again."""
    t, classes, val_tab, out = f.p.train, f.classes, f.val_tab, f.out
    best = load_checkpoint(out / "best.pt", f.device)
    model.load_state_dict(best["model"])
    net = as_validated(model, t)
    titles = focus = None
    per_image = best["image_confusions"].numpy() if "image_confusions" in best else None
    if per_image is not None:   # the gallery: each class's worst validation image
        worst = worst_per_class(per_image, t.gallery)
        shown = [i for i, _, _ in worst]
        titles = [f"worst {classes[c]}: IoU {v:.2f}" for _, c, v in worst]
        focus = [c for _, c, _ in worst]
        write_image_scores(per_image, val_tab, classes, out / "val_images.csv")
    else:
        n_present = (val_tab[[f"px_{c}" for c in range(1, len(classes))]] > 0).sum(axis=1)
        shown = n_present.sort_values(ascending=False, kind="stable").index[: t.gallery].tolist()
    if "confusion" in best and per_image is not None:
        cm = best["confusion"].numpy()
        gallery = DataLoader(Subset(val_dl.dataset, shown), val_dl.batch_size)
        preds = validate(net, gallery, val_tab, loss_fn, len(classes), f.device, t.amp, t.channels_last,
                         keep=set(shown))[2] if shown else {}
    else:   # a checkpoint written before best.pt kept its confusion
        _, matrix, preds, per_image = validate(net, val_dl, val_tab, loss_fn, len(classes), f.device, t.amp,
                                               t.channels_last, keep=set(shown), metric=Metric.of(f.p.metric))
        cm, per_image = matrix.numpy(), per_image.numpy()
    s = {**scores(cm, classes), "metric": Metric.of(f.p.metric).value(per_image)}
    with atomic_file(out / "val_confusion.npy") as tmp:
        np.save(tmp, cm)
    with atomic_file(out / "val_image_confusions.npz") as tmp:   # per validation image: cv's bootstrap, paired tests
        np.savez(tmp, keys=np.asarray(val_tab.key, dtype=str), confusions=per_image)
    reports = out / "reports"
    reports.mkdir(exist_ok=True)
    plot_confusion(cm, classes, reports / "confusion.png", f"{f.name}, best epoch {best['epoch']}")
    plot_iou(s["IoU"], reports / "iou.png", f"{f.name}: mIoU {s['mIoU']:.3f}")
    plot_curves(history, reports / "curves.png")
    if shown:
        plot_gallery([read_image(val_tab["image"][i], (val_tab["height"][i], val_tab["width"][i])) for i in shown],
                     [cv2.imread(val_tab["mask"][i], cv2.IMREAD_UNCHANGED) for i in shown],
                     [preds[i] for i in shown], classes, reports / "gallery.png", titles=titles, focus=focus)
    plots = Path(f.p.paths.plots) / f.tag
    plots.mkdir(parents=True, exist_ok=True)
    with atomic_file(plots / f"{member_name(f.fold, f.seed)}.csv") as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    summary = {"fold": f.fold, "seed": f.seed, "best_epoch": best["epoch"], "val_images": len(val_tab),
               "train_s": round(sum(h.get("time/epoch_s", 0.0) for h in history), 1),   # wall: not reproducible
               **{k: v for k, v in s.items() if k in ("metric", "mIoU", "pixel_acc", "mean_acc", "fwIoU")},
               "IoU": {k: v for k, v in s["IoU"].items() if v is not None}}
    write_json(Path(f.p.paths.metrics) / f.tag / f"{member_name(f.fold, f.seed)}.json", {"val": summary})
    if f.run:
        f.run.log_metrics({f"best/{k}": v for k, v in flat_scores(s, "val").items()})
        f.run.log_artifacts(reports, "reports")
    return s


def seed_everything(seed: int, deterministic: bool) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
