"""EDA + split on a real-sized dataset: 1,500 photos of ~12 MP in 54 sizes, 5,000 polygons.

Builds the dataset in a temp folder (one smooth JPEG per size, hard-linked to every file name of
that size, so it costs seconds and little disk), then times the real `stages.eda` and
`stages.split` processes (imports, validation, image-header checks, MLflow logging included),
plus an in-process breakdown. Every EDA figure is exact at full resolution (run-length arithmetic).

    python -m bench.eda_split [--images 1500] [--polygons 5000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ["UNKNOWN", "General trash", "Paper", "Paper pack", "Metal", "Glass", "Plastic",
              "Styrofoam", "Plastic bag", "Battery", "Clothing"]
WEIGHTS = np.array([0.3, 2.5, 2.0, 0.6, 0.5, 0.5, 1.5, 0.7, 1.8, 0.05, 0.2])


def sizes_12mp(n: int = 54) -> list[tuple[int, int]]:
    """n distinct (width, height) pairs of about 12 MP, half landscape, half portrait."""
    out = []
    for i in range(n // 2):
        w = 3600 + 24 * i
        h = round(12e6 / w)
        out += [(w, h), (h, w)]
    return out


def blob(rng, cx, cy, r, n) -> list[float]:
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * (1 + rng.uniform(-0.3, 0.3, n))
    return [round(float(v), 1) for xy in zip(cx + rad * np.cos(ang), cy + rad * np.sin(ang)) for v in xy]


def build(root: Path, n_images: int, n_polygons: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    sizes = sizes_12mp()
    root.mkdir(parents=True)
    src = root / "_sources"
    src.mkdir()
    for w, h in sizes:  # one smooth photo per size
        grad = np.linspace(60, 200, w, dtype=np.float32)[None, :, None] + np.zeros((h, 1, 3), np.float32)
        cv2.imwrite(str(src / f"{w}x{h}.jpg"), grad.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 80])
    images, anns = [], []
    per_image = rng.multinomial(n_polygons, np.ones(n_images) / n_images)
    p = WEIGHTS / WEIGHTS.sum()
    for i in range(n_images):
        w, h = sizes[i % len(sizes)]
        name = f"batch_{i // 100:02d}/{i:04d}.jpg"
        (root / name).parent.mkdir(exist_ok=True)
        # Distinct files, as real photos are (the split keeps byte-identical copies together): the
        # size's photo plus i bytes after the JPEG end marker, which decoders ignore.
        (root / name).write_bytes((src / f"{w}x{h}.jpg").read_bytes() + bytes(i))
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        bag = None
        for k in range(per_image[i]):
            c = int(rng.choice(len(CATEGORIES), p=p))
            if bag is not None and rng.random() < 0.5:  # inside the bag: an overlap
                cx, cy, r = bag[0] + rng.uniform(-0.3, 0.3) * bag[2], bag[1] + rng.uniform(-0.3, 0.3) * bag[2], bag[2] * 0.35
            else:
                r = rng.uniform(0.05, 0.2) * min(w, h)
                cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            if CATEGORIES[c] == "Plastic bag":
                bag = (cx, cy, r)
            anns.append({"id": len(anns), "image_id": i, "category_id": c, "iscrowd": 0,
                         "segmentation": [blob(rng, cx, cy, r, int(rng.integers(16, 48)))],
                         "area": float(np.pi * r * r), "bbox": [cx - r, cy - r, 2 * r, 2 * r]})
    cats = [{"id": i, "name": n} for i, n in enumerate(CATEGORIES)]
    (root / "train.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def bench_workspace(tmp: Path, **paths: str) -> dict:
    """tmp/params.yaml: the repo's params on tmp/data (no test set, no corrections), outputs at
    `paths`; returns the environment the stages run in (a private MLflow store)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(root=str(tmp / "data"), test_json=None, corrections=[])
    params["paths"].update(paths)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    return {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
            "PIPELINE_SESSION": "bench", "MLFLOW_DISABLE_TELEMETRY": "true"}


def run_stage(name: str, ws: Path, env: dict) -> float:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=ws, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"stage {name} failed:\n{out.stderr}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--polygons", type=int, default=5000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        build(tmp / "data", args.images, args.polygons)
        print(f"built {args.images} images in {len(sizes_12mp())} sizes (~12 MP), {args.polygons} polygons "
              f"in {time.perf_counter() - t:.1f} s")
        env = bench_workspace(tmp, eda=str(tmp / "eda"), split=str(tmp / "split"), metrics=str(tmp / "metrics"))
        eda_s = run_stage("eda", tmp, env)
        split_s = run_stage("split", tmp, env)
        summary = json.loads((tmp / "metrics" / "eda.json").read_text())["eda"]

        # In-process breakdown (no interpreter start, no MLflow).
        sys.path.insert(0, str(REPO))
        from pipeline.config import Split
        from pipeline.data.coco import load_dataset
        from pipeline.data.eda import analyse
        from pipeline.data.folds import balance_report, make_folds

        t0 = time.perf_counter()
        ds = load_dataset(tmp / "data", ["train.json"])
        t1 = time.perf_counter()
        analyse(ds, "smaller_on_top", workers=0)
        t2 = time.perf_counter()
        split = Split(strategy="multilabel", n_folds=5, holdout=0.1, seed=42)
        balance_report(ds, make_folds(ds, split), split)
        t3 = time.perf_counter()
    print(f"  overlaps found: {summary['overlap']['images']} images, {summary['overlap']['class_pairs']} class pairs "
          "(exact, full resolution)")
    print(f"  stage eda:   {eda_s:6.1f} s  (whole process)")
    print(f"  stage split: {split_s:6.1f} s  (whole process)")
    print(f"  EDA + split: {eda_s + split_s:6.1f} s  (target <= 30 s on 2 cores)")
    print(f"  in-process: load+validate+header checks {t1 - t0:.1f} s, EDA {t2 - t1:.1f} s, "
          f"folds+balance {t3 - t2:.1f} s")


if __name__ == "__main__":
    main()
