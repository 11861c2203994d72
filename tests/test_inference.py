"""TTA, ensembles, the submission file and predict: invariants with known answers."""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from tests.helpers import image, square, write_coco

from pipeline.config import Masks
from pipeline.data.coco import DataError, load_dataset
from pipeline.data.masks import build_mask_cache
from pipeline.evaluation.scoring import score
from pipeline.inference.ensemble import Ensemble
from pipeline.config import Data
from pipeline.data.coco import load_test_set
from pipeline.inference.submission import check_output_dir, predict_folder, write_submission
from pipeline.models.checkpoint import InputSpec
from pipeline.inference.tta import D4, TTA, expand, tta_proba


@pytest.mark.parametrize("name", sorted(TTA))
def test_deaugment_undoes_augment(name):
    x = torch.randn(2, 3, 32, 64)                  # not square: rotations change the shape
    aug, deaug = TTA[name]
    assert torch.equal(deaug(aug(x)), x)


def test_d4_views_are_the_8_distinct_symmetries():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    outs = {tuple(TTA[v][0](x).flatten().tolist()) for v in expand(["d4"])}
    assert len(expand(["d4", "hflip"])) == 8 and len(outs) == 8 and set(expand(["d4"])) == set(D4)
    with pytest.raises(ValueError, match="unknown TTA view"):
        expand(["mirror"])


class PixelModel(nn.Module):
    """Per-pixel (1x1) classifier: equivariant to every flip, rotation and (nearly) to resizing."""

    def __init__(self, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x):
        return self.conv(x)


def test_tta_on_an_equivariant_model_changes_nothing():
    model, x = PixelModel().eval(), torch.randn(2, 3, 64, 96)
    single = tta_proba(model, x)
    assert torch.allclose(tta_proba(model, x, ["d4"]), single, atol=1e-6)
    multi = tta_proba(model, x, ["identity", "hflip"], [0.5, 1.0, 1.5])
    assert multi.shape == single.shape and torch.allclose(multi.sum(1), torch.ones(2, 64, 96), atol=1e-5)


def test_tta_passes_per_device(monkeypatch):
    calls = []
    model = PixelModel().eval()
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    tta_proba(model, torch.randn(2, 3, 32, 32), ["d4"])
    assert calls == [2] * 8                         # CPU: one pass per view
    calls.clear()
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    tta_proba(model, torch.randn(2, 3, 32, 48), ["identity", "hflip", "rot90"])
    assert calls == [4, 2]                          # "CUDA": same-shape views batched together


def test_ensemble_of_identical_models_is_the_model():
    x = torch.randn(2, 3, 32, 32)
    one = Ensemble([(PixelModel(seed=1).eval(), 1.0)], ["identity"], [1.0], torch.device("cpu"))
    three = Ensemble([(PixelModel(seed=1).eval(), w) for w in (1.0, 2.0, 0.5)], ["identity"], [1.0],
                     torch.device("cpu"))
    assert torch.allclose(one.proba(x), three.proba(x), atol=1e-6)
    mixed = Ensemble([(PixelModel(seed=1).eval(), 1.0), (PixelModel(seed=2).eval(), 3.0)], ["identity"], [1.0],
                     torch.device("cpu")).proba(x)
    a = Ensemble([(PixelModel(seed=1).eval(), 1.0)], ["identity"], [1.0], torch.device("cpu")).proba(x)
    b = Ensemble([(PixelModel(seed=2).eval(), 1.0)], ["identity"], [1.0], torch.device("cpu")).proba(x)
    assert torch.allclose(mixed, 0.25 * a + 0.75 * b, atol=1e-6)


class ConstantModel(nn.Module):
    """Predicts class `c` at every pixel, whatever the input."""

    def __init__(self, c, classes=3):
        super().__init__()
        self.c, self.classes = c, classes

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.classes, *x.shape[-2:])
        out[:, self.c] = 10.0
        return out


def test_score_counts_every_pixel_of_every_size_once(tmp_path):
    """Images of three sizes; a model that always says class 2: the confusion's column 2 holds each
    mask's own pixels (at the cached size), row by row equal to the index's per-class pixel counts."""
    images = [image(0, w=10, h=8), image(1, w=20, h=12), image(2, w=7, h=15)]
    anns = [{"image_id": 0, "category_id": 0, "segmentation": square(1, 1, 5, 4)},
            {"image_id": 1, "category_id": 1, "segmentation": square(2, 2, 12, 10)},
            {"image_id": 2, "category_id": 0, "segmentation": square(0, 0, 7, 3)}]
    write_coco(tmp_path / "data", images, anns, ["a", "b"])
    table = build_mask_cache(load_dataset(tmp_path / "data", ["train.json"]), tmp_path / "masks", Masks(), workers=1)
    ens = Ensemble([(ConstantModel(2), 1.0)], ["identity"], [1.0], torch.device("cpu"), spec=InputSpec(("bg", "a", "b"), None, 32, None))
    cm, rate = score(ens, table, 2)
    mat = cm.numpy()
    assert mat.sum() == 80 + 240 + 105 and rate > 0
    assert mat[:, [0, 1]].sum() == 0 and mat[:, 2].tolist() == [table[f"px_{c}"].sum() for c in range(3)]
    assert mat[:, 2].tolist() == [80 + 240 + 105 - 12 - 80 - 21, 12 + 21, 80]


@pytest.fixture
def test_set(tmp_path):
    root = tmp_path / "data"
    (root / "test").mkdir(parents=True)
    images = []
    for i, (w, h) in enumerate([(64, 64), (96, 64), (64, 128)]):
        cv2.imwrite(str(root / f"test/{i}.jpg"), np.full((h, w, 3), 40 * i, np.uint8))
        images.append({"id": i, "file_name": f"test/{i}.jpg", "width": w, "height": h})
    (root / "test.json").write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    return root


@pytest.mark.parametrize("framing", ["resize", "slide"])
def test_submission_format(test_set, tmp_path, framing):
    """Whole images resized to the model's 64, or seen by sliding 32-pixel windows (a model trained on
    crops): either way one 256 x 256 class map per test image, in test.json's order."""
    from pipeline.inference.slide import SlidingWindow

    images = load_test_set(Data(root=str(test_set)))
    model = PixelModel(classes=12).eval()
    member, size = (model, 64) if framing == "resize" else (SlidingWindow(model, 32, 1 / 3), None)
    ens = Ensemble([(member, 1.0)], ["identity", "hflip"], [1.0], torch.device("cpu"), spec=InputSpec(tuple(f"c{i}" for i in range(12)), None, size, None))
    kept = write_submission(ens, images, tmp_path / "submission.csv", size=256, keep=2)
    csv.field_size_limit(10**7)   # a row holds 65,536 numbers: more than csv's default field limit
    rows = list(csv.reader(open(tmp_path / "submission.csv")))
    assert rows[0] == ["image_id", "PredictionString"]
    assert [r[0] for r in rows[1:]] == ["test/0.jpg", "test/1.jpg", "test/2.jpg"]   # test.json order and names
    for _, pred in rows[1:]:
        values = [int(v) for v in pred.split(" ")]
        assert len(values) == 256 * 256 and 0 <= min(values) and max(values) < 12
    assert kept[1].shape == (64, 96) and set(kept) == {0, 1}                        # at the image's own size


def test_missing_test_image_is_an_error(test_set):
    (test_set / "test/1.jpg").unlink()
    with pytest.raises(DataError, match=r"(?s)1 unusable test image.*missing_image: image_id=1 .*test/1.jpg not found"):
        load_test_set(Data(root=str(test_set)))


def test_predict_refuses_to_write_into_its_inputs(test_set, tmp_path):
    for out in (test_set, test_set / "test" / "preds", tmp_path):
        with pytest.raises(DataError, match="overlaps --images"):
            check_output_dir(test_set / "test", out) if out != tmp_path else check_output_dir(tmp_path / "data", out)
    ens = Ensemble([(PixelModel(classes=3).eval(), 1.0)], ["identity"], [1.0], torch.device("cpu"), spec=InputSpec(("bg", "a", "b"), None, 64, None))
    n = predict_folder(ens, test_set / "test", tmp_path / "out")
    assert n == 3
    pred = cv2.imread(str(tmp_path / "out/1.png"), cv2.IMREAD_UNCHANGED)
    assert pred.shape == (64, 96) and pred.max() < 3 and (tmp_path / "out/1_overlay.jpg").exists()


def test_predict_refuses_names_that_would_overwrite_each_other(test_set, tmp_path):
    """0.jpg and 0.png would both become 0.png: a clear error before any prediction is written."""
    cv2.imwrite(str(test_set / "test/0.png"), np.zeros((8, 8, 3), np.uint8))
    ens = Ensemble([(PixelModel(classes=3).eval(), 1.0)], ["identity"], [1.0], torch.device("cpu"))
    with pytest.raises(DataError, match=r"0\.jpg, 0\.png differ only by extension"):
        predict_folder(ens, test_set / "test", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_test_time_images_are_prepared_exactly_as_validation_images(tmp_path):
    """With masks.max_side set, submit, predict and pseudo-labelling feed the model the very tensor
    validation fed it (cache: INTER_AREA to max_side, then the validation transform) — not a
    full-size decode squashed straight to the model size."""
    import cv2

    from pipeline.data.augment import build_transform
    from pipeline.data.coco import load_dataset
    from pipeline.data.dataset import SegDataset
    from pipeline.data.masks import build_mask_cache, decode_oriented
    from pipeline.inference.ensemble import ImageFiles, image_files
    from tests.helpers import square, write_coco

    root = tmp_path / "ds"
    root.mkdir()
    rng = np.random.default_rng(0)
    photo = cv2.resize(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8), (160, 96), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(root / "p.jpg"), photo)
    write_coco(root, [{"id": 0, "file_name": "p.jpg", "width": 160, "height": 96}],
               [{"image_id": 0, "category_id": 1, "segmentation": square(10, 10, 60, 50)}], ["a", "b"],
               write_images=False)
    index = build_mask_cache(load_dataset(root, ["train.json"]), tmp_path / "cache", Masks(max_side=64), workers=1)
    validation = SegDataset(index, build_transform([], 32)).load(0)[0]
    test = pd.DataFrame({"path": [str(root / "p.jpg")], "height": [96], "width": [160]})
    assert torch.equal(image_files(test, 32, 64)[0][0], validation)
    before = ImageFiles(lambda i: decode_oriented(test.path[i], 96, 160), 1, 32)[0][0]   # the old test-time path
    assert not torch.equal(before, validation)
