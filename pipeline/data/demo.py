"""Deterministic synthetic "recycling scenes" in the competition's COCO layout.

Each of the 11 categories has its own learnable look (shape + colour + texture) on a cluttered
background. Items sit inside translucent plastic bags (overlapping labels), Battery is rare, some
images are empty, and annotations mix every COCO encoding a real dataset uses: polygons,
multi-part polygons (Clothing), compressed RLE, and crowd regions as uncompressed RLE. Each
annotation is rasterised with pycocotools *before* the object is drawn from it, so pixels and
labels agree exactly. Category ids start at 0 (UNKNOWN), as in the competition's json.

Layout written: <out>/train.json, <out>/test.json (images only), <out>/test_gt.json (the test
labels, never read by the pipeline; kept for checking a submission by hand), label_noise.csv (the
annotations corrupted on purpose with demo.label_noise: the label audit's answer key), and the
JPEGs at <out>/batch_XX/NNNN.jpg (train) and <out>/test/NNNN.jpg.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from pipeline.io import atomic_dir, write_image
from pipeline.workspace import DemoFiles

CATEGORIES = ["UNKNOWN", "General trash", "Paper", "Paper pack", "Metal", "Glass", "Plastic",
              "Styrofoam", "Plastic bag", "Battery", "Clothing"]
# Relative frequency of each loose item (the bag is placed separately). Battery is rare on purpose.
FREQUENCY = {"UNKNOWN": 0.7, "General trash": 1.1, "Paper": 1.3, "Paper pack": 0.9, "Metal": 0.9,
             "Glass": 0.8, "Plastic": 1.1, "Styrofoam": 0.8, "Battery": 0.6, "Clothing": 0.7}
IMAGES_PER_BATCH = 16
NOISE_COLUMNS = ["ann_id", "file_name", "kind", "true_class", "written_class", "bbox"]

# BGR base colours per class; textures below make them separable beyond colour.
COLOURS = {"UNKNOWN": (200, 50, 150), "General trash": (40, 70, 110), "Paper": (235, 235, 230),
           "Paper pack": (200, 120, 40), "Metal": (200, 190, 190), "Glass": (60, 170, 60),
           "Plastic": (230, 210, 120), "Styrofoam": (220, 190, 255), "Plastic bag": (120, 220, 240),
           "Battery": (0, 140, 255), "Clothing": (40, 40, 200)}


def _blob(rng, cx, cy, r, n=9, jitter=0.35) -> list[float]:
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * (1 + rng.uniform(-jitter, jitter, n))
    return _flat(cx + rad * np.cos(ang), cy + rad * np.sin(ang))


def _rect(rng, cx, cy, w, h) -> list[float]:
    t = rng.uniform(0, np.pi)
    pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    pts = pts @ rot.T
    return _flat(cx + pts[:, 0], cy + pts[:, 1])


def _ellipse(rng, cx, cy, a, b) -> list[float]:
    pts = cv2.ellipse2Poly((int(cx), int(cy)), (max(2, int(a)), max(2, int(b))), int(rng.uniform(0, 180)), 0, 360, 20)
    return _flat(pts[:, 0].astype(float), pts[:, 1].astype(float))


def _flat(xs, ys) -> list[float]:
    return [round(float(v), 1) for xy in zip(xs, ys) for v in xy]


def _shape(name: str, rng, cx: float, cy: float, s: float) -> list[list[float]]:
    """Polygon parts (COCO order x0,y0,x1,y1,...) for one object of class `name`, size scale s."""
    if name == "Paper":
        return [_rect(rng, cx, cy, s * 1.4, s * 1.0)]
    if name == "Paper pack":
        return [_rect(rng, cx, cy, s * 0.8, s * 1.3)]
    if name == "Styrofoam":
        return [_rect(rng, cx, cy, s * 1.2, s * 1.2)]
    if name == "Metal":
        return [_ellipse(rng, cx, cy, s * 0.6, s * 0.6)]
    if name in ("Glass", "Plastic"):
        return [_ellipse(rng, cx, cy, s * 0.9, s * 0.4)]
    if name == "Battery":
        return [_rect(rng, cx, cy, s * 1.0, s * 0.5)]
    if name == "Clothing":  # two separate pieces: a multi-part polygon
        return [_blob(rng, cx - s * 0.55, cy, s * 0.5), _blob(rng, cx + s * 0.55, cy + s * 0.1, s * 0.45)]
    if name == "Plastic bag":
        return [_blob(rng, cx, cy, s, n=12, jitter=0.15)]
    return [_blob(rng, cx, cy, s * 0.6)]  # UNKNOWN, General trash: irregular lumps


def _texture(name: str, rng, h: int, w: int) -> np.ndarray:
    """A full-frame (H, W, 3) uint8 texture in the class's look."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.array(COLOURS[name], np.float32)
    shade = np.ones((h, w), np.float32)
    period = max(4.0, h / 24)
    if name == "Paper":          # printed lines
        shade = 1 - 0.35 * (np.sin(yy * 2 * np.pi / period) > 0.6)
    elif name == "Paper pack":   # a white band
        shade = 1 + 0.5 * ((xx // (period * 1.5)) % 3 == 0)
    elif name == "Metal":        # concentric rings
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        shade = 0.7 + 0.3 * np.cos(np.hypot(xx - cx, yy - cy) / period * 2 * np.pi)
    elif name == "Plastic":      # diagonal stripes
        shade = 0.8 + 0.2 * np.sign(np.sin((xx + yy) * 2 * np.pi / (period * 1.5)))
    elif name == "Styrofoam":    # bead dots
        shade = 1 - 0.3 * ((xx % period < 2) & (yy % period < 2))
    elif name == "Battery":      # black band
        shade = np.where((xx // (period * 2)) % 2 == 0, 1.0, 0.15)
    elif name == "Clothing":     # checks
        shade = 0.7 + 0.3 * (((xx // period) + (yy // period)) % 2)
    elif name == "General trash":
        shade = 0.7 + 0.6 * rng.random((h, w)).astype(np.float32)
    elif name == "UNKNOWN":
        shade = 0.6 + 0.8 * rng.random((h, w)).astype(np.float32) ** 2
    tex = base[None, None, :] * shade[..., None]
    return np.clip(tex + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


def _background(rng, h: int, w: int) -> np.ndarray:
    """Cluttered floor: smooth tone, noise and a few low-contrast strokes (no class look)."""
    tone = rng.uniform(70, 125) + rng.uniform(-8, 8, 3)   # greyish: no class colour
    low = cv2.resize(rng.normal(0, 18, (4, 4, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img = np.clip(tone + low + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    for _ in range(rng.integers(2, 6)):
        p1 = tuple(int(v) for v in rng.integers(0, [w, h]))
        p2 = tuple(int(v) for v in rng.integers(0, [w, h]))
        c = tuple(int(v) for v in np.clip(tone + rng.normal(0, 25, 3), 0, 255))
        cv2.line(img, p1, p2, c, int(rng.integers(1, 3)))
    return img


def _encode(rng, name: str, parts: list[list[float]], h: int, w: int) -> tuple[dict | list, np.ndarray, int]:
    """Pick the COCO encoding for one object; return (segmentation, mask (H, W) uint8, iscrowd)."""
    rle = mask_utils.merge(mask_utils.frPyObjects(parts, h, w))
    mask = mask_utils.decode(rle)
    r = rng.random()
    if name == "General trash" and r < 0.25:  # a crowd region: uncompressed RLE, iscrowd=1
        counts, flat, prev, run = [], mask.ravel(order="F"), 0, 0
        for v in flat:
            if v == prev:
                run += 1
            else:
                counts.append(run)
                prev, run = v, 1
        counts.append(run)
        return {"size": [h, w], "counts": [int(c) for c in counts]}, mask, 1
    if r < 0.15 and len(parts) == 1:  # compressed RLE string
        return {"size": [h, w], "counts": rle["counts"].decode("ascii")}, mask, 0
    return parts, mask, 0


def _scene(rng, h: int, w: int, pick: Callable[[], str]) -> tuple[np.ndarray, list[dict]]:
    img = _background(rng, h, w)
    objects: list[dict] = []
    occupied = np.zeros((h, w), bool)
    if rng.random() < 0.06:
        return img, objects  # an image with nothing annotated
    items: list[tuple[str, float, float, float, bool]] = []
    if rng.random() < 0.35:  # a bag with things inside it
        bs = rng.uniform(0.22, 0.32) * min(h, w)
        bx, by = rng.uniform(bs, w - bs), rng.uniform(bs, h - bs)
        items.append(("Plastic bag", bx, by, bs, True))
        for _ in range(rng.integers(1, 3)):
            items.append((pick(), bx + rng.uniform(-0.4, 0.4) * bs, by + rng.uniform(-0.4, 0.4) * bs, bs * 0.45, True))
    for _ in range(rng.integers(3, 7)):
        s = rng.uniform(0.11, 0.19) * min(h, w)
        items.append((pick(), rng.uniform(s, w - s), rng.uniform(s, h - s), s, False))
    for name, cx, cy, s, inside_bag in items:
        for _try in range(8):
            parts = _shape(name, rng, cx, cy, s)
            seg, mask, crowd = _encode(rng, name, parts, h, w)
            m = mask.astype(bool)
            if m.sum() >= 8 and (inside_bag or (occupied & m).sum() < 0.05 * m.sum()):
                break
            cx, cy = rng.uniform(s, w - s), rng.uniform(s, h - s)
        else:
            continue
        tex = _texture(name, rng, h, w)
        if name in ("Plastic bag", "Glass"):  # translucent: what is behind shows through
            img[m] = (0.3 * img[m] + 0.7 * tex[m]).astype(np.uint8)
        else:
            img[m] = tex[m]
        occupied |= m
        ys, xs = np.nonzero(m)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        objects.append(dict(category=name, segmentation=seg, iscrowd=crowd, area=float(m.sum()), bbox=bbox))
    return img, objects


def add_label_noise(anns: list[dict], images: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Corrupt `fraction` of the annotations on purpose, half relabelled as another category, half
    deleted: (the annotations as written, one record per corrupted annotation). The scenes are drawn
    before, so the images are the same with and without noise."""
    rng = np.random.default_rng(seed + 7919)
    picked = rng.choice(len(anns), size=round(fraction * len(anns)), replace=False) if anns else []
    files = {im["id"]: im["file_name"] for im in images}
    records, deleted = [], set()
    for n, i in enumerate(sorted(int(i) for i in picked)):
        a = anns[i]
        true = CATEGORIES[a["category_id"]]
        rec = {"ann_id": a["id"], "file_name": files[a["image_id"]], "true_class": true, "bbox": json.dumps(a["bbox"])}
        if n % 2 == 0:
            a["category_id"] = int(rng.choice([c for c in range(len(CATEGORIES)) if c != a["category_id"]]))
            records.append({**rec, "kind": "relabelled", "written_class": CATEGORIES[a["category_id"]]})
        else:
            deleted.add(i)
            records.append({**rec, "kind": "deleted", "written_class": ""})
    return [a for i, a in enumerate(anns) if i not in deleted], records


def make_demo(out_dir: str | Path, n_train: int, n_test: int, image_size: int, seed: int,
              label_noise: float = 0.0) -> dict:
    """Write the demo dataset to `out_dir` (atomically) and return a summary of what was written.
    label_noise > 0 corrupts that fraction of the training annotations, listed in label_noise.csv."""
    rng = np.random.default_rng(seed)
    names = [n for n in FREQUENCY]
    p = np.array([FREQUENCY[n] for n in names])
    p = p / p.sum()

    def pick() -> str:
        return str(rng.choice(names, p=p))

    categories = [{"id": i, "name": n, "supercategory": "trash"} for i, n in enumerate(CATEGORIES)]
    cat_id = {c["name"]: c["id"] for c in categories}
    h = w = image_size
    summary = {"train_images": n_train, "test_images": n_test, "annotations": 0}
    with atomic_dir(out_dir) as tmp:
        out = DemoFiles(tmp)
        for split, n in (("train", n_train), ("test", n_test)):
            images, anns = [], []
            for i in range(n):
                img, objects = _scene(rng, h, w, pick)
                folder = f"batch_{i // IMAGES_PER_BATCH + 1:02d}" if split == "train" else "test"
                file_name = f"{folder}/{i:04d}.jpg"
                (tmp / folder).mkdir(exist_ok=True)
                write_image(tmp / file_name, img, cv2.IMWRITE_JPEG_QUALITY, 95)
                images.append({"id": i, "file_name": file_name, "width": w, "height": h})
                for obj in objects:
                    anns.append({"id": len(anns), "image_id": i, "category_id": cat_id[obj.pop("category")], **obj})
            meta = {"info": {"description": "synthetic recycling scenes (pipeline demo)", "seed": seed},
                    "licenses": [], "categories": categories, "images": images}
            if split == "train":
                anns, noise = add_label_noise(anns, images, label_noise, seed)
                out.train_json.write_text(json.dumps({**meta, "annotations": anns}))
                pd.DataFrame(noise, columns=NOISE_COLUMNS).to_csv(out.label_noise_csv, index=False)
                summary.update(annotations=len(anns), corrupted_annotations=len(noise))
            else:
                out.test_json.write_text(json.dumps({**meta, "annotations": []}))
                out.test_gt_json.write_text(json.dumps({**meta, "annotations": anns}))
    return summary
