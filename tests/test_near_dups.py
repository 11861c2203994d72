"""Near-duplicate detection: known pairs on generated photos, hash and cluster arithmetic, and the
split keeping near-duplicates in one fold."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from pipeline.data import near_dups as nd


def photo(seed: int, h: int = 480, w: int = 640) -> np.ndarray:
    """A cluttered scene (RGB): smoothed noise plus 60 random shapes, different for every seed."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (3, 3), 0)
    img = np.ascontiguousarray(cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC))
    for _ in range(60):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        s = int(rng.integers(8, 60))
        kind = rng.integers(3)
        if kind == 0:
            cv2.rectangle(img, (x, y), (x + s, y + int(rng.integers(8, 60))), colour, -1)
        elif kind == 1:
            cv2.circle(img, (x, y), s // 2, colour, -1)
        else:
            cv2.line(img, (x, y), (int(rng.integers(0, w)), int(rng.integers(0, h))), colour, int(rng.integers(1, 5)))
    return img


VARIANTS = {
    "crop": lambda im: cv2.resize(im[60:420, 100:580], (640, 480)),     # 56 % of the area, stretched back
    "resize": lambda im: cv2.resize(im, (320, 240), interpolation=cv2.INTER_AREA),
    "jpeg": lambda im: cv2.imdecode(cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 20])[1], cv2.IMREAD_COLOR),
    "bright": lambda im: cv2.convertScaleAbs(im, alpha=0.8, beta=50),
}


def write(folder, images: dict[str, np.ndarray]) -> pd.DataFrame:
    rows = []
    for key, im in images.items():
        path = folder / key
        cv2.imwrite(str(path), im)
        rows.append(dict(key=key, path=str(path), height=im.shape[0], width=im.shape[1]))
    return pd.DataFrame(rows)


def test_finds_every_variant_and_nothing_else(tmp_path):
    originals = {f"p{s}.png": photo(s) for s in range(8)}
    variants = {f"p{s}_{name}.png": f(originals[f"p{s}.png"]) for s in (0, 1) for name, f in VARIANTS.items()}
    images = write(tmp_path, {**originals, **variants})
    pairs = nd.find_pairs(images, workers=1)
    found = {tuple(sorted(p)) for p in zip(pairs.key_a, pairs.key_b)}
    family = lambda k: k.split("_")[0].split(".")[0]
    keys = images.key.tolist()
    truth = {tuple(sorted((a, b))) for i, a in enumerate(keys) for b in keys[i + 1:] if family(a) == family(b)}
    assert found == truth
    by_key = {tuple(sorted(p)): m for *p, m in zip(pairs.key_a, pairs.key_b, pairs.method)}
    assert by_key[("p0.png", "p0_crop.png")] == "orb"          # a crop changes the hash...
    assert by_key[("p0.png", "p0_jpeg.png")] in ("hash", "both")   # ...a re-encode does not
    cluster = nd.clusters(keys, pairs)
    assert cluster["p0_crop.png"] == cluster["p0.png"] != cluster["p1.png"] >= 0
    assert (cluster[[f"p{s}.png" for s in range(2, 8)]] == -1).all()


def test_hash_pairs_and_clusters_known_answers():
    h = np.array([0, 0b1011, (1 << 64) - 1, 0b1], np.uint64)
    assert nd.hash_pairs(h, 1) == [(0, 3, 1)]
    assert sorted(nd.hash_pairs(h, 3)) == [(0, 1, 3), (0, 3, 1), (1, 3, 2)]
    pairs = pd.DataFrame({"key_a": ["a", "d", "e"], "key_b": ["b", "e", "f"]})
    c = nd.clusters(list("abcdef"), pairs)
    assert c.to_dict() == {"a": 1, "b": 1, "c": -1, "d": 0, "e": 0, "f": 0}   # biggest cluster first


def test_read_pairs_without_the_stage(tmp_path):
    assert nd.read_pairs(tmp_path / "missing").columns.tolist() == nd.PAIR_COLUMNS
