"""EDA on a few crowded photos: 4 images of 12 MP holding 200,000 polygons between them.

Aerial litter surveys, cell images and dense piles put tens of thousands of annotations on one
photo. EDA must stay linear in annotations there (target: the whole `stages.eda` process <= 30 s
on 2 cores). The objects are small blobs, a third of them inside a larger "bag" (overlaps the rule
resolves), some crowds of touching boxes thousands strong.

    python -m bench.eda_crowded [--images 4] [--annotations 200000]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from bench.eda_split import CATEGORIES, REPO, WEIGHTS, bench_workspace, run_stage

W, H = 4000, 3000


def polygon(rng, cx, cy, r, n=8) -> list[float]:
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * (1 + rng.uniform(-0.3, 0.3, n))
    x = np.clip(cx + rad * np.cos(ang), 0, W)
    y = np.clip(cy + rad * np.sin(ang), 0, H)
    return [round(float(v), 1) for xy in zip(x, y) for v in xy]


def build(root: Path, n_images: int, n_anns: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    photo = np.linspace(60, 200, W, dtype=np.float32)[None, :, None] + np.zeros((H, 1, 3), np.float32)
    cv2.imwrite(str(root / "_photo.jpg"), photo.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 80])
    images, anns = [], []
    p = WEIGHTS / WEIGHTS.sum()
    bag_class = CATEGORIES.index("Plastic bag")
    for i in range(n_images):
        (root / f"{i:02d}.jpg").write_bytes((root / "_photo.jpg").read_bytes() + bytes(i))
        images.append({"id": i + 1, "file_name": f"{i:02d}.jpg", "width": W, "height": H})
        n = n_anns // n_images
        classes = rng.choice(len(CATEGORIES), n, p=p)
        centres = rng.uniform([20, 20], [W - 20, H - 20], (n, 2))
        radii = rng.uniform(4, 14, n)
        bags = np.flatnonzero(classes == bag_class)
        inside = rng.random(n) < 1 / 3
        for k in range(n):
            cx, cy, r = *centres[k], radii[k]
            if inside[k] and len(bags) and classes[k] != bag_class:
                b = bags[rng.integers(len(bags))]
                cx, cy, r = centres[b][0] + rng.uniform(-4, 4), centres[b][1] + rng.uniform(-4, 4), radii[b] * 0.5
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(classes[k]), "iscrowd": 0,
                         "segmentation": [polygon(rng, cx, cy, r)], "area": float(np.pi * r * r),
                         "bbox": [cx - r, cy - r, 2 * r, 2 * r]})
    (root / "_photo.jpg").unlink()
    cats = [{"id": i, "name": n} for i, n in enumerate(CATEGORIES)]
    (root / "train.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--annotations", type=int, default=200_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        build(tmp / "data", args.images, args.annotations)
        print(f"built {args.images} images of {W}x{H} with {args.annotations} polygons "
              f"in {time.perf_counter() - t:.1f} s")
        env = bench_workspace(tmp, eda=str(tmp / "eda"), metrics=str(tmp / "metrics"))
        eda_s = run_stage("eda", tmp, env)
        summary = json.loads((tmp / "metrics" / "eda.json").read_text())["eda"]

        sys.path.insert(0, str(REPO))   # in-process breakdown (no interpreter start, no MLflow)
        from pipeline.data.coco import load_dataset
        from pipeline.data.eda import analyse

        t0 = time.perf_counter()
        ds = load_dataset(tmp / "data", ["train.json"])
        t1 = time.perf_counter()
        analyse(ds, "smaller_on_top", workers=0)
        t2 = time.perf_counter()
    print(f"  annotations {summary['annotations']}, overlapping class pairs {summary['overlap']['class_pairs']}, "
          f"reassigned pixels {summary['overlap']['reassigned_pixels']}")
    print(f"  stage eda: {eda_s:6.1f} s  (whole process; target <= 30 s on 2 cores)")
    print(f"  in-process: load+validate {t1 - t0:.1f} s, EDA {t2 - t1:.1f} s")


if __name__ == "__main__":
    main()
