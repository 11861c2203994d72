"""Exploratory analysis from the annotations alone (image pixels are never decoded).

Everything pixel-based is rasterised with the image's longest side capped at `max_side` (the
report says which), through the same `paint` the mask cache uses, so the overlap figures describe
exactly what the masks will contain.

Overlap: for classes a != b, `pixels` counts pixels covered by annotations of both, `images` the
images where that happens; `a_lost_to_b` counts pixels annotated as a that the overlap rule paints
as b (and the reverse), i.e. what the rule reassigns.
"""
from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from pipeline.data.coco import IGNORE_INDEX, Dataset
from pipeline.data.masks import paint, target_size, to_rle, unknown_class_index


@dataclass
class EdaResult:
    tables: dict[str, pd.DataFrame]  # name -> table, written as <name>.csv
    summary: dict                    # small, flat-ish dict: DVC metrics and MLflow metrics


def _image_stats(task: tuple) -> dict:
    """One image: per-annotation areas, per-class painted pixels, pair overlaps, reassignments."""
    key, h, w, segs, classes, max_side, rule, unknown_class, unknown = task
    out_hw = target_size(h, w, max_side)
    n_px = out_hw[0] * out_hw[1]
    if not segs:
        return dict(key=key, n_px=n_px, areas=[], painted=np.bincount([0], [n_px], minlength=256), pairs={}, lost={})
    rles = [to_rle(s, h, w, *out_hw) for s in segs]
    label = paint(rles, classes, rule, out_hw, unknown_class, unknown)
    areas = [int(a) for a in mask_utils.area(rles)]
    planes: dict[int, np.ndarray] = {}
    for rle, c in zip(rles, classes):
        m = mask_utils.decode(rle).astype(bool)
        planes[c] = planes[c] | m if c in planes else m
    present = sorted(planes)
    pairs, lost = {}, {}
    for i, a in enumerate(present):
        painted_as = np.bincount(label[planes[a]], minlength=256)
        for b in np.nonzero(painted_as)[0]:
            if b != a:
                lost[(a, int(b))] = int(painted_as[b])
        for b in present[i + 1:]:
            both = int(np.count_nonzero(planes[a] & planes[b]))
            if both:
                pairs[(a, b)] = both
    return dict(key=key, n_px=n_px, areas=areas, painted=np.bincount(label.ravel(), minlength=256), pairs=pairs, lost=lost)


def analyse(ds: Dataset, max_side: int, overlap: str, unknown: str = "keep", unknown_name: str = "UNKNOWN",
            workers: int = 1) -> EdaResult:
    """Compute every EDA table for the labelled pool (see the module docstring). workers=0: all cores."""
    workers = workers or os.cpu_count() or 1
    unknown_class = unknown_class_index(ds.classes, unknown_name)
    by_key = ds.annotations_by_key()
    tasks = []
    for r in ds.images.itertuples(index=False):
        a = by_key.get(r.key)
        segs, cls = (list(a.segmentation), [int(c) for c in a.class_idx]) if a is not None else ([], [])
        tasks.append((r.key, r.height, r.width, segs, cls, max_side, overlap, unknown_class, unknown))
    if workers > 1 and len(tasks) >= 64:
        with ProcessPoolExecutor(workers) as pool:
            stats = list(pool.map(_image_stats, tasks, chunksize=max(1, len(tasks) // (workers * 8))))
    else:
        stats = [_image_stats(t) for t in tasks]
    names = ds.classes
    K = len(names)
    anns = ds.annotations

    # Per annotation: area as a fraction of its image, and how the json `area` compares.
    img = ds.images.set_index("key")
    frac = np.concatenate([np.asarray(s["areas"], float) / s["n_px"] for s in stats]) if len(anns) else np.array([])
    order = pd.Index([s["key"] for s in stats])
    ann_tab = pd.concat([by_key[k] for k in order if k in by_key]) if len(anns) else anns
    full_px = img.loc[ann_tab.key, "width"].to_numpy() * img.loc[ann_tab.key, "height"].to_numpy()
    ann_table = pd.DataFrame({
        "ann_id": ann_tab.ann_id.to_numpy(), "key": ann_tab.key.to_numpy(),
        "class": [names[c] for c in ann_tab.class_idx], "iscrowd": ann_tab.iscrowd.to_numpy(),
        "area_frac": frac, "area_px": np.round(frac * full_px),
        "json_area": pd.to_numeric(ann_tab.json_area, errors="coerce").to_numpy(),
    })
    ann_table["json_area_ratio"] = ann_table.json_area / ann_table.area_px.where(ann_table.area_px > 0)

    # Per class: instances, images, painted pixel share.
    painted = np.sum([s["painted"] for s in stats], axis=0)
    total_px = painted.sum()
    fg_px = total_px - painted[0] - painted[IGNORE_INDEX]
    inst = anns.groupby("class_idx").size().reindex(range(K), fill_value=0)
    crowd = anns[anns.iscrowd == 1].groupby("class_idx").size().reindex(range(K), fill_value=0)
    imgs = anns.groupby("class_idx").key.nunique().reindex(range(K), fill_value=0)
    class_table = pd.DataFrame({
        "class_idx": range(K), "class": names, "instances": inst.to_numpy(), "crowd": crowd.to_numpy(),
        "images": imgs.to_numpy(), "image_share": imgs.to_numpy() / len(ds.images),
        "pixels": painted[:K], "pixel_share": painted[:K] / total_px,
        "foreground_share": np.where(np.arange(K) == 0, np.nan, painted[:K] / max(fg_px, 1)),
    })
    class_table.loc[0, ["instances", "crowd", "images", "image_share"]] = [0, 0, len(ds.images) - anns.key.nunique(),
                                                                          (len(ds.images) - anns.key.nunique()) / len(ds.images)]

    # Overlaps between classes.
    pair_px, pair_img, lost = defaultdict(int), defaultdict(int), defaultdict(int)
    overlap_rows = []
    for s in stats:
        for ab, n in s["pairs"].items():
            pair_px[ab] += n
            pair_img[ab] += 1
        for ab, n in s["lost"].items():
            lost[ab] += n
        if s["pairs"]:
            overlap_rows.append(dict(key=s["key"], image_id=int(img.loc[s["key"], "image_id"]),
                                     pairs="; ".join(f"{names[a]} + {names[b]}" for a, b in sorted(s["pairs"])),
                                     overlap_pixels=sum(s["pairs"].values()),
                                     overlap_frac=sum(s["pairs"].values()) / s["n_px"]))
    pair_table = pd.DataFrame([
        dict(class_a=names[a], class_b=names[b], images=pair_img[(a, b)], pixels=pair_px[(a, b)],
             a_lost_to_b=lost.get((a, b), 0), b_lost_to_a=lost.get((b, a), 0))
        for a, b in sorted(pair_px, key=lambda ab: -pair_px[ab])
    ], columns=["class_a", "class_b", "images", "pixels", "a_lost_to_b", "b_lost_to_a"])
    overlap_images = pd.DataFrame(overlap_rows, columns=["key", "image_id", "pairs", "overlap_pixels", "overlap_frac"])
    overlap_matrix = np.zeros((K, K), dtype=np.int64)
    for (a, b), n in pair_px.items():
        overlap_matrix[a, b] = overlap_matrix[b, a] = n

    per_image = pd.DataFrame({"key": ds.images.key, "image_id": ds.images.image_id,
                              "annotations": ds.images.key.map(anns.groupby("key").size()).fillna(0).astype(int),
                              "classes": ds.images.key.map(anns.groupby("key").class_idx.nunique()).fillna(0).astype(int)})
    issues = ds.issues
    errors = issues[issues.severity == "error"]
    present = class_table[(class_table.class_idx > 0) & (class_table.instances > 0)]
    summary = {
        "images": int(len(ds.images)),
        "annotations": int(len(anns)),
        "classes": int(K - 1),
        "classes_absent": [c for c in class_table["class"][1:][class_table.instances[1:] == 0]],
        "images_without_annotations": int((per_image.annotations == 0).sum()),
        "annotations_per_image": {"mean": float(per_image.annotations.mean()), "max": int(per_image.annotations.max())},
        "crowd_annotations": int(anns.iscrowd.sum()),
        "imbalance_ratio": float(present.instances.max() / present.instances.min()) if len(present) else 0.0,
        "rarest_class": str(present.sort_values("instances")["class"].iloc[0]) if len(present) else None,
        "overlap": {"images": int(len(overlap_images)), "class_pairs": int(len(pair_table)),
                    "pixel_frac": float(sum(pair_px.values()) / total_px) if total_px else 0.0,
                    "reassigned_pixels": int(sum(lost.values()))},
        "json_area_mismatch": int((ann_table.json_area_ratio.sub(1).abs() > 0.5).sum()),
        "issues": {"skipped": int(len(errors)), "notes": int((issues.severity == "info").sum())},
        "resolution_max_side": int(max_side),
    }
    tables = {"class_stats": class_table, "annotations": ann_table, "per_image": per_image,
              "overlap_pairs": pair_table, "overlap_images": overlap_images, "issues": issues,
              "overlap_matrix": pd.DataFrame(overlap_matrix, index=names, columns=names)}
    return EdaResult(tables=tables, summary=summary)


def write_report(result: EdaResult, out_dir: str | Path) -> list[Path]:
    """Write the tables as CSV and the plots as PNG into out_dir; return the PNG paths."""
    out_dir = Path(out_dir)
    for name, table in result.tables.items():
        table.to_csv(out_dir / f"{name}.csv", index=(name == "overlap_matrix"))
    return plot_report(result, out_dir)


def plot_report(result: EdaResult, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = result.tables
    cls = t["class_stats"].iloc[1:]
    paths = []

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, col, title in zip(axes, ["instances", "images", "foreground_share"],
                              ["annotations per class", "images containing the class", "share of labelled pixels"]):
        ax.barh(cls["class"], cls[col], color="tab:blue")
        ax.set_title(title)
        ax.invert_yaxis()
    fig.suptitle("Class balance")
    fig.tight_layout()
    paths.append(out_dir / "class_balance.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    m = t["overlap_matrix"].to_numpy()[1:, 1:].astype(float)
    names = list(t["overlap_matrix"].index[1:])
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(np.log10(1 + m), cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_yticks(range(len(names)), names)
    pairs = t["overlap_pairs"].set_index(["class_a", "class_b"])
    for (a, b), row in pairs.iterrows():
        i, j = names.index(a), names.index(b)
        for y, x in ((i, j), (j, i)):
            ax.text(x, y, str(int(row.images)), ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label="log10(1 + overlapping pixels)")
    ax.set_title(f"Overlapping labels (numbers: images; longest side {result.summary['resolution_max_side']} px)")
    fig.tight_layout()
    paths.append(out_dir / "overlap_matrix.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    a = t["annotations"]
    frac = a.area_frac[a.area_frac > 0]
    if len(frac):
        bins = np.logspace(np.log10(frac.min()), 0, 30)
        for name, g in a[a.area_frac > 0].groupby("class"):
            axes[0].hist(g.area_frac, bins=bins, histtype="step", label=name)
        axes[0].set_xscale("log")
        axes[0].legend(fontsize=7)
    axes[0].set_title("object area (fraction of the image)")
    per = t["per_image"].annotations
    axes[1].hist(per, bins=np.arange(per.max() + 2) - 0.5, color="tab:green")
    axes[1].set_title("annotations per image")
    fig.tight_layout()
    paths.append(out_dir / "area_hist.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths

