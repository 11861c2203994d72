"""Fold invariants: disjoint, complete, groups intact, holdout untouched, better balanced than random."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.config import Split
from pipeline.data.coco import DataError, Dataset
from pipeline.data.folds import (Links, balance_report, duplicates_apart, even_out, label_matrix, leak_report,
                                 leaky_keys, make_folds, near_pairs, oversized_groups, split_summary, split_warnings)
from pipeline.io import identical_files

CLASSES = ["Background"] + [f"c{i}" for i in range(1, 9)]


def skewed_dataset(n: int = 240, seed: int = 0) -> Dataset:
    """Images with 0-5 objects; classes from common (c1) to very rare (c8, ~3% of images)."""
    rng = np.random.default_rng(seed)
    p = np.array([0.6, 0.45, 0.3, 0.2, 0.12, 0.08, 0.05, 0.03])
    images, anns = [], []
    for i in range(n):
        key = f"batch_{i // 12:02d}/{i:04d}.jpg"
        images.append(dict(key=key, image_id=i, source="train.json", file_name=key, width=64, height=64,
                           path=key, site=f"site{i % 7}"))
        for c in np.nonzero(rng.random(8) < p)[0] + 1:
            for _ in range(rng.integers(1, 3)):
                anns.append(dict(ann_id=len(anns), key=key, class_idx=int(c), iscrowd=0, segmentation=[], json_area=1))
    return Dataset(images=pd.DataFrame(images), annotations=pd.DataFrame(anns), classes=CLASSES)


@pytest.fixture(scope="module")
def ds() -> Dataset:
    return skewed_dataset()


@pytest.mark.parametrize("strategy", ["multilabel", "random"])
@pytest.mark.parametrize("group", [None, "folder", "site"])
@pytest.mark.parametrize("holdout", [0.0, 0.15])
def test_folds_disjoint_complete_groups_intact(ds, strategy, group, holdout):
    n_folds = 5 if group != "site" else 3
    f = make_folds(ds, Split(strategy=strategy, n_folds=n_folds, group=group, holdout=holdout, seed=1))
    assert len(f) == len(ds.images) and f.key.is_unique and set(f.key) == set(ds.images.key)
    pool = f[~f.holdout]
    assert set(pool.fold) == set(range(n_folds))            # every fold is used, one fold per image
    assert (f[f.holdout].fold == -1).all()                   # the holdout is in no fold
    assert f.groupby("group").fold.nunique().max() == 1      # no group straddles folds
    assert f.groupby("group").holdout.nunique().max() == 1   # nor the holdout boundary
    if holdout and group is None:
        assert abs(f.holdout.mean() - holdout) < 0.05
    if not holdout:
        assert not f.holdout.any()


def test_deterministic_per_seed(ds):
    a = make_folds(ds, Split(strategy="multilabel", n_folds=5, holdout=0.1, seed=3))
    b = make_folds(ds, Split(strategy="multilabel", n_folds=5, holdout=0.1, seed=3))
    c = make_folds(ds, Split(strategy="multilabel", n_folds=5, holdout=0.1, seed=4))
    assert a.equals(b) and not a.fold.equals(c.fold)


def test_multilabel_beats_random_on_skewed_data(ds):
    f = make_folds(ds, Split(strategy="multilabel", n_folds=5, holdout=0.1, seed=0))
    table, s = balance_report(ds, f, Split(strategy="multilabel", n_folds=5, seed=0))
    assert s["class_dev"] < 0.6 * s["random_class_dev"]
    assert s["missing_classes"] <= s["random_missing_classes"]
    assert s["object_dev"] < s["random_object_dev"]
    assert set(table.strategy) == {"multilabel", "random_baseline"} and len(table) == 10


def test_rare_class_reaches_every_validation_fold(ds):
    presence, _ = label_matrix(ds)
    assert presence[:, 7].sum() >= 5                        # c8 is rare but present
    f = make_folds(ds, Split(strategy="multilabel", n_folds=5, holdout=0.0, seed=0))
    folds_with_c8 = set(f.fold[presence[:, 7] == 1])
    assert folds_with_c8 == set(range(5))


def test_given_strategy_uses_val_json_and_holdout_from_train(ds):
    images = ds.images.copy()
    images.loc[images.image_id % 5 == 0, "source"] = "val.json"
    given = Dataset(images=images, annotations=ds.annotations, classes=CLASSES)
    f = make_folds(given, Split(strategy="given", n_folds=1, holdout=0.1, seed=0), val_source="val.json")
    assert (f[f.source == "val.json"].fold == 0).all() and not f[f.source == "val.json"].holdout.any()
    assert (f[f.source == "train.json"].fold == -1).all()
    assert 0 < f.holdout.sum() < (f.source == "train.json").sum()
    table, s = balance_report(given, f, Split(strategy="given", n_folds=1, seed=0))
    assert table.groupby("strategy").images.sum().to_dict() == {"given": 48, "random_baseline": 48}


def test_too_few_groups_is_a_clear_error(ds):
    with pytest.raises(DataError, match="groups left for 10 folds"):
        make_folds(ds, Split(strategy="multilabel", n_folds=10, group="site", holdout=0.0))
    with pytest.raises(DataError, match="no field 'camera'"):
        make_folds(ds, Split(strategy="multilabel", n_folds=5, group="camera", holdout=0.0))


def test_identical_files_are_found_by_content_not_name_or_size(tmp_path):
    files = {"a.jpg": b"photo-1", "b/a_copy.jpg": b"photo-1", "c.jpg": b"photo-2",   # c: same size, other bytes
             "d.jpg": b"photo-1 longer", "e.jpg": b"photo-2", "f.jpg": b"photo-1"}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    paths = [tmp_path / n for n in files] + [tmp_path / "missing.jpg"]
    assert identical_files(paths) == [[0, 1, 5], [2, 4]]
    assert identical_files(paths[:1] + paths[2:4]) == []


@pytest.mark.parametrize("strategy", ["multilabel", "random"])
@pytest.mark.parametrize("group", [None, "folder"])
def test_byte_identical_images_share_a_fold_and_the_holdout_fate(ds, strategy, group):
    """The same photo under two names (two folders apart): whatever the seed, never one copy in
    training and the other in validation or the holdout."""
    copies = [[3, 100, 201], [7, 150]]                            # positions in ds.images
    for seed in range(6):
        f = make_folds(ds, Split(strategy=strategy, n_folds=5, group=group, holdout=0.15, seed=seed), links=Links(identical=copies))
        for same in copies:
            assert f.iloc[same].fold.nunique() == 1 and f.iloc[same].holdout.nunique() == 1, (seed, same)
            assert f.duplicate_of.iloc[same].tolist() == ["", *[ds.images.key[same[0]]] * (len(same) - 1)]
        assert duplicates_apart(f) == 0 and set(f[~f.holdout].fold) == set(range(5))
        if group == "folder":                                    # folders joined by a copy stay whole
            assert f.groupby(f.file_name.str.split("/").str[0]).fold.nunique().max() == 1
    plain = make_folds(ds, Split(strategy=strategy, n_folds=5, group=group, holdout=0.15, seed=0))
    assert (plain.duplicate_of == "").all()


def test_given_split_keeps_its_folds_and_counts_copies_across_them(ds):
    images = ds.images.copy()
    images.loc[images.image_id % 5 == 0, "source"] = "val.json"
    given = Dataset(images=images, annotations=ds.annotations, classes=CLASSES)
    f = make_folds(given, Split(strategy="given", n_folds=1, holdout=0.0, seed=0), val_source="val.json",
                   links=Links(identical=[[0, 1], [2, 3]]))
    assert f.fold.iloc[0] == 0 and f.fold.iloc[1] == -1          # image 0 is in val.json, image 1 is not
    assert duplicates_apart(f) == 1                               # 2 and 3 are both training images


def test_object_counts_balance_on_a_long_tail():
    """Most images hold 1-3 objects, a few up to 90: bins that follow the tail keep the folds'
    object totals at least 40 % closer together than image-quartile bins (iterstrat either way)."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    from pipeline.data.folds import _strat_labels, count_edges

    rng = np.random.default_rng(0)
    counts = np.minimum(np.round(rng.lognormal(0.3, 1.1, 600)).astype(int), 90)
    presence = (rng.random((600, 10)) < rng.uniform(0.02, 0.5, 10)).astype(np.uint8)
    assert count_edges(counts).tolist() == [1, 2, 3, 6, 10]
    quartiles = np.unique(np.quantile(counts, [0.25, 0.5, 0.75]))
    old = np.hstack([presence, np.eye(len(quartiles) + 1, dtype=np.uint8)[np.digitize(counts, quartiles)]])

    def spread(labels):
        out = []
        for seed in range(5):
            fold = np.zeros(600, int)
            for k, (_, v) in enumerate(MultilabelStratifiedKFold(5, shuffle=True, random_state=seed).split(counts, labels)):
                fold[v] = k
            out.append(np.std([counts[fold == k].sum() for k in range(5)]))
        return np.mean(out)

    assert spread(_strat_labels(presence, counts)) < 0.6 * spread(old)


def _leaks(f: pd.DataFrame, pairs: pd.DataFrame) -> int:
    return len(leaky_keys(f, list(zip(pairs.key_a, pairs.key_b))))


def test_near_duplicate_pairs_share_a_fold_and_leaks_are_counted(ds):
    """Chains of joined near-duplicate pairs join one group (weak pairs do not); every pair, joined
    or not, is counted when its images end up on two sides."""
    keys = ds.images.key
    pairs = pd.DataFrame({"key_a": [keys[3], keys[40], keys[41], "not-labelled.jpg", keys[7]],
                          "key_b": [keys[90], keys[41], keys[200], keys[5], keys[8]],
                          "joined": [True, True, True, True, False]})
    near = near_pairs(keys, pairs)
    assert near == [[3, 90], [40, 41], [41, 200]]                     # the test image's and the weak pair dropped
    assert near_pairs(keys, pairs, joined_only=False)[-1] == [7, 8]
    for seed in range(4):
        f = make_folds(ds, Split(strategy="multilabel", n_folds=5, holdout=0.15, seed=seed), links=Links(near=near))
        for same in ([3, 90], [40, 41, 200]):
            assert f.iloc[same].fold.nunique() == 1 and f.iloc[same].holdout.nunique() == 1
        assert _leaks(f, pairs[:3]) == 0
    f = make_folds(ds, Split(strategy="multilabel", n_folds=5, holdout=0.0, seed=0))
    side = f.set_index("key").fold
    apart = [(a, b) for a, b in zip(pairs.key_a[:3], pairs.key_b[:3]) if side[a] != side[b]]
    assert _leaks(f, pairs[:3]) == len({k for p in apart for k in p})


def test_near_dup_leaks_known_answer():
    folds = pd.DataFrame({"key": list("abcdef"), "fold": [0, 1, 0, -1, -1, 2],
                          "holdout": [False, False, False, True, True, False]})
    pairs = pd.DataFrame({"key_a": ["a", "a", "d", "e"], "key_b": ["b", "c", "e", "f"]})
    # a-b: folds 0/1, both leak; a-c: same fold; d-e: both holdout; e-f: e (holdout) sees f trained on
    assert sorted(leaky_keys(folds, list(zip(pairs.key_a, pairs.key_b)))) == ["a", "b", "e"]
    # one set of three: c (fold 0) sees b (fold 1); d (holdout) sees b and c; f alone
    assert sorted(leaky_keys(folds, [["b", "c", "d"], ["f"], ["zz", "f"]])) == ["b", "c", "d"]


def roboflow_dataset(n_sources: int = 120, copies: int = 3, seed: int = 0) -> Dataset:
    """A Roboflow-style export: every source photo written `copies` times as
    <stem>_jpg.rf.<32 hex>.jpg, all in one folder, each copy with its source's labels."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for s in range(n_sources):
        classes = np.nonzero(rng.random(8) < [0.6, 0.4, 0.3, 0.2, 0.1, 0.08, 0.05, 0.03])[0] + 1
        for c in range(copies):
            key = f"train/IMG_{s:04d}_jpg.rf.{rng.integers(0, 16**8):08x}{s:08x}{c:016x}.jpg"
            images.append(dict(key=key, image_id=len(images), source="train.json", file_name=key.split("/")[1],
                               width=64, height=64, path=key))
            anns += [dict(ann_id=len(anns) + i, key=key, class_idx=int(k), iscrowd=0, segmentation=[], json_area=1)
                     for i, k in enumerate(classes)]
    order = rng.permutation(len(images))     # exports list files by hash: copies are not adjacent
    return Dataset(images=pd.DataFrame(images).iloc[order].reset_index(drop=True), annotations=pd.DataFrame(anns),
                   classes=CLASSES)


def _source(key: str) -> str:
    return key.split("/")[1].split("_jpg.rf.")[0]


@pytest.mark.parametrize("strategy", ["multilabel", "random"])
def test_copies_named_by_the_exporter_never_straddle_a_fold_or_the_holdout(strategy):
    from pipeline.data.sources import copies_by_name

    rf = roboflow_dataset()
    named = copies_by_name(rf.images.file_name)
    assert len(named) == 120 and all(len(g) == 3 for g in named)
    for seed in range(3):
        f = make_folds(rf, Split(strategy=strategy, n_folds=5, holdout=0.1, seed=seed), links=Links(named=named))
        by_source = f.groupby(f.key.map(_source))
        assert by_source.fold.nunique().max() == 1 and by_source.holdout.nunique().max() == 1
        sizes = f[~f.holdout].fold.value_counts()
        assert sizes.max() <= 1.1 * sizes.mean() and sizes.min() >= 0.9 * sizes.mean()
        assert leak_report(f, {"same_source": [f.key.to_numpy()[g] for g in named]})["leaky_images"] == 0
    # the same split without the names: copies fall apart, and the count says how many leak
    f = make_folds(rf, Split(strategy=strategy, n_folds=5, holdout=0.1, seed=0))
    sets = [f.key.to_numpy()[g] for g in named]
    side = f.set_index("key")
    independent = 0                           # brute force over every ordered pair of copies
    for g in sets:
        for k in g:
            fk, hk = side.fold[k], side.holdout[k]
            trained = [(side.fold[m], side.holdout[m]) for m in g if m != k]
            independent += any((hk and not hm) or (not hk and not hm and fm != fk) for fm, hm in trained)
    got = leak_report(f, {"same_source": sets})
    assert got["leaky_images"] == independent > 100


def test_a_group_pattern_groups_by_its_first_capture():
    rf = roboflow_dataset(n_sources=40)
    s = Split(strategy="multilabel", n_folds=4, holdout=0.0, group={"pattern": r"^(IMG_\d{3})"}, seed=0)
    f = make_folds(rf, s)
    assert f.group.str.startswith("pattern:IMG_").all() and f.group.nunique() == 4     # IMG_000 .. IMG_003
    assert f.groupby("group").fold.nunique().max() == 1
    with pytest.raises(ValueError, match="capture group"):
        Split(group={"pattern": "IMG_"})
    with pytest.raises(ValueError, match="not a regular expression"):
        Split(group={"pattern": "(IMG"})


def test_given_split_and_user_groups_count_named_copies_as_leaks():
    from pipeline.data.sources import copies_by_name

    rf = roboflow_dataset(n_sources=30)
    images = rf.images.copy()
    images.loc[::4, "source"] = "val.json"                        # copies of a source in both files
    given = Dataset(images=images, annotations=rf.annotations, classes=CLASSES)
    named = copies_by_name(given.images.file_name)
    f = make_folds(given, Split(strategy="given", n_folds=1, holdout=0.0), "val.json", Links(named=named))
    val = set(f.key[f.fold == 0])
    expected = {k for g in named for k in f.key.to_numpy()[g] if k in val
                and any(m not in val for m in f.key.to_numpy()[g])}
    assert leak_report(f, {"same_source": [f.key.to_numpy()[g] for g in named]})["leaky_images"] == len(expected) > 0


def test_even_out_moves_whole_groups_until_folds_are_within_ten_percent():
    sizes = np.array([30, 20, 12, 10, 8, 8, 6, 6, 5, 5, 4, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1])   # 130 images
    labels = np.ones((len(sizes), 1)) * sizes[:, None]
    fold = np.array([0] * 8 + [1] * 7 + [2] * 6)                  # 100 / 27 / 3 images: groups allow 43 each
    out = even_out(fold, sizes, labels)
    got = np.array([sizes[out == k].sum() for k in range(3)])
    assert abs(got - 130 / 3).max() <= 0.1 * 130 / 3 and got.sum() == 130
    already = np.array([0, 1, 2] * 7)
    assert (even_out(already, np.ones(21, int), np.ones((21, 1))) == already).all()   # even: untouched
    giant = even_out(np.array([0, 1, 2, 1, 2]), np.array([60, 5, 5, 5, 5]), np.ones((5, 1)))
    assert giant[0] == 0                                          # nothing fits the gap it makes: it stays


def test_a_group_bigger_than_a_fold_is_reported_loudly():
    rf = roboflow_dataset(n_sources=60)
    chain = [list(range(0, 80))]                                  # 80 of 180 images chained into one group
    f = make_folds(rf, Split(strategy="multilabel", n_folds=3, holdout=0.1, seed=0), links=Links(near=chain))
    big = oversized_groups(f)
    assert len(big) == 1 and big[0]["images"] >= 80 and not f.iloc[chain[0]].holdout.any()
    summary = split_summary(f, {}, Links(near=chain), pd.DataFrame(columns=["key_a", "key_b", "joined"]), True)
    lines = summary["warnings"]
    assert lines == split_warnings({k: v for k, v in summary.items() if k != "warnings"})
    assert any("more than a fold's share" in line and big[0]["group"] in line for line in lines)
    assert any(line.startswith("folds are uneven") for line in lines)


def test_the_report_puts_split_warnings_and_oversized_groups_first(tmp_path):
    from pipeline.config import Paths
    from pipeline.evaluation.report import _split
    from pipeline.workspace import Workspace

    rf = roboflow_dataset(n_sources=60)
    chain = [list(range(0, 80))]
    f = make_folds(rf, Split(strategy="multilabel", n_folds=3, holdout=0.1, seed=0), links=Links(near=chain))
    metrics = {"split": split_summary(f, {}, Links(near=chain), pd.DataFrame(columns=["key_a", "key_b"]), True)}
    page = _split(Workspace(Paths(split=str(tmp_path))), metrics)
    assert page.index("class='warn'") < page.index("more than a fold") < page.index("fold_images")
    assert metrics["split"]["groups"]["oversized"]                # the page's copy was trimmed, not the metrics


def test_a_class_mix_worse_than_random_is_said():
    base = {"fold_images": {"0": 10, "1": 10}, "groups": {"oversized": []}}
    worse = split_warnings({**base, "balance": {"class_dev": 0.05, "random_class_dev": 0.03}})
    assert len(worse) == 1 and "class_dev 0.0500 vs 0.0300" in worse[0]
    assert split_warnings({**base, "balance": {"class_dev": 0.031, "random_class_dev": 0.03}}) == []
    assert split_warnings({**base, "balance": {}}) == []
