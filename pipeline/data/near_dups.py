"""Near-duplicate images: one photo cropped, resized, rotated, mirrored, letterboxed, re-encoded or
brightened under another name.

A model validated on a copy of a photo it trained on scores the photo, not the skill. Every image is
first trimmed of uniform borders (letterbox and pad bands of any colour, which otherwise dominate a
hash and give keypoints at the band's edge), then looked at by two detectors:

  hash: pHash (64-bit sign pattern of the low DCT frequencies of a 32x32 grey thumbnail) of each of
      the 8 rotations/reflections (D4) of the trimmed image, compared with every other image's
      upright hash by popcount (millions of pairs per second). Survives resizing, re-encoding,
      brightness, 90-degree turns and mirroring; blind to crops and small rotations.
  orb: ORB keypoints (OpenCV) of the trimmed image and of its mirror image, plus a geometric check.
      Candidates come from locality-sensitive hashing of all binary descriptors at once (images
      sharing many more descriptor keys than a typical pair does); a candidate is a pair when at
      least `min_inliers` ratio-tested matches agree on one affine map (RANSAC): a crop, a rescale,
      a rotation, a shear or a stretch. The mirror image's keypoints find flipped copies (ORB itself
      is rotation- but not reflection-invariant).

Then the pixels decide. Each pair is aligned (the affine map, or the D4 view for hash pairs) and
its two grey thumbnails compared where they overlap, each normalised by its own mean and spread
(brightness and contrast changes cancel): `disagree` is the share of overlapping pixels that differ
by more than 1.5 standard deviations. A copy differs in a few per cent (interpolation, JPEG); two
photos that share a letterbox band, a background or a landmark but show other things differ where
the things are. Only pairs with disagree <= max_disagree (and enough overlap) are `joined` into
groups the split keeps together; the rest are listed and still counted as possible leaks.

Why not embeddings: the pipeline is offline (no pretrained weights to download) and features of a
randomly initialised network do not rank visual similarity. Measured precision/recall and cost:
`python -m bench.near_dups` (README, Performance).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pandas as pd
from scipy.fft import dctn
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.config import NearDups
from pipeline.data.masks import decode_oriented, target_size
from pipeline.io import parallel_map, write_image
from pipeline.workspace import NearDupFiles

PAIR_COLUMNS = ["key_a", "key_b", "method", "hash_distance", "inliers", "view", "disagree", "overlap", "joined"]
LSH_TABLES, LSH_BITS, LSH_BUCKET = 16, 20, 8   # candidate search (see candidate_pairs)
LSH_SPLIT = 2           # each table's buckets are voted in 2**LSH_SPLIT parts (by their key's top bits)
TOP_K = 5               # candidates kept per image, most votes first
QUICK = 300             # keypoints (strongest first) a candidate is matched on first...
QUICK_MAYBE = 5         # ...and all of them when that gives this many inliers but fewer than min_inliers
SATURATE = 30000        # votes are capped here (far above any doubt) so the uint16 tally never wraps
MIN_VOTES = 10
CLAHE = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
FAST_THRESHOLD = 10     # ORB's corner threshold (OpenCV's default 20 finds few corners in dark photos)
RATIO = 0.8             # Lowe's ratio test when matching a candidate pair
THUMB = 96              # long side of the grey thumbnail the pixel check compares
MIN_OVERLAP = 0.1       # share of the first image the aligned second must cover for a pixel verdict
BLUR = 1.0              # Gaussian sigma (thumbnail pixels) before comparing: forgives a pixel of misalignment
CELLS = 8               # the comparison grid (cells of the thumbnail)
DIFFER = 0.7            # mean normalised grey difference above which a cell disagrees
MIN_CELLS = 8           # cells both images cover that a verdict needs (a 50 % x 50 % crop covers 16)
PAD_SPREAD = 8          # grey levels a pad region spans (1st to 99th percentile)
BAND_TOLERANCE = 12     # grey levels a pad band's pixels may stray from its colour (JPEG ringing)
BAND_SHARE = 0.98       # share of a row/column that must be pad colour for it to count as band
MIN_KEEP = 0.25         # a trim never keeps less than this share of a side (a blank photo stays whole)
D4 = [lambda a: a, lambda a: np.rot90(a, 1), lambda a: np.rot90(a, 2), lambda a: np.rot90(a, 3),
      lambda a: a[:, ::-1], lambda a: np.rot90(a[:, ::-1], 1), lambda a: np.rot90(a[:, ::-1], 2),
      lambda a: np.rot90(a[:, ::-1], 3)]   # the 8 rotations/reflections; view 0 is the image itself


def trim_box(img: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) bounds of `img` ((H, W) or (H, W, C) uint8) without its uniform
    border bands: from each edge, rows/columns in which at least BAND_SHARE of the pixels lie within
    BAND_TOLERANCE of that edge's colour (white, black, grey or any other pad). Keeps at least
    MIN_KEEP of each side."""
    h, w = img.shape[:2]
    f = max(1, min(h, w) // 128)          # looked at on a copy ~128 px across: the bands are wide, 1/f the work
    small = cv2.resize(img, (w // f, h // f), interpolation=cv2.INTER_AREA) if f > 1 else img
    a = small.astype(np.int16) if small.ndim == 3 else small.astype(np.int16)[..., None]
    sh, sw = a.shape[:2]

    def run(lines: np.ndarray, limit: int) -> int:   # lines: (n, m, C) from the edge inwards
        ref = np.median(lines[0], axis=0)
        close = (np.abs(lines - ref).max(axis=2) <= BAND_TOLERANCE).mean(axis=1) >= BAND_SHARE
        n = int(np.argmin(close)) if not close.all() else len(close)
        return min(n, limit)

    ky, kx = int(sh * (1 - MIN_KEEP)), int(sw * (1 - MIN_KEEP))
    top = run(a, ky)
    bottom = run(a[::-1], ky - top)
    cols = np.ascontiguousarray(a.transpose(1, 0, 2))
    left = run(cols, kx)
    right = run(cols[::-1], kx - left)
    # a boundary cell of the small copy mixes band and content, so it stops the run: bands are
    # trimmed to within f pixels, content never
    return top * f, h - bottom * f, left * f, w - right * f


def pad_mask(grey: np.ndarray) -> np.ndarray:
    """(H, W) bool: the uniform regions connected to the border of a grey uint8 image (letterbox
    bands, the black or white fill a rotation or shear leaves in the corners). A region counts when
    it is flat (3x3 standard deviation under 4 grey levels: JPEG noise in a band stays under it,
    texture does not) and one colour (98 % of it within PAD_SPREAD grey levels: a sky or a smooth
    gradient is flat but not one colour, and stays content)."""
    g = grey.astype(np.float32)
    mean = cv2.blur(g, (3, 3))
    flat = (cv2.blur(g * g, (3, 3)) - mean * mean) < 16.0
    _, labels = cv2.connectedComponents(flat.astype(np.uint8), connectivity=4)   # 0: not flat
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    pad = np.zeros(grey.shape, bool)
    for label in edge[edge > 0]:
        region = labels == label
        lo, hi = np.percentile(grey[region], [1, 99])
        if hi - lo <= PAD_SPREAD:
            pad |= region
    return pad


def phash_d4(grey: np.ndarray) -> np.ndarray:
    """(8,) uint64 pHash of each D4 view of a grey image: the sign of the 8x8 lowest DCT frequencies
    of its 32x32 thumbnail against their median (imagehash's phash algorithm, on an INTER_AREA thumbnail)."""
    small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float64)
    out = np.zeros(8, np.uint64)
    for v, view in enumerate(D4):
        low = dctn(np.ascontiguousarray(view(small)), type=2, norm=None)[:8, :8]
        bits = (low > np.median(low)).flatten()
        out[v] = np.packbits(bits).view(">u8")[0]
    return out


def _orb(grey: np.ndarray, n_features: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pts, des, mpts, mdes): ORB keypoints and descriptors of the image and of its mirror image.
    The mirror's keypoints are the image's, reflected (FAST corners are symmetric; the orientation
    angle a becomes 180 - a): only their descriptors are computed, not a second detection."""
    flat = CLAHE.apply(grey)   # local contrast first: night and back-lit photos otherwise give a handful of keypoints
    orb = cv2.ORB_create(nfeatures=n_features, fastThreshold=FAST_THRESHOLD)
    kps, des = orb.detectAndCompute(flat, None)
    if des is not None:                # strongest first: a quick check matches the first QUICK only
        order = np.argsort([-k.response for k in kps], kind="stable")
        kps, des = [kps[i] for i in order], des[order]
    w = grey.shape[1]
    mirrored = [cv2.KeyPoint(w - 1 - k.pt[0], k.pt[1], k.size, (180.0 - k.angle) % 360, k.response, k.octave, k.class_id)
                for k in kps]
    mkps, mdes = orb.compute(np.ascontiguousarray(flat[:, ::-1]), mirrored) if mirrored else ((), None)
    empty = np.zeros((0, 32), np.uint8)
    return (np.float32([k.pt for k in kps]).reshape(-1, 2), des if des is not None else empty,
            np.float32([k.pt for k in mkps]).reshape(-1, 2), mdes if mdes is not None else empty)


def features(path: str, height: int, width: int, side: int, n_features: int) -> dict:
    """One image, decoded (EXIF-aware, JPEG DCT-scaled: the features need no fine detail) with its
    long side at most `side` and trimmed of pad bands (trim_box):
      phash (8,) uint64 (phash_d4); pts/des: ORB keypoint positions (N, 2) float32 in pixels of the
      trimmed copy and descriptors (N, 32) uint8; mpts/mdes: the same for its mirror image;
      thumb: grey uint8 with long side THUMB; scale: thumb pixels per feature pixel; trim: the box."""
    img = decode_oriented(path, height, width, target_size(height, width, side), dct_min_factor=1)
    t, b, l, r = trim_box(img)
    grey = np.ascontiguousarray(cv2.cvtColor(img[t:b, l:r], cv2.COLOR_RGB2GRAY))
    pts, des, mpts, mdes = _orb(grey, n_features)
    th, tw = target_size(*grey.shape, THUMB)
    thumb = cv2.resize(grey, (tw, th), interpolation=cv2.INTER_AREA)
    pad = pad_mask(thumb)
    # the hash sees content only: pad pixels take the content's median grey
    filled = np.where(pad, np.median(thumb[~pad]) if (~pad).any() else 0, thumb).astype(np.uint8)
    return dict(phash=phash_d4(filled), pts=pts, des=des, mpts=mpts, mdes=mdes, thumb=thumb, content=~pad,
                scale=tw / grey.shape[1], trim=(t, b, l, r))


def _features_task(args: tuple) -> dict:
    return features(*args)


def extract(images: pd.DataFrame, side: int, n_features: int, workers: int = 0) -> list[dict]:
    """features() of every row of `images` (columns path, height, width), in row order."""
    tasks = [(r.path, r.height, r.width, side, n_features) for r in images.itertuples(index=False)]
    # descriptors go straight into one buffer as each image arrives: held once, never twice. Its
    # untouched tail (ORB may find fewer than n_features) is never paged in.
    buffer = np.empty((2 * len(tasks) * n_features, 32), np.uint8)
    used = 0

    def keep(f: dict) -> dict:
        nonlocal used
        for name in ("des", "mdes"):
            n = len(f[name])
            buffer[used:used + n] = f[name]
            f[name] = buffer[used:used + n]
            used += n
        return f

    return parallel_map(_features_task, tasks, "near_dups", workers, serial_below=32, keep=keep)


def hash_pairs(hashes: np.ndarray, max_distance: int, block: int = 256) -> list[tuple[int, int, int, int]]:
    """(i, j, Hamming distance, view) for every i < j whose hashes differ in at most max_distance bits.
    hashes: (N,) uint64, or (N, V) uint64 hashes of V views of each image (D4: V = 8), where image
    i's view 0 is compared with every view of j and `view` is the closest one (0 for (N,) input)."""
    h = np.asarray(hashes, np.uint64)
    h = h[:, None] if h.ndim == 1 else h
    out = []
    for s in range(0, len(h), block):
        d = np.bitwise_count(h[s:s + block, 0, None, None] ^ h[None, :, :])   # (b, N, V)
        view, best = d.argmin(axis=2), d.min(axis=2)
        i, j = np.nonzero(best <= max_distance)
        i = i + s
        keep = i < j
        i, j = i[keep], j[keep]
        out += list(zip(i.tolist(), j.tolist(), best[i - s, j].tolist(), view[i - s, j].tolist()))
    return out


def _descriptors(feats: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(all descriptors (D, 32) uint8, owner (D,) int32): image i's own as owner i, its mirror
    image's as owner N + i, in the order extract() buffers them (i's, i's mirror's, i + 1's...),
    so that buffer is used as it is, without a copy."""
    n = len(feats)
    des = [d for f in feats for d in (f["des"], f["mdes"])]
    sizes = [len(d) for d in des]
    ids = np.stack([np.arange(n), np.arange(n) + n], axis=1).ravel().astype(np.int32)
    owner = np.repeat(ids, sizes)
    base = feats[0]["des"].base
    if base is not None and all(d.base is base for d in des):
        ptr = [d.__array_interface__["data"][0] for d in des if len(d)]
        if ptr == sorted(ptr) and len(base) >= sum(sizes):
            start = (ptr[0] - base.__array_interface__["data"][0]) // 32 if ptr else 0
            return base[start:start + sum(sizes)], owner
    return (np.concatenate(des) if des else np.zeros((0, 32), np.uint8)), owner


def _vote(key: np.ndarray, shift: int, n: int, code_type: type, votes: np.ndarray) -> None:
    """Add one vote per pair of images whose descriptors share a small bucket. key: (D,) int64 of
    bucket key << shift | owner (owner: image i, or N + i for its mirror image); votes: (N * N * 2,)
    uint16, indexed by (i * N + j) * 2 + mirrored for i < j."""
    key.sort()                                  # one sort of (bucket key, owner), no argsort + gather
    k, w = (key >> shift).astype(np.int32), (key & ((1 << shift) - 1)).astype(code_type)
    new = np.r_[True, k[1:] != k[:-1]]
    small = np.diff(np.r_[np.flatnonzero(new), len(k)])[np.cumsum(new, dtype=np.int32) - 1] <= LSH_BUCKET
    del new
    for off in range(1, LSH_BUCKET):
        m = (k[off:] == k[:-off]) & small[off:]
        a, b = w[:-off][m], w[off:][m]
        # upright-upright and mirror-mirror are one geometry; upright-mirror finds flipped copies
        mirrored = (a >= n) != (b >= n)
        a, b = a % n, b % n
        other = a != b
        np.add.at(votes, ((np.minimum(a, b) * n + np.maximum(a, b)) * 2 + mirrored)[other], 1)


def candidate_pairs(feats: list[dict], top_k: Optional[int] = None, seed: int = 0) -> dict[tuple[int, int, bool], int]:
    """Image pairs worth a geometric check, from locality-sensitive hashing of all ORB descriptors at
    once: {(i, j, mirrored): votes} with i < j; mirrored: j's mirror image matched i.

    Each of LSH_TABLES tables keys every descriptor (of every image and of every mirror image) by
    LSH_BITS random bits of its 256; two descriptors sharing a key in a small bucket (at most
    LSH_BUCKET, so the flat-sky patterns every photo has do not count) give their images one vote.
    A pair is a candidate when it has at least MIN_VOTES and is among the top_k of either image, so
    the geometric checks grow linearly with the images. (On the facade photos, crops of one photo
    got 230+ votes at the 5th percentile, unrelated pairs 16 at the median and 33 at the 99th.)
    Memory: each table is sorted as int64 (key, owner) in 2**LSH_SPLIT parts and votes are counted
    into one uint16 (N, N, 2) array (100 MB at 5,000 images), never a list of every colliding pair.
    """
    n, top_k = len(feats), top_k or TOP_K
    if n < 2:
        return {}
    packed, owner = _descriptors(feats)
    if not len(packed):
        return {}
    votes = np.zeros(n * n * 2, np.uint16)
    code_type = np.int32 if n * n * 2 < 2 ** 31 else np.int64
    shift = int(2 * n - 1).bit_length()
    rng = np.random.default_rng(seed)
    for _ in range(LSH_TABLES):
        # LSH_BITS sampled bits: whole bytes (8 of ORB's 256 tests each) are as random a sample as
        # single bits and take one column read, not eight
        cols = rng.choice(32, -(-LSH_BITS // 8), replace=False)
        np.minimum(votes, SATURATE, out=votes)      # one table adds < 2**15 to a pair: uint16 never wraps
        first = packed[:, cols[0]] >> (8 - LSH_SPLIT)
        for part in range(2 ** LSH_SPLIT):          # buckets split by their key's top bits: 1/4 the scratch memory
            idx = np.flatnonzero(first == part)
            key = owner[idx].astype(np.int64)
            for b, c in enumerate(cols):
                keep = min(8, LSH_BITS - 8 * b)
                key |= (packed[idx, c] >> (8 - keep)).astype(np.int64) << (shift + 8 * b)
            del idx
            _vote(key, shift, n, code_type, votes)
    # each image's top_k (partner, view) by votes, read a block of rows at a time from the upper
    # triangle and its transpose (no table of every voted pair)
    votes = votes.reshape(n, n, 2)
    out: dict[tuple[int, int, bool], int] = {}
    k = min(top_k, 2 * n)
    for r0 in range(0, n, 256):
        rows = np.arange(r0, min(n, r0 + 256))
        block = (votes[rows] + votes[:, rows].transpose(1, 0, 2)).reshape(len(rows), 2 * n)
        top = np.argpartition(-block.astype(np.int32), k - 1, axis=1)[:, :k]
        for r, cols in zip(rows, top):
            for c in cols:
                v = int(block[r - r0, c])
                j, m = int(c // 2), bool(c % 2)
                if v >= MIN_VOTES and j != r:
                    out[(min(r, j), max(r, j), m)] = v
    return out


def affine_match(a: dict, b: dict, mirrored: bool = False, first: Optional[int] = None) -> tuple[int, Optional[np.ndarray]]:
    """(inliers, A): how many ratio-tested ORB matches from image a to image b (to b's mirror image
    when mirrored) agree on one affine map A (2x3, a's feature pixels -> b's; RANSAC).
    first: match only the first (strongest) keypoints of each image."""
    bp, bd = (b["mpts"], b["mdes"]) if mirrored else (b["pts"], b["des"])
    ap, ad = a["pts"], a["des"]
    if first:
        ap, ad, bp, bd = ap[:first], ad[:first], bp[:first], bd[:first]
    if len(ad) < 3 or len(bd) < 3:
        return 0, None
    knn = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(ad, bd, k=2)
    good = [m[0] for m in knn if len(m) == 2 and m[0].distance < RATIO * m[1].distance]
    if len(good) < 3:
        return 0, None
    src = ap[[m.queryIdx for m in good]]
    dst = bp[[m.trainIdx for m in good]]
    extent = max(np.ptp(src, axis=0).max(), np.ptp(dst, axis=0).max(), 1.0)
    A, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=0.01 * extent)
    if A is None or mask is None or not np.isfinite(A).all():
        return 0, None
    det = abs(np.linalg.det(A[:, :2]))
    if not 1 / 25 <= det <= 25:          # collapses or blows up the image: not a crop or a resize
        return 0, None
    return int(mask.sum()), A


def disagreement(a: np.ndarray, b: np.ndarray, M: Optional[np.ndarray] = None,
                 content_a: Optional[np.ndarray] = None, content_b: Optional[np.ndarray] = None) -> tuple[float, float]:
    """(disagree, overlap) of two grey uint8 thumbnails aligned by M (2x3: a's pixels -> b's; None:
    b is stretched onto a), compared on the pixels that are content (not pad_mask) in both.
    overlap: share of a's content that b's content covers; disagree: share of those pixels where
    the two, each normalised by its mean and standard deviation there, differ by more than DIFFER."""
    h, w = a.shape
    ca = np.ones((h, w), bool) if content_a is None else content_a
    cb = np.ones(b.shape, bool) if content_b is None else content_b
    a = cv2.GaussianBlur(a.astype(np.float32), (0, 0), BLUR)
    b = cv2.GaussianBlur(b.astype(np.float32), (0, 0), BLUR)
    cb = cb.astype(np.float32)
    if M is None:
        warped = cv2.resize(b, (w, h), interpolation=cv2.INTER_AREA)
        cover = cv2.resize(cb, (w, h), interpolation=cv2.INTER_AREA)
    else:
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        warped = cv2.warpAffine(b, M, (w, h), flags=flags)
        cover = cv2.warpAffine(cb, M, (w, h), flags=flags, borderValue=0)
    valid = (cv2.erode(cover, np.ones((3, 3), np.uint8)) > 0.99) & ca
    overlap = float(valid.sum() / max(ca.sum(), 1))
    if valid.sum() < 16:
        return 1.0, overlap
    za, zb = a[valid], warped[valid]
    diff = np.zeros((h, w), np.float32)
    diff[valid] = np.abs((za - za.mean()) / max(za.std(), 1.0) - (zb - zb.mean()) / max(zb.std(), 1.0))
    # per cell of a CELLS x CELLS grid: a different object changes whole cells, noise a few pixels
    ys, xs = np.linspace(0, h, CELLS + 1).astype(int), np.linspace(0, w, CELLS + 1).astype(int)
    cells = [(diff[y0:y1, x0:x1].sum() / n, n) for y0, y1 in zip(ys, ys[1:]) for x0, x1 in zip(xs, xs[1:])
             if (n := valid[y0:y1, x0:x1].sum()) >= 0.5 * (y1 - y0) * (x1 - x0)]
    if len(cells) < MIN_CELLS:           # too little of both to judge: no verdict, no join
        return 1.0, overlap
    return float(np.mean([m > DIFFER for m, _ in cells])), overlap


def thumb_map(A: np.ndarray, a: dict, b: dict) -> np.ndarray:
    """The affine map A (a's feature pixels -> b's) in thumbnail pixels."""
    M = A.astype(np.float64).copy()
    M[:, :2] *= b["scale"] / a["scale"]
    M[:, 2] *= b["scale"]
    return M


def pixel_check(a: dict, b: dict, view: int = 0, A: Optional[np.ndarray] = None, mirrored: bool = False) -> tuple[float, float]:
    """disagreement() of images a and b: aligned by the ORB affine map A (b mirrored first if
    `mirrored`), or else by the D4 view of b the hash matched."""
    if A is not None:
        flip = (lambda x: np.ascontiguousarray(x[:, ::-1])) if mirrored else (lambda x: x)
        return disagreement(a["thumb"], flip(b["thumb"]), thumb_map(A, a, b), a["content"], flip(b["content"]))
    turn = lambda x: np.ascontiguousarray(D4[view](x))
    return disagreement(a["thumb"], turn(b["thumb"]), None, a["content"], turn(b["content"]))


_FEATS: list[dict] = []


def _verify_init(feats: list[dict]) -> None:
    global _FEATS
    _FEATS = feats


def _verify(task: tuple) -> tuple[int, float, float]:
    i, j, mirrored, min_inliers = task
    a, b = _FEATS[i], _FEATS[j]
    n, A = affine_match(a, b, mirrored, first=QUICK)       # the strongest keypoints settle most pairs
    if n < min_inliers and n >= QUICK_MAYBE:
        n, A = affine_match(a, b, mirrored)
    if n < min_inliers or A is None:
        return n, 1.0, 0.0
    return (n, *pixel_check(a, b, A=A, mirrored=mirrored))


def verify(feats: list[dict], pairs: list[tuple[int, int, bool]], workers: int = 0,
           min_inliers: int = 20) -> list[tuple[int, float, float]]:
    """(inliers, disagree, overlap) of each candidate (i, j, mirrored), across `workers` processes
    (0 = all cores): the QUICK strongest keypoints first, all of them when that is inconclusive
    (QUICK_MAYBE or more inliers, fewer than min_inliers); the pixel check for pairs that pass.
    The features reach forked workers by inheritance (no copy per worker), and other start
    methods through the initializer."""
    global _FEATS
    _FEATS = feats
    import multiprocessing as mp

    init = None if mp.get_start_method() == "fork" else (_verify_init, (feats,))
    try:
        return parallel_map(_verify, [(*p, min_inliers) for p in pairs], "near_dups check", workers, serial_below=64,
                            init=init)
    finally:
        _FEATS = []


def find_pairs(images: pd.DataFrame, settings: Optional[NearDups] = None, workers: int = 0,
               feats: Optional[list[dict]] = None) -> pd.DataFrame:
    """Near-duplicate pairs among `images` (columns key, path, height, width): PAIR_COLUMNS.
    settings: the near_dups section (default its defaults).
    method: 'hash' (a D4 view's pHash within hash_distance bits), 'orb' (keypoints), or 'both';
    view: the D4 view (0-7) the hash matched, or 'mirror'/'upright' for keypoint pairs; disagree and
    overlap: the pixel check (see disagreement); joined: disagree <= max_disagree with overlap >=
    MIN_OVERLAP, the pairs the split keeps together."""
    n = settings or NearDups()
    feats = feats if feats is not None else extract(images, n.side, n.n_features, workers)
    keys = images.key.tolist()
    hashes = np.stack([f["phash"] for f in feats]) if feats else np.zeros((0, 8), np.uint64)
    found: dict[tuple[int, int], dict] = {}
    for i, j, d, v in hash_pairs(hashes, n.hash_distance):
        dis, ov = pixel_check(feats[i], feats[j], view=v)
        found[(i, j)] = dict(method="hash", hash_distance=d, inliers=0, view=str(v), disagree=dis, overlap=ov)
    candidates = sorted(candidate_pairs(feats))
    best: dict[tuple[int, int], tuple] = {}   # per pair, the view (upright or mirror) whose pixels agree best
    for (i, j, m), (inl, dis, ov) in zip(candidates, verify(feats, candidates, workers, n.min_inliers)):
        old = best.get((i, j))
        if inl >= n.min_inliers and (old is None or (dis, -inl) < (old[0], -old[1])):
            best[(i, j)] = (dis, inl, ov, m)
    for (i, j), (dis, inl, ov, m) in best.items():
        row = found.get((i, j)) or dict(method="orb", hash_distance=int(np.bitwise_count(hashes[i] ^ hashes[j]).min()))
        dis = min(dis, row.get("disagree", 1.0))
        found[(i, j)] = {**row, "method": "both" if row["method"] == "hash" else "orb", "inliers": inl,
                         "view": row.get("view", "mirror" if m else "upright"), "disagree": dis,
                         "overlap": max(ov, row.get("overlap", 0.0))}
    rows = [dict(key_a=keys[i], key_b=keys[j], **v,
                 joined=bool(v["disagree"] <= n.max_disagree and v["overlap"] >= MIN_OVERLAP))
            for (i, j), v in sorted(found.items())]
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
            "joined_pairs": int(pairs.joined.astype(bool).sum()) if len(pairs) else 0,
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
    """Cluster id per key (connected components of the joined pairs: all pairs when there is no
    `joined` column); singletons get -1. Ids count from 0 in order of decreasing cluster size, then
    first key."""
    pos = {k: i for i, k in enumerate(keys)}
    if "joined" in pairs and len(pairs):
        pairs = pairs[pairs.joined.astype(bool)]
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
    write_image(out, cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR))
