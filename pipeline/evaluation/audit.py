"""Label audit: annotations and images whose labels disagree with confident out-of-fold predictions.

Every labelled, non-holdout image has out-of-fold probabilities P (stage oof: models that never
trained on it). Two kinds of suspect, scored alike by how much the model prefers another answer:

  an annotation   labelled class c over its pixels M (rasterised at the OOF resolution; at least
                  min_area of them, or a few pixels would outvote their label); the model's
                  best other class q (possibly Background). score = mean_M P[q] - mean_M P[c]: high
                  when the object looks confidently like something else (a wrong class, or no object).
  a missing label a connected region predicted as class c with probability >= min_confidence where
                  the truth is Background, at least min_area pixels, away (> 2 px) from labelled
                  pixels of c (object edges are not suspects). score = mean (P[c] - P[Background]).

suspects.csv ranks both together (rank 1 = most suspicious); images.csv ranks images by the share of
their labelled pixels that a confident prediction contradicts. With the demo's label_noise.csv (the
annotations corrupted on purpose), `noise_recall` says how many of them the top k suspects find.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import cv2
import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from pipeline.data.coco import Dataset
from pipeline.labels import IGNORE_INDEX
from pipeline.data.masks import palette, read_image, to_rle, unknown_class_index
from pipeline.evaluation.oof import read_oof

if TYPE_CHECKING:
    from pipeline.config import Audit, Masks

SUSPECT_COLUMNS = ["rank", "key", "kind", "ann_id", "labelled", "predicted", "score", "pixels", "bbox", "fold"]


def find_suspects(oof_dir: str | Path, ds: Dataset, min_confidence: float, min_area: int,
                  untrained: Optional[set[int]] = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(suspects, images): see the module docstring. Annotations of `untrained` classes (UNKNOWN when
    masks.unknown drops or ignores it: no model learnt it) are not judged."""
    index, classes = read_oof(oof_dir), ds.classes
    anns = ds.annotations_by_key()
    sizes = ds.images.set_index("key")[["height", "width"]]
    found, images = [], []
    for r in index.itertuples():
        probs = np.load(r.probs).astype(np.float32) / 255.0
        truth = cv2.imread(r.mask, cv2.IMREAD_UNCHANGED)
        pred, conf = probs.argmax(0), probs.max(0)
        base = {"key": r.key, "fold": r.fold}
        h, w = sizes.loc[r.key, "height"], sizes.loc[r.key, "width"]
        for a in anns.get(r.key, pd.DataFrame()).itertuples():
            m = mask_utils.decode(to_rle(a.segmentation, h, w, r.height, r.width)).astype(bool)
            if m.sum() < min_area:   # a few pixels at this resolution cannot outvote their label
                continue
            c = int(a.class_idx)
            if c in (untrained or ()):
                continue
            mean = probs[:, m].mean(1)
            other = int(np.argmax(np.where(np.arange(len(mean)) == c, -1.0, mean)))
            found.append({**base, "kind": "looks like another class" if other else "looks like background",
                          "ann_id": a.ann_id, "labelled": classes[c], "predicted": classes[other],
                          "score": float(mean[other] - mean[c]), "pixels": int(m.sum()), "bbox": _bbox(m)})
        for c, m in unlabelled_regions(probs, truth, min_confidence, min_area):
            found.append({**base, "kind": "unlabelled object", "ann_id": None, "labelled": classes[0],
                          "predicted": classes[c], "score": float((probs[c][m] - probs[0][m]).mean()),
                          "pixels": int(m.sum()), "bbox": _bbox(m)})
        labelled = (truth != IGNORE_INDEX) & (truth > 0)
        against = labelled & (conf >= min_confidence) & (pred != truth)
        missing = (truth == 0) & (pred > 0) & (conf >= min_confidence)
        images.append({**base, "disagreement": float(against.sum() / max(labelled.sum(), 1)),
                       "unlabelled_share": float(missing.sum() / truth.size)})
    suspects = pd.DataFrame(found, columns=SUSPECT_COLUMNS[1:])
    suspects = suspects[suspects.score > 0].sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    suspects.insert(0, "rank", np.arange(1, len(suspects) + 1))
    suspects["ann_id"] = suspects["ann_id"].astype("Int64")
    images = pd.DataFrame(images, columns=["key", "fold", "disagreement", "unlabelled_share"])
    images = images.sort_values(["disagreement", "unlabelled_share"], ascending=False, kind="stable")
    return suspects, images.reset_index(drop=True)


def unlabelled_regions(probs: np.ndarray, truth: np.ndarray, min_confidence: float, min_area: int):
    """(class, (h, w) bool region) for each connected region predicted as a class with probability >=
    min_confidence where the truth is Background, at least min_area pixels and more than 2 px from
    labelled pixels of that class. probs: (C, h, w) float32; truth: (h, w) uint8 at the same size."""
    pred, conf = probs.argmax(0), probs.max(0)
    for c in range(1, len(probs)):
        near_label = cv2.dilate((truth == c).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        region = (pred == c) & (conf >= min_confidence) & (truth == 0) & ~near_label
        n, comp, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
        for j in range(1, n):
            if stats[j, cv2.CC_STAT_AREA] >= min_area:
                yield c, comp == j


def audit(oof_dir: str | Path, ds: Dataset, a: "Audit", masks: "Masks", noise_file: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(suspects, images, metrics) for the `audit` params `a`; UNKNOWN is not judged when `masks.unknown`
    drops or ignores it. With `noise_file` (the demo's answer key), metrics hold noise_recall."""
    unknown = unknown_class_index(ds.classes, masks.unknown_name)
    untrained = {unknown} if unknown is not None and masks.unknown != "keep" else set()
    suspects, images = find_suspects(oof_dir, ds, a.min_confidence, a.min_area, untrained)
    metrics: dict = {"suspects": len(suspects), "images": len(images)}
    if noise_file.exists():
        oof = read_oof(oof_dir)
        metrics["noise"] = noise_recall(suspects, pd.read_csv(noise_file), ds, dict(zip(oof.key, oof.width)), a.top_k)
    return suspects, images, metrics


def summary_line(metrics: dict, suspects_csv: Path) -> str:
    line = f"label audit: {metrics['suspects']} suspects -> {suspects_csv}"
    n = metrics.get("noise") or {}
    if n.get("injected"):
        line += f"; top {n['k']} find {n['found']} of the {n['injected']} labels corrupted on purpose"
    return line


def _bbox(m: np.ndarray) -> str:
    """[x, y, w, h] at the OOF resolution, as JSON."""
    ys, xs = np.nonzero(m)
    return json.dumps([int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)])


def noise_recall(suspects: pd.DataFrame, noise: pd.DataFrame, ds: Dataset, oof_width: dict[str, int], k: int) -> dict:
    """How many annotations corrupted on purpose (label_noise.csv: ann_id, file_name, kind, bbox at full
    resolution) the top k suspects find: a relabelled one by its annotation id; a deleted one by an
    'unlabelled object' suspect in its image whose box centre falls in the deleted object's box.
    Only errors in images with out-of-fold predictions (`oof_width`: key -> OOF width) can be found."""
    key_of = dict(zip(ds.images.file_name, ds.images.key))
    full_width = dict(zip(ds.images.key, ds.images.width))
    top = suspects.head(k)
    hits = {"relabelled": 0, "deleted": 0}
    total = {"relabelled": 0, "deleted": 0}
    for n in noise.itertuples():
        key = key_of.get(n.file_name)
        if key not in oof_width:
            continue
        total[n.kind] += 1
        if n.kind == "relabelled":
            hits[n.kind] += int((top.ann_id == n.ann_id).any())
            continue
        x, y, w, h = json.loads(n.bbox)
        f = full_width[key] / oof_width[key]
        for s in top[(top.key == key) & (top.kind == "unlabelled object")].itertuples():
            sx, sy, sw, sh = json.loads(s.bbox)
            if x <= (sx + sw / 2) * f <= x + w and y <= (sy + sh / 2) * f <= y + h:
                hits[n.kind] += 1
                break
    injected, found = sum(total.values()), sum(hits.values())
    return {"k": k, "injected": injected, "found": found, "recall": found / injected if injected else None,
            **{f"{kind}/recall": hits[kind] / total[kind] for kind in total if total[kind]}}


def plot_suspects(suspects: pd.DataFrame, oof_dir: str | Path, ds: Dataset, path: Path, n: int) -> Optional[Path]:
    """The top n suspects: image | label | out-of-fold prediction, the suspect's box drawn on each."""
    from pipeline.evaluation.plots import _plt, _save

    top = suspects.head(n)
    if top.empty:
        return None
    index = read_oof(oof_dir).set_index("key")
    images = ds.images.set_index("key")
    pal = palette(len(ds.classes))
    plt = _plt()
    fig, axes = plt.subplots(len(top), 3, figsize=(7.5, 2.5 * len(top)), squeeze=False)
    for row, s in zip(axes, top.itertuples()):
        r, im = index.loc[s.key], images.loc[s.key]
        photo = read_image(im["path"], (int(im["height"]), int(im["width"])))   # as its json sees it
        img = cv2.resize(photo, (int(r["width"]), int(r["height"])), interpolation=cv2.INTER_AREA)
        truth = cv2.imread(r["mask"], cv2.IMREAD_UNCHANGED)
        pred = np.load(r["probs"]).argmax(0)
        x, y, w, h = json.loads(s.bbox)
        for ax, pic, title in zip(row, (img, pal[truth], pal[pred]),
                                  (f"#{s.rank} {_short(s.key)}", f"label: {s.labelled}", f"predicted: {s.predicted}")):
            ax.imshow(pic)
            ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="red", linewidth=1.5))
            ax.set_title(title, fontsize=7)
            ax.axis("off")
        row[0].text(0, -0.02, f"{s.kind}, score {s.score:.2f}", transform=row[0].transAxes, fontsize=7, va="top")
    fig.suptitle("label audit: labels that confident out-of-fold predictions contradict", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    _save(fig, path, 80)
    return path


def _short(key: str, n: int = 30) -> str:
    """A panel title's image name: the file name, its middle elided when long (Roboflow names run to 80)."""
    name = Path(key).name
    return name if len(name) <= n else f"{name[:n // 2 - 1]}…{name[-(n // 2 - 1):]}"


REVIEW_COLUMNS = ["rank", "key", "ann_id", "kind", "labelled", "predicted", "score", "bbox", "suggested", "action"]


def review_sheet(suspects: pd.DataFrame, ds: Dataset, oof_width: dict[str, int], k: int) -> pd.DataFrame:
    """The top k suspects as a reviewer's worksheet (reports/audit/review.csv, data.corrections' CSV
    shape): bbox [x, y, w, h] in the image's json pixels, the action the prediction suggests, and an
    empty `action` the reviewer fills with relabel:<class> | delete | ok (an unlabelled object is drawn
    in review_coco.json instead; its row stays empty)."""
    full_width = dict(zip(ds.images.key, ds.images.width))
    rows = []
    for s in suspects.head(k).itertuples():
        f = full_width[s.key] / oof_width[s.key]
        bbox = [round(v * f, 1) for v in json.loads(s.bbox)]
        suggested = {"looks like another class": f"relabel:{s.predicted}", "looks like background": "delete",
                     "unlabelled object": f"draw {s.predicted} (review_coco.json)"}[s.kind]
        rows.append({"rank": s.rank, "key": s.key, "ann_id": s.ann_id, "kind": s.kind, "labelled": s.labelled,
                     "predicted": s.predicted, "score": round(float(s.score), 4), "bbox": json.dumps(bbox),
                     "suggested": suggested, "action": ""})
    out = pd.DataFrame(rows, columns=REVIEW_COLUMNS)
    out["ann_id"] = out["ann_id"].astype("Int64")
    return out


def review_coco(suspects: pd.DataFrame, oof_dir: str | Path, ds: Dataset, a) -> dict:
    """COCO json of the images of the top `a.top_k` suspects, for CVAT or FiftyOne: categories by the
    dataset's class names (ids 1..K), and one proposed annotation per 'unlabelled object' suspect (its
    out-of-fold region as polygons at the image's json size; attributes suspect_rank and score).
    Edited there (keep the real objects, fix outlines, add missed ones) and exported as COCO into
    corrections/, it is a data.corrections json: its annotations are added to the labels."""
    top = suspects.head(a.top_k)
    index = read_oof(oof_dir).set_index("key")
    images = ds.images.set_index("key")
    keys = list(dict.fromkeys(top.key))
    out = {"info": {"description": "label audit: suspect images and proposed missing objects"},
           "categories": [{"id": i, "name": n} for i, n in enumerate(ds.classes) if i],
           "images": [{"id": n + 1, "file_name": str(images.loc[k, "file_name"]), "width": int(images.loc[k, "width"]),
                       "height": int(images.loc[k, "height"])} for n, k in enumerate(keys)],
           "annotations": []}
    image_id = {k: n + 1 for n, k in enumerate(keys)}
    for key, group in top[top.kind == "unlabelled object"].groupby("key", sort=False):
        r, im = index.loc[key], images.loc[key]
        probs = np.load(r["probs"]).astype(np.float32) / 255.0
        truth = cv2.imread(r["mask"], cv2.IMREAD_UNCHANGED)
        regions = {(c, _bbox(m)): m for c, m in unlabelled_regions(probs, truth, a.min_confidence, a.min_area)}
        for s in group.itertuples():
            m = regions[(ds.classes.index(s.predicted), s.bbox)]
            polys = _polygons(m, int(im["height"]), int(im["width"]))
            xs, ys = polys[0][0::2], polys[0][1::2]
            out["annotations"].append({
                "id": len(out["annotations"]) + 1, "image_id": image_id[key], "category_id": ds.classes.index(s.predicted),
                "segmentation": polys, "iscrowd": 0, "area": float(m.sum() * (im["width"] / m.shape[1]) * (im["height"] / m.shape[0])),
                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                "attributes": {"suspect_rank": int(s.rank), "score": round(float(s.score), 4)}})
    return out


def _polygons(m: np.ndarray, height: int, width: int) -> list[list[float]]:
    """A (h, w) bool region's outer outlines as COCO polygons at height x width. The region is upscaled
    nearest to twice that size, where OpenCV traces the centres of its boundary pixels: halved, the
    outline lies a quarter pixel inside the region's edge, so it rasterises back to the same pixels."""
    big = cv2.resize(m.astype(np.uint8), (2 * width, 2 * height), interpolation=cv2.INTER_NEAREST_EXACT)
    contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = [[(float(v) + 0.5) / 2 for v in c.reshape(-1)] for c in sorted(contours, key=cv2.contourArea, reverse=True)
             if len(c) >= 3]
    if not polys:   # a sliver: its box
        x, y, w, h = (v / 2 for v in cv2.boundingRect(big))
        polys = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return polys
