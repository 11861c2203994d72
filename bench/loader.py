"""Mask cache vs the usual baseline loader, samples/s per item (one process, as a DataLoader worker sees it).

Baseline: the competition's starter `Dataset.__getitem__` — read the JPEG, then per item build
the mask from the COCO json with pycocotools (`getAnnIds`, `loadAnns`, `annToMask` per
annotation, `np.maximum` with the class value), float32 image / 255.
Ours: the mask cache — the decoded uint8 image (.npy) and the uint8 PNG mask, both written once
by the masks stage; then the same float32 / 255 as the baseline.

    python -m bench.loader [--images 120] [--size 512]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from pycocotools.coco import COCO

from pipeline.data.coco import load_dataset
from pipeline.data.demo import make_demo
from pipeline.config import Masks
from pipeline.data.masks import build_mask_cache, read_image

cv2.setNumThreads(1)


def baseline_items(root: Path, n_epochs: int):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(root / "train.json"))
    ids = coco.getImgIds()
    cat_names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    names = ["Background"] + list(cat_names.values())
    for _ in range(n_epochs):
        for i in ids:
            info = coco.loadImgs(i)[0]
            img = cv2.imread(str(root / info["file_name"]))
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
            anns = coco.loadAnns(coco.getAnnIds(imgIds=info["id"], iscrowd=None))
            mask = np.zeros((info["height"], info["width"]))
            for a in sorted(anns, key=lambda a: a["area"], reverse=True):
                value = names.index(cat_names[a["category_id"]])
                mask[coco.annToMask(a) == 1] = value
            yield img, mask.astype(np.int8)


def cached_items(index, n_epochs: int):
    for _ in range(n_epochs):
        for r in index.itertuples():
            img = read_image(r.image).astype(np.float32) / 255.0
            mask = cv2.imread(r.mask, cv2.IMREAD_UNCHANGED)
            yield img, mask


def rate(items, n: int) -> float:
    start = time.perf_counter()
    count = sum(1 for _ in items)
    assert count == n
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        make_demo(root, args.images, 0, args.size, seed=0)
        ds = load_dataset(root, ["train.json"])
        t = time.perf_counter()
        index = build_mask_cache(ds, Path(tmp) / "masks", Masks(), workers=0)
        build_s = time.perf_counter() - t
        n = len(index) * args.epochs
        list(cached_items(index, 1))  # warm the page cache for both
        base = rate(baseline_items(root, args.epochs), n)
        ours = rate(cached_items(index, args.epochs), n)
    print(f"loader @ {args.size}px, {args.images} images x {args.epochs} epochs, "
          f"{len(ds.annotations) / len(ds.images):.1f} annotations/image, 1 process")
    print(f"  mask cache build (all cores): {build_s:.2f} s, once")
    print(f"  baseline (pycocotools per item):   {base:8.1f} samples/s")
    print(f"  mask cache (npy image + PNG mask): {ours:8.1f} samples/s")
    print(f"  speed-up: {ours / base:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
