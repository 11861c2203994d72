"""Near-duplicate images: one photo cropped, resized, re-encoded or brightened under another name.

A model validated on a crop of a photo it trained on scores the photo, not the skill. Two detectors,
one verdict per pair:

  hash: imagehash's pHash (64-bit sign pattern of the low DCT frequencies of a 32x32 grey thumbnail).
      Survives resizing, JPEG re-encoding, brightness/contrast and mild colour changes; all pairs are
      compared with a popcount (a million pairs take milliseconds). Blind to crops: a 70 % crop has
      other low frequencies.
  orb: ORB keypoints (OpenCV) + a geometric check. Candidates come from locality-sensitive hashing
      of every image's binary descriptors at once (numpy; FLANN's LSH index took 50x longer): images
      sharing many more descriptor keys than a typical pair does; a candidate pair is a duplicate when at least `min_inliers`
      ratio-tested matches agree on one affine map (RANSAC), which a crop, a rescale, a small
      rotation or a stretch to a square all are. Two photos that merely look alike (two facades, two
      bottles on one table) share few descriptors in a consistent geometry.

Why not embeddings: the pipeline is offline (no pretrained weights to download) and features of a
randomly initialised network do not rank visual similarity; a hash plus keypoints needs none.
Pairs are joined into clusters (connected components). Measured precision/recall and cost:
`python -m bench.near_dups` (README, Performance).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import cv2
import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.config import NearDups
from pipeline.data.masks import decode_oriented, target_size
from pipeline.io import parallel_map
from pipeline.workspace import NearDupFiles

PAIR_COLUMNS = ["key_a", "key_b", "method", "hash_distance", "inliers"]
LSH_TABLES, LSH_BITS, LSH_BUCKET = 16, 20, 8   # candidate search (see candidate_pairs)
TOP_K = 5               # candidates kept per image, most votes first
MIN_VOTES = 10
CLAHE = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
FAST_THRESHOLD = 10     # ORB's corner threshold (OpenCV's default 20 finds few corners in dark photos)
RATIO = 0.8             # Lowe's ratio test when matching a candidate pair


def features(path: str, height: int, width: int, side: int, n_features: int) -> dict:
    """pHash (uint64), ORB keypoint positions (N, 2, in pixels of the decoded copy) and descriptors
    (N, 32 uint8) of one image, decoded (EXIF-aware, JPEG DCT-scaled as far as the size allows: the
    features need no fine detail) with its long side at most `side`."""
    img = decode_oriented(path, height, width, target_size(height, width, side), dct_min_factor=1)
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    bits = imagehash.phash(Image.fromarray(grey)).hash.flatten()
    phash = np.packbits(bits).view(">u8")[0].astype(np.uint64)
    # local contrast first: night and back-lit photos otherwise give a handful of keypoints
    flat = CLAHE.apply(grey)
    kps, des = cv2.ORB_create(nfeatures=n_features, fastThreshold=FAST_THRESHOLD).detectAndCompute(flat, None)
    pts = np.float32([k.pt for k in kps]).reshape(-1, 2)
    return dict(phash=phash, pts=pts, des=des if des is not None else np.zeros((0, 32), np.uint8))


def _features_task(args: tuple) -> dict:
    return features(*args)


def extract(images: pd.DataFrame, side: int, n_features: int, workers: int = 0) -> list[dict]:
    """features() of every row of `images` (columns path, height, width), in row order."""
    tasks = [(r.path, r.height, r.width, side, n_features) for r in images.itertuples(index=False)]
    return parallel_map(_features_task, tasks, "near_dups", workers, serial_below=32)


def hash_pairs(hashes: np.ndarray, max_distance: int, block: int = 2048) -> list[tuple[int, int, int]]:
    """(i, j, Hamming distance) for every i < j whose 64-bit hashes differ in at most max_distance bits."""
    hashes = np.asarray(hashes, np.uint64)
    out = []
    for s in range(0, len(hashes), block):
        d = np.bitwise_count(hashes[s:s + block, None] ^ hashes[None, :])
        i, j = np.nonzero(d <= max_distance)
        i = i + s
        keep = i < j
        out += list(zip(i[keep].tolist(), j[keep].tolist(), d[i[keep] - s, j[keep]].tolist()))
    return out


def candidate_pairs(feats: list[dict], top_k: Optional[int] = None, seed: int = 0) -> dict[tuple[int, int], int]:
    """Image pairs (i < j) worth a geometric check, from locality-sensitive hashing of all ORB
    descriptors at once: {(i, j): votes}.

    Each of LSH_TABLES tables keys every descriptor by LSH_BITS random bits of its 256; two
    descriptors sharing a key in a small bucket (at most LSH_BUCKET, so the flat-sky patterns every
    photo has do not count) give their images one vote. A pair is a candidate when it has at least
    MIN_VOTES and is among the top_k of either image, so the geometric checks grow linearly with
    the images. (On the facade photos, crops of one photo got 230+ votes at the 5th percentile,
    unrelated pairs 16 at the median and 33 at the 99th percentile.) Within a burst of many shots
    of one scene, top_k links are enough to join the whole cluster, not to list every pair.
    """
    n, top_k = len(feats), top_k or TOP_K
    des = [f["des"] for f in feats]
    owner = np.repeat(np.arange(n), [len(d) for d in des])
    if n < 2 or len(owner) == 0:
        return {}
    packed = np.concatenate(des)
    rng = np.random.default_rng(seed)
    codes = []
    for _ in range(LSH_TABLES):
        pos = rng.choice(256, LSH_BITS, replace=False)
        bits = (packed[:, pos // 8] >> (7 - pos % 8)[None, :]) & 1
        key = (bits.astype(np.int64) << np.arange(LSH_BITS)).sum(1)
        order = np.argsort(key, kind="stable")
        k, w = key[order], owner[order]
        _, inverse, counts = np.unique(k, return_inverse=True, return_counts=True)
        small = counts[inverse] <= LSH_BUCKET
        for off in range(1, LSH_BUCKET):
            m = (k[off:] == k[:-off]) & small[off:] & (w[off:] != w[:-off])
            a, b = w[:-off][m], w[off:][m]
            codes.append(np.minimum(a, b) * n + np.maximum(a, b))
    pair, votes = np.unique(np.concatenate(codes), return_counts=True)
    keep = votes >= MIN_VOTES
    pairs = pd.DataFrame({"i": pair[keep] // n, "j": pair[keep] % n, "votes": votes[keep]})
    both = pd.concat([pairs, pairs.rename(columns={"i": "j", "j": "i"})])
    top = both.sort_values("votes", ascending=False, kind="stable").groupby("i").head(top_k)
    return {(min(i, j), max(i, j)): int(v) for i, j, v in top[["i", "j", "votes"]].itertuples(index=False)}


def affine_inliers(a: dict, b: dict) -> int:
    """How many ratio-tested ORB matches between two images agree on one affine map (RANSAC)."""
    if len(a["des"]) < 3 or len(b["des"]) < 3:
        return 0
    knn = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(a["des"], b["des"], k=2)
    good = [m[0] for m in knn if len(m) == 2 and m[0].distance < RATIO * m[1].distance]
    if len(good) < 3:
        return 0
    src = a["pts"][[m.queryIdx for m in good]]
    dst = b["pts"][[m.trainIdx for m in good]]
    extent = max(np.ptp(src, axis=0).max(), np.ptp(dst, axis=0).max(), 1.0)
    A, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=0.01 * extent)
    if A is None or mask is None:
        return 0
    det = abs(np.linalg.det(A[:, :2]))
    if not 1 / 25 <= det <= 25:          # collapses or blows up the image: not a crop or a resize
        return 0
    return int(mask.sum())


_FEATS: list[dict] = []


def _verify_init(feats: list[dict]) -> None:
    global _FEATS
    _FEATS = feats


def _verify(pair: tuple[int, int]) -> int:
    return affine_inliers(_FEATS[pair[0]], _FEATS[pair[1]])


def verify(feats: list[dict], pairs: list[tuple[int, int]], workers: int = 0) -> list[int]:
    """affine_inliers of each pair, across `workers` processes (0 = all cores); the features go to
    each worker once (initializer), not with every pair."""
    return parallel_map(_verify, pairs, "near_dups check", workers, serial_below=64, init=(_verify_init, (feats,)))


def find_pairs(images: pd.DataFrame, settings: Optional[NearDups] = None, workers: int = 0,
               feats: Optional[list[dict]] = None) -> pd.DataFrame:
    """Near-duplicate pairs among `images` (columns key, path, height, width): PAIR_COLUMNS.
    settings: the near_dups section (hash_distance, min_inliers, side, n_features; default its defaults).
    method: 'hash' (pHash within hash_distance bits), 'orb' (keypoints), or 'both' (found by each)."""
    n = settings or NearDups()
    hash_distance, min_inliers = n.hash_distance, n.min_inliers
    feats = feats if feats is not None else extract(images, n.side, n.n_features, workers)
    keys = images.key.tolist()
    hashes = np.array([f["phash"] for f in feats], np.uint64)
    found = {(i, j): dict(method="hash", hash_distance=d, inliers=0) for i, j, d in hash_pairs(hashes, hash_distance)}
    candidates = sorted(candidate_pairs(feats))
    for (i, j), n in zip(candidates, verify(feats, candidates, workers)):
        if n >= min_inliers:
            row = found.get((i, j)) or dict(method="orb", hash_distance=int(np.bitwise_count(hashes[i] ^ hashes[j])))
            found[(i, j)] = {**row, "method": "both" if row["method"] == "hash" else "orb", "inliers": n}
    rows = [dict(key_a=keys[i], key_b=keys[j], **v) for (i, j), v in sorted(found.items())]
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def with_test_images(labelled: pd.DataFrame, test: Optional[pd.DataFrame]) -> pd.DataFrame:
    """The images to compare, with a `role` column: the labelled pool, plus the test images that are
    not also labelled (the same file under the same key is one image)."""
    images = labelled.assign(role="labelled")
    if test is None:
        return images
    return pd.concat([images, test[~test.key.isin(images.key)].assign(role="test")], ignore_index=True)


def write_report(images: pd.DataFrame, pairs: pd.DataFrame, cluster: pd.Series, out: NearDupFiles) -> None:
    """The pairs, the clusters (key, role, cluster; clustered images only) and their montage."""
    table = images[["key", "role"]].assign(cluster=cluster.to_numpy())
    pairs.to_csv(out.pairs_csv, index=False)
    table[table.cluster >= 0].sort_values(["cluster", "key"]).to_csv(out.clusters_csv, index=False)
    montage(images, cluster, out.clusters_png)


def summary(images: pd.DataFrame, pairs: pd.DataFrame, cluster: pd.Series) -> dict:
    """The stage's metrics: pairs by method, clusters, and test images that repeat a labelled one."""
    role = pd.Series(images.role.to_numpy(), index=images.key)
    clustered = pd.DataFrame({"role": role.to_numpy(), "cluster": cluster.to_numpy()})[cluster.to_numpy() >= 0]
    mixed = clustered.groupby("cluster").role.nunique() > 1
    labelled = pairs.key_a.map(role).eq("labelled") & pairs.key_b.map(role).eq("labelled")
    return {"images": len(images), "pairs": len(pairs),
            "pairs_by_method": {m: int((pairs.method == m).sum()) for m in ("hash", "orb", "both")},
            "clusters": int(cluster.max() + 1), "images_in_clusters": len(clustered),
            "largest_cluster": int(clustered.cluster.value_counts().max()) if len(clustered) else 0,
            "labelled_pairs": int(labelled.sum()),
            "test_images_repeating_labelled": int(((clustered.role == "test") & clustered.cluster.isin(mixed[mixed].index)).sum())}


def read_pairs(folder: str | os.PathLike) -> pd.DataFrame:
    """The pairs the near_dups stage wrote (empty when it has not run or was disabled)."""
    path = NearDupFiles(Path(folder)).pairs_csv
    if not path.exists():
        return pd.DataFrame(columns=PAIR_COLUMNS)
    return pd.read_csv(path, dtype={"key_a": str, "key_b": str}, keep_default_na=False)


def clusters(keys: list[str], pairs: pd.DataFrame) -> pd.Series:
    """Cluster id per key (connected components of the pairs); singletons get -1. Ids count from 0
    in order of decreasing cluster size, then first key."""
    pos = {k: i for i, k in enumerate(keys)}
    a = pairs.key_a.map(pos).to_numpy(int) if len(pairs) else np.zeros(0, int)
    b = pairs.key_b.map(pos).to_numpy(int) if len(pairs) else np.zeros(0, int)
    n = len(keys)
    _, labels = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)
    sizes = np.bincount(labels, minlength=n)
    multi = sorted({l for l in labels if sizes[l] > 1}, key=lambda l: (-sizes[l], np.flatnonzero(labels == l)[0]))
    rank = {l: r for r, l in enumerate(multi)}
    return pd.Series([rank.get(l, -1) for l in labels], index=keys, name="cluster")


def montage(images: pd.DataFrame, cluster: pd.Series, out: str, max_clusters: int = 40, per_row: int = 8,
            thumb: int = 128) -> None:
    """One row of thumbnails per cluster (largest first), each captioned with its file name, into a PNG."""
    by_key = images.set_index("key")
    rows = []
    for c in sorted(set(cluster[cluster >= 0]))[:max_clusters]:
        tiles, members = [], cluster.index[cluster == c]
        for key in members[:per_row]:
            r = by_key.loc[key]
            img = decode_oriented(r.path, r.height, r.width, target_size(r.height, r.width, thumb))
            tile = np.full((thumb + 16, thumb, 3), 255, np.uint8)
            tile[:img.shape[0], :img.shape[1]] = img
            name = str(key).rsplit("/", 1)[-1]
            cv2.putText(tile, name[:20], (2, thumb + 11), cv2.FONT_HERSHEY_SIMPLEX, 0.32, (0, 0, 0), 1, cv2.LINE_AA)
            tiles.append(tile)
        label = np.full((thumb + 16, 48, 3), 255, np.uint8)
        cv2.putText(label, f"#{c}", (4, thumb // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(label, f"{len(members)} img", (4, thumb // 2 + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1,
                    cv2.LINE_AA)
        row = np.hstack([label] + tiles + [np.full((thumb + 16, thumb, 3), 255, np.uint8)] * (per_row - len(tiles)))
        rows.append(np.vstack([row, np.full((4, row.shape[1], 3), 200, np.uint8)]))
    if not rows:
        rows = [np.full((thumb, 48 + per_row * thumb, 3), 255, np.uint8)]
        cv2.putText(rows[0], "no near-duplicate images found", (8, thumb // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                    (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(out), cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR))
