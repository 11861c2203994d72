"""State finishing of a training run: the best checkpoint's scores, reports and metrics."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from torch.utils.data import DataLoader, Subset

from pipeline.data.masks import read_image
from pipeline.evaluation.metrics import Metric, flat_scores, scores, worst_per_class
from pipeline.evaluation.reports import plot_confusion, plot_curves, plot_gallery, plot_iou, write_image_scores
from pipeline.io import atomic_file, write_json
from pipeline.models.checkpoint import load_checkpoint, member_name
from pipeline.training.fold import FoldRun, as_validated
from pipeline.training.loop import validate


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

