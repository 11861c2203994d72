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
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import cv2
import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from pipeline.data.coco import DataError, Dataset
from pipeline.data.rle import rle_runs
from pipeline.labels import IGNORE_INDEX
from pipeline.io import atomic_dir, parallel_map, write_image
from pipeline.workspace import CLASSES_JSON, INDEX

if TYPE_CHECKING:
    from pipeline.config import Masks

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


PYCOCO_CHUNK = 255   # pycocotools 2.0.11 under numpy 2 overflows (uint8) on 256+ shapes in one call


def union(rles: Sequence[dict]) -> dict:
    """The union of RLEs, merged at most PYCOCO_CHUNK at a time (see PYCOCO_CHUNK)."""
    rles = list(rles)
    while len(rles) > 1:
        rles = [mask_utils.merge(rles[i:i + PYCOCO_CHUNK]) if len(rles[i:i + PYCOCO_CHUNK]) > 1 else rles[i]
                for i in range(0, len(rles), PYCOCO_CHUNK)]
    return rles[0]


def from_polygons(parts: list[list[float]], h: int, w: int) -> list[dict]:
    """pycocotools' frPyObjects, PYCOCO_CHUNK polygons at a time."""
    return [r for i in range(0, len(parts), PYCOCO_CHUNK) for r in mask_utils.frPyObjects(parts[i:i + PYCOCO_CHUNK], h, w)]


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
        return union(from_polygons(parts, out_h, out_w))
    rle = seg
    if isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    elif isinstance(seg["counts"], str):
        rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
    if (out_h, out_w) == (height, width):
        return rle
    # centre-aligned nearest (INTER_NEAREST picks each block's top-left pixel: up to half a source
    # pixel off the INTER_AREA image it labels)
    m = cv2.resize(mask_utils.decode(rle), (out_w, out_h), interpolation=cv2.INTER_NEAREST_EXACT)
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
    """Paint RLEs into a (H, W) uint8 class map: 0 background, 1..K classes, 255 ignore.

    The runs are painted straight into a column-major buffer, touching only the columns an
    annotation spans: a full-size decode per annotation (what `mask_utils.decode` does) costs
    tens of ms each on a 12-MP photo."""
    h, w = out_hw
    label_t = np.zeros((w, h), dtype=np.uint8)          # label_t.ravel()[x * h + y] = label[y, x], as in an RLE
    flat = label_t.reshape(-1)
    runs = [rle_runs(r) for r in rles]
    areas = [int(r[1::2].sum()) for r in runs]
    for i in paint_order(areas, classes, rule):
        c = classes[i]
        if c == unknown_class and unknown == "background" or not areas[i]:
            continue
        value = IGNORE_INDEX if (c == unknown_class and unknown == "ignore") else c
        ends = np.cumsum(runs[i])
        on_start, on_end = ends[0::2][: len(runs[i]) // 2], ends[1::2]
        lo, hi = int(on_start[0]), int(on_end[-1])
        if 32 * len(on_start) < hi - lo:                # few long runs (most shapes): a slice each
            for a, b in zip(on_start.tolist(), on_end.tolist()):
                flat[a:b] = value
            continue
        edges = np.zeros(hi - lo + 1, np.int8)          # many short runs: +1 where a run of 1s starts, -1 where
        np.add.at(edges, on_start - lo, 1)              # it ends, and one pass over the span
        np.add.at(edges, on_end - lo, -1)
        np.copyto(flat[lo:hi], np.uint8(value), where=np.cumsum(edges[:-1], dtype=np.int8).view(bool))
    return np.ascontiguousarray(label_t.T)


def unknown_class_index(classes: list[str], name: str) -> Optional[int]:
    """Class index of the UNKNOWN category (case-insensitive name match), None if absent."""
    lowered = [c.lower() for c in classes]
    return lowered.index(name.lower()) if name.lower() in lowered else None


def palette(n: int) -> np.ndarray:
    """(256, 3) uint8 colours: background black, classes from tab20, ignore white."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    pal = np.zeros((256, 3), np.uint8)
    for c in range(1, n):
        pal[c] = (np.array(cmap((c - 1) % 20)[:3]) * 255).astype(np.uint8)
    pal[IGNORE_INDEX] = 255
    return pal



def image_label(anns: pd.DataFrame | None, size: tuple[int, int], out_hw: tuple[int, int], rule: str,
                unknown_class: Optional[int], unknown: str) -> np.ndarray:
    """All annotations of one image (rows with segmentation, class_idx) of json size (height, width)
    -> (H, W) = out_hw uint8 class map."""
    if anns is None or anns.empty:
        return np.zeros(out_hw, dtype=np.uint8)
    rles = [to_rle(s, *size, *out_hw) for s in anns.segmentation]
    return paint(rles, list(anns.class_idx), rule, out_hw, unknown_class, unknown)


def read_image(path: str, hw: Optional[tuple[int, int]] = None) -> np.ndarray:
    """An image as (H, W, 3) uint8 RGB, from the cache (.npy) or an image file. hw: the (height,
    width) its json (and mask) says it has; a file is then oriented by decode_oriented's rule, the
    same one the cache was written with, so a photo read in place (masks.cache_images: false) and
    its mask never disagree about EXIF rotation."""
    if path.endswith(".npy"):
        return np.load(path)
    if hw is not None:
        return decode_oriented(path, int(hw[0]), int(hw[1]))
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"cannot decode image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


JPEG_SCALES = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
# A DCT-scaled decode then INTER_AREA stacks two low-pass filters: with fewer than ~3 decoded pixels
# per output pixel the result is visibly softer than a full decode + INTER_AREA (1024-px photos to
# 320: 12 % less Laplacian energy; to 400: 17 %); bench/quality.py's same-recipe pipeline scored
# 0.0070 mIoU less on it (mean of 3 seeds, lower on each). At >= 3x (or an exact fit) the loss is <= 3 %.
DCT_MIN_FACTOR = 3


def dct_scale(height: int, width: int, out_h: int, out_w: int, min_factor: float = DCT_MIN_FACTOR) -> tuple[int, int]:
    """(r, imread flag): the largest JPEG DCT scale 1/r whose decode is exactly (out_h, out_w) or at
    least min_factor times it on both sides; (1, IMREAD_COLOR) (a full decode) otherwise."""
    for r, flag in JPEG_SCALES:
        h, w = -(-height // r), -(-width // r)
        if (h, w) == (out_h, out_w) or (h >= min_factor * out_h and w >= min_factor * out_w):
            return r, flag
    return 1, cv2.IMREAD_COLOR


def decode_oriented(path: str, height: int, width: int, out_hw: Optional[tuple[int, int]] = None,
                    data: Optional[bytes] = None, dct_min_factor: float = DCT_MIN_FACTOR) -> np.ndarray:
    """Decode a photo to (height, width, 3) uint8 RGB, as the json's size says it is seen, or shrunk
    to out_hw = (h, w) with INTER_AREA (the one way every consumer prepares a capped image).

    Annotation tools disagree about EXIF orientation: if the stored pixels already have the json
    size they are used as stored; if only the EXIF-rotated view has it, that view is used.
    A JPEG shrunk a lot is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain first (libjpeg's own
    scaled decoding: several times faster on 12-MP photos), then resized to the exact size — but
    only where that keeps the detail a full decode + INTER_AREA gives (see dct_scale; a lower
    dct_min_factor trades detail for speed where only a thumbnail is needed).
    `data`: the file's bytes, when already read.
    """
    out_h, out_w = out_hw or (height, width)
    if data is None:
        data = Path(path).read_bytes()
    buf = np.frombuffer(data, np.uint8)
    scale, flag = 1, cv2.IMREAD_COLOR
    if data[:2] == b"\xff\xd8":
        scale, flag = dct_scale(height, width, out_h, out_w, dct_min_factor)
    want = (-(-height // scale), -(-width // scale))
    img = cv2.imdecode(buf, flag | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is not None and img.shape[:2] != want:
        img = cv2.imdecode(buf, flag)
    if img is None:
        raise DataError(f"{path}: cannot decode the image (truncated or corrupt)")
    if img.shape[:2] != want:
        raise DataError(f"{path}: decoded size {img.shape[1] * scale}x{img.shape[0] * scale} differs from the "
                        f"json's {width}x{height}")
    if img.shape[:2] != (out_h, out_w):
        img = cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def prepare_image(path: str, height: int, width: int, max_side: Optional[int]) -> np.ndarray:
    """A photo as the mask cache stores it for training and validation (EXIF rule, long side capped
    at max_side with INTER_AREA): the one preparation every consumer uses (cache, submit, predict,
    pseudo-labels), so a model sees at test time exactly what it was validated on."""
    return decode_oriented(path, height, width, target_size(height, width, max_side))


def _cache_one(task: dict) -> dict:
    """Worker: rasterise one image's mask and, if asked, cache the decoded image; write files.

    The digest covers the mask's PNG bytes and the source image file's bytes (read once, for
    decoding too): what a training item is made of, without hashing decoded pixels."""
    out_hw = (task["out_h"], task["out_w"])
    label = image_label(task["anns"], (task["height"], task["width"]), out_hw, task["rule"],
                        task["unknown_class"], task["unknown"])
    # Level 1: decodes ~3x faster than OpenCV's default level, for a few % more bytes.
    png = write_image(task["mask_file"], label, cv2.IMWRITE_PNG_COMPRESSION, 1)
    src = Path(task["src"]).read_bytes()
    if task["image_file"]:
        try:
            img = decode_oriented(task["src"], task["height"], task["width"], out_hw, data=src)
        except DataError as e:
            raise DataError(f"{e} (image_id {task['image_id']})") from None
        Path(task["image_file"]).parent.mkdir(parents=True, exist_ok=True)
        np.save(task["image_file"], np.ascontiguousarray(img))
    counts = cv2.calcHist([label], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    return {"key": task["key"], "counts": counts, "digest": content_digest(png, src, str(out_hw).encode())}


MASK_BYTES_PER_PX = 0.05   # class maps at PNG level 1: ~0.01 B/px seen on real photos; 5x headroom


def cache_bytes(index: pd.DataFrame) -> tuple[int, int]:
    """(decoded-image bytes, estimated mask bytes) the cache described by `index` will take."""
    px = index.height.to_numpy(np.int64) * index.width.to_numpy(np.int64)
    cached = index.image.str.endswith(".npy").to_numpy()
    return int((px[cached] * 3 + 128).sum()), int(px.sum() * MASK_BYTES_PER_PX)


def check_disk(index: pd.DataFrame, out_dir: Path, log=print) -> None:
    """Pre-flight: say what the cache will take, and stop before writing when the disk cannot hold it."""
    images, masks = cache_bytes(index)
    parent = next(p for p in [out_dir, *out_dir.parents] if p.exists())
    free = shutil.disk_usage(parent).free
    gb = lambda n: f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"   # noqa: E731
    log(f"masks: {len(index)} images -> about {gb(images + masks)} ({gb(images)} of decoded images, "
        f"~{gb(masks)} of masks); {gb(free)} free under {parent}")
    if images + masks > 0.95 * free:
        cached = index.image.str.endswith(".npy")
        capped = (index.height[cached] * index.width[cached]).clip(upper=1024 * 768).sum() * 3
        raise DataError(
            f"masks: the cache needs about {gb(images + masks)} but only {gb(free)} are free under {parent}. "
            f"Set masks.max_side (e.g. 1024: about {gb(capped + masks)} of images), or masks.cache_images: false "
            "(training then decodes the dataset's own files every epoch), or free some space")


def build_mask_cache(ds: Dataset, out_dir: str | Path, m: "Masks", workers: int = 0) -> pd.DataFrame:
    """Rasterise every labelled image once into `out_dir` and return the index table.

    Layout: out_dir/masks/<key>.png (uint8 class map; key = the image's path under data.root,
    extension included), out_dir/images/<key>.npy (decoded
    (H, W, 3) uint8 RGB at the mask's size: no JPEG decoding per epoch; H*W*3 bytes each; with
    cache_images=False only images shrunk by max_side are stored), out_dir/index.csv (`image` and
    `mask` paths, sizes, `digest` of mask + image content, painted pixels per class), out_dir/classes.json.
    Paths in the index are as given (relative to the working directory when the inputs are).
    The whole folder is written under a temporary name and renamed at the end, so a crash never
    leaves a half cache behind.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        return _build(ds, (out_dir, tmp), m, workers)


def _build(ds: Dataset, dirs: tuple[Path, Path], m: "Masks", workers: int) -> pd.DataFrame:
    """The cache's files into tmp, their paths as they will be under out_dir: dirs = (out_dir, tmp)."""
    (out_dir, tmp), overlap, unknown, max_side, cache_images = dirs, m.overlap, m.unknown, m.max_side, m.cache_images
    unknown_class = unknown_class_index(ds.classes, m.unknown_name)
    by_key = ds.annotations_by_key()
    tasks, rows = [], []
    for r in ds.images.itertuples(index=False):
        out_h, out_w = target_size(r.height, r.width, max_side)
        cached = cache_images or (out_h, out_w) != (r.height, r.width)
        stem = r.key   # the whole name: 0001.jpg and 0001.png are two images with two masks
        rows.append(dict(key=r.key, image_id=r.image_id, source=r.source, file_name=r.file_name,
                         image=str(out_dir / "images" / f"{stem}.npy") if cached else r.path,
                         mask=str(out_dir / "masks" / f"{stem}.png"), height=out_h, width=out_w,
                         orig_height=r.height, orig_width=r.width,
                         n_annotations=len(by_key[r.key]) if r.key in by_key else 0))
        tasks.append(dict(key=r.key, image_id=r.image_id, anns=by_key.get(r.key), height=r.height, width=r.width,
                          out_h=out_h, out_w=out_w, rule=overlap, unknown_class=unknown_class, unknown=unknown,
                          mask_file=str(tmp / "masks" / f"{stem}.png"), src=r.path,
                          image_file=str(tmp / "images" / f"{stem}.npy") if cached else ""))
    index = pd.DataFrame(rows)
    check_disk(index, out_dir)
    results = parallel_map(_cache_one, tasks, "masks", workers)
    counts = {r["key"]: r["counts"] for r in results}
    index["digest"] = index.key.map({r["key"]: r["digest"] for r in results})
    px = np.stack([counts[k] for k in index.key])
    for c in range(ds.num_classes):
        index[f"px_{c}"] = px[:, c]
    index[f"px_{IGNORE_INDEX}"] = px[:, IGNORE_INDEX]
    index.to_csv(tmp / INDEX, index=False)
    meta = dict(classes=ds.classes, ignore_index=IGNORE_INDEX, overlap=overlap, unknown=unknown,
                unknown_class=unknown_class, max_side=max_side)
    (tmp / CLASSES_JSON).write_text(json.dumps(meta, indent=2))
    return index


def read_classes(cache_dir: str | Path) -> dict:
    """The cache's classes.json: class names, overlap rule, unknown handling, max_side."""
    return json.loads((Path(cache_dir) / CLASSES_JSON).read_text())
