"""The built-in demo dataset: deterministic, every category, every COCO encoding, labels = pixels."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from pipeline.data.coco import load_dataset
from pipeline.data.demo import CATEGORIES, make_demo
from pipeline.data.eda import analyse


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    make_demo(out, n_train=64, n_test=6, image_size=96, seed=0)
    return out


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_deterministic(demo, tmp_path):
    again = tmp_path / "again"
    make_demo(again, n_train=64, n_test=6, image_size=96, seed=0)
    assert _digest(demo) == _digest(again)
    other = tmp_path / "other"
    make_demo(other, n_train=64, n_test=6, image_size=96, seed=1)
    assert _digest(demo)["train.json"] != _digest(other)["train.json"]


def test_competition_layout_and_categories(demo):
    train = json.loads((demo / "train.json").read_text())
    test = json.loads((demo / "test.json").read_text())
    assert [c["name"] for c in train["categories"]] == CATEGORIES and train["categories"][0]["id"] == 0
    assert len(train["images"]) == 64 and len(test["images"]) == 6 and test["annotations"] == []
    assert all((demo / im["file_name"]).exists() for im in train["images"] + test["images"])
    assert {im["file_name"].split("/")[0] for im in train["images"]} == {"batch_01", "batch_02", "batch_03", "batch_04"}


def test_annotation_mix_imbalance_and_overlap(demo):
    ds = load_dataset(demo, ["train.json"])
    segs = ds.annotations.segmentation
    kinds = {"polygon" if isinstance(s, list) and len(s) == 1 else "multipolygon" if isinstance(s, list)
             else "rle_compressed" if isinstance(s["counts"], str) else "rle_uncompressed" for s in segs}
    assert kinds == {"polygon", "multipolygon", "rle_compressed", "rle_uncompressed"}
    assert ds.annotations.iscrowd.sum() >= 1
    r = analyse(ds, overlap="smaller_on_top")
    inst = r.tables["class_stats"].set_index("class").instances
    assert inst["Battery"] == inst[1:].min() and inst["Battery"] < inst[1:].max() / 2   # the rarest, still learnable
    assert r.summary["images_without_annotations"] >= 1
    pairs = r.tables["overlap_pairs"]
    assert (pairs.class_b == "Plastic bag").sum() + (pairs.class_a == "Plastic bag").sum() >= 3  # items in bags


def test_every_class_has_its_own_colour(demo):
    """Labels match pixels: the mean colour inside each class's masks differs between classes."""
    import cv2
    from pipeline.data.masks import image_label

    ds = load_dataset(demo, ["train.json"])
    by_key = ds.annotations_by_key()
    sums = {}
    for r in ds.images.itertuples():
        if r.key not in by_key:
            continue
        label = image_label(by_key[r.key], (r.height, r.width), (r.height, r.width), "smaller_on_top", None, "keep")
        img = cv2.imread(r.path).astype(float)
        for c in np.unique(label[label > 0]):
            s = sums.setdefault(int(c), [np.zeros(3), 0])
            s[0] += img[label == c].sum(axis=0)
            s[1] += int((label == c).sum())
    means = {c: s[0] / s[1] for c, s in sums.items()}
    assert len(means) >= 10
    cs = sorted(means)
    closest = min(np.linalg.norm(means[a] - means[b]) for i, a in enumerate(cs) for b in cs[i + 1:])
    assert closest > 8


def test_label_noise_corrupts_what_its_answer_key_lists_and_nothing_else(tmp_path):
    clean, noisy = tmp_path / "clean", tmp_path / "noisy"
    make_demo(clean, n_train=32, n_test=0, image_size=64, seed=3, label_noise=0.0)
    summary = make_demo(noisy, n_train=32, n_test=0, image_size=64, seed=3, label_noise=0.2)
    before = {a["id"]: a for a in json.loads((clean / "train.json").read_text())["annotations"]}
    after = {a["id"]: a for a in json.loads((noisy / "train.json").read_text())["annotations"]}
    key = pd.read_csv(noisy / "label_noise.csv")
    assert summary["corrupted_annotations"] == len(key) == round(0.2 * len(before))
    assert set(key.kind) == {"relabelled", "deleted"} and abs((key.kind == "deleted").sum() * 2 - len(key)) <= 1
    for r in key.itertuples():
        assert CATEGORIES[before[r.ann_id]["category_id"]] == r.true_class
        if r.kind == "deleted":
            assert r.ann_id not in after
        else:
            assert CATEGORIES[after[r.ann_id]["category_id"]] == r.written_class != r.true_class
            assert after[r.ann_id]["segmentation"] == before[r.ann_id]["segmentation"]
    untouched = set(before) - set(key.ann_id)
    assert all(after[i] == before[i] for i in untouched)
    assert _digest(clean / "batch_01") == _digest(noisy / "batch_01")      # the same images
    assert pd.read_csv(clean / "label_noise.csv").empty
