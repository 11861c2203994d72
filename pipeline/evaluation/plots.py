"""Figures for a fold: confusion matrix, per-class IoU, learning curves, validation galleries, and
the table of every validation image's scores; the test-prediction gallery."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.labels import IGNORE_INDEX
from pipeline.data.masks import palette, read_image
from pipeline.evaluation.metrics import image_ious
from pipeline.io import atomic_file


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, dpi: int) -> None:
    """Write the figure atomically (a killed stage never leaves half a PNG) and free it."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    _plt().close(fig)


def plot_confusion(mat: np.ndarray, names: list[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (rows: truth); cells show the share of the true class."""
    plt = _plt()
    mat = np.asarray(mat, float)
    norm = mat / np.maximum(mat.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(9, 8))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(norm):
        if v >= 0.005:
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v > 0.5 else "k")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title or "confusion (share of each true class)")
    fig.tight_layout()
    _save(fig, path, 90)
    return path


def plot_iou(iou: dict[str, float | None], path: Path, title: str = "") -> Path:
    plt = _plt()
    names = list(iou)
    vals = [v if v is not None else 0.0 for v in iou.values()]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.2))
    bars = ax.barh(names, vals, color=["tab:gray" if iou[n] is None else "tab:blue" for n in names])
    for b, n in zip(bars, names):
        ax.text(b.get_width() + 0.01, b.get_y() + b.get_height() / 2,
                "absent" if iou[n] is None else f"{iou[n]:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, 1.1)
    ax.invert_yaxis()
    ax.set_title(title or "IoU per class")
    fig.tight_layout()
    _save(fig, path, 90)
    return path


def plot_curves(history: list[dict], path: Path) -> Path:
    plt = _plt()
    ep = [h["epoch"] for h in history]
    val = [h for h in history if "val/mIoU" in h]   # train.val_every > 1 validates some epochs only
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(ep, [h["train/loss"] for h in history], "o-", label="train")
    a.plot([h["epoch"] for h in val], [h["val/loss"] for h in val], "o-", label="val")
    a.set_title("loss")
    a.legend()
    b.plot([h["epoch"] for h in val], [h["val/mIoU"] for h in val], "o-", label="val mIoU")
    b.plot([h["epoch"] for h in val], [h["val/pixel_acc"] for h in val], "o-", label="val pixel acc")
    b.set_ylim(0, 1)
    b.set_title("validation")
    b.legend()
    for ax in (a, b):
        ax.set_xlabel("epoch")
    fig.tight_layout()
    _save(fig, path, 90)
    return path


GALLERY_CLASSES = 6   # per-class panels in a gallery row


def plot_gallery(images: list[np.ndarray], truths: list[np.ndarray], preds: list[np.ndarray],
                 names: list[str], path: Path, rows: list[tuple[str, int]] | None = None) -> Path:
    """One row per image: image | truth | prediction | then, per class present in truth or
    prediction (the row's focus class first), a panel with true positives green, false positives
    red, false negatives blue. rows: (title on the image panel, focus class) per row."""
    titles, focus = ([t for t, _ in rows], [c for _, c in rows]) if rows else (None, None)
    max_classes = GALLERY_CLASSES
    plt = _plt()
    pal = palette(len(names))
    ncols = 3 + max_classes
    fig, axes = plt.subplots(len(images), ncols, figsize=(2.0 * ncols, 2.1 * len(images)), squeeze=False)
    for r, (img, t, p) in enumerate(zip(images, truths, preds)):
        row = axes[r]
        first = titles[r] if titles else "image"
        for ax, pic, title in zip(row, (img, pal[t], pal[p]), (first, "truth", "prediction")):
            ax.imshow(pic)
            ax.set_title(title, fontsize=8)
        classes = [c for c in np.union1d(np.unique(t), np.unique(p)) if 0 < c < len(names)]
        if focus:
            classes = [focus[r]] + [c for c in classes if c != focus[r]]
        classes = classes[:max_classes]
        for ax, c in zip(row[3:], classes):
            err = np.zeros(t.shape + (3,), np.uint8)
            err[(t == c) & (p == c)] = (0, 200, 0)
            err[(t != c) & (p == c) & (t != IGNORE_INDEX)] = (230, 0, 0)
            err[(t == c) & (p != c)] = (0, 90, 255)
            ax.imshow(err)
            inter, union = ((t == c) & (p == c)).sum(), ((t == c) | (p == c)).sum()
            ax.set_title(f"{names[c]} IoU {inter / max(union, 1):.2f}", fontsize=7)
        for ax in row:
            ax.axis("off")
    fig.suptitle("validation: green = correct, red = false positive, blue = missed", fontsize=9)
    # Fixed margins: tight_layout measures every one of the grid's panels (seconds per gallery).
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.7 / fig.get_figheight(), wspace=0.05, hspace=0.25)
    _save(fig, path, 80)
    return path


def plot_test_gallery(images: pd.DataFrame, kept: dict[int, np.ndarray], names: list[str], path: Path) -> Path:
    """plot_predictions for the rows of `images` (path, height, width) whose predictions were `kept`."""
    shown = sorted(kept)
    return plot_predictions([read_image(images.path[i], (images.height[i], images.width[i])) for i in shown],
                            [kept[i] for i in shown], names, path)


def plot_predictions(images: list[np.ndarray], preds: list[np.ndarray], names: list[str], path: Path) -> Path:
    """Unlabelled images (e.g. the test set): image | prediction | overlay, with a class legend."""
    plt = _plt()
    pal = palette(len(names))
    fig, axes = plt.subplots(len(images), 3, figsize=(7.5, 2.5 * len(images)), squeeze=False)
    for row, img, p in zip(axes, images, preds):
        colour = pal[p]
        overlay = np.where(p[..., None] > 0, (0.5 * img + 0.5 * colour).astype(np.uint8), img)
        for ax, pic, title in zip(row, (img, colour, overlay), ("image", "prediction", "overlay")):
            ax.imshow(pic)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    present = sorted({int(c) for p in preds for c in np.unique(p) if 0 < c < len(names)})
    handles = [plt.Rectangle((0, 0), 1, 1, color=pal[c] / 255) for c in present]
    if handles:
        fig.legend(handles, [names[c] for c in present], loc="lower center", ncol=4, fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save(fig, path, 80)
    return path


def write_image_scores(per_image: np.ndarray, val_tab: pd.DataFrame, classes: list[str], path: Path) -> None:
    """val_images.csv: each validation image's mIoU (over the classes in its truth or prediction) and
    per-class IoU, worst first — what the report and a label audit start from."""
    iou = image_ious(per_image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # an image with no class at all: NaN
        miou = np.nanmean(iou, axis=1)
    table = pd.DataFrame({"key": val_tab["key"], "mIoU": miou, **{f"IoU/{c}": iou[:, k] for k, c in enumerate(classes)}})
    with atomic_file(path) as tmp:
        table.sort_values("mIoU", kind="stable").to_csv(tmp, index=False, float_format="%.4f")
