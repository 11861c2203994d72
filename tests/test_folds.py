"""Fold invariants: disjoint, complete, groups intact, holdout untouched, better balanced than random."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.config import Split
from pipeline.data.coco import DataError, Dataset
from pipeline.data.folds import (balance_report, duplicates_apart, label_matrix, make_folds, near_dups_apart,
                                 near_pairs)
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
        f = make_folds(ds, Split(strategy=strategy, n_folds=5, group=group, holdout=0.15, seed=seed), duplicates=copies)
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
                   duplicates=[[0, 1], [2, 3]])
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


def test_near_duplicate_pairs_share_a_fold_and_leaks_are_counted(ds):
    """Chains of near-duplicate pairs join one group; without joining, the leak count says how many
    validation/holdout images have a near-duplicate among the images their model trained on."""
    keys = ds.images.key
    pairs = pd.DataFrame({"key_a": [keys[3], keys[40], keys[41], "not-labelled.jpg"],
                          "key_b": [keys[90], keys[41], keys[200], keys[5]]})
    near = near_pairs(keys, pairs)
    assert near == [[3, 90], [40, 41], [41, 200]]                     # the test image's pair is dropped
    for seed in range(4):
        f = make_folds(ds, Split(strategy="multilabel", n_folds=5, holdout=0.15, seed=seed), near=near)
        for same in ([3, 90], [40, 41, 200]):
            assert f.iloc[same].fold.nunique() == 1 and f.iloc[same].holdout.nunique() == 1
        assert near_dups_apart(f, pairs) == {"pairs": 3, "pairs_apart": 0, "leaky_images": 0}
    f = make_folds(ds, Split(strategy="multilabel", n_folds=5, holdout=0.0, seed=0))
    side = f.set_index("key").fold
    apart = [(a, b) for a, b in zip(pairs.key_a[:3], pairs.key_b[:3]) if side[a] != side[b]]
    got = near_dups_apart(f, pairs)
    assert got["pairs_apart"] == len(apart) and got["leaky_images"] == len({k for p in apart for k in p})


def test_near_dup_leaks_known_answer():
    folds = pd.DataFrame({"key": list("abcdef"), "fold": [0, 1, 0, -1, -1, 2],
                          "holdout": [False, False, False, True, True, False]})
    pairs = pd.DataFrame({"key_a": ["a", "a", "d", "e"], "key_b": ["b", "c", "e", "f"]})
    # a-b: folds 0/1, both leak; a-c: same fold; d-e: both holdout; e-f: e (holdout) sees f trained on
    assert near_dups_apart(folds, pairs) == {"pairs": 4, "pairs_apart": 2, "leaky_images": 3}
