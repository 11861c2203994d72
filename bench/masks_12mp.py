"""Masks stage on 12-MP photos vs a plain one-process loop, side by side in one run.

Builds N photo-like JPEGs of ~12 MP in distinct sizes (smooth shading + texture + noise, so each is
a few MB like a phone photo) with ~30 polygons each, then times, on the same files:

  full size      plain loop: imread + per-annotation pycocotools decode + paint (smaller on top) +
                 PNG write, one process;  vs  the stage's work (load_dataset with its file checks +
                 build_mask_cache, masks.cache_images false: masks only, as the plain loop writes).
  max_side 1024  plain loop: imread + INTER_AREA resize + paint at the capped size + PNG + .npy;
                 vs  the stage with masks.max_side 1024 (image cache written too).

    python -m bench.masks_12mp [--images 40] [--polygons 30]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from bench.eda_split import sizes_12mp

cv2.setNumThreads(1)


def photo(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """A photo-like (h, w, 3) uint8 image: shading, blobs of texture, sensor noise."""
    small = cv2.resize(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    texture = cv2.resize(rng.integers(0, 60, (h // 8, w // 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.add(cv2.add(small, texture), rng.integers(0, 12, (h, w, 3), dtype=np.uint8))


def build(root: Path, n: int, polygons: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    sizes = sizes_12mp()
    images, anns = [], []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        cv2.imwrite(str(root / f"{i:04d}.jpg"), photo(w, h, rng), [cv2.IMWRITE_JPEG_QUALITY, 92])
        images.append({"id": i, "file_name": f"{i:04d}.jpg", "width": w, "height": h})
        for _ in range(polygons):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(40, 700)
            t = np.sort(rng.uniform(0, 2 * np.pi, 24))
            rr = r * rng.uniform(0.6, 1.0, 24)
            poly = np.stack([cx + rr * np.cos(t), cy + rr * np.sin(t)], 1).ravel()
            anns.append({"id": len(anns), "image_id": i, "category_id": int(rng.integers(0, 11)),
                         "segmentation": [poly.round(1).tolist()], "iscrowd": 0})
    (root / "train.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                 "categories": [{"id": c, "name": f"c{c}"} for c in range(11)]}))
    return images


def plain_loop(root: Path, out: Path, max_side: int | None) -> float:
    """The loop a team writes by hand: one process, a full-size decode per annotation."""
    coco = json.loads((root / "train.json").read_text())
    by_image: dict[int, list] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for im in coco["images"]:
        h, w = im["height"], im["width"]
        s = min(1.0, max_side / max(h, w)) if max_side else 1.0
        oh, ow = round(h * s), round(w * s)
        img = cv2.imread(str(root / im["file_name"]))
        rles, classes = [], []
        for a in by_image.get(im["id"], []):
            polys = [[v * s for v in p] for p in a["segmentation"]]
            rles.append(mask_utils.merge(mask_utils.frPyObjects(polys, oh, ow)))
            classes.append(a["category_id"] + 1)
        label = np.zeros((oh, ow), np.uint8)
        for i in sorted(range(len(rles)), key=lambda i: -int(mask_utils.area(rles[i]))):
            label[mask_utils.decode(rles[i]).astype(bool)] = classes[i]
        cv2.imwrite(str(out / f"{im['file_name']}.png"), label)
        if max_side:
            np.save(out / f"{im['file_name']}.npy", cv2.resize(img, (ow, oh), interpolation=cv2.INTER_AREA)[..., ::-1])
    return time.perf_counter() - t


def stage_work(root: Path, out: Path, max_side: int | None) -> float:
    from pipeline.data.coco import load_dataset
    from pipeline.config import Masks
    from pipeline.data.masks import build_mask_cache

    t = time.perf_counter()
    ds = load_dataset(root, ["train.json"])
    build_mask_cache(ds, out, Masks(max_side=max_side, cache_images=max_side is not None), workers=0)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--polygons", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "data"
        root.mkdir()
        t = time.perf_counter()
        images = build(root, args.images, args.polygons)
        mb = sum((root / im["file_name"]).stat().st_size for im in images) / len(images) / 1e6
        print(f"built {len(images)} JPEGs of ~12 MP ({mb:.1f} MB each), {args.polygons} polygons each, "
              f"in {time.perf_counter() - t:.0f} s; {os.cpu_count()} cores")
        for label, max_side in (("full size", None), ("max_side 1024", 1024)):
            plain = plain_loop(root, Path(d) / f"plain_{max_side}", max_side)
            ours = stage_work(root, Path(d) / f"stage_{max_side}", max_side)
            n = len(images)
            print(f"  {label:14s} plain loop {n / plain:5.2f} img/s | stage {n / ours:5.2f} img/s | "
                  f"{plain / ours:.2f}x (target >= 2x)")


if __name__ == "__main__":
    main()
