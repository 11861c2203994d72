"""EDA numbers on a fixture whose overlaps are counted by hand."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.data.coco import load_dataset
from pipeline.data.eda import analyse, write_report
from pipeline.workspace import EdaFiles
from tests.helpers import image, square, write_coco

CATS = ["Paper", "Metal", "Plastic bag"]  # category ids 0, 1, 2 -> classes 1, 2, 3


@pytest.fixture
def ds(tmp_path):
    anns = [
        # image 0: a bag 8x8=64 with a 3x3=9 metal can inside
        {"image_id": 0, "category_id": 2, "segmentation": square(0, 0, 8, 8), "area": 64.0},
        {"image_id": 0, "category_id": 1, "segmentation": square(2, 2, 5, 5), "area": 9.0},
        # image 1: metal 4x4 and paper 4x4 overlapping in a 2x4 strip (8 px); paper is listed
        # second and equally large, so under smaller_on_top (stable order) paper ends on top.
        {"image_id": 1, "category_id": 1, "segmentation": square(0, 0, 4, 4), "area": 16.0},
        {"image_id": 1, "category_id": 0, "segmentation": square(2, 0, 6, 4), "area": 999.0},  # box-like area
        # image 2: paper alone; image 3: nothing
        {"image_id": 2, "category_id": 0, "segmentation": square(0, 0, 2, 2), "area": 4.0},
    ]
    write_coco(tmp_path, [image(i) for i in range(4)], anns, CATS)
    return load_dataset(tmp_path, ["train.json"])


def pair(result, a, b):
    t = result.tables["overlap_pairs"]
    row = t[((t.class_a == a) & (t.class_b == b))]
    assert len(row) == 1, t
    return row.iloc[0]


def test_overlap_counts_smaller_on_top(ds):
    r = analyse(ds, overlap="smaller_on_top")
    bag = pair(r, "Metal", "Plastic bag")
    assert (bag.images, bag.pixels, bag.a_lost_to_b, bag.b_lost_to_a) == (1, 9, 0, 9)
    pm = pair(r, "Paper", "Metal")
    assert (pm.images, pm.pixels, pm.a_lost_to_b, pm.b_lost_to_a) == (1, 8, 0, 8)
    assert len(r.tables["overlap_pairs"]) == 2
    assert sorted(r.tables["overlap_images"].image_id) == [0, 1]
    assert r.summary["overlap"] == {"images": 2, "class_pairs": 2, "pixel_frac": 17 / 320, "reassigned_pixels": 17}


def test_overlap_counts_higher_class_wins(ds):
    r = analyse(ds, overlap="higher_class_wins")
    bag = pair(r, "Metal", "Plastic bag")
    assert (bag.a_lost_to_b, bag.b_lost_to_a) == (9, 0)      # the bag (class 3) covers the can
    pm = pair(r, "Paper", "Metal")
    assert (pm.a_lost_to_b, pm.b_lost_to_a) == (8, 0)        # metal (2) beats paper (1)


def test_class_stats_and_summary(ds, tmp_path):
    r = analyse(ds, overlap="smaller_on_top")
    cs = r.tables["class_stats"].set_index("class")
    assert cs.loc[["Paper", "Metal", "Plastic bag"], "instances"].tolist() == [2, 2, 1]
    assert cs.loc[["Paper", "Metal", "Plastic bag"], "images"].tolist() == [2, 2, 1]
    # painted pixels: image0 bag 55 + metal 9; image1 paper 16 + metal 16-8; image2 paper 4
    assert cs.loc[["Background", "Paper", "Metal", "Plastic bag"], "pixels"].tolist() == [320 - 92, 20, 17, 55]
    assert cs.pixel_share.sum() == pytest.approx(1.0)
    assert r.summary["images_without_annotations"] == 1
    assert r.summary["json_area_mismatch"] == 1                     # the 999 "box area"
    assert r.summary["rarest_class"] == "Plastic bag" and r.summary["imbalance_ratio"] == 2.0
    pngs = write_report(r, EdaFiles(tmp_path))
    assert {p.name for p in pngs} == {"class_balance.png", "overlap_matrix.png", "area_hist.png"}
    assert all(p.stat().st_size > 5000 for p in pngs)
    m = np.loadtxt(tmp_path / "overlap_matrix.csv", delimiter=",", skiprows=1, usecols=range(1, 5))
    assert m[2, 3] == m[3, 2] == 9 and m[1, 2] == 8


def test_overlaps_are_exact_on_a_12mp_photo(tmp_path):
    """At full resolution: a 1-px-wide overlap that a 512-px raster would lose is counted."""
    write_coco(tmp_path, [image(0, w=4000, h=3000)],
               [{"image_id": 0, "category_id": 2, "segmentation": square(0, 0, 2000, 2000)},
                {"image_id": 0, "category_id": 1, "segmentation": square(1999, 100, 2500, 180)},   # 1 x 80 px inside
                {"image_id": 0, "category_id": 0, "segmentation": square(3000, 0, 3100, 100)}], CATS, write_images=False)
    ds = load_dataset(tmp_path, ["train.json"], check_files=False)
    r = analyse(ds, overlap="smaller_on_top")
    row = pair(r, "Metal", "Plastic bag")
    assert (row.pixels, row.a_lost_to_b, row.b_lost_to_a) == (80, 0, 80)
    a = r.tables["annotations"].set_index("class")
    assert a.loc["Metal", "area_px"] == 501 * 80 and a.loc["Plastic bag", "area_px"] == 2000 * 2000
    cs = r.tables["class_stats"].set_index("class")
    assert cs.loc[["Paper", "Metal", "Plastic bag"], "pixels"].tolist() == [10000, 501 * 80, 2000 * 2000 - 80]


def test_json_area_mismatch_flags_box_areas_not_rounding(tmp_path):
    """A 3x3 object whose json area is 16 (rasterised elsewhere) is fine; a box area for a
    triangle is not. A box starting at -1 (rounding) is inside the image."""
    tri = [[0, 0, 400, 0, 0, 400]]
    write_coco(tmp_path, [image(0, w=500, h=500)],
               [{"image_id": 0, "category_id": 1, "segmentation": square(10, 10, 13, 13), "area": 16, "bbox": [-1, 9, 5, 5]},
                {"image_id": 0, "category_id": 2, "segmentation": tri, "area": 400 * 400, "bbox": [0, 0, 400, 400]},
                {"image_id": 0, "category_id": 2, "segmentation": tri, "area": 80000, "bbox": [0, 0, 401.5, 400]}],
               CATS, write_images=False)
    ds = load_dataset(tmp_path, ["train.json"], check_files=False)
    ann = analyse(ds, overlap="smaller_on_top").tables["annotations"]
    assert ann.json_area_mismatch.tolist() == [False, True, False]
    assert "bbox_outside_image" not in set(ds.issues.kind)


def test_canonical_runs_known_answers():
    from pipeline.data.eda import canonical_runs

    assert canonical_runs([0, 2, 3, 2, 18]).tolist() == [0, 2, 3, 2, 18]     # a leading empty run is the form
    assert canonical_runs([0, 0, 2, 3, 2, 18]).tolist() == [2, 3, 2, 18]
    assert canonical_runs([3, 0, 2, 4]).tolist() == [5, 4]
    assert canonical_runs([2, 0, 0, 3]).tolist() == [2, 3]
    assert canonical_runs([0, 0, 5]).tolist() == [5]


@pytest.mark.timeout(60, method="thread")   # pycocotools looping in C ignores the default signal timeout
def test_zero_length_runs_and_corner_masks_do_not_hang_the_overlap_arithmetic():
    """A crowd RLE written with empty runs inside, overlapping masks that start on the first pixel:
    pycocotools' merge loops forever on such runs unless they are made canonical first."""
    from pipeline.data.eda import _image_stats
    from pipeline.data.masks import image_label

    h = w = 6
    crowd = {"size": [h, w], "counts": [0, 0, 4, 0, 0, 2, 30]}
    segs = [square(0, 0, 3, 3), square(0, 0, 6, 6), crowd, square(1, 0, 4, 2)]
    classes = [1, 2, 1, 3]
    for rule in ("smaller_on_top", "higher_class_wins"):
        label = image_label(pd.DataFrame({"segmentation": segs, "class_idx": classes}), (h, w), (h, w), rule, None, "keep")
        for dense in (False, True):
            s = _image_stats(("k", h, w, segs, classes, rule, None, "keep"), dense=dense)
            assert {v: c for v, c in s["painted"].items() if c} == {int(v): int(c) for v, c in
                                                                    zip(*np.unique(label, return_counts=True))}


def test_crowded_image_takes_the_dense_path_with_the_same_figures():
    """Above DENSE_ABOVE annotations EDA counts on pixel arrays (linear in annotations); every
    figure equals the run-length path's, with overlaps, nested objects and every unknown mode."""
    from pipeline.data import eda

    rng = np.random.default_rng(0)
    h, w, n = 60, 80, eda.DENSE_ABOVE + 40
    segs, classes = [], []
    for _ in range(n):
        x, y, s = rng.uniform(0, w - 4), rng.uniform(0, h - 4), rng.uniform(2, 12)
        segs.append([[x, y, x + s, y, x + s * 0.7, y + s, x, y + s * 0.8]])
        classes.append(int(rng.integers(1, 5)))
    for rule in ("smaller_on_top", "higher_class_wins"):
        for unknown in ("keep", "background", "ignore"):
            task = ("k", h, w, segs, classes, rule, 4, unknown)
            auto, runs = eda._image_stats(task), eda._image_stats(task, dense=False)
            assert {k: {a: b for a, b in v.items() if b} if isinstance(v, dict) else v for k, v in runs.items()} == auto
            assert auto["pairs"] and auto["lost"]


def test_box_shaped_classes_and_objects_labelled_twice_are_named(tmp_path):
    """A detection export turned into segmentation: every bottle outlined (a diamond) and labelled
    again as its axis-aligned box under `bottle box`; a cap sits inside each bottle. The EDA says
    which class is boxes and which classes lie inside another, with counts."""
    anns = []
    for i in range(6):
        x, y = 2 + i * 6, 4
        diamond = [[x + 2, y, x + 4, y + 3, x + 2, y + 6, x, y + 3]]
        anns += [{"image_id": i // 3, "category_id": 0, "segmentation": diamond, "area": 12.0},
                 {"image_id": i // 3, "category_id": 1, "segmentation": square(x, y, x + 4, y + 6), "area": 24.0},
                 {"image_id": i // 3, "category_id": 2, "segmentation": square(x + 1.5, y + 2.5, x + 2.5, y + 3.5), "area": 1.0}]
    write_coco(tmp_path, [image(i, w=40, h=16) for i in range(2)], anns, ["bottle", "bottle box", "cap"])
    r = analyse(load_dataset(tmp_path, ["train.json"]), overlap="smaller_on_top")
    a = r.tables["annotations"].set_index("class")
    assert (a.loc["bottle box"].box_fill == 1.0).all() and (a.loc["bottle"].box_fill < 0.8).all()
    assert (a.loc["bottle"].inside_class == "bottle box").all() and (a.loc["bottle box"].inside_class == "").all()
    assert set(a.loc["cap"].inside_class) <= {"bottle", "bottle box"} and (a.loc["cap"].inside_class != "").all()
    notes = r.tables["issues"].groupby("kind").detail.apply(list)
    assert ("class 'bottle box': 100% of its 6 annotations are boxes (the shape fills >= 95% of its bounding box): "
            "box labels rather than outlines, unless the objects are upright rectangles") in notes["box_shaped_class"]
    assert len(notes["box_shaped_class"]) == 2                   # the 1-px caps are squares too; bottles are not
    assert any(t.startswith("class 'bottle': 100% of its 6 annotations lie inside an annotation of class 'bottle box' (6)")
               for t in notes["class_inside_class"]) and len(notes["class_inside_class"]) == 2
    assert r.summary["issues"]["class_notes"] == {"box_shaped_class": 2, "class_inside_class": 2}
    assert r.summary["box_shaped_annotations"] == 12 and r.summary["annotations_inside_other_class"] == 12
    assert r.summary["named_copies"]["images_named"] == 0
