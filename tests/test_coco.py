"""Loading real-world COCO: every malformed record is named (file, image id, annotation id) in an
error under strict mode, and skipped-and-reported otherwise. The user's files are never touched."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.config import Masks
from pipeline.data.masks import build_mask_cache
from pipeline.data.coco import DataError, load_dataset
from tests.helpers import image, square, write_coco

pytestmark = pytest.mark.quick   # `make test-quick`: config, data, metrics, the model zoo in about a minute

CATS = ["UNKNOWN", "Paper", "Metal"]  # ids 0, 1, 2


def base(root: Path) -> dict:
    images = [image(0), image(1), image(2)]
    anns = [{"id": 10, "image_id": 0, "category_id": 1, "segmentation": square(0, 0, 4, 4)},
            {"id": 11, "image_id": 1, "category_id": 2, "segmentation": square(1, 1, 5, 5)},
            {"id": 12, "image_id": 2, "category_id": 0, "segmentation": square(2, 2, 6, 6)}]
    write_coco(root, images, anns, CATS)
    return json.loads((root / "train.json").read_text())


def rewrite(root: Path, coco: dict) -> None:
    (root / "train.json").write_text(json.dumps(coco))


def apply(root: Path, mutate) -> None:
    coco = base(root)
    mutate(coco, root)
    rewrite(root, coco)


def _ann(c, i):
    return c["annotations"][i]


# (case id, mutation of the json / files, issue kind, image id named, annotation id named)
ANNOTATION_CASES = [
    ("unknown_category", lambda c, r: _ann(c, 0).update(category_id=99), "unknown_category_id", 0, 10),
    ("unknown_image", lambda c, r: _ann(c, 0).update(image_id=42), "unknown_image_id", 42, 10),
    ("empty_segmentation", lambda c, r: _ann(c, 1).update(segmentation=[]), "bad_segmentation", 1, 11),
    ("odd_coordinates", lambda c, r: _ann(c, 1).update(segmentation=[[0, 0, 4, 0, 4]]), "bad_segmentation", 1, 11),
    ("two_points_only", lambda c, r: _ann(c, 1).update(segmentation=[[0, 0, 4, 4]]), "bad_segmentation", 1, 11),
    ("nan_coordinate", lambda c, r: _ann(c, 1).update(segmentation=[[0, 0, float("nan"), 0, 4, 4]]),
     "bad_segmentation", 1, 11),
    ("polygon_outside", lambda c, r: _ann(c, 2).update(segmentation=square(50, 50, 60, 60)), "bad_segmentation", 2, 12),
    ("rle_wrong_size", lambda c, r: _ann(c, 2).update(segmentation={"size": [4, 4], "counts": [16]}),
     "bad_segmentation", 2, 12),
    ("rle_bad_counts", lambda c, r: _ann(c, 2).update(segmentation={"size": [8, 10], "counts": [3, 3]}),
     "bad_segmentation", 2, 12),
    ("rle_malformed_string", lambda c, r: _ann(c, 2).update(segmentation={"size": [8, 10], "counts": "0"}),
     "bad_segmentation", 2, 12),                                # pycocotools would read past the string
    ("segmentation_wrong_type", lambda c, r: _ann(c, 2).update(segmentation="oops"), "bad_segmentation", 2, 12),
]
IMAGE_CASES = [
    ("duplicate_image_id", lambda c, r: c["images"][2].update(id=1), "duplicate_image_id", 1, None),
    ("missing_file", lambda c, r: (r / "imgs/001.png").unlink(), "missing_image", 1, None),
    ("corrupt_file", lambda c, r: (r / "imgs/001.png").write_bytes(b"not an image"), "corrupt_image", 1, None),
    ("size_mismatch", lambda c, r: Image.new("RGB", (12, 8)).save(r / "imgs/001.png"), "image_size_mismatch", 1, None),
    ("dotdot_file_name", lambda c, r: c["images"][1].update(file_name="../outside.png"), "unsafe_file_name", 1, None),
    ("absolute_file_name", lambda c, r: c["images"][1].update(file_name="/etc/passwd"), "unsafe_file_name", 1, None),
    ("bad_width", lambda c, r: c["images"][1].update(width="10"), "bad_image_size", 1, None),
]

BAD_RECORDS = pytest.mark.parametrize("case, mutate, kind, image_id, ann_id", ANNOTATION_CASES + IMAGE_CASES,
                                      ids=[c[0] for c in ANNOTATION_CASES + IMAGE_CASES])


@BAD_RECORDS
def test_bad_record_strict_error_names_it(tmp_path, case, mutate, kind, image_id, ann_id):
    apply(tmp_path, mutate)
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path, ["train.json"], strict=True)
    msg = str(err.value)
    assert f"train.json: {kind}: image_id={image_id}" in msg
    if ann_id is not None:
        assert f"ann_id={ann_id}" in msg
    assert "data.strict: false" in msg


@BAD_RECORDS
def test_bad_record_lenient_skips_and_reports(tmp_path, case, mutate, kind, image_id, ann_id):
    apply(tmp_path, mutate)
    ds = load_dataset(tmp_path, ["train.json"], strict=False)
    row = ds.issues[(ds.issues.kind == kind) & (ds.issues.severity == "error")]
    assert len(row) >= 1 and row.action.iloc[0] == "skipped"
    if ann_id is not None:  # only that annotation is gone
        assert ann_id not in set(ds.annotations.ann_id) and len(ds.annotations) == 2
    else:                   # the image is gone, and so are its annotations
        assert image_id not in set(ds.images.image_id) or kind == "duplicate_image_id"
        assert set(ds.annotations.key) <= set(ds.images.key)


@pytest.mark.parametrize("content, expected", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"images": []}', "missing top-level key 'categories'"),
    (b'{"images": {}, "categories": []}', "'images' must be a list"),
    (b'{"images": [], "annotations": [], "categories": [{"id": "a", "name": 1}]}', "categories[0] needs an integer 'id'"),
    (b'{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}',
     "category id 1 is used for both"),
    # without annotations every mask would be background: a labelled file must have the key
    (b'{"images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}], "categories": [{"id": 1, "name": "a"}]}',
     "missing top-level key 'annotations'"),
    (b'{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}', "no usable images"),
])
def test_unusable_files_fail_with_the_file_named(tmp_path, content, expected):
    (tmp_path / "train.json").write_bytes(content)
    with pytest.raises(DataError, match="train.json|no usable images") as err:
        load_dataset(tmp_path, ["train.json"], strict=False)
    assert expected in str(err.value)


def test_missing_json_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: file not found"):
        load_dataset(tmp_path, ["nope.json"])


def test_harmless_findings_are_notes_not_errors(tmp_path):
    coco = base(tmp_path)
    coco["images"].append(image(3))                                          # no annotations
    _ann(coco, 0)["bbox"] = [-5, -5, 100, 100]                               # box outside the image
    _ann(coco, 1)["segmentation"] = square(-2, -2, 5, 5)                     # polygon partly outside
    coco["annotations"].append(dict(_ann(coco, 2)))                          # verbatim duplicate
    coco["annotations"].append({**_ann(coco, 2), "segmentation": square(0, 0, 1, 1)})  # id reused
    write_coco(tmp_path, coco["images"], coco["annotations"], coco["categories"])
    ds = load_dataset(tmp_path, ["train.json"], strict=True)                 # no error
    kinds = set(ds.issues.kind)
    assert {"no_annotations", "bbox_outside_image", "polygon_note", "duplicate_annotation",
            "duplicate_annotation_id"} <= kinds
    assert set(ds.issues.severity) == {"info"}
    assert len(ds.images) == 4 and len(ds.annotations) == 4


def test_loading_never_modifies_the_dataset(tmp_path):
    coco = base(tmp_path)
    coco["annotations"][0]["category_id"] = 99
    rewrite(tmp_path, coco)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}
    modes = {p: p.stat().st_mode for p in [tmp_path, *tmp_path.rglob("*")]}
    for p in modes:                                   # the user's data, read-only: we never need to write it
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        ds = load_dataset(tmp_path, ["train.json"], strict=False)
        build_mask_cache(ds, tmp_path.parent / f"{tmp_path.name}-cache", Masks(), workers=1)
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}
    assert before == after


def test_train_and_val_json_form_one_pool(tmp_path):
    base(tmp_path)
    write_coco(tmp_path, [image(0, folder="val")],  # ids restart at 0 in val.json: keys are file names
               [{"image_id": 0, "category_id": 2, "segmentation": square(0, 0, 3, 3)}], CATS, name="val.json")
    ds = load_dataset(tmp_path, ["train.json", "val.json"])
    assert len(ds.images) == 4 and ds.images.key.is_unique
    assert ds.images.groupby("source").size().to_dict() == {"train.json": 3, "val.json": 1}
