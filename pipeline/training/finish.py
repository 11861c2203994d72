"""State finishing of a training run: the best checkpoint's scores, reports and metrics."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
from torch.utils.data import DataLoader, Subset

from pipeline.data.masks import read_image
from pipeline.evaluation.metrics import Metric, flat_scores, scores, worst_per_class
from pipeline.evaluation.reports import plot_confusion, plot_curves, plot_gallery, plot_iou, write_image_scores
from pipeline.io import atomic_file, write_json
from pipeline.models.checkpoint import load_checkpoint
from pipeline.training.fold import FoldRun, as_validated
from pipeline.training.loop import validate

EPOCH_S = "time/epoch_s"   # a history row's wall seconds: kept beside last.pt, not in it (Member.epoch_seconds)


def finish_fold(f: FoldRun, model, val_dl: DataLoader, loss_fn, history: list[dict]) -> dict:
    """The best checkpoint's scores (its epoch's validation confusion, kept in best.pt: the fold is
    not validated twice) and every report; only the gallery's few images are predicted again."""
    member, classes = f.member, f.classes
    best = load_checkpoint(member.checkpoint("best"), f.device)
    model.load_state_dict(best["model"])
    cm, per_image = best["confusion"].numpy(), best["image_confusions"].numpy()
    s = {**scores(cm, classes), "metric": Metric.of(f.p.metric).value(per_image)}
    with atomic_file(member.val_confusion()) as tmp:
        np.save(tmp, cm)
    with atomic_file(member.image_confusions) as tmp:   # per validation image: cv's bootstrap, paired tests
        np.savez(tmp, keys=np.asarray(f.val_tab.key, dtype=str), confusions=per_image)
    write_image_scores(per_image, f.val_tab, classes, member.val_images)
    member.reports.mkdir(exist_ok=True)
    plot_confusion(cm, classes, member.confusion_png, f"{f.name}, best epoch {best['epoch']}")
    plot_iou(s["IoU"], member.iou_png, f"{f.name}: mIoU {s['mIoU']:.3f}")
    plot_curves(history, member.curves_png)
    plot_worst(f, model, val_dl, loss_fn, per_image)
    with atomic_file(f.ws.history_csv(f.tag, f.fold, f.seed)) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    summary = {"fold": f.fold, "seed": f.seed, "best_epoch": best["epoch"], "val_images": len(f.val_tab),
               "train_s": round(sum(h.get(EPOCH_S, 0.0) for h in history), 1),   # wall: not reproducible
               **{k: v for k, v in s.items() if k in ("metric", "mIoU", "pixel_acc", "mean_acc", "fwIoU")},
               "IoU": {k: v for k, v in s["IoU"].items() if v is not None}}
    write_json(f.ws.member_metrics(f.tag, f.fold, f.seed), {"val": summary})
    if f.run:
        f.run.log_metrics({f"best/{k}": v for k, v in flat_scores(s, "val").items()})
        f.run.log_artifacts(member.reports, "reports")
    return s


def plot_worst(f: FoldRun, model, val_dl: DataLoader, loss_fn, per_image: np.ndarray) -> None:
    """The gallery: each class's worst validation image (image | truth | prediction | per class),
    predicted again by the best model (only these few images)."""
    worst, tab = worst_per_class(per_image, f.p.train.gallery), f.val_tab
    shown = [i for i, _, _ in worst]
    if not shown:
        return
    gallery = DataLoader(Subset(val_dl.dataset, shown), val_dl.batch_size)
    preds = validate(as_validated(model, f.p.train), gallery, tab, loss_fn, f.evaluation(), keep=set(shown))[2]
    plot_gallery([read_image(tab["image"][i], (tab["height"][i], tab["width"][i])) for i in shown],
                 [cv2.imread(tab["mask"][i], cv2.IMREAD_UNCHANGED) for i in shown], [preds[i] for i in shown],
                 f.classes, f.member.gallery_png, [(f"worst {f.classes[c]}: IoU {v:.2f}", c) for _, c, v in worst])
