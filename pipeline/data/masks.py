"""COCO annotations -> class-index masks, and the on-disk mask cache the loaders read.

Painting rules (params `masks.overlap`), for pixels claimed by several annotations:
  - smaller_on_top: paint in descending *rasterised* area (the json `area` field is often the box
    area, so it is not trusted), so a bottle inside a bag keeps its class;
  - higher_class_wins: paint in ascending class index, so the higher index wins (the baseline's
    np.maximum).
UNKNOWN (params `masks.unknown`): keep as its class; background = drop those annotations (what they
cover falls back to whatever else is there, else 0); ignore = paint 255 in the same order.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from pipeline.data.coco import IGNORE_INDEX, DataError, Dataset
from pipeline.io import atomic_dir

cv2.setNumThreads(1)  # the pool provides the parallelism


def content_digest(*parts: bytes | np.ndarray) -> str:
    """md5 of what a training item is made of (mask and image bytes): the index records it per image,
    so a checkpoint is never resumed or reused after an image changed under the same name and size."""
    h = hashlib.md5()
    for part in parts:
        h.update(part.tobytes() if isinstance(part, np.ndarray) else part)
    return h.hexdigest()


def target_size(height: int, width: int, max_side: Optional[int]) -> tuple[int, int]:
    """(h, w) after capping the longest side at max_side (aspect kept, never upscaled)."""
    if not max_side or max(height, width) <= max_side:
        return height, width
    s = max_side / max(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


def clip_polygon(flat: list[float], width: int, height: int, margin: float = 1.0) -> list[float]:
    """Clip a polygon [x0, y0, x1, y1, ...] to the image (plus a margin), Sutherland-Hodgman.

    Only polygons reaching outside the margin are touched; inside the image the filled area is
    unchanged. pycocotools rasterises every edge pixel by pixel at 5x, so a stray vertex at 1e9
    (real data has them) would cost gigabytes or overflow its int arithmetic and crash."""
    lo_x, lo_y, hi_x, hi_y = -margin, -margin, width + margin, height + margin
    xs, ys = flat[0::2], flat[1::2]
    if min(xs) >= lo_x and min(ys) >= lo_y and max(xs) <= hi_x and max(ys) <= hi_y:
        return flat
    pts = list(zip(xs, ys))
    for axis, bound, keep_above in ((0, lo_x, True), (0, hi_x, False), (1, lo_y, True), (1, hi_y, False)):
        def inside(p):
            return p[axis] >= bound if keep_above else p[axis] <= bound

        def cross(p, q):
            t = (bound - p[axis]) / (q[axis] - p[axis])
            return (bound, p[1] + t * (q[1] - p[1])) if axis == 0 else (p[0] + t * (q[0] - p[0]), bound)

        out = []
        for i, q in enumerate(pts):
            p = pts[i - 1]
            if inside(q):
                if not inside(p):
                    out.append(cross(p, q))
                out.append(q)
            elif inside(p):
                out.append(cross(p, q))
        pts = out
        if not pts:
            return []
    return [v for pt in pts for v in pt]


def to_rle(seg: Any, height: int, width: int, out_h: int, out_w: int) -> dict:
    """One validated COCO segmentation -> compressed RLE at (out_h, out_w).

    Polygons are scaled before rasterising (exact at any size); RLEs are decoded and resized
    nearest-neighbour when the size changes. Polygon parts with < 3 points are dropped first,
    because pycocotools reads a 4-number list as a *box*, not a polygon.
    """
    if isinstance(seg, list):
        parts = [seg] if seg and not isinstance(seg[0], list) else seg
        sx, sy = out_w / width, out_h / height
        parts = [[v * (sx if i % 2 == 0 else sy) for i, v in enumerate(p)] for p in parts if len(p) >= 6]
        parts = [q for q in (clip_polygon(p, out_w, out_h) for p in parts) if len(q) >= 6]
        if not parts:
            return mask_utils.encode(np.zeros((out_h, out_w), np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(parts, out_h, out_w))
    rle = seg
    if isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    elif isinstance(seg["counts"], str):
        rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
    if (out_h, out_w) == (height, width):
        return rle
    m = cv2.resize(mask_utils.decode(rle), (out_w, out_h), interpolation=cv2.INTER_NEAREST)
    return mask_utils.encode(np.asfortranarray(m))


def paint_order(areas: Sequence[int], classes: Sequence[int], rule: str) -> list[int]:
    """Indices in painting order (later ones end on top). Ties keep json order."""
    n = range(len(classes))
    if rule == "smaller_on_top":
        return sorted(n, key=lambda i: -areas[i])
    if rule == "higher_class_wins":
        return sorted(n, key=lambda i: classes[i])
    raise ValueError(f"unknown overlap rule {rule!r}; choose smaller_on_top or higher_class_wins")


def paint(rles: Sequence[dict], classes: Sequence[int], rule: str, out_hw: tuple[int, int],
          unknown_class: Optional[int] = None, unknown: str = "keep") -> np.ndarray:
    """Paint RLEs into a (H, W) uint8 class map: 0 background, 1..K classes, 255 ignore."""
    label = np.zeros(out_hw, dtype=np.uint8)
    areas = [int(a) for a in mask_utils.area(list(rles))] if len(rles) else []  # uint32: negating overflows
    for i in paint_order(areas, classes, rule):
        c = classes[i]
        if c == unknown_class and unknown == "background":
            continue
        value = IGNORE_INDEX if (c == unknown_class and unknown == "ignore") else c
        label[mask_utils.decode(rles[i]).astype(bool)] = value
    return label


def unknown_class_index(classes: list[str], name: str) -> Optional[int]:
    """Class index of the UNKNOWN category (case-insensitive name match), None if absent."""
    lowered = [c.lower() for c in classes]
    return lowered.index(name.lower()) if name.lower() in lowered else None


def image_label(anns: pd.DataFrame | None, height: int, width: int, out_hw: tuple[int, int], rule: str,
                unknown_class: Optional[int], unknown: str) -> np.ndarray:
    """All annotations of one image (rows with segmentation, class_idx) -> (H, W) uint8 class map."""
    if anns is None or anns.empty:
        return np.zeros(out_hw, dtype=np.uint8)
    rles = [to_rle(s, height, width, *out_hw) for s in anns.segmentation]
    return paint(rles, list(anns.class_idx), rule, out_hw, unknown_class, unknown)


def read_image(path: str) -> np.ndarray:
    """An image as (H, W, 3) uint8 RGB, from the cache (.npy) or an image file."""
    if path.endswith(".npy"):
        return np.load(path)
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"cannot decode image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_oriented(path: str, height: int, width: int) -> np.ndarray:
    """Decode a photo to (height, width, 3) uint8 RGB, as the json's size says it is seen.

    Annotation tools disagree about EXIF orientation: if the stored pixels already have the json
    size they are used as stored; if only the EXIF-rotated view has it, that view is used.
    """
    img = cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is not None and img.shape[:2] != (height, width):
        img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: cannot decode the image (truncated or corrupt)")
    if img.shape[:2] != (height, width):
        raise DataError(f"{path}: decoded size {img.shape[1]}x{img.shape[0]} differs from the json's {width}x{height}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _cache_one(task: dict) -> dict:
    """Worker: rasterise one image's mask and, if asked, cache the decoded image; write files."""
    out_hw = (task["out_h"], task["out_w"])
    label = image_label(task["anns"], task["height"], task["width"], out_hw, task["rule"],
                        task["unknown_class"], task["unknown"])
    Path(task["mask_file"]).parent.mkdir(parents=True, exist_ok=True)
    # Level 1: decodes ~3x faster than OpenCV's default level, for a few % more bytes.
    if not cv2.imwrite(task["mask_file"], label, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise OSError(f"could not write {task['mask_file']}")
    if task["image_file"]:
        try:
            img = decode_oriented(task["src"], task["height"], task["width"])
        except DataError as e:
            raise DataError(f"{e} (image_id {task['image_id']})") from None
        if (img.shape[0], img.shape[1]) != out_hw:
            img = cv2.resize(img, (task["out_w"], task["out_h"]), interpolation=cv2.INTER_AREA)
        Path(task["image_file"]).parent.mkdir(parents=True, exist_ok=True)
        np.save(task["image_file"], np.ascontiguousarray(img))
    else:
        img = Path(task["src"]).read_bytes()   # training reads the user's file itself
    counts = np.bincount(label.ravel(), minlength=256)
    return {"key": task["key"], "counts": counts, "digest": content_digest(label, img)}


def build_mask_cache(ds: Dataset, out_dir: str | Path, overlap: str, unknown: str, unknown_name: str,
                     max_side: Optional[int], workers: int = 0, cache_images: bool = True) -> pd.DataFrame:
    """Rasterise every labelled image once into `out_dir` and return the index table.

    Layout: out_dir/masks/<file_name stem>.png (uint8 class map), out_dir/images/<stem>.npy (decoded
    (H, W, 3) uint8 RGB at the mask's size: no JPEG decoding per epoch; H*W*3 bytes each; with
    cache_images=False only images shrunk by max_side are stored), out_dir/index.csv (`image` and
    `mask` paths, sizes, `digest` of mask + image content, painted pixels per class), out_dir/classes.json.
    Paths in the index are as given (relative to the working directory when the inputs are).
    The whole folder is written under a temporary name and renamed at the end, so a crash never
    leaves a half cache behind.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        return _build(ds, out_dir, tmp, overlap, unknown, unknown_name, max_side, workers, cache_images)


def _build(ds: Dataset, out_dir: Path, tmp: Path, overlap: str, unknown: str, unknown_name: str,
           max_side: Optional[int], workers: int, cache_images: bool) -> pd.DataFrame:
    unknown_class = unknown_class_index(ds.classes, unknown_name)
    by_key = ds.annotations_by_key()
    tasks, rows = [], []
    for r in ds.images.itertuples(index=False):
        out_h, out_w = target_size(r.height, r.width, max_side)
        cached = cache_images or (out_h, out_w) != (r.height, r.width)
        stem = str(Path(r.key).with_suffix(""))
        rows.append(dict(key=r.key, image_id=r.image_id, source=r.source, file_name=r.file_name,
                         image=str(out_dir / "images" / f"{stem}.npy") if cached else r.path,
                         mask=str(out_dir / "masks" / f"{stem}.png"), height=out_h, width=out_w,
                         orig_height=r.height, orig_width=r.width,
                         n_annotations=len(by_key[r.key]) if r.key in by_key else 0))
        tasks.append(dict(key=r.key, image_id=r.image_id, anns=by_key.get(r.key), height=r.height, width=r.width,
                          out_h=out_h, out_w=out_w, rule=overlap, unknown_class=unknown_class, unknown=unknown,
                          mask_file=str(tmp / "masks" / f"{stem}.png"), src=r.path,
                          image_file=str(tmp / "images" / f"{stem}.npy") if cached else ""))
    masks_seen = pd.Series([row["mask"] for row in rows])
    if masks_seen.duplicated().any():
        clash = sorted(set(masks_seen[masks_seen.duplicated()]))[:5]
        raise ValueError(f"file names differ only by extension, their masks would collide: {clash}")
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(tasks) < 16:
        results = [_cache_one(t) for t in tasks]
    else:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_cache_one, tasks, chunksize=max(1, len(tasks) // (workers * 8))))
    counts = {r["key"]: r["counts"] for r in results}
    index = pd.DataFrame(rows)
    index["digest"] = index.key.map({r["key"]: r["digest"] for r in results})
    px = np.stack([counts[k] for k in index.key])
    for c in range(ds.num_classes):
        index[f"px_{c}"] = px[:, c]
    index[f"px_{IGNORE_INDEX}"] = px[:, IGNORE_INDEX]
    index.to_csv(tmp / "index.csv", index=False)
    meta = dict(classes=ds.classes, ignore_index=IGNORE_INDEX, overlap=overlap, unknown=unknown,
                unknown_class=unknown_class, max_side=max_side)
    (tmp / "classes.json").write_text(json.dumps(meta, indent=2))
    return index


def read_classes(cache_dir: str | Path) -> dict:
    return json.loads((Path(cache_dir) / "classes.json").read_text())
