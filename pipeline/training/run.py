"""Train one fold: the stage train@<fold> calls `train_fold` and nothing else.

Writes <models>/fold_<k>/seed_<s>/: last.pt (full state, for resuming), best.pt (weights of the best epoch
by validation mIoU), val_confusion.npy (the best model's confusion matrix on this fold's
validation images: the out-of-fold result the cv stage sums), reports/*.png; with
train.swa_epochs > 0 also swa.pt (weights averaged over the last epochs, BN statistics
recomputed on the training images) and val_confusion_swa.npy.
"""
from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pandas as pd
import torch
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from pipeline import cli
from pipeline.config import NO_CLASS_WEIGHTS, ConfigError, ParamsView
from pipeline.data.augment import build_transform
from pipeline.data.dataset import SegDataset, fold_tables, round2_table, worker_init
from pipeline.data.masks import read_classes, read_image
from pipeline.evaluation.metrics import flat_scores, scores
from pipeline.evaluation.reports import plot_confusion, plot_curves, plot_gallery, plot_iou
from pipeline.io import atomic_file, write_json
from pipeline.models.factory import backbone, build_model, check_input_size, encoder_of
from pipeline.models.losses import build_loss, class_weights_from_pixels
from pipeline.training import distributed, gpus
from pipeline.training.checkpoint import load_checkpoint, member_dir, member_name, save_checkpoint
from pipeline.training.loop import train_one_epoch, validate
from pipeline.training.optim import build_optimizer, build_schedule, use_slow_weights

PARAMS = ("model", "encoder", "encoder_weights", "train", "paths")


def pick_device(name: str) -> torch.device:
    """cpu / cuda / auto (cuda when there is one). With $PIPELINE_GPU_POOL set, claims a free GPU first."""
    if name != "cpu":
        gpus.pin(1)
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def seed_everything(seed: int, deterministic: bool) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


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
    digest of their content, so hashing them covers the pixels without rereading them."""
    h = hashlib.md5()
    for f in [*files, *sorted(Path(__file__).parents[1].rglob("*.py"))]:
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def train_fold(fold: int, seed: int, p: ParamsView, run=None, round2: bool = False) -> dict:
    """Train, validate every epoch, keep best/last, resume an interrupted run; return final scores.
    Under torchrun every rank calls this (see pipeline/training/distributed.py); only rank 0 writes.

    A finished run with the same params, data and code is reused, not retrained: adding a seed or a
    fold to train.seeds/train.folds reruns every train stage in DVC's eyes, but only the new ones train.
    round2: fine-tune round 1's best model of this fold and seed for `pseudo.epochs` on its training
    images plus the fold's pseudo-labelled test images (validation unchanged), into paths.models_round2.
    """
    t = p.train
    out = member_dir(p.paths.models_round2 if round2 else p.paths.models, fold, seed)
    round1_best = member_dir(p.paths.models, fold, seed) / "best.pt"
    classes = read_classes(p.paths.masks)["classes"]
    train_tab, val_tab = fold_tables(p.paths.masks, p.paths.split, fold)
    masks = Path(p.paths.masks)   # class names and every image's content (digests), then the folds
    epochs, inputs = t.epochs, [masks / "index.csv", masks / "classes.json", Path(p.paths.split) / "folds.csv"]
    if round2:
        folds = pd.read_csv(Path(p.paths.split) / "folds.csv")
        pseudo_index = Path(p.paths.pseudo) / f"fold_{fold}" / "index.csv"
        train_tab = round2_table(train_tab, pseudo_index, set(val_tab.key), set(folds.key[folds.holdout]))
        epochs, inputs = p.pseudo.epochs, inputs + [pseudo_index, round1_best]
    check_input_size(p.model, t.image_size)
    used = backbone(p.model, p.encoder)
    if run:
        run.set_tags({"pipeline.backbone": used})   # what the model is built on, not just what params say
    if used != p.encoder:
        print(f"note: {p.model} is built on {used}; encoder {p.encoder!r} is not used")
    d, device = distributed.setup(pick_device(t.device))
    try:
        return _train(fold, seed, p, run if d.main else None, round2, d, device, out, round1_best, classes,
                      train_tab, val_tab, epochs, inputs)
    finally:
        distributed.teardown()


def _train(fold, seed, p, run, round2, d, device, out, round1_best, classes, train_tab, val_tab, epochs, inputs):
    t, n_cls = p.train, len(classes)
    if t.batch_size % d.world:
        raise ConfigError(f"train.batch_size {t.batch_size} must be a multiple of the {d.world} processes")
    seed_everything(seed, t.deterministic)
    model = build_model(p.model, p.encoder, p.encoder_weights, n_cls).to(device)
    if round2:
        model.load_state_dict(load_checkpoint(round1_best, device)["model"])
    if t.dropout is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.dropout._DropoutNd):
                m.p = t.dropout
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trained = distributed.wrap(model, d, device)  # DDP when distributed; `model` stays the plain module
    if t.compile:
        trained = torch.compile(trained)
    pixels = train_tab[[f"px_{c}" for c in range(n_cls)]].sum().to_numpy()
    cw = class_weights_from_pixels(torch.tensor(pixels.astype(np.int64)), t.class_weights)
    unweighted = sorted(n for n, w in t.loss.items() if w > 0 and n in NO_CLASS_WEIGHTS)
    if cw is not None and unweighted and d.main:
        print(f"note: train.class_weights {t.class_weights!r} apply to every loss but {', '.join(unweighted)}")
    loss_fn = build_loss(t.loss, cw.to(device) if cw is not None else None, t.boundary_width, t.boundary_weight).to(device)
    opt = build_optimizer(model, encoder_of(model), t.optimizer, t.lr, t.encoder_lr, t.weight_decay, t.lookahead)

    paste = paste_class_ids(t.copy_paste_classes, classes, pixels)
    donors = [i for i, row in train_tab.iterrows() if any(row[f"px_{c}"] > 0 for c in paste)]
    train_ds = SegDataset(train_tab, build_transform(t.augment, t.image_size, seed), t.copy_paste, paste, donors, seed)
    val_ds = SegDataset(val_tab, build_transform([], t.image_size))
    gen = torch.Generator().manual_seed(seed)
    cuda = device.type == "cuda"
    # One seeded permutation per epoch, cut into global batches; each rank takes its share of each.
    sampler = DistributedSampler(train_ds, d.world, d.rank, shuffle=True, seed=seed)
    loader = dict(num_workers=t.workers, pin_memory=cuda, persistent_workers=t.workers > 0)
    train_dl = DataLoader(train_ds, t.batch_size // d.world, sampler=sampler, drop_last=len(train_ds) > t.batch_size,
                          worker_init_fn=worker_init, generator=gen, **loader)
    val_dl = DataLoader(val_ds, t.batch_size, **loader)  # all validation images (reports, SWA)
    shard = DataLoader(Subset(val_ds, range(d.rank, len(val_ds), d.world)), t.batch_size, **loader)

    def validate_all(net):
        """Validation over every rank's shard: summed confusion, mean loss — as one process would."""
        loss, cm, _ = validate(net, shard, val_tab, loss_fn, n_cls, device, t.amp, t.channels_last)
        total = d.sum(torch.tensor([loss * len(shard.dataset), len(shard.dataset)], dtype=torch.float64))
        cm.mat = d.sum(cm.mat)
        return float(total[0] / max(total[1], 1)), cm
    steps = math.ceil(len(train_dl) / t.accumulate)
    schedule = build_schedule(opt, t.scheduler, steps * epochs, round(t.warmup_epochs * steps))
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and t.amp == "fp16")

    params = {**{k: str(v) for k, v in p.flat().items() if k not in ("train.folds", "train.seeds")},
              "fold": str(fold), "seed": str(seed), "data": fingerprint(*inputs), "round": "2" if round2 else "1"}
    history, best, start = [], -1.0, 0
    swa = AveragedModel(model) if t.swa_epochs and not round2 else None
    last, tag, name = out / "last.pt", "train_round2" if round2 else "train", f"fold {fold} seed {seed}"
    ck = load_checkpoint(last, device) if last.exists() else {}
    done = [out / "best.pt", out / "val_confusion.npy"] + ([out / "swa.pt"] if swa is not None else [])
    if ck.get("params") == params and ck["epoch"] == epochs and "optimizer" not in ck and all(f.exists() for f in done):
        print(f"{name}: already trained with these params, data and code; reusing it")
        for row in ck["history"] if run else []:
            run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        if not d.main:
            return ck["scores"] if "scores" in ck else {}
        return finish_fold(fold, seed, model, out, val_tab, val_dl, loss_fn, classes, ck["history"], device, p, run, tag)
    if ck.get("params") == params and ck["epoch"] < epochs:
        model.load_state_dict(ck["model"])
        if swa is not None:
            swa.load_state_dict(ck["swa"])
        opt.load_state_dict(ck["optimizer"])
        schedule.load_state_dict(ck["schedule"])
        scaler.load_state_dict(ck["scaler"])
        history, best, start = ck["history"], ck["best_miou"], ck["epoch"]
        torch.set_rng_state(ck["rng"])
        for row in history if run else []:  # a resumed run still shows its whole curve
            run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        print(f"{name}: resuming after epoch {start}")
    elif d.main:
        d.barrier()  # every rank has read last.pt before it goes
        shutil.rmtree(out, ignore_errors=True)
    else:
        d.barrier()
    out.mkdir(parents=True, exist_ok=True)

    for epoch in range(start, epochs):
        gen.manual_seed(seed * 1000 + epoch)  # the epoch's order and augmentations depend on the epoch alone
        sampler.set_epoch(epoch)
        train_ds.reseed(seed * 1000 + epoch)
        rng = np.random.default_rng(seed * 1000 + epoch)
        tr = train_one_epoch(trained, train_dl, loss_fn, opt, schedule, scaler, device, t.amp, t.accumulate,
                             t.clip_grad, t.cutmix, rng, t.channels_last, desc=f"{name} epoch {epoch + 1}")
        tr = d.mean(tr)
        use_slow_weights(opt)   # Lookahead: validate, average and save the slow weights
        val_loss, cm = validate_all(model)
        s = scores(cm.numpy(), classes)
        schedule.step_epoch(s["mIoU"])
        row = {"epoch": epoch + 1, **{f"train/{k}": v for k, v in tr.items()}, "val/loss": val_loss,
               **flat_scores(s, "val"), **{f"lr/{g['name']}": g["lr"] for g in opt.param_groups}}
        if swa is not None and epoch >= epochs - t.swa_epochs:
            swa.update_parameters(model)
        history.append(row)
        if run:
            run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
        if d.main:
            print(f"{name} epoch {epoch + 1}/{epochs}: train loss {tr['loss']:.4f}  val loss {val_loss:.4f}  "
                  f"val mIoU {s['mIoU']:.4f}", flush=True)
        if s["mIoU"] > best and d.main:
            save_checkpoint(out / "best.pt", model=model.state_dict(), epoch=epoch + 1, classes=classes,
                            params=params, scores=s, confusion=cm.mat.cpu().clone())
        best = max(best, s["mIoU"])
        if d.main:
            save_checkpoint(last, model=model.state_dict(), optimizer=opt.state_dict(), schedule=schedule.state_dict(),
                            scaler=scaler.state_dict(), epoch=epoch + 1, history=history, best_miou=best,
                            rng=torch.get_rng_state(), classes=classes, params=params,
                            swa=swa.state_dict() if swa is not None else None)
            cli.kept(f"{name}: {last} holds epoch {epoch + 1} of {epochs}; `dvc repro` resumes from there")
    if swa is not None:  # BN statistics of the averaged weights, from the training images (no augmentation)
        bn_dl = DataLoader(SegDataset(train_tab, build_transform([], t.image_size)), t.batch_size)
        update_bn(bn_dl, swa, device)  # every rank alike: identical weights, identical statistics
        _, swa_cm = validate_all(swa.module)
        swa_scores = scores(swa_cm.numpy(), classes)
        if d.main:
            save_checkpoint(out / "swa.pt", model=swa.module.state_dict(), epoch=epochs, classes=classes,
                            params=params, swa_epochs=t.swa_epochs)
            with atomic_file(out / "val_confusion_swa.npy") as tmp:
                np.save(tmp, swa_cm.numpy())
            print(f"{name} SWA over the last {t.swa_epochs} epochs: val mIoU {swa_scores['mIoU']:.4f}")
        if run:
            run.log_metrics({f"swa/{k}": v for k, v in flat_scores(swa_scores, "val").items()})
    if not d.main:
        d.barrier()  # rank 0 writes the reports
        return s
    # Done: the optimizer state was only needed to resume; keep the final weights and the history.
    save_checkpoint(last, model=model.state_dict(), epoch=epochs, history=history, best_miou=best,
                    classes=classes, params=params)
    s = finish_fold(fold, seed, model, out, val_tab, val_dl, loss_fn, classes, history, device, p, run, tag)
    d.barrier()
    return s


def finish_fold(fold, seed, model, out, val_tab, val_dl, loss_fn, classes, history, device, p, run, tag="train") -> dict:
    """The best checkpoint's scores (its epoch's validation confusion, kept in best.pt: the fold is
    not validated twice) and every report; only the gallery's few images are predicted again."""
    t = p.train
    best = load_checkpoint(out / "best.pt", device)
    model.load_state_dict(best["model"])
    n_present = (val_tab[[f"px_{c}" for c in range(1, len(classes))]] > 0).sum(axis=1)
    shown = n_present.sort_values(ascending=False, kind="stable").index[: t.gallery].tolist()
    if "confusion" in best:
        cm = best["confusion"].numpy()
        gallery = DataLoader(Subset(val_dl.dataset, shown), val_dl.batch_size)
        preds = validate(model, gallery, val_tab, loss_fn, len(classes), device, t.amp, t.channels_last,
                         keep=set(shown))[2] if shown else {}
    else:   # a checkpoint written before best.pt kept its confusion
        _, matrix, preds = validate(model, val_dl, val_tab, loss_fn, len(classes), device, t.amp, t.channels_last,
                                    keep=set(shown))
        cm = matrix.numpy()
    s = scores(cm, classes)
    with atomic_file(out / "val_confusion.npy") as tmp:
        np.save(tmp, cm)
    reports = out / "reports"
    reports.mkdir(exist_ok=True)
    plot_confusion(cm, classes, reports / "confusion.png", f"fold {fold} seed {seed}, best epoch {best['epoch']}")
    plot_iou(s["IoU"], reports / "iou.png", f"fold {fold} seed {seed}: mIoU {s['mIoU']:.3f}")
    plot_curves(history, reports / "curves.png")
    if shown:
        plot_gallery([read_image(val_tab["image"][i], (val_tab["height"][i], val_tab["width"][i])) for i in shown],
                     [cv2.imread(val_tab["mask"][i], cv2.IMREAD_UNCHANGED) for i in shown],
                     [preds[i] for i in shown], classes, reports / "gallery.png")
    plots = Path(p.paths.plots) / tag
    plots.mkdir(parents=True, exist_ok=True)
    with atomic_file(plots / f"{member_name(fold, seed)}.csv") as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    summary = {"fold": fold, "seed": seed, "best_epoch": best["epoch"], "val_images": len(val_tab),
               **{k: v for k, v in s.items() if k in ("mIoU", "pixel_acc", "mean_acc", "fwIoU")},
               "IoU": {k: v for k, v in s["IoU"].items() if v is not None}}
    write_json(Path(p.paths.metrics) / tag / f"{member_name(fold, seed)}.json", {"val": summary})
    if run:
        run.log_metrics({f"best/{k}": v for k, v in flat_scores(s, "val").items()})
        run.log_artifacts(reports, "reports")
    return s
