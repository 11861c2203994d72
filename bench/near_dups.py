"""Near-duplicate detection: precision, recall and cost on a generated set built from real photos.

Takes a folder of photos you know to be distinct (no two of one scene), writes every photo once and,
for the first half of them, variants a dataset really holds: crops (50-80 % of each side, anywhere,
kept at crop size), crops stretched back to the photo's size (as exporters do), resizes (40-70 %),
JPEG re-encodes (quality 15-40), brightness/contrast shifts (x0.7-1.3, +-40) and a crop that is also
brightened and re-encoded. Ground truth: a photo and its variants are one family. Then times the
detector (pipeline.data.near_dups.find_pairs, the stage's defaults) and scores its pairs:

  recall per variant kind: (photo, variant) pairs found / made
  precision: found pairs inside one family / found pairs (pairs across two distinct photos are
             listed: with real photos some are a second shot of the same scene, so precision here is
             a lower bound)

    python -m bench.near_dups --photos DIR [--variants 2] [--seed 0]

Without --photos it uses generated cluttered scenes (tests/test_near_dups.photo): a smoke run only,
since synthetic scenes are easier than photos.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.config import NearDups
from pipeline.data import near_dups as nd


def _crop(im, rng, lo=0.5, hi=0.8):
    h, w = im.shape[:2]
    ch, cw = int(h * rng.uniform(lo, hi)), int(w * rng.uniform(lo, hi))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return im[y:y + ch, x:x + cw]


def _jpeg(im, q):
    return cv2.imdecode(cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, int(q)])[1], cv2.IMREAD_COLOR)


def _bright(im, rng):
    return cv2.convertScaleAbs(im, alpha=rng.uniform(0.7, 1.3), beta=rng.uniform(-40, 40))


KINDS = {
    "crop": lambda im, rng: _crop(im, rng),
    "crop_stretched": lambda im, rng: cv2.resize(_crop(im, rng, 0.6, 0.85), im.shape[1::-1]),
    "resize": lambda im, rng: cv2.resize(im, None, fx=rng.uniform(0.4, 0.7), fy=rng.uniform(0.4, 0.7),
                                         interpolation=cv2.INTER_AREA),
    "jpeg": lambda im, rng: _jpeg(im, rng.integers(15, 41)),
    "brightness": _bright,
    "crop+brightness+jpeg": lambda im, rng: _jpeg(_bright(_crop(im, rng, 0.6, 0.85), rng), rng.integers(25, 41)),
}


def build(photos: list[np.ndarray], out: Path, variants: int, seed: int) -> pd.DataFrame:
    """Write the set; one row per image: key, path, height, width, family, kind."""
    rng = np.random.default_rng(seed)
    names = list(KINDS)
    rows = []
    for f, im in enumerate(photos):
        todo = [("original", im)]
        if f < len(photos) // 2:
            picks = [names[(f * variants + v) % len(names)] for v in range(variants)]   # every kind, in turn
            todo += [(k, KINDS[k](im, rng)) for k in picks]
        for v, (kind, img) in enumerate(todo):
            key = f"{f:04d}_{v}_{kind}.jpg"
            cv2.imwrite(str(out / key), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
            rows.append(dict(key=key, path=str(out / key), height=img.shape[0], width=img.shape[1], family=f, kind=kind))
    return pd.DataFrame(rows)


def score(images: pd.DataFrame, pairs: pd.DataFrame) -> tuple[pd.DataFrame, float, pd.DataFrame]:
    fam = images.set_index("key").family
    found = {tuple(sorted(p)) for p in zip(pairs.key_a, pairs.key_b)}
    originals = images[images.kind == "original"].set_index("family").key
    recall = []
    for k in KINDS:
        v = images[images.kind == k]
        made = [tuple(sorted((originals[f], key))) for f, key in zip(v.family, v.key)]
        recall.append(dict(kind=k, made=len(made), found=sum(p in found for p in made)))
    same = [fam[a] == fam[b] for a, b in found]
    precision = float(np.mean(same)) if same else 1.0
    wrong = pairs[[fam[a] != fam[b] for a, b in zip(pairs.key_a, pairs.key_b)]]
    return pd.DataFrame(recall).assign(recall=lambda d: d.found / d.made), precision, wrong


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", help="folder of distinct photos (jpg/png, searched recursively)")
    ap.add_argument("--variants", type=int, default=2, help="variants per photo, for the first half")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.photos:
        files = sorted(p for p in Path(a.photos).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        photos = [cv2.imread(str(p)) for p in files]
        source = f"{len(files)} photos from {a.photos}"
    else:
        from tests.test_near_dups import photo
        photos = [cv2.cvtColor(photo(s), cv2.COLOR_RGB2BGR) for s in range(60)]
        source = "60 generated scenes (smoke run: pass --photos for real ones)"
    with tempfile.TemporaryDirectory() as tmp:
        images = build(photos, Path(tmp), a.variants, a.seed)
        start = time.perf_counter()
        cfg = NearDups()   # the stage's defaults
        feats = nd.extract(images, cfg.side, cfg.n_features)
        t_feat = time.perf_counter() - start
        start = time.perf_counter()
        pairs = nd.find_pairs(images, cfg, feats=feats)
        t_match = time.perf_counter() - start
    recall, precision, wrong = score(images, pairs)
    n = len(images)
    print(f"set: {source}; {n} images ({(images.kind != 'original').sum()} variants), "
          f"{os.cpu_count()} cores")
    print(recall.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    made, got = recall.made.sum(), recall.found.sum()
    print(f"recall (photo, variant): {got}/{made} = {got / made:.3f}")
    print(f"pairs found: {len(pairs)}; precision: {precision:.3f} ({len(wrong)} across distinct photos)")
    for r in wrong.head(10).itertuples():
        print(f"   across: {r.key_a} ~ {r.key_b} ({r.method}, {r.inliers} inliers, hash distance {r.hash_distance})")
    print(f"cost: features {t_feat:.1f} s + matching {t_match:.1f} s for {n} images = "
          f"{1000 * (t_feat + t_match) / n:.1f} s per 1,000 images")


if __name__ == "__main__":
    main()
