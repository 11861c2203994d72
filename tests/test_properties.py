"""Property-based tests (hypothesis) over the annotation -> mask path: for any rectangles the mask is
exactly their painted union with the smallest on top, whatever the order; for any garbage
segmentation the loader either paints a valid mask or reports the annotation — never a traceback."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.data.coco import DataError, load_dataset
from pipeline.data.masks import image_label, unknown_class_index
from tests.helpers import image, square, write_coco

pytestmark = pytest.mark.quick   # `make test-quick`: config, data, metrics, the model zoo in about a minute

W, H = 16, 12
CATS = [{"id": 0, "name": "UNKNOWN"}, {"id": 5, "name": "Paper"}, {"id": 9, "name": "Plastic bag"}]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load(anns: list[dict], strict: bool = False):
    with tempfile.TemporaryDirectory() as tmp:
        write_coco(Path(tmp), [image(0, W, H)], anns, CATS)
        ds = load_dataset(Path(tmp), ["train.json"], strict=strict)
    a = ds.annotations
    label = image_label(a, (H, W), (H, W), "smaller_on_top", unknown_class_index(ds.classes, "UNKNOWN"), "keep")
    return label, ds


rects = st.lists(st.tuples(st.integers(0, W - 1), st.integers(0, H - 1), st.integers(1, W), st.integers(1, H),
                           st.sampled_from([0, 5, 9])), min_size=1, max_size=4)


@SETTINGS
@given(rects, st.randoms(use_true_random=False))
def test_rectangles_paint_their_union_smallest_on_top_in_any_order(boxes, rnd):
    boxes = [(x, y, min(x + w, W), min(y + h, H), c) for x, y, w, h, c in boxes]
    areas = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1, _ in boxes]
    assume(len(set(areas)) == len(areas))                       # ties have no defined order
    anns = [{"image_id": 0, "category_id": c, "segmentation": square(x0, y0, x1, y1)} for x0, y0, x1, y1, c in boxes]
    label, ds = load(anns, strict=True)
    union = np.zeros((H, W), bool)
    for x0, y0, x1, y1, _ in boxes:
        union[y0:y1, x0:x1] = True
    index = {0: 1, 5: 2, 9: 3}                                  # category id -> class index (list position)
    assert label.shape == (H, W) and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0} | {index[c] for *_, c in boxes}
    assert np.array_equal(label != 0, union)
    x0, y0, x1, y1, c = boxes[int(np.argmin(areas))]
    assert (label[y0:y1, x0:x1] == index[c]).all()              # the smallest is never covered
    shuffled = list(anns)
    rnd.shuffle(shuffled)
    assert np.array_equal(load([dict(a) for a in shuffled], strict=True)[0], label)


number = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-50, 50))
garbage = st.one_of(
    st.lists(st.lists(number, max_size=12), max_size=3),                        # polygons, any length
    st.fixed_dictionaries({"size": st.lists(st.integers(-2, 20), max_size=3),   # RLE, any size/counts
                           "counts": st.one_of(st.lists(st.integers(-5, 300), max_size=6), st.text(max_size=8))}),
    st.none(), st.integers(), st.text(max_size=5))


@SETTINGS
@given(st.lists(garbage, min_size=1, max_size=3))
def test_any_segmentation_is_painted_or_reported_never_a_crash(segs):
    anns = [{"image_id": 0, "category_id": 5, "segmentation": s} for s in segs]
    label, ds = load(anns)
    assert label.shape == (H, W) and set(np.unique(label)) <= {0, 2}
    reported = set(ds.issues.ann_id.dropna().astype(int)) if len(ds.issues) else set()
    assert set(ds.annotations.ann_id) | reported == set(range(len(segs)))  # each one kept or reported
    try:
        load(anns, strict=True)
    except DataError as e:                                      # strict: an error naming the file and ids
        assert "train.json" in str(e)


def nonzero(stats: dict) -> dict:
    return {k: {a: b for a, b in v.items() if b} if isinstance(v, dict) else v for k, v in stats.items()}


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_eda_pixels_and_overlaps_equal_the_painted_masks(data):
    """The EDA's run-length arithmetic gives exactly what bitmaps give: class pixels equal the mask
    stage's painted pixels; pair overlaps and reassigned pixels equal per-pixel counts. The dense
    path (crowded images) gives exactly the same figures."""
    from pycocotools import mask as mask_utils

    from pipeline.data.eda import _image_stats
    from pipeline.data.masks import image_label, to_rle

    h, w = data.draw(st.integers(4, 40)), data.draw(st.integers(4, 40))
    n = data.draw(st.integers(1, 7))
    coord = st.floats(-3, 43, allow_nan=False)
    segs = [[[data.draw(coord) for _ in range(2 * data.draw(st.integers(3, 6)))]] for _ in range(n)]
    classes = [data.draw(st.integers(1, 3)) for _ in range(n)]
    rule = data.draw(st.sampled_from(["smaller_on_top", "higher_class_wins"]))
    unknown = data.draw(st.sampled_from(["keep", "background", "ignore"]))
    s = _image_stats(("k", h, w, segs, classes, rule, 3, unknown), dense=False)
    assert nonzero(_image_stats(("k", h, w, segs, classes, rule, 3, unknown), dense=True)) == nonzero(s)
    label = image_label(pd.DataFrame({"segmentation": segs, "class_idx": classes}), (h, w), (h, w), rule, 3, unknown)
    assert {v: c for v, c in s["painted"].items() if c} == {int(v): int(c) for v, c in zip(*np.unique(label, return_counts=True))}
    planes = {}
    for seg, c in zip(segs, classes):
        m = mask_utils.decode(to_rle(seg, h, w, h, w)).astype(bool)
        planes[c] = planes.get(c, np.zeros_like(m)) | m
    for a in planes:
        for b in planes:
            if a < b:
                assert s["pairs"].get((a, b), 0) == int((planes[a] & planes[b]).sum())
        own = 255 if a == 3 and unknown == "ignore" else a
        for v in set(np.unique(label[planes[a]]).tolist()) - {own, 0}:
            assert s["lost"].get((a, v), 0) == int((label[planes[a]] == v).sum()), (a, v)
