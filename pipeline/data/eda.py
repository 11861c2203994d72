"""Exploratory analysis from the annotations alone (image pixels are never decoded).

Every figure is exact at the images' full resolution, and none needs a bitmap: each annotation is
rasterised to a COCO RLE (what the masks stage paints), and areas, intersections and what the
overlap rule paints come from run-length operations. Only annotations whose boxes touch another's
(a box prefilter, then connected groups) are intersected, so a 12-MP photo costs about what its
polygons' outlines cost.

Overlap: for classes a != b, `pixels` counts pixels covered by annotations of both, `images` the
images where that happens; `a_lost_to_b` counts pixels annotated as a that the overlap rule paints
as b (and the reverse), i.e. what the rule reassigns. Class `pixels` are what the masks will hold.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.data.coco import ISSUE_COLUMNS, Dataset
from pipeline.data.sources import naming_summary
from pipeline.labels import IGNORE_INDEX
from pipeline.data.masks import paint_order, to_rle, union, unknown_class_index
from pipeline.data.rle import rle_runs, rle_spans, span_pixels
from pipeline.io import parallel_map
from pipeline.workspace import EdaFiles

# A json `area` is "wrong" when it is off by half the true area *and* by more than the box's
# perimeter (rasterised and polygon areas of one shape differ by up to about half the perimeter).
AREA_MISMATCH_FRAC = 0.5


@dataclass
class EdaResult:
    tables: dict[str, pd.DataFrame]  # name -> table, written as <name>.csv
    summary: dict                    # small, flat-ish dict: DVC metrics and MLflow metrics


def canonical_runs(runs: np.ndarray) -> np.ndarray:
    """The same pixels as run lengths with no zero-length run after the first. pycocotools' merge
    assumes that form: a zero-length run inside (a crowd RLE written that way, or a complement
    of a mask that starts on its first pixel) can make it loop forever."""
    runs = np.asarray(runs, np.int64)
    if len(runs) < 2 or (runs[1:] > 0).all():
        return runs
    edges, n = np.unique(np.cumsum(runs)[:-1], return_counts=True)   # every edge toggles the value
    kept = edges[n % 2 == 1]                                         # two toggles at one pixel cancel
    return np.diff(np.concatenate([[0], kept, [runs.sum()]]))


def _rle(runs: np.ndarray, h: int, w: int) -> dict:
    return mask_utils.frPyObjects({"size": [h, w], "counts": canonical_runs(runs).tolist()}, h, w)


def _canonical(rle: dict) -> dict:
    runs = rle_runs(rle)
    if len(runs) < 2 or (runs[1:] > 0).all():
        return rle
    h, w = rle["size"]
    return _rle(runs, h, w)


def _union(rles: list[dict]) -> dict:
    return _canonical(union(rles))


def _intersect(a: dict, b: dict) -> dict:
    return _canonical(mask_utils.merge([a, b], intersect=True))


def _minus(a: dict, b: dict, h: int, w: int) -> dict:
    """a and not b (the complement of an RLE is its runs behind one empty run)."""
    return _intersect(a, _rle(np.concatenate([[0], rle_runs(b)]), h, w))


def _area(rle: dict) -> int:
    return int(rle_runs(rle)[1::2].sum())


def _touching_groups(boxes: np.ndarray) -> tuple[int, np.ndarray]:
    """Connected groups of annotations whose pixel boxes (x, y, w, h) intersect."""
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
    touch = (x0[:, None] < x1[None]) & (x0[None] < x1[:, None]) & (y0[:, None] < y1[None]) & (y0[None] < y1[:, None])
    return connected_components(coo_matrix(touch), directed=False)


def _image_stats(task: tuple, dense: Optional[bool] = None) -> dict:
    """One image at full resolution: per-annotation areas and box perimeters, per-class painted
    pixels, class-pair overlaps and reassigned pixels.
    dense: the pixel-array path (linear in annotations; default above DENSE_ABOVE annotations) or
    the run-length one (no full-image array; the default for the usual few dozen)."""
    key, h, w, segs, classes, rule, unknown_class, unknown = task
    n_px = h * w
    if not segs:
        return dict(key=key, n_px=n_px, areas=[], perimeters=[], box_fill=[], inside=[], painted={0: n_px}, pairs={},
                    lost={})
    rles = [to_rle(s, h, w, h, w) for s in segs]
    boxes = np.array([mask_utils.toBbox(r) for r in rles]).reshape(-1, 4)
    value: list[Optional[int]] = [None if c == unknown_class and unknown == "background" else
                                  IGNORE_INDEX if c == unknown_class and unknown == "ignore" else c for c in classes]
    if dense is None:
        dense = len(segs) > DENSE_ABOVE
    paint = Painting(classes, value, rule, unknown_class, unknown == "ignore")
    if dense and len(set(classes)) <= MAX_DENSE_CLASSES:
        areas, painted, pairs, lost = _dense_overlaps(rles, paint, n_px)
    else:
        rles = [_canonical(r) for r in rles]
        areas = [_area(r) for r in rles]
        painted, pairs, lost = _rle_overlaps(rles, areas, boxes, paint, (h, w))
    painted[0] = n_px - sum(painted.values())
    box_px = np.maximum(boxes[:, 2] * boxes[:, 3], 1)
    inside = _inside_other_class(rles, areas, boxes, classes) if len(segs) <= DENSE_ABOVE else [None] * len(segs)
    return dict(key=key, n_px=n_px, areas=areas, perimeters=(2 * boxes[:, 2:].sum(axis=1)).tolist(),
                box_fill=(np.asarray(areas) / box_px).tolist(), inside=inside,
                painted=dict(painted), pairs=dict(pairs), lost=dict(lost))


def _inside_other_class(rles: list[dict], areas: list[int], boxes: np.ndarray, classes: list[int]) -> list[Optional[int]]:
    """Per annotation, the class of another-class annotation covering at least INSIDE_SHARE of its
    pixels (the largest such cover), else None. Only pairs whose boxes nest that far are intersected
    (a shape inside another lies inside its box)."""
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
    iw = np.clip(np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None]), 0, None)
    ih = np.clip(np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None]), 0, None)
    nested = iw * ih >= INSIDE_SHARE * np.maximum(boxes[:, 2] * boxes[:, 3], 1)[:, None]
    cls = np.asarray(classes)
    nested &= cls[:, None] != cls[None]
    out: list[Optional[int]] = [None] * len(rles)
    for i in np.flatnonzero(nested.any(axis=1)):
        best = 0.0
        for j in np.flatnonzero(nested[i]):
            share = _area(_intersect(_canonical(rles[i]), _canonical(rles[j]))) / max(areas[i], 1)
            if share >= INSIDE_SHARE and share > best:
                best, out[i] = share, int(cls[j])
    return out


class Painting(NamedTuple):
    """One image's annotations as the masks stage paints them: class per annotation, the value it
    paints (None: nothing, unknown as background), the overlap rule, and the unknown class with
    whether its pixels are ignored (unknown: ignore)."""
    classes: list[int]
    value: list[Optional[int]]
    rule: str
    unknown_class: Optional[int]
    ignore_unknown: bool

    def own(self, c: int) -> int:
        """The value class c's own pixels show; pixels of c showing another value were reassigned."""
        return IGNORE_INDEX if c == self.unknown_class and self.ignore_unknown else c


DENSE_ABOVE = 300        # annotations in one image above which the pixel-array path runs
BOX_FILL = 0.95          # an annotation filling this much of its own box is box-shaped
INSIDE_SHARE = 0.9       # an annotation with this share of its pixels under another class's lies inside it
CLASS_NOTE_SHARE = 0.5   # a class is noted when at least this share of its annotations is box-shaped or inside
CLASS_NOTE_MIN = 5       # ...and it has at least this many annotations
MAX_DENSE_CLASSES = 16   # classes present in one image that the dense path's bit codes hold


def _dense_overlaps(rles: list[dict], paint: Painting, n_px: int) -> tuple[list[int], dict, dict, dict]:
    """(areas, painted, pairs, lost) from one pixel array per image: the top annotation of every
    pixel (np.maximum.at of paint ranks) and a bit code of the classes covering it, counted in one
    bincount. Time and memory grow with pixels and annotated area, never with annotation pairs."""
    classes, value = paint.classes, paint.value
    start, length, owner = rle_spans(rles)
    areas = np.bincount(owner, weights=length, minlength=len(rles)).astype(np.int64)
    order = paint_order(areas.tolist(), classes, paint.rule)
    rank = np.full(len(rles), -1, np.int64)
    rank[order] = np.arange(len(order))
    rank[[v is None for v in value]] = -1                    # unknown as background paints nothing
    shown_by_rank = np.array([-1 if value[j] is None else value[j] for j in order] + [-1], np.int64)
    present = sorted(set(classes))
    bit = np.array([1 << present.index(c) for c in classes], np.int64)
    px = span_pixels(start, length)
    who = np.repeat(owner, length)
    top = np.full(n_px, -1, np.int64)
    np.maximum.at(top, px, rank[who])
    code = np.zeros(n_px, np.int64)
    np.bitwise_or.at(code, px, bit[who])
    covered = np.flatnonzero(code)
    shown = shown_by_rank[top[covered]]                      # rank -1 -> the trailing -1: nothing shown
    n_shown = IGNORE_INDEX + 2
    counts = np.bincount(code[covered] * n_shown + shown + 1, minlength=n_shown)
    painted: dict[int, int] = defaultdict(int)
    pairs: dict[tuple[int, int], int] = defaultdict(int)
    lost: dict[tuple[int, int], int] = defaultdict(int)
    for k in np.flatnonzero(counts):
        cm, v, n = int(k // n_shown), int(k % n_shown) - 1, int(counts[k])
        members = [present[i] for i in range(len(present)) if cm >> i & 1]
        if v >= 0:
            painted[v] += n
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                pairs[(a, b)] += n
            if v >= 0 and v != paint.own(a):
                lost[(a, v)] += n
    return areas.tolist(), painted, pairs, lost


def _rle_overlaps(rles: list[dict], areas: list[int], boxes: np.ndarray, paint: Painting,
                  hw: tuple[int, int]) -> tuple[dict, dict, dict]:
    """(painted, pairs, lost) by run-length arithmetic within groups of touching boxes."""
    (h, w), classes, value = hw, paint.classes, paint.value
    painted: dict[int, int] = defaultdict(int)
    pairs: dict[tuple[int, int], int] = defaultdict(int)
    lost: dict[tuple[int, int], int] = defaultdict(int)
    _, group = _touching_groups(boxes)
    for g in np.unique(group):
        members = np.flatnonzero(group == g).tolist()
        if len(members) == 1:
            if value[members[0]] is not None:
                painted[value[members[0]]] += areas[members[0]]
            continue
        order = [members[i] for i in paint_order([areas[i] for i in members], [classes[i] for i in members], paint.rule)]
        shown: dict[int, dict] = {}                     # painted value -> pixels showing it
        covered = None
        for j in reversed(order):                       # from the top: what is not yet covered shows j
            if value[j] is None:
                continue
            vis = rles[j] if covered is None else _minus(rles[j], covered, h, w)
            shown[value[j]] = _union([shown[value[j]], vis]) if value[j] in shown else vis
            covered = rles[j] if covered is None else _union([covered, rles[j]])
        for v, r in shown.items():
            painted[v] += _area(r)
        planes = {c: _union([rles[i] for i in members if classes[i] == c]) for c in sorted({classes[i] for i in members})}
        present = sorted(planes)
        for i, a in enumerate(present):
            for b in present[i + 1:]:
                both = _area(_intersect(planes[a], planes[b]))
                if both:
                    pairs[(a, b)] += both
            for v, r in shown.items():
                n = _area(_intersect(planes[a], r)) if v != paint.own(a) else 0
                if n:
                    lost[(a, v)] += n
    return painted, pairs, lost


def analyse(ds: Dataset, overlap: str, unknown: str = "keep", unknown_name: str = "UNKNOWN",
            workers: int = 1) -> EdaResult:
    """Compute every EDA table for the labelled pool (see the module docstring). workers=0: all cores."""
    unknown_class = unknown_class_index(ds.classes, unknown_name)
    by_key = ds.annotations_by_key()
    tasks = []
    for r in ds.images.itertuples(index=False):
        a = by_key.get(r.key)
        segs, cls = (list(a.segmentation), [int(c) for c in a.class_idx]) if a is not None else ([], [])
        tasks.append((r.key, r.height, r.width, segs, cls, overlap, unknown_class, unknown))
    stats = parallel_map(_image_stats, tasks, "eda", workers, serial_below=64)
    painted = np.zeros(256, np.int64)   # pixels per mask value, exact: what the full-size masks will hold
    for s in stats:
        for v, n in s["painted"].items():
            painted[v] += n
    class_table = _class_table(ds, painted)
    overlaps, overlap_summary = _overlaps(ds, stats, painted.sum())
    by_image = ds.annotations.groupby("key")
    per_image = pd.DataFrame({"key": ds.images.key, "image_id": ds.images.image_id,
                              "annotations": ds.images.key.map(by_image.size()).fillna(0).astype(int),
                              "classes": ds.images.key.map(by_image.class_idx.nunique()).fillna(0).astype(int)})
    annotations = _annotation_table(ds, stats, by_key)
    issues = pd.concat([ds.issues, _shape_notes(annotations)], ignore_index=True) if len(annotations) else ds.issues
    tables = {"class_stats": class_table, "annotations": annotations, "per_image": per_image,
              **overlaps, "issues": issues}
    return EdaResult(tables=tables, summary=_summary(ds, tables, overlap_summary))


def _shape_notes(annotations: pd.DataFrame) -> pd.DataFrame:
    """Info rows for the issues table: classes whose annotations are mostly their own boxes (a
    detection export turned into segmentation), and classes whose annotations mostly lie inside
    another class's (the same object labelled twice, or parts inside wholes)."""
    rows = []
    for name, a in annotations.groupby("class", sort=True):
        n = len(a)
        if n < CLASS_NOTE_MIN:
            continue
        boxes = int((a.box_fill >= BOX_FILL).sum())
        if boxes >= CLASS_NOTE_SHARE * n:
            rows.append(dict(kind="box_shaped_class", detail=f"class {name!r}: {boxes / n:.0%} of its {n:,} annotations "
                             f"are boxes (the shape fills >= {BOX_FILL:.0%} of its bounding box): box labels rather than outlines, "
                             "unless the objects are upright rectangles"))
        inside = a.inside_class[a.inside_class != ""]
        if len(inside) >= CLASS_NOTE_SHARE * n:
            top = inside.value_counts()
            rows.append(dict(kind="class_inside_class", detail=f"class {name!r}: {len(inside) / n:.0%} of its {n:,} "
                             f"annotations lie inside an annotation of class {top.index[0]!r} ({top.iloc[0]:,})"
                             + (f" or of {', '.join(map(repr, top.index[1:4]))}" if len(top) > 1 else "")
                             + ": the same object labelled twice, or parts inside wholes"))
    return pd.DataFrame([dict(severity="info", file="", image_id=None, ann_id=None, action="noted", **r) for r in rows],
                        columns=ISSUE_COLUMNS)


def _annotation_table(ds: Dataset, stats: list[dict], by_key: dict) -> pd.DataFrame:
    """Per annotation: exact area (pixels the mask paints for it alone), and how the json `area` compares."""
    anns, img = ds.annotations, ds.images.set_index("key")
    area_px = np.concatenate([np.asarray(s["areas"], float) for s in stats]) if len(anns) else np.array([])
    perimeter = np.concatenate([np.asarray(s["perimeters"], float) for s in stats]) if len(anns) else np.array([])
    ann_tab = pd.concat([by_key[s["key"]] for s in stats if s["key"] in by_key]) if len(anns) else anns
    full_px = img.loc[ann_tab.key, "width"].to_numpy() * img.loc[ann_tab.key, "height"].to_numpy()
    table = pd.DataFrame({
        "ann_id": ann_tab.ann_id.to_numpy(), "key": ann_tab.key.to_numpy(),
        "class": [ds.classes[c] for c in ann_tab.class_idx], "iscrowd": ann_tab.iscrowd.to_numpy(),
        "area_frac": area_px / full_px, "area_px": area_px,
        "json_area": pd.to_numeric(ann_tab.json_area, errors="coerce").to_numpy(),
    })
    table["box_fill"] = np.concatenate([np.asarray(s["box_fill"], float) for s in stats]) if len(anns) else np.array([])
    inside = [c for s in stats for c in s["inside"]] if len(anns) else []
    table["inside_class"] = [ds.classes[c] if c is not None else "" for c in inside]
    table["json_area_ratio"] = table.json_area / table.area_px.where(table.area_px > 0)
    off = (table.json_area - table.area_px).abs()
    table["json_area_mismatch"] = (off > AREA_MISMATCH_FRAC * table.area_px) & (off > perimeter)
    return table


def _class_table(ds: Dataset, painted: np.ndarray) -> pd.DataFrame:
    """Per class: instances, images, painted pixels. painted: (256,) int64 pixels per mask value."""
    anns, K, n_images = ds.annotations, len(ds.classes), len(ds.images)
    total_px = painted.sum()
    fg_px = total_px - painted[0] - painted[IGNORE_INDEX]
    inst = anns.groupby("class_idx").size().reindex(range(K), fill_value=0)
    crowd = anns[anns.iscrowd == 1].groupby("class_idx").size().reindex(range(K), fill_value=0)
    imgs = anns.groupby("class_idx").key.nunique().reindex(range(K), fill_value=0)
    table = pd.DataFrame({
        "class_idx": range(K), "class": ds.classes, "instances": inst.to_numpy(), "crowd": crowd.to_numpy(),
        "images": imgs.to_numpy(), "image_share": imgs.to_numpy() / n_images,
        "pixels": painted[:K], "pixel_share": painted[:K] / total_px,
        "foreground_share": np.where(np.arange(K) == 0, np.nan, painted[:K] / max(fg_px, 1)),
    })
    unlabelled = n_images - anns.key.nunique()
    table.loc[0, ["instances", "crowd", "images", "image_share"]] = [0, 0, unlabelled, unlabelled / n_images]
    return table


def _overlaps(ds: Dataset, stats: list[dict], total_px: int) -> tuple[dict[str, pd.DataFrame], dict]:
    """Overlaps between classes: tables per class pair (pixels, images, pixels each lost to the
    other), per image, and the symmetric pixel matrix; and their summary (share of all pixels)."""
    names, K, img = ds.classes, len(ds.classes), ds.images.set_index("key")
    pair_px, pair_img, lost = defaultdict(int), defaultdict(int), defaultdict(int)
    rows = []
    for s in stats:
        for ab, n in s["pairs"].items():
            pair_px[ab] += n
            pair_img[ab] += 1
        for ab, n in s["lost"].items():
            lost[ab] += n
        if s["pairs"]:
            rows.append(dict(key=s["key"], image_id=int(img.loc[s["key"], "image_id"]),
                             pairs="; ".join(f"{names[a]} + {names[b]}" for a, b in sorted(s["pairs"])),
                             overlap_pixels=sum(s["pairs"].values()), overlap_frac=sum(s["pairs"].values()) / s["n_px"]))
    pairs = pd.DataFrame([
        dict(class_a=names[a], class_b=names[b], images=pair_img[(a, b)], pixels=pair_px[(a, b)],
             a_lost_to_b=lost.get((a, b), 0), b_lost_to_a=lost.get((b, a), 0))
        for a, b in sorted(pair_px, key=lambda ab: -pair_px[ab])
    ], columns=["class_a", "class_b", "images", "pixels", "a_lost_to_b", "b_lost_to_a"])
    matrix = np.zeros((K, K), dtype=np.int64)
    for (a, b), n in pair_px.items():
        matrix[a, b] = matrix[b, a] = n
    summary = {"images": len(rows), "class_pairs": int(len(pairs)),
               "pixel_frac": float(sum(pair_px.values()) / total_px) if total_px else 0.0,
               "reassigned_pixels": int(sum(lost.values()))}
    return {"overlap_pairs": pairs,
            "overlap_images": pd.DataFrame(rows, columns=["key", "image_id", "pairs", "overlap_pixels", "overlap_frac"]),
            "overlap_matrix": pd.DataFrame(matrix, index=names, columns=names)}, summary


def _summary(ds: Dataset, t: dict[str, pd.DataFrame], overlap: dict) -> dict:
    """The stage's metrics (metrics/eda.json) from the tables and the overlaps' summary."""
    anns, classes, per_image, issues = ds.annotations, t["class_stats"], t["per_image"], t["issues"]
    present = classes[(classes.class_idx > 0) & (classes.instances > 0)]
    return {
        "images": int(len(ds.images)),
        "annotations": int(len(anns)),
        "classes": int(len(ds.classes) - 1),
        "classes_absent": [c for c in classes["class"][1:][classes.instances[1:] == 0]],
        "images_without_annotations": int((per_image.annotations == 0).sum()),
        "annotations_per_image": {"mean": float(per_image.annotations.mean()), "max": int(per_image.annotations.max())},
        "crowd_annotations": int(anns.iscrowd.sum()),
        "imbalance_ratio": float(present.instances.max() / present.instances.min()) if len(present) else 0.0,
        "rarest_class": str(present.sort_values("instances")["class"].iloc[0]) if len(present) else None,
        "overlap": overlap,
        "json_area_mismatch": int(t["annotations"].json_area_mismatch.sum()),
        "box_shaped_annotations": int((t["annotations"].box_fill >= BOX_FILL).sum()) if len(anns) else 0,
        "annotations_inside_other_class": int((t["annotations"].inside_class != "").sum()) if len(anns) else 0,
        # copies an exporter named as one source (Roboflow's .rf.): the split keeps each source in one group
        "named_copies": naming_summary(ds.images.file_name),
        "issues": {"skipped": int((issues.severity == "error").sum()), "notes": int((issues.severity == "info").sum()),
                   "class_notes": {k: int((issues.kind == k).sum()) for k in ("box_shaped_class", "class_inside_class")}},
        # data.corrections applied (pipeline/data/corrections.py): {relabelled, deleted, added: count}
        "corrections": {str(k): int(v) for k, v in issues[issues.kind == "correction"].action.value_counts().items()},
    }


def write_report(result: EdaResult, out: EdaFiles) -> list[Path]:
    """Write the tables as CSV and the plots as PNG into the folder; return the PNG paths."""
    for name, table in result.tables.items():
        table.to_csv(out.table(name), index=(name == "overlap_matrix"))
    return plot_report(result, out)


def plot_report(result: EdaResult, out: EdaFiles) -> list[Path]:
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
    paths.append(out.class_balance_png)
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
    ax.set_title("Overlapping labels (numbers: images; exact, at full resolution)")
    fig.tight_layout()
    paths.append(out.overlap_png)
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
    # one bar per count while counts are few; 50 bars when an image holds thousands (a bar per
    # count would draw tens of thousands of patches)
    axes[1].hist(per, bins=np.arange(per.max() + 2) - 0.5 if per.max() < 60 else 50, color="tab:green")
    axes[1].set_title("annotations per image")
    fig.tight_layout()
    paths.append(out.area_hist_png)
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths

