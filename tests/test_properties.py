"""Property-based tests (hypothesis) over the annotation -> mask path: for any rectangles the mask is
exactly their painted union with the smallest on top, whatever the order; for any garbage
segmentation the loader either paints a valid mask or reports the annotation — never a traceback."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.data.coco import DataError, load_dataset
from pipeline.data.masks import image_label, unknown_class_index
from tests.conftest import image, square, write_coco

W, H = 16, 12
CATS = [{"id": 0, "name": "UNKNOWN"}, {"id": 5, "name": "Paper"}, {"id": 9, "name": "Plastic bag"}]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load(anns: list[dict], strict: bool = False):
    with tempfile.TemporaryDirectory() as tmp:
        write_coco(Path(tmp), [image(0, W, H)], anns, CATS)
        ds = load_dataset(Path(tmp), ["train.json"], strict=strict)
    a = ds.annotations
    label = image_label(a, H, W, (H, W), "smaller_on_top", unknown_class_index(ds.classes, "UNKNOWN"), "keep")
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
