"""Masks against hand-drawn fixtures whose pixels are counted by hand."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from pipeline.data.coco import load_dataset
from pipeline.labels import IGNORE_INDEX
from pipeline.config import Masks
from pipeline.data.masks import build_mask_cache, image_label, target_size, unknown_class_index
from tests.helpers import image, square, write_coco

pytestmark = pytest.mark.quick   # `make test-quick`: config, data, metrics, the model zoo in about a minute

# The competition's categories: id 0 is a real class (UNKNOWN), so ids and class indices differ.
CATS = [{"id": 0, "name": "UNKNOWN"}, {"id": 7, "name": "Plastic"}, {"id": 3, "name": "Plastic bag"}]
UNKNOWN, PLASTIC, BAG = 1, 2, 3  # position in the list + 1


def label_of(root, anns, cats=CATS, w=10, h=8, overlap="smaller_on_top", unknown="keep", max_side=None):
    for a in anns:
        a.setdefault("image_id", 0)
    write_coco(root, [image(0, w, h)], anns, cats)
    ds = load_dataset(root, ["train.json"])
    out_hw = target_size(h, w, max_side)
    a = ds.annotations
    return image_label(a, (h, w), out_hw, overlap, unknown_class_index(ds.classes, "UNKNOWN"), unknown), ds


def test_class_index_is_list_position_not_raw_id(tmp_path):
    label, ds = label_of(tmp_path, [{"category_id": 0, "segmentation": square(0, 0, 2, 2)},
                                    {"category_id": 7, "segmentation": square(4, 0, 6, 3)},
                                    {"category_id": 3, "segmentation": square(0, 4, 5, 8)}])
    assert ds.classes == ["Background", "UNKNOWN", "Plastic", "Plastic bag"]
    assert np.count_nonzero(label == UNKNOWN) == 4
    assert np.count_nonzero(label == PLASTIC) == 6
    assert np.count_nonzero(label == BAG) == 20
    assert np.count_nonzero(label == 0) == 80 - 30


@pytest.mark.parametrize("overlap, plastic_px, bag_px", [
    ("smaller_on_top", 9, 64 - 9),      # the bottle stays visible inside the bag
    ("higher_class_wins", 0, 64),      # the bag has the higher class index, so it covers the bottle
])
def test_overlap_rule(tmp_path, overlap, plastic_px, bag_px):
    # The bag's json area is wrong on purpose (a tiny number): painting order uses rasterised area.
    label, _ = label_of(tmp_path, [{"category_id": 3, "segmentation": square(0, 0, 8, 8), "area": 1.0},
                                   {"category_id": 7, "segmentation": square(2, 2, 5, 5), "area": 500.0}],
                        overlap=overlap)
    assert np.count_nonzero(label == PLASTIC) == plastic_px
    assert np.count_nonzero(label == BAG) == bag_px


@pytest.mark.parametrize("mode, expect_unknown_px, expect_bag_px, value", [
    ("keep", 4, 60, UNKNOWN),
    ("background", 0, 64, UNKNOWN),   # dropped: the bag underneath shows through
    ("ignore", 4, 60, IGNORE_INDEX),
])
def test_unknown_modes(tmp_path, mode, expect_unknown_px, expect_bag_px, value):
    label, _ = label_of(tmp_path, [{"category_id": 3, "segmentation": square(0, 0, 8, 8)},
                                   {"category_id": 0, "segmentation": square(1, 1, 3, 3)}], unknown=mode)
    assert np.count_nonzero(label == value) == expect_unknown_px
    assert np.count_nonzero(label == BAG) == expect_bag_px


def test_duplicate_category_names_merge_into_one_class(tmp_path):
    cats = [{"id": 1, "name": "Paper"}, {"id": 2, "name": "Metal"}, {"id": 9, "name": "Paper"}]
    label, ds = label_of(tmp_path, [{"category_id": 1, "segmentation": square(0, 0, 2, 2)},
                                    {"category_id": 9, "segmentation": square(5, 0, 7, 2)},
                                    {"category_id": 2, "segmentation": square(0, 5, 1, 6)}], cats=cats)
    assert ds.classes == ["Background", "Paper", "Metal"]
    assert np.count_nonzero(label == 1) == 8 and np.count_nonzero(label == 2) == 1
    assert "duplicate_category_name" in set(ds.issues.kind)


def _rle_counts(m: np.ndarray) -> list[int]:
    flat, counts, prev, run = m.ravel(order="F"), [], 0, 0
    for v in flat:
        if v != prev:
            counts.append(run)
            prev, run = v, 0
        run += 1
    return counts + [run]


def test_rle_compressed_uncompressed_and_crowd(tmp_path):
    a = np.zeros((8, 10), np.uint8)
    a[0:3, 0:4] = 1                       # 12 px, compressed RLE string
    b = np.zeros((8, 10), np.uint8)
    b[5:8, 6:10] = 1
    b[6, 0:2] = 1                         # 14 px in two blobs: crowd, uncompressed RLE
    comp = mask_utils.encode(np.asfortranarray(a))["counts"].decode()
    label, ds = label_of(tmp_path, [
        {"category_id": 7, "segmentation": {"size": [8, 10], "counts": comp}},
        {"category_id": 3, "segmentation": {"size": [8, 10], "counts": _rle_counts(b)}, "iscrowd": 1}])
    assert np.array_equal(label == PLASTIC, a.astype(bool))
    assert np.array_equal(label == BAG, b.astype(bool))
    assert ds.annotations.iscrowd.tolist() == [0, 1]


def test_multipolygon_and_degenerate_part(tmp_path):
    # Two real parts (4 + 6 px) and a 2-point "part" that pycocotools would misread as a box.
    seg = square(0, 0, 2, 2) + square(5, 5, 8, 7) + [[1, 1, 3, 3]]
    label, ds = label_of(tmp_path, [{"category_id": 7, "segmentation": seg}])
    assert np.count_nonzero(label == PLASTIC) == 10
    assert (ds.issues.kind == "polygon_note").sum() == 1


def test_max_side_scales_polygons_exactly(tmp_path):
    # 200x100 image capped at 50: scale 1/4, a 40x20 rectangle becomes 10x5 = 50 px.
    label, _ = label_of(tmp_path, [{"category_id": 7, "segmentation": square(40, 20, 80, 40)}],
                        w=200, h=100, max_side=50)
    assert label.shape == (25, 50)
    assert np.count_nonzero(label == PLASTIC) == 50


def test_max_side_shrinks_rle_masks_centre_aligned(tmp_path):
    # 30x12 image capped at 10 (scale 1/3): a 1-px column at x = 3k + 1, the centre of each 3-px block,
    # survives as every output column; one at x = 3k (a block's edge, INTER_NEAREST's pick) vanishes.
    centre, edge = np.zeros((12, 30), np.uint8), np.zeros((12, 30), np.uint8)
    centre[:, 1::3], edge[1:4, 0::3] = 1, 1
    label, _ = label_of(tmp_path, [
        {"category_id": 7, "segmentation": {"size": [12, 30], "counts": _rle_counts(centre)}},
        {"category_id": 3, "segmentation": {"size": [12, 30], "counts": _rle_counts(edge)}}], w=30, h=12, max_side=10)
    assert label.shape == (4, 10)
    assert (label == PLASTIC).all()


def test_mask_cache_index_and_files(tmp_path):
    root = tmp_path / "ds"
    write_coco(root, [image(0), image(1, w=40, h=20)],
               [{"image_id": 0, "category_id": 3, "segmentation": square(0, 0, 8, 8)},
                {"image_id": 0, "category_id": 7, "segmentation": square(2, 2, 5, 5)},
                {"image_id": 1, "category_id": 7, "segmentation": square(0, 0, 20, 10)}], CATS)
    ds = load_dataset(root, ["train.json"])
    index = build_mask_cache(ds, tmp_path / "cache", Masks.model_construct(max_side=20), workers=1)
    assert index.px_2.tolist() == [9, 50] and index.px_3.tolist() == [55, 0]
    assert index[["height", "width"]].values.tolist() == [[8, 10], [10, 20]]
    m = cv2.imread(index["mask"][1], cv2.IMREAD_UNCHANGED)
    assert m.dtype == np.uint8 and m.shape == (10, 20) and np.count_nonzero(m == PLASTIC) == 50
    small = np.load(index["image"][1])
    assert small.shape == (10, 20, 3) and small.dtype == np.uint8   # decoded once, resized to the cap
    assert np.load(index["image"][0]).shape == (8, 10, 3)
    meta = json.loads((tmp_path / "cache" / "classes.json").read_text())
    assert meta["classes"] == ["Background", "UNKNOWN", "Plastic", "Plastic bag"] and meta["ignore_index"] == 255
    assert not list(tmp_path.glob("cache.tmp-*"))


def test_without_image_cache_only_capped_images_are_stored(tmp_path):
    root = tmp_path / "ds"
    write_coco(root, [image(0), image(1, w=40, h=20)], [], CATS)
    ds = load_dataset(root, ["train.json"])
    index = build_mask_cache(ds, tmp_path / "cache", Masks.model_construct(max_side=20, cache_images=False), workers=1)
    assert index["image"][0] == str(root / "imgs/000.png")          # read in place
    assert index["image"][1].endswith(".npy") and np.load(index["image"][1]).shape == (10, 20, 3)


def test_exif_rotated_photo_is_cached_as_the_json_sees_it(tmp_path):
    from PIL import Image

    root = tmp_path / "ds"
    write_coco(root, [{"id": 0, "file_name": "p.jpg", "width": 8, "height": 12}], [], CATS, write_images=False)
    stored = np.zeros((8, 12, 3), np.uint8)
    stored[:, :4] = 255                                   # stored 12 wide x 8 high, left third white
    exif = Image.Exif()
    exif[0x0112] = 6                                      # "rotate 90 CW to view"
    Image.fromarray(stored).save(root / "p.jpg", exif=exif, quality=100)
    ds = load_dataset(root, ["train.json"])
    assert "exif_rotated" in set(ds.issues.kind)
    index = build_mask_cache(ds, tmp_path / "cache", Masks(), workers=1)
    img = np.load(index["image"][0])
    assert img.shape == (12, 8, 3) and img[:4].mean() > 200 and img[6:].mean() < 50   # white on top after rotating


def test_parallel_cache_equals_serial(tmp_path):
    root = tmp_path / "ds"
    anns = [{"image_id": i, "category_id": [0, 7, 3][i % 3], "segmentation": square(i % 5, 0, 6, 1 + i % 7)}
            for i in range(20)]
    write_coco(root, [image(i) for i in range(20)], anns, CATS)
    ds = load_dataset(root, ["train.json"])
    one = build_mask_cache(ds, tmp_path / "a", Masks(), workers=1)
    two = build_mask_cache(ds, tmp_path / "b", Masks(), workers=2)
    assert one.filter(like="px_").equals(two.filter(like="px_")) and one.digest.equals(two.digest)


@pytest.mark.parametrize("cache_images", [True, False])
def test_digest_changes_with_the_image_content_and_nothing_else_does(tmp_path, cache_images):
    """An image repainted under the same name and size (same annotations, same pixel counts) changes
    only its row's digest: training fingerprints the index, so no model of the old image is reused."""
    root = tmp_path / "ds"
    write_coco(root, [image(0), image(1)], [{"image_id": i, "category_id": 3, "segmentation": square(0, 0, 4, 4)}
                                            for i in range(2)], CATS)
    ds = load_dataset(root, ["train.json"])

    def build(out):
        table = build_mask_cache(ds, tmp_path / out, Masks(cache_images=cache_images), workers=1)
        return table.drop(columns=["image", "mask", "digest"]), table.digest.tolist()

    (before, d0), (_, d1) = build("a"), build("b")
    cv2.imwrite(str(root / "imgs/001.png"), np.full((8, 10, 3), 30, np.uint8))
    after, d2 = build("c")
    assert d0 == d1 and len(set(d0)) == 1                          # deterministic, content only
    assert after.equals(before) and d2[0] == d0[0] and d2[1] != d0[1]


def test_a_stray_far_vertex_is_clipped_not_rasterised_for_ever(tmp_path):
    """Real data has vertices at 1e9; pycocotools would walk every pixel of that edge (or crash)."""
    far = [[2.0, 2.0, 1e9, 4.0, 3.0, 7.0]]
    near = [[2.0, 2.0, 300.0, 4.0, 3.0, 7.0]]     # same edges inside the image, still cheap to rasterise
    label_far, _ = label_of(tmp_path / "far", [{"category_id": 7, "segmentation": far}])
    label_near, _ = label_of(tmp_path / "near", [{"category_id": 7, "segmentation": near}])
    assert np.count_nonzero(label_far == PLASTIC) > 0
    assert np.count_nonzero(label_far != label_near) <= 2   # inside, the two edges' slopes differ by < 0.01


@pytest.mark.parametrize("json_sees", ["stored", "rotated"])
def test_exif_photo_read_in_place_matches_its_mask(tmp_path, json_sees):
    """masks.cache_images: false reads the photo itself at training time: it is oriented by the same
    rule as the cache (the json's size decides), so image and mask agree whichever way the
    annotation tool saw the photo."""
    from PIL import Image

    from pipeline.data.dataset import SegDataset

    root = tmp_path / "ds"
    w, h = (12, 8) if json_sees == "stored" else (8, 12)
    write_coco(root, [{"id": 0, "file_name": "p.jpg", "width": w, "height": h}],
               [{"image_id": 0, "category_id": 3, "segmentation": square(0, 0, 4, 4)}], CATS, write_images=False)
    stored = np.zeros((8, 12, 3), np.uint8)
    stored[:, :4] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(root / "p.jpg", exif=exif, quality=100)
    ds = load_dataset(root, ["train.json"])
    in_place = build_mask_cache(ds, tmp_path / "a", Masks(cache_images=False), workers=1)
    cached = build_mask_cache(ds, tmp_path / "b", Masks(), workers=1)
    assert in_place["image"][0].endswith("p.jpg")
    identity = lambda image, mask: {"image": image, "mask": torch.from_numpy(mask)}
    img, mask = SegDataset(in_place, identity).load(0)
    assert img.shape[:2] == mask.shape == (h, w)
    assert np.array_equal(img, np.load(cached["image"][0]))


def _touch_then_sleep(task):
    import time

    folder, i = task
    (folder / str(i)).touch()
    if i == 5:
        raise RuntimeError("task 5 failed")
    time.sleep(0.05)
    return i * i


def test_parallel_map_keeps_order_and_stops_the_rest_on_failure(tmp_path):
    """Results come back in task order; when the stage stops (an error, Ctrl-C) the tasks not yet
    started are cancelled, not run to the end before the error surfaces."""
    from pipeline.io import parallel_map

    ok = tmp_path / "ok"
    ok.mkdir()
    assert parallel_map(_touch_then_sleep, [(ok, i) for i in range(6, 46)], "t", workers=2) == [i * i for i in range(6, 46)]
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(RuntimeError, match="task 5 failed"):
        parallel_map(_touch_then_sleep, [(bad, i) for i in range(400)], "t", workers=2)
    assert len(list(bad.iterdir())) < 100
