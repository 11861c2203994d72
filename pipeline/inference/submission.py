"""The competition submission and predictions on new images.

submission.csv: columns image_id, PredictionString. image_id is the test image's file_name;
PredictionString is the predicted class map (at the image's own size) resized nearest-neighbour
to size x size, flattened row by row, as space-separated integers.
"""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.data.coco import DataError
from pipeline.data.masks import palette
from pipeline.inference.ensemble import Ensemble, image_files
from pipeline.io import atomic_file, write_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def predict_images(ens: Ensemble, images: pd.DataFrame, batch_size: int):
    """Yield (row index, (H, W) uint8 class map at the image's json size); images are prepared as the
    ensemble's checkpoints say (ens.spec: evaluation size, the mask cache's max_side)."""
    data = image_files(images, ens.spec.eval_size, ens.spec.max_side)
    yield from ens.predict(data, list(zip(images.height, images.width)), batch_size)


def write_submission(ens: Ensemble, images: pd.DataFrame, out_csv: str | Path, size: int = 256,
                     batch_size: int = 8, keep: int = 0) -> dict[int, np.ndarray]:
    """Write submission.csv atomically (rows in the test json's order); return `keep` predictions."""
    preds: dict[int, str] = {}
    kept: dict[int, np.ndarray] = {}
    for i, pred in predict_images(ens, images, batch_size):
        small = cv2.resize(pred, (size, size), interpolation=cv2.INTER_NEAREST)
        preds[i] = " ".join(map(str, small.ravel().tolist()))
        if i < keep:
            kept[i] = pred
    with atomic_file(out_csv) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "PredictionString"])
        for i, image_id in enumerate(images.image_id):
            w.writerow([image_id, preds[i]])
    return kept


def check_output_dir(images_dir: Path, out_dir: Path) -> None:
    """Refuse an output folder that is, contains, or lies inside the input folder."""
    a, b = images_dir.resolve(), out_dir.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise DataError(f"--out {out_dir} overlaps --images {images_dir}: predictions would overwrite or mix "
                        "with the inputs; choose a separate folder")


def image_table(files: list[str | Path]) -> pd.DataFrame:
    """path, height, width of image files (as OpenCV decodes them: EXIF-oriented), for predict_images."""
    sizes = []
    for p in files:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            raise DataError(f"{p}: cannot decode the image")
        sizes.append(img.shape[:2])
    return pd.DataFrame({"path": [str(p) for p in files], "height": [s[0] for s in sizes],
                         "width": [s[1] for s in sizes]})


def predict_folder(ens: Ensemble, images_dir: str | Path, out_dir: str | Path, batch_size: int = 8) -> int:
    """Every image under images_dir -> out_dir/<same path>.png (class indices, uint8) and
    <same path>_overlay.jpg (prediction blended over the photo). Returns the number written."""
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    check_output_dir(images_dir, out_dir)
    files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{images_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    targets = pd.Series([str(f.relative_to(images_dir).with_suffix("")) for f in files])
    if targets.duplicated().any():
        clash = [str(f.relative_to(images_dir)) for f, t in zip(files, targets) if (targets == t).sum() > 1]
        raise DataError(f"{images_dir}: {', '.join(clash[:6])} differ only by extension; their predictions would "
                        "overwrite each other (<name>.png): rename or move one of each pair")
    table = image_table(files)
    pal = palette(len(ens.spec.classes))
    for i, pred in predict_images(ens, table, batch_size):
        rel = files[i].relative_to(images_dir).with_suffix("")
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        write_image(f"{target}.png", pred)
        photo = cv2.imread(str(files[i]), cv2.IMREAD_COLOR)
        colour = pal[pred][..., ::-1]
        overlay = np.where(pred[..., None] > 0, (0.5 * photo + 0.5 * colour).astype(np.uint8), photo)
        write_image(f"{target}_overlay.jpg", overlay)
    return len(files)
