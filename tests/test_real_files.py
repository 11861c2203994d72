"""What real datasets bring (issue: crowded images, broken files, standard layouts): each case has a
known answer — an exact pixel count, a named error, or a reported skip."""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import Masks, Data
from pipeline.data.coco import DataError, load_dataset, load_test_set
from pipeline.labels import MAX_CLASSES
from pipeline.data.eda import analyse
from pipeline.data.masks import build_mask_cache, decode_oriented, image_label
from tests.helpers import square, write_coco


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h (a decompression bomb needs no pixel data to be dangerous)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))


def test_an_image_with_300_annotations_is_painted_exactly(tmp_path):
    """pycocotools overflows on 256+ shapes in one call; 300 disjoint 2x2 squares must give 1,200 px."""
    anns = [{"image_id": 0, "category_id": i % 2, "segmentation": square(2 * (i % 30), 2 * (i // 30), 2 * (i % 30) + 2,
                                                                           2 * (i // 30) + 2)} for i in range(300)]
    anns.append({"image_id": 0, "category_id": 0, "segmentation": [square(0, 0, 1, 1)[0] for _ in range(260)]})  # 260 parts
    write_coco(tmp_path, [{"id": 0, "file_name": "a.png", "width": 60, "height": 20}], anns, ["a", "b"])
    ds = load_dataset(tmp_path, ["train.json"])
    label = image_label(ds.annotations, (20, 60), (20, 60), "smaller_on_top", None, "keep")
    assert np.count_nonzero(label == 1) == 600 and np.count_nonzero(label == 2) == 600
    index = build_mask_cache(ds, tmp_path / "cache", Masks(), workers=1)
    assert index.px_1.iloc[0] == 600 and index.px_2.iloc[0] == 600 and index.n_annotations.iloc[0] == 301
    eda = analyse(ds, "smaller_on_top")
    assert eda.summary["annotations_per_image"]["max"] == 301


def test_more_classes_than_a_mask_holds_is_a_clear_error(tmp_path):
    write_coco(tmp_path, [{"id": 0, "file_name": "a.png", "width": 4, "height": 4}], [], [f"c{i}" for i in range(MAX_CLASSES)])
    assert load_dataset(tmp_path, ["train.json"]).num_classes == MAX_CLASSES + 1          # 254 + background fit
    write_coco(tmp_path, [{"id": 0, "file_name": "a.png", "width": 4, "height": 4}], [], [f"c{i}" for i in range(MAX_CLASSES + 1)])
    with pytest.raises(DataError, match=r"train.json: 255 distinct category names; masks are uint8, so at most 254"):
        load_dataset(tmp_path, ["train.json"])


def _two_images(root: Path, fmt: str = "jpg") -> None:
    images = [{"id": i, "file_name": f"{i}.{fmt}", "width": 48, "height": 40} for i in range(2)]
    write_coco(root, images, [{"image_id": i, "category_id": 0, "segmentation": square(4, 4, 20, 20)} for i in range(2)], ["a"],
               write_images=False)
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(root / f"{i}.{fmt}"), rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt, keep_bytes", [("jpg", 0.7), ("png", 0.7), ("jpg", 0.05)])
def test_a_truncated_image_is_an_error_or_a_reported_skip(tmp_path, fmt, keep_bytes):
    """Decoders fill a cut JPEG with gray and succeed; the loader must not."""
    _two_images(tmp_path, fmt)
    data = (tmp_path / f"1.{fmt}").read_bytes()
    (tmp_path / f"1.{fmt}").write_bytes(data[: int(len(data) * keep_bytes)])
    with pytest.raises(DataError, match=rf"corrupt_image: image_id=1 ann_id=: image file .*1\.{fmt}"):
        load_dataset(tmp_path, ["train.json"])
    ds = load_dataset(tmp_path, ["train.json"], strict=False)
    assert ds.images.key.tolist() == [f"0.{fmt}"] and ds.issues.kind.tolist().count("corrupt_image") == 1


def test_a_whole_jpeg_with_bytes_after_its_end_is_fine(tmp_path):
    """Phones append data after the JPEG's end marker (Samsung trailers, motion photos)."""
    _two_images(tmp_path)
    with open(tmp_path / "1.jpg", "ab") as f:
        f.write(os.urandom(200_000))
    assert len(load_dataset(tmp_path, ["train.json"]).images) == 2


def test_decompression_bomb_and_huge_numbers_are_named(tmp_path):
    _two_images(tmp_path, "png")
    coco = json.loads((tmp_path / "train.json").read_text())
    coco["images"][1].update(width=20000, height=20000)
    _png_header_only(tmp_path / "1.png", 20000, 20000)
    (tmp_path / "train.json").write_text(json.dumps(coco).replace('"segmentation": [[4, 4, 20, 4',
                                                                  '"segmentation": [[4' + "0" * 400 + ', 4, 20, 4', 1))
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path, ["train.json"])
    msg = str(err.value)
    assert "image_too_large: image_id=1" in msg and "decompression bomb" in msg
    assert "bad_segmentation: image_id=0 ann_id=0: polygon part 0 has NaN, infinite or out-of-range" in msg
    ds = load_dataset(tmp_path, ["train.json"], strict=False)
    assert ds.images.key.tolist() == ["0.png"] and ds.annotations.empty


def test_names_differing_only_by_extension_are_two_images(tmp_path):
    images = [{"id": 1, "file_name": "0001.jpg", "width": 16, "height": 8},
              {"id": 2, "file_name": "0001.png", "width": 16, "height": 8}]
    write_coco(tmp_path, images, [{"image_id": 1, "category_id": 0, "segmentation": square(0, 0, 4, 4)},
                                  {"image_id": 2, "category_id": 1, "segmentation": square(0, 0, 8, 8)}], ["a", "b"])
    index = build_mask_cache(load_dataset(tmp_path, ["train.json"]), tmp_path / "cache", Masks(), workers=1).set_index("key")
    assert index["mask"].nunique() == 2 and index["image"].nunique() == 2
    assert (index.px_1["0001.jpg"], index.px_2["0001.png"]) == (16, 64)
    assert cv2.imread(index["mask"]["0001.png"], cv2.IMREAD_UNCHANGED).max() == 2


def test_a_fifo_is_an_error_not_a_hang(tmp_path):
    _two_images(tmp_path)
    (tmp_path / "1.jpg").unlink()
    os.mkfifo(tmp_path / "1.jpg")
    with pytest.raises(DataError, match=r"not_a_file: image_id=1 ann_id=: .*1\.jpg is not a regular file"):
        load_dataset(tmp_path, ["train.json"])


def test_lenient_mode_with_nothing_left_lists_the_problems(tmp_path):
    _two_images(tmp_path)
    for i in range(2):
        (tmp_path / f"{i}.jpg").unlink()
    with pytest.raises(DataError, match=r"(?s)every image was skipped \(2 problems\).*missing_image: image_id=0 ann_id=: "):
        load_dataset(tmp_path, ["train.json"], strict=False)


def test_ids_are_reported_as_written(tmp_path):
    _two_images(tmp_path)
    coco = json.loads((tmp_path / "train.json").read_text())
    coco["annotations"][1]["category_id"] = 7
    (tmp_path / "train.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"unknown_category_id: image_id=1 ann_id=1: "):
        load_dataset(tmp_path, ["train.json"])
    issues = load_dataset(tmp_path, ["train.json"], strict=False).issues
    assert issues.ann_id.tolist() == [1, None] and issues.image_id.tolist() == [1, 1]   # the error, then "no annotations"
    assert issues.to_csv(index=False).splitlines()[1].startswith("error,unknown_category_id,train.json,1,1,")


def test_standard_coco_layout_one_folder_per_json(tmp_path):
    """images/train2017 and images/val2017 with bare file names (the same name in both folders)."""
    (tmp_path / "annotations").mkdir()
    for split, n in (("train2017", 3), ("val2017", 2)):
        images = [{"id": i, "file_name": f"{i:012d}.png", "width": 10, "height": 8, } for i in range(n)]
        for im in images:
            (tmp_path / "images" / split).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (10, 8)).save(tmp_path / "images" / split / im["file_name"])
        write_coco(tmp_path, images, [{"image_id": 0, "category_id": 0, "segmentation": square(0, 0, 2, 2)}], ["a"],
                   name=f"annotations/instances_{split}.json", write_images=False)
    (tmp_path / "annotations/image_info_test2017.json").write_text(json.dumps(
        {"images": [{"id": 9, "file_name": "000000000000.png", "width": 10, "height": 8}], "categories": []}))
    (tmp_path / "images/test2017").mkdir()
    Image.new("RGB", (10, 8)).save(tmp_path / "images/test2017/000000000000.png")
    data = Data(root=str(tmp_path), train_json="annotations/instances_train2017.json",
                val_json="annotations/instances_val2017.json", test_json="annotations/image_info_test2017.json",
                image_dir={"train": "images/train2017", "val": "images/val2017", "test": "images/test2017"})
    from pipeline.data.corrections import dataset_from_params
    ds = dataset_from_params(data)
    assert len(ds.images) == 5 and ds.images.key.is_unique
    assert ds.images.key.iloc[3] == "images/val2017/000000000000.png"
    assert ds.annotations.key.tolist() == ["images/train2017/000000000000.png", "images/val2017/000000000000.png"]
    test = load_test_set(data)
    assert test.key.tolist() == ["images/test2017/000000000000.png"] and test.image_id.tolist() == ["000000000000.png"]


def test_a_broken_test_set_fails_the_masks_stage(tmp_path, monkeypatch):
    """The test json is first needed after training; it is checked in the first data stage."""
    import yaml

    from stages import masks as stage

    _two_images(tmp_path / "d")
    (tmp_path / "d/test.json").write_text(json.dumps({"images": [{"id": 5, "file_name": "gone.jpg", "width": 4,
                                                                  "height": 4}], "categories": []}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"root": str(tmp_path / "d")},
                                                          "paths": {"masks": str(tmp_path / "m"),
                                                                    "metrics": str(tmp_path / "metrics")}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"(?s)test.json: 1 unusable test image.*missing_image: image_id=5"):
        stage.main()
    assert not (tmp_path / "m").exists()


def test_capped_jpeg_decoding_matches_a_full_decode(tmp_path):
    """JPEGs shrunk a lot are decoded at reduced DCT scale, and only where that keeps the detail of a
    full decode + INTER_AREA: a fine texture (like leaves) keeps >= 90 % of its Laplacian energy at
    every output size; decoding at any scale that fits (the old rule) kept 75-87 % where a 1.6-2x
    INTER_AREA was left to do."""
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 255, (600, 803, 3), dtype=np.uint8), (0, 0), 1.6)
    cv2.imwrite(str(tmp_path / "a.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    full = cv2.cvtColor(cv2.imread(str(tmp_path / "a.jpg")), cv2.COLOR_BGR2RGB)

    def detail(x):
        return np.abs(cv2.Laplacian(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float32), cv2.CV_32F)).mean()

    for out_hw in [(600, 803), (375, 502), (300, 402), (188, 251), (150, 201), (75, 100), (37, 50)]:
        fast = decode_oriented(str(tmp_path / "a.jpg"), 600, 803, out_hw)
        ref = cv2.resize(full, out_hw[::-1], interpolation=cv2.INTER_AREA)
        assert fast.shape == (*out_hw, 3)
        assert np.abs(fast.astype(int) - ref).mean() < 3, out_hw   # about 1 % of the range on average
        assert detail(fast) >= 0.9 * detail(ref), (out_hw, detail(fast), detail(ref))


def test_dct_scale_known_answers():
    from pipeline.data.masks import dct_scale

    assert dct_scale(1024, 1024, 320, 320)[0] == 1      # 512 would leave a 1.6x INTER_AREA: full decode
    assert dct_scale(1024, 1024, 256, 256)[0] == 4      # an exact fit: no resize left
    assert dct_scale(1024, 1024, 160, 160)[0] == 2      # 512 is 3.2x
    assert dct_scale(3024, 4032, 384, 512)[0] == 2      # 12 MP to 512: 1512x2016, >= 3x
    assert dct_scale(3024, 4032, 768, 1024)[0] == 1
    assert dct_scale(1024, 1024, 32, 32)[0] == 8
    assert dct_scale(1024, 1024, 320, 320, min_factor=1)[0] == 2   # near-dup thumbnails: speed first


def test_progress_lines_say_rate_and_eta(monkeypatch):
    from pipeline import io

    clock = iter(range(0, 1000, 4))   # every item takes 4 s
    monkeypatch.setattr(io.time, "monotonic", lambda: next(clock))
    lines: list[str] = []
    assert list(io.progress(range(10), 10, "masks", every_s=10, log=lines.append)) == list(range(10))
    assert lines[0] == "masks: 3/10 (30%), 0.2/s, elapsed 12s, ETA 28s"
    assert lines[-1].startswith("masks: 10/10 (100%)") and "ETA" not in lines[-1]


def test_the_cache_stops_before_writing_when_the_disk_is_too_small(tmp_path, monkeypatch):
    from pipeline.data import masks

    _two_images(tmp_path)
    ds = load_dataset(tmp_path, ["train.json"])
    monkeypatch.setattr(masks.shutil, "disk_usage", lambda p: type("u", (), {"free": 5000})())
    with pytest.raises(DataError, match=r"the cache needs about 0 MB but only 0 MB are free.*masks.max_side"):
        build_mask_cache(ds, tmp_path / "cache", Masks(), workers=1)
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob("cache.tmp-*"))
    assert masks.cache_bytes(pd.DataFrame({"height": [40, 40], "width": [48, 48], "image": ["a.npy", "b.jpg"]})) == \
        (40 * 48 * 3 + 128, int(2 * 40 * 48 * masks.MASK_BYTES_PER_PX))
