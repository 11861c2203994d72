"""Near-duplicate detection and the split it feeds: measured on constructed copies and on real exports.

Constructed copies (--photos DIR, a folder of photos you know to be distinct): every photo is
written once and, for the first half of them, as variants a dataset really holds: crops (50-80 %
of each side), crops stretched back, resizes, JPEG re-encodes, brightness/contrast shifts, mirror
images, quarter turns, small rotations (black corners), letterboxing ("fit" into a square with white
or black bands, as Roboflow exports) and combinations. Ground truth: a photo and its variants are
one family. Prints recall per kind (found: the pair is listed; joined: same cluster) and precision.

    python -m bench.near_dups --photos DIR [--variants 2] [--seed 0]

Real exports (--data ROOT --json A.json [--json B.json]; images beside each json, the Roboflow
layout, or under --image-dir): runs the near_dups detector on the labelled images (time, peak memory of the process
tree), scores it against the copies the exporter *named* (same-source pairs by file name; the
detector never sees names), then makes the default split (names + byte-identical + joined pairs)
and prints fold sizes, class balance against random KFold, leaky images by signal, and the same
for a split that ignores names. A random sample (--sample, 40) of cross-source joined pairs is drawn
into montages (--out) to be checked by eye: different names can still be one scene (a static camera, a photo uploaded twice).

    python -m bench.near_dups --data /data/trash --json train/_annotations.coco.json --out /tmp/nd

Without --photos or --data it uses generated cluttered scenes (tests/helpers.photo): a smoke
run only, since synthetic scenes are easier than photos.
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


def _letterbox(im, colour, side=640):
    h, w = im.shape[:2]
    s = side / max(h, w)
    small = cv2.resize(im, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    top, left = (side - small.shape[0]) // 2, (side - small.shape[1]) // 2
    return cv2.copyMakeBorder(small, top, side - small.shape[0] - top, left, side - small.shape[1] - left,
                              cv2.BORDER_CONSTANT, value=colour)


def _rotate(im, rng):
    h, w = im.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(5, 15) * rng.choice([-1, 1]), 1.0)
    return cv2.warpAffine(im, m, (w, h))


KINDS = {
    "crop": lambda im, rng: _crop(im, rng),
    "crop_stretched": lambda im, rng: cv2.resize(_crop(im, rng, 0.6, 0.85), im.shape[1::-1]),
    "resize": lambda im, rng: cv2.resize(im, None, fx=rng.uniform(0.4, 0.7), fy=rng.uniform(0.4, 0.7),
                                         interpolation=cv2.INTER_AREA),
    "jpeg": lambda im, rng: _jpeg(im, rng.integers(15, 41)),
    "brightness": _bright,
    "crop+brightness+jpeg": lambda im, rng: _jpeg(_bright(_crop(im, rng, 0.6, 0.85), rng), rng.integers(25, 41)),
    "mirror": lambda im, rng: np.ascontiguousarray(im[:, ::-1]),
    "rot90": lambda im, rng: np.ascontiguousarray(np.rot90(im, int(rng.choice([1, 3])))),
    "rotate5-15": _rotate,
    "letterbox_white": lambda im, rng: _letterbox(im, (255, 255, 255)),
    "letterbox_black+mirror": lambda im, rng: _letterbox(np.ascontiguousarray(im[:, ::-1]), (0, 0, 0)),
    "flip+rot90+letterbox+jpeg": lambda im, rng: _jpeg(_letterbox(np.ascontiguousarray(np.rot90(im[::-1])),
                                                                  (255, 255, 255)), 40),
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
    """Recall per kind (found: the (photo, variant) pair is listed; joined: both in one cluster),
    precision of the listed pairs, and the pairs across two photos."""
    fam = images.set_index("key").family
    found = {tuple(sorted(p)) for p in zip(pairs.key_a, pairs.key_b)}
    cluster = nd.clusters(images.key.tolist(), pairs)
    originals = images[images.kind == "original"].set_index("family").key
    recall = []
    for k in KINDS:
        v = images[images.kind == k]
        made = [(originals[f], key) for f, key in zip(v.family, v.key)]
        recall.append(dict(kind=k, made=len(made), found=sum(tuple(sorted(p)) in found for p in made),
                           joined=sum(cluster[a] == cluster[b] >= 0 for a, b in made)))
    same = [fam[a] == fam[b] for a, b in found]
    precision = float(np.mean(same)) if same else 1.0
    wrong = pairs[[fam[a] != fam[b] for a, b in zip(pairs.key_a, pairs.key_b)]]
    return (pd.DataFrame(recall).assign(found_recall=lambda d: d.found / d.made, joined_recall=lambda d: d.joined / d.made),
            precision, wrong)


def constructed(a: argparse.Namespace) -> None:
    if a.photos:
        files = sorted(p for p in Path(a.photos).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        photos = [cv2.imread(str(p)) for p in files][:a.limit]
        source = f"{len(photos)} photos from {a.photos}"
    else:
        from tests.helpers import photo
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
    print(f"set: {source}; {n} images ({(images.kind != 'original').sum()} variants), {os.cpu_count()} cores")
    print(recall.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    made, got, joined = recall.made.sum(), recall.found.sum(), recall.joined.sum()
    print(f"recall (photo, variant): found {got}/{made} = {got / made:.3f}; joined {joined}/{made} = {joined / made:.3f}")
    print(f"pairs found: {len(pairs)} ({int(pairs.joined.sum())} joined); precision: {precision:.3f} "
          f"({len(wrong)} across distinct photos, {int(wrong.joined.sum())} of them joined)")
    for r in wrong.head(10).itertuples():
        print(f"   across: {r.key_a} ~ {r.key_b} ({r.method}, {r.inliers} inliers, hash distance {r.hash_distance}, "
              f"disagree {r.disagree:.2f}, joined {r.joined})")
    print(f"cost: features {t_feat:.1f} s + matching {t_match:.1f} s for {n} images = "
          f"{1000 * (t_feat + t_match) / n:.1f} s per 1,000 images")


def _pairs_in_child(images: pd.DataFrame, out: Path) -> tuple[float, float]:
    """find_pairs in a fresh child process (its workers fork from it): (seconds, peak RSS in GB of
    the largest process of that tree)."""
    import multiprocessing as mp
    import resource

    def run():
        start = time.perf_counter()
        pairs = nd.find_pairs(images, NearDups())
        pairs.to_pickle(out)
        (out.parent / "seconds").write_text(str(time.perf_counter() - start))

    child = mp.get_context("fork").Process(target=run)
    child.start()
    child.join()
    if child.exitcode:
        raise SystemExit(f"near_dups failed in the child process (exit {child.exitcode})")
    return float((out.parent / "seconds").read_text()), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6


def same_source_recall(keys: list[str], named: list[list[int]], pairs: pd.DataFrame) -> dict:
    """Same-source pairs (by name) that the content alone found (listed pair) and joined (one cluster)."""
    found = {tuple(sorted(p)) for p in zip(pairs.key_a, pairs.key_b)}
    cluster = nd.clusters(keys, pairs)
    truth = [(keys[i], keys[j]) for g in named for x, i in enumerate(g) for j in g[x + 1:]]
    if not truth:
        return {"same_source_pairs": 0, "found": None, "joined": None}
    return {"same_source_pairs": len(truth),
            "found": sum(tuple(sorted(p)) in found for p in truth) / len(truth),
            "joined": sum(cluster[a] == cluster[b] >= 0 for a, b in truth) / len(truth)}


def cross_source_montage(images: pd.DataFrame, pairs: pd.DataFrame, out: Path, n: int = 40, seed: int = 0) -> None:
    """A random sample of n joined pairs whose names differ, side by side (4 pairs a row), to check
    by eye whether they show one scene."""
    by_key = images.set_index("key")
    sample = pairs.sample(min(n, len(pairs)), random_state=seed) if len(pairs) else pairs
    tiles = []
    for r in sample.itertuples():
        a, b = (cv2.resize(cv2.imread(by_key.loc[k, "path"]), (128, 128)) for k in (r.key_a, r.key_b))
        tiles.append(np.hstack([a, np.full((128, 4, 3), 255, np.uint8), b, np.full((128, 16, 3), 255, np.uint8)]))
    if tiles:
        tiles += [np.full_like(tiles[0], 255)] * (-len(tiles) % 4)
        rows = [np.hstack(tiles[i:i + 4]) for i in range(0, len(tiles), 4)]
        cv2.imwrite(str(out), np.vstack([np.vstack([r, np.full((8, r.shape[1], 3), 255, np.uint8)]) for r in rows]))


def export(a: argparse.Namespace) -> None:
    from pipeline.data.coco import load_dataset
    from pipeline.data.folds import Links, balance_report, make_folds, near_pairs, split_summary
    from pipeline.data.sources import copies_by_name, naming_summary
    from pipeline.config import Split
    from pipeline.io import identical_files

    root = Path(a.data)
    dirs = [a.image_dir] * len(a.json) if a.image_dir is not None else [str(Path(j).parent) for j in a.json]
    ds = load_dataset(root, a.json, dirs, strict=False)
    images = ds.images.reset_index(drop=True)
    out = Path(a.out or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    seconds, peak_gb = _pairs_in_child(images, out / "pairs.pkl")
    pairs = pd.read_pickle(out / "pairs.pkl")
    keys = images.key.tolist()
    named = copies_by_name(images.file_name, a.source_pattern)
    src = pd.Series([None] * len(keys), index=keys, dtype=object)
    for g in named:
        src.iloc[g] = keys[g[0]]
    cross = pairs[pairs.joined & (pairs.key_a.map(src).isna() | (pairs.key_a.map(src) != pairs.key_b.map(src)))]
    sample = cross.sample(min(a.sample, len(cross)), random_state=0) if len(cross) else cross
    for page in range(0, len(sample), 40):   # 40 pairs a picture
        cross_source_montage(images, sample[page:page + 40], out / f"cross_source_joined_{page // 40}.png", n=40)
    rec = same_source_recall(keys, named, pairs)
    print(f"export: {root} ({', '.join(a.json)}): {len(images)} labelled images, {os.cpu_count()} cores")
    print(f"  names: {naming_summary(images.file_name, a.source_pattern)}")
    print(f"  near_dups: {seconds:.1f} s, peak memory {peak_gb:.2f} GB; pairs {len(pairs)} "
          f"(hash {int((pairs.method == 'hash').sum())}, orb {int((pairs.method == 'orb').sum())}, "
          f"both {int((pairs.method == 'both').sum())}), joined {int(pairs.joined.sum())}")
    if rec["same_source_pairs"]:
        print(f"  same-source pairs (by name) {rec['same_source_pairs']}: content alone found {rec['found']:.3f}, "
              f"joined {rec['joined']:.3f}")
    print(f"  joined pairs across two named sources: {len(cross)} of {int(pairs.joined.sum())} "
          f"({len(cross) / max(int(pairs.joined.sum()), 1):.3f}; a random {len(sample)} of them to check by eye: "
          f"{out}/cross_source_joined_*.png)")
    cl = nd.clusters(keys, pairs)
    print(f"  largest joined cluster: {int(cl[cl >= 0].value_counts().max()) if (cl >= 0).any() else 0} images")
    full = Links(identical=identical_files(images.path), named=named, near=near_pairs(images.key, pairs))
    for label, join_names in (("default split (names + identical + joined pairs)", True),
                              ("split ignoring names (content only)", False)):
        s = Split(copies_by_name=join_names)
        folds = make_folds(ds, s, None, full.joining(join_names, True))
        _, bal = balance_report(ds, folds, s)
        m = split_summary(folds, bal, full, pairs, True)
        print(f"  {label}: folds {list(m['fold_images'].values())}, holdout {m['holdout_images']}, "
              f"class_dev {bal['class_dev']:.4f} vs random {bal['random_class_dev']:.4f}, largest group "
              f"{m['groups']['largest']}, leaky images {m['leaky_images']} {m['leaks_by_signal']}")
        for w in m["warnings"]:
            print(f"    WARNING: {w}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", help="folder of distinct photos (jpg/png, searched recursively)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many photos")
    ap.add_argument("--variants", type=int, default=2, help="variants per photo, for the first half")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", help="root of a real export")
    ap.add_argument("--json", action="append", default=[], help="a COCO json under --data (repeatable)")
    ap.add_argument("--source-pattern", help="regex whose first capture on file_name names the source photo (as "
                    "split.group's pattern), tried before the exporters' namings")
    ap.add_argument("--image-dir", help="images at --data/<image-dir>/<file_name> (default: beside each json)")
    ap.add_argument("--out", help="folder for the pairs and the cross-source montage")
    ap.add_argument("--sample", type=int, default=40, help="joined pairs of differently named photos to draw")
    a = ap.parse_args()
    export(a) if a.data else constructed(a)


if __name__ == "__main__":
    main()
