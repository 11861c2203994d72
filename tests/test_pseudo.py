"""Pseudo-labels: confident pixels only, never for validation/holdout images, per-fold teachers."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pipeline.data.coco import DataError
from pipeline.inference.ensemble import Ensemble
from pipeline.data.dataset import round2_table
from pipeline.inference.pseudo import pseudo_label, unlabelled
from pipeline.config import Data, Pseudo
from pipeline.data.coco import load_test_set
from pipeline.models.checkpoint import InputSpec

SPEC = InputSpec(("Background", "a", "b"), max_side=None, eval_size=64, window=None)


class FixedLogits(nn.Module):
    """Class 1 with high confidence on the left half, a 50/50 guess on the right half."""

    def forward(self, x):
        n, _, h, w = x.shape
        out = torch.zeros(n, 3, h, w)
        out[:, 1, :, : w // 2] = 10.0
        out[:, 0, :, w // 2:] = 1.0
        out[:, 2, :, w // 2:] = 1.0
        return out


@pytest.fixture
def test_set(tmp_path):
    root = tmp_path / "data"
    (root / "test").mkdir(parents=True)
    images = []
    for i in range(3):
        cv2.imwrite(str(root / f"test/{i}.jpg"), np.full((64, 64, 3), 30 * i, np.uint8))
        images.append({"id": i, "file_name": f"test/{i}.jpg", "width": 64, "height": 64})
    (root / "test.json").write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    return load_test_set(Data(root=str(root)))


@pytest.mark.parametrize("min_kept, kept_images", [(0.0, 3), (0.4, 0)])
def test_tta_disagreement_is_not_confident(test_set, tmp_path, min_kept, kept_images):
    """With hflip, each half averages with the other's mirror: no pixel reaches 0.9."""
    teacher = Ensemble([(FixedLogits(), 1.0)], ["identity", "hflip"], [1.0], torch.device("cpu"), spec=SPEC)
    index, report = pseudo_label(teacher, test_set, tmp_path / "p", Pseudo(threshold=0.9, min_kept=min_kept))
    assert len(index) == kept_images
    assert report.set_index("class_idx").kept_fraction[1] == pytest.approx(0.0)   # hflip averages the halves
    if kept_images:
        mask = cv2.imread(index["mask"][0], cv2.IMREAD_UNCHANGED)
        assert (mask == 255).all() and index.kept_fraction.tolist() == [0.0] * 3


def test_identity_tta_keeps_the_confident_half(test_set, tmp_path):
    teacher = Ensemble([(FixedLogits(), 1.0)], ["identity"], [1.0], torch.device("cpu"), spec=SPEC)
    index, _ = pseudo_label(teacher, test_set, tmp_path / "tmp", Pseudo(threshold=0.9, min_kept=0.4),
                            final_dir=tmp_path / "final")
    assert index["mask"][0].startswith(str(tmp_path / "final"))     # where the folder lives after the rename
    (tmp_path / "tmp").rename(tmp_path / "final")
    mask = cv2.imread(index["mask"][0], cv2.IMREAD_UNCHANGED)
    assert (mask[:, :32] == 1).all() and (mask[:, 32:] == 255).all()      # unsure pixels are ignored
    assert index.kept_fraction.tolist() == [0.5] * 3 and index.px_255.tolist() == [64 * 32] * 3


def test_test_images_in_the_labelled_pool_are_left_out(test_set, tmp_path):
    pd.DataFrame({"key": ["test/1.jpg", "batch/0.jpg"]}).to_csv(tmp_path / "folds.csv", index=False)
    kept, left_out = unlabelled(test_set, tmp_path / "folds.csv")
    assert left_out == ["test/1.jpg"] and "test/1.jpg" not in set(kept.image_id)


def test_a_renamed_copy_of_a_labelled_image_is_left_out(test_set, tmp_path):
    """test/2.jpg is byte-identical to the labelled batch/0.jpg: pseudo-labelling it would train on
    a validation or holdout image under another name."""
    root = tmp_path / "data"
    (root / "batch").mkdir()
    (root / "batch/0.jpg").write_bytes((root / "test/2.jpg").read_bytes())
    cv2.imwrite(str(root / "batch/1.jpg"), np.full((64, 64, 3), 200, np.uint8))
    pd.DataFrame({"key": ["batch/0.jpg", "batch/1.jpg", "batch/gone.jpg"]}).to_csv(tmp_path / "folds.csv", index=False)
    kept, left_out = unlabelled(test_set, tmp_path / "folds.csv", root)
    assert left_out == ["test/2.jpg"] and kept.image_id.tolist() == ["test/0.jpg", "test/1.jpg"]
    assert unlabelled(test_set, tmp_path / "folds.csv")[1] == []      # by name alone it passes


def test_round2_never_trains_on_validation_or_holdout(tmp_path):
    train = pd.DataFrame({"key": ["a", "b"], "image": ["a", "b"], "mask": ["a", "b"]})
    pd.DataFrame({"key": ["pseudo/t1.jpg"], "image": ["t1"], "mask": ["m1"], "kept_fraction": [0.9]}).to_csv(
        tmp_path / "ok.csv", index=False)
    both = round2_table(train, tmp_path / "ok.csv", {"v"}, {"h"})
    assert both.key.tolist() == ["a", "b", "pseudo/t1.jpg"]
    pd.DataFrame({"key": ["pseudo/v"], "image": ["v"], "mask": ["m"], "kept_fraction": [0.9]}).to_csv(
        tmp_path / "leak.csv", index=False)
    with pytest.raises(DataError, match="pseudo-labels for validation/holdout images"):
        round2_table(train, tmp_path / "leak.csv", {"v"}, {"h"})
