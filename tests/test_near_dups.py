"""Near-duplicate detection: known pairs on generated photos, hash and cluster arithmetic, and the
split keeping near-duplicates in one fold."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from pipeline.data import near_dups as nd
from tests.helpers import photo




def letterbox(im: np.ndarray, colour=(255, 255, 255), side: int = 640) -> np.ndarray:
    """Roboflow's "fit (white edges)": scaled into a side x side square, padded with bands."""
    h, w = im.shape[:2]
    s = side / max(h, w)
    small = cv2.resize(im, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    top, left = (side - small.shape[0]) // 2, (side - small.shape[1]) // 2
    return cv2.copyMakeBorder(small, top, side - small.shape[0] - top, left, side - small.shape[1] - left,
                              cv2.BORDER_CONSTANT, value=colour)


def rotate(im: np.ndarray, degrees: float, fill=(0, 0, 0)) -> np.ndarray:
    h, w = im.shape[:2]
    return cv2.warpAffine(im, cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0), (w, h), borderValue=fill)


VARIANTS = {
    "crop": lambda im: cv2.resize(im[60:420, 100:580], (640, 480)),     # 56 % of the area, stretched back
    "resize": lambda im: cv2.resize(im, (320, 240), interpolation=cv2.INTER_AREA),
    "jpeg": lambda im: cv2.imdecode(cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 20])[1], cv2.IMREAD_COLOR),
    "bright": lambda im: cv2.convertScaleAbs(im, alpha=0.8, beta=50),
    "mirror": lambda im: np.ascontiguousarray(im[:, ::-1]),
    "rot90": lambda im: np.ascontiguousarray(np.rot90(im)),
    "letterbox": letterbox,
    "rot12": lambda im: rotate(im, 12),
    "mirror+letterbox": lambda im: letterbox(np.ascontiguousarray(im[:, ::-1]), (0, 0, 0)),
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
    assert pairs.joined.all()                                   # every copy's pixels agree once aligned
    found = {tuple(sorted(p)) for p in zip(pairs.key_a, pairs.key_b)}
    family = lambda k: k.split("_")[0].split(".")[0]
    keys = images.key.tolist()
    assert all(family(a) == family(b) for a, b in found)        # nothing across photos
    cluster = nd.clusters(keys, pairs)
    # every copy joins its original's cluster (directly, or through another copy: each image keeps
    # its top candidates only, so 10 copies of one photo are linked, not all 45 pairs checked)
    assert all(cluster[f"p{s}_{name}.png"] == cluster[f"p{s}.png"] >= 0 for s in (0, 1) for name in VARIANTS)
    by_key = {tuple(sorted(p)): m for *p, m in zip(pairs.key_a, pairs.key_b, pairs.method)}
    assert all(by_key[k] == "orb" for k in by_key if "crop" in k[1])   # a crop changes the hash...
    assert by_key[("p0.png", "p0_jpeg.png")] in ("hash", "both")   # ...a re-encode does not
    assert by_key[("p0.png", "p0_mirror.png")] in ("hash", "both")  # nor a mirror or a quarter turn (D4 views)
    assert pairs.set_index(["key_a", "key_b"]).view[("p0.png", "p0_rot90.png")] != "0"
    assert cluster["p0_crop.png"] == cluster["p0.png"] != cluster["p1.png"] >= 0
    assert (cluster[[f"p{s}.png" for s in range(2, 8)]] == -1).all()


def test_hash_pairs_and_clusters_known_answers():
    h = np.array([0, 0b1011, (1 << 64) - 1, 0b1], np.uint64)
    assert nd.hash_pairs(h, 1) == [(0, 3, 1, 0)]
    assert sorted(nd.hash_pairs(h, 3)) == [(0, 1, 3, 0), (0, 3, 1, 0), (1, 3, 2, 0)]
    views = np.array([[0, 5, 5], [9, 0b111, 0b1], [(1 << 64) - 1, 6, 7]], np.uint64)   # (N, V): closest view wins
    assert nd.hash_pairs(views, 2) == [(0, 1, 1, 2), (0, 2, 2, 1)]
    pairs = pd.DataFrame({"key_a": ["a", "d", "e", "c"], "key_b": ["b", "e", "f", "a"], "joined": [1, 1, 1, 0]})
    c = nd.clusters(list("abcdef"), pairs)
    assert c.to_dict() == {"a": 1, "b": 1, "c": -1, "d": 0, "e": 0, "f": 0}   # biggest first; weak c-a not joined


def test_read_pairs_without_the_stage(tmp_path):
    assert nd.read_pairs(tmp_path / "missing").columns.tolist() == nd.PAIR_COLUMNS


def test_pad_bands_of_any_colour_are_trimmed_and_blank_photos_kept_whole():
    im = photo(5)
    for colour in ((255, 255, 255), (0, 0, 0), (114, 114, 114)):
        boxed = letterbox(im, colour)                           # 640 x 480 -> bands of 80 rows top and bottom
        t, b, l, r = nd.trim_box(boxed)
        assert abs(t - 80) <= 1 and abs(b - 560) <= 1 and (l, r) == (0, 640)
    t, b, l, r = nd.trim_box(np.full((100, 200, 3), 255, np.uint8))
    assert b - t >= 25 and r - l >= 50                           # never below MIN_KEEP of a side
    grey = cv2.cvtColor(rotate(letterbox(im), 10), cv2.COLOR_RGB2GRAY)
    pad = nd.pad_mask(cv2.resize(grey, (96, 96), interpolation=cv2.INTER_AREA))
    assert pad[0].mean() > 0.75 and pad[48, 48] == 0            # skewed band and black corners; content kept
    ramp = np.tile(np.linspace(40, 200, 96, dtype=np.float32), (96, 1)).astype(np.uint8)
    assert not nd.pad_mask(ramp).any()                           # a smooth sky is flat, but not one colour


def test_photos_sharing_a_background_or_letterbox_are_listed_but_not_joined(tmp_path):
    """Two different scenes pasted on one textured backdrop (the same board, the same framing),
    and two different photos letterboxed alike: the keypoints or hashes may pair them, the pixels
    never join them."""
    board = photo(100)
    a, b = board.copy(), board.copy()
    a[120:360, 160:480] = photo(101)[120:360, 160:480]          # different objects, 25 % of the frame
    b[120:360, 160:480] = photo(102)[120:360, 160:480]
    images = write(tmp_path, {"a.png": a, "b.png": b, "c.png": letterbox(photo(103)[:200]),
                              "d.png": letterbox(photo(104)[:200])})
    pairs = nd.find_pairs(images, workers=1)
    assert not pairs.joined.any()
    if len(pairs):
        assert (pairs.disagree > nd.NearDups().max_disagree).all()
