"""Metrics: a hand-computed answer, torchmetrics agreement, dataset-level (not per-batch) means."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from pipeline.evaluation.metrics import ConfusionMatrix, flat_scores, scores

pytestmark = pytest.mark.quick   # `make test-quick`: config, data, metrics, the model zoo in about a minute

NAMES = ["bg", "a", "b", "c"]


def test_known_answer_and_absent_classes():
    target = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 3]])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    s = scores(cm.numpy(), NAMES)
    # (truth, pred) pairs: (0,0) (0,1) (1,1) (1,1) (0,0) (2,2) (2,0); the 255 pixel is skipped, so its
    # prediction "c" does not count. bg: tp 2, truth 3, pred 3 -> 2/4; a: tp 2, truth 2, pred 3 -> 2/3;
    # b: tp 1, truth 2, pred 1 -> 1/2; c: absent from truth and prediction -> no IoU.
    assert s["IoU"]["bg"] == pytest.approx(2 / 4) and s["IoU"]["a"] == pytest.approx(2 / 3)
    assert s["IoU"]["b"] == pytest.approx(1 / 2) and s["IoU"]["c"] is None   # c: absent from truth and prediction
    assert s["mIoU"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert s["pixel_acc"] == pytest.approx(5 / 7) and s["mean_acc"] == pytest.approx((2 / 3 + 1 + 0.5) / 3)
    assert s["fwIoU"] == pytest.approx(3 / 7 * 0.5 + 2 / 7 * 2 / 3 + 2 / 7 * 0.5)
    assert flat_scores(s, "val")["val/IoU/a"] == pytest.approx(2 / 3) and "val/IoU/c" not in flat_scores(s, "val")


def test_equals_torchmetrics():
    g = torch.Generator().manual_seed(0)
    cm = ConfusionMatrix(4)
    jac = MulticlassJaccardIndex(4, average=None, ignore_index=255)
    acc_micro = MulticlassAccuracy(4, average="micro", ignore_index=255)
    acc_macro = MulticlassAccuracy(4, average="macro", ignore_index=255)
    for _ in range(5):
        target = torch.randint(0, 4, (3, 16, 16), generator=g)
        target[target == 3] = torch.where(torch.rand(target[target == 3].shape, generator=g) < 0.3, 255, 3)
        pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target.clamp(max=3), torch.randint(0, 4, target.shape, generator=g))
        cm.update(pred, target)
        jac.update(pred, target)
        acc_micro.update(pred, target)
        acc_macro.update(pred, target)
    s = scores(cm.numpy(), NAMES)
    assert np.allclose([s["IoU"][n] for n in NAMES], jac.compute().numpy(), atol=1e-6)
    assert s["mIoU"] == pytest.approx(jac.compute().mean().item(), abs=1e-6)
    assert s["pixel_acc"] == pytest.approx(acc_micro.compute().item(), abs=1e-6)
    assert s["mean_acc"] == pytest.approx(acc_macro.compute().item(), abs=1e-6)


def test_dataset_level_not_mean_of_batches():
    big_t, big_p = torch.ones(100, dtype=torch.long), torch.ones(100, dtype=torch.long)
    small_t, small_p = torch.full((4,), 2), torch.zeros(4, dtype=torch.long)
    cm = ConfusionMatrix(3)
    cm.update(big_p, big_t)
    cm.update(small_p, small_t)
    per_batch = np.mean([scores(ConfusionMatrix(3).merge(_cm(p, t)).numpy(), ["bg", "a", "b"])["pixel_acc"]
                         for p, t in ((big_p, big_t), (small_p, small_t))])
    assert scores(cm.numpy(), ["bg", "a", "b"])["pixel_acc"] == pytest.approx(100 / 104)
    assert per_batch == pytest.approx(0.5)


def _cm(p, t):
    c = ConfusionMatrix(3)
    c.update(p, t)
    return c


def test_cv_sums_every_fold_and_seed_and_reports_each(tmp_path):
    from pipeline.data.coco import DataError
    from pipeline.evaluation.cv import cv_scores
    from pipeline.models.checkpoint import ModelSet
    from pipeline.workspace import Member

    classes = ["Background", "a"]
    right, wrong = np.array([[5, 0], [0, 5]]), np.array([[0, 5], [5, 0]])
    for (k, s), m in {(0, 0): right, (1, 0): right, (0, 1): wrong, (1, 1): right}.items():
        Member.of(tmp_path, k, s).dir.mkdir(parents=True)
        np.save(Member.of(tmp_path, k, s).val_confusion(), m)
    out = cv_scores(ModelSet(tmp_path, (0, 1), (0, 1)), classes)
    assert out["per_seed_mIoU"] == {"0": 1.0, "1": pytest.approx(0.5 * (1 / 3 + 1 / 3))}
    assert out["confusion"] == (3 * right + wrong).tolist() and out["per_fold_mIoU"]["1"] == 1.0
    with pytest.raises(DataError, match=r"train@2-0"):
        cv_scores(ModelSet(tmp_path, (2,), (0,)), classes)


def test_per_image_ious_and_each_class_worst_image_known_answer():
    from pipeline.evaluation.metrics import image_ious, worst_per_class

    def conf(pairs, c=3):
        m = np.zeros((c, c), np.int64)
        for (t, p), n in pairs.items():
            m[t, p] = n
        return m

    per_image = np.stack([
        conf({(0, 0): 90, (1, 1): 10}),                 # class 1 perfect
        conf({(0, 0): 80, (1, 1): 5, (1, 0): 15}),     # class 1: 5 / 20
        conf({(0, 0): 70, (2, 2): 20, (2, 1): 10}),    # class 2: 20 / 30; class 1 predicted, absent: IoU 0
        conf({(0, 0): 100}),                           # background only
    ])
    iou = image_ious(per_image)
    assert iou[0, 1] == 1.0 and iou[1, 1] == 0.25 and iou[2, 2] == pytest.approx(2 / 3) and iou[2, 1] == 0.0
    assert np.isnan(iou[3, 1]) and np.isnan(iou[0, 2])
    # fold IoU: class 1 = 15 / (25 + 25 - 15) = 0.43, class 2 = 20 / 30 = 0.67: class 1's worst first;
    # image 2 (class 1 only predicted, not in its truth) is never class 1's "worst".
    assert worst_per_class(per_image, 5) == [(1, 1, 0.25), (2, 2, pytest.approx(2 / 3))]
    assert worst_per_class(per_image, 1) == [(1, 1, 0.25)]


def test_one_truth_for_what_is_submitted():
    """The report's cards, the leaderboard and the parent run read the submitted variant by its id,
    never the best holdout row; with a blend of several experiments, the blend is what is submitted."""
    from pipeline.evaluation.headline import headline as dvc_headline, parent_metrics, submitted
    from pipeline.evaluation.report import headline

    ens = {"submitted": {"id": "final_postprocess", "variant": "final + postprocess", "mIoU": 0.45, "metric": 0.45,
                         "metric_name": "mIoU", "ci95_low": 0.4, "ci95_high": 0.5}, "train_min": 3.5,
           "variants": {"holdout/kfold": {"mIoU": 0.5}, "holdout/final_postprocess": {"mIoU": 0.45}}}
    head = headline({"mIoU": 0.42}, ens)
    assert head["submitted"] == {"id": "final_postprocess", "mIoU": 0.45, "ci95": (0.4, 0.5), "metric_name": "mIoU",
                                 "metric": 0.45}
    assert head["cv"] == {"name": "mIoU", "value": 0.42, "ci95": None}
    assert submitted(ens, {"experiments": 1, "mIoU": 0.3})["id"] == "final_postprocess"
    assert submitted(ens, {"experiments": 2, "mIoU": 0.6}) == {"id": "blend_of_2_experiments", "mIoU": 0.6, "ci95": None,
                                                               "metric_name": "mIoU", "metric": 0.6}
    assert headline({}, {})["submitted"] == {} and headline({}, {})["cv_mIoU"] is None
    assert parent_metrics("submit", {"ensemble": ens}) == {"holdout/mIoU": 0.45, "train/minutes": 3.5,
                                                           "holdout/mIoU_ci95_low": 0.4, "holdout/mIoU_ci95_high": 0.5}
    # DVC reads the headline only: the variant table stays in the details
    assert dvc_headline("ensemble", {"ensemble": ens}) == {"ensemble": {"submitted": ens["submitted"], "train_min": 3.5}}


def test_parent_run_metrics_are_each_under_one_name():
    from pipeline.evaluation.headline import HEADLINE, headline, parent_metrics

    cv = {"cv": {"mIoU": 0.6, "pixel_acc": 0.9, "mean_acc": 0.7, "fwIoU": 0.8, "per_fold_mIoU": {"0": 0.5},
                 "IoU": {"Background": 0.9, "Paper": 0.3},
                 "metric": {"name": "mIoU", "value": 0.6, "ci95_low": 0.55, "ci95_high": 0.65, "images": 9,
                            "shakeup": {"sd": 0.01}}}}
    assert parent_metrics("cv", cv) == {"cv/mIoU": 0.6, "cv/pixel_acc": 0.9, "cv/mean_acc": 0.7, "cv/mIoU_ci95_low": 0.55,
                                        "cv/mIoU_ci95_high": 0.65, "cv/IoU/Background": 0.9, "cv/IoU/Paper": 0.3}
    assert headline("cv", cv) == {"cv": {"mIoU": 0.6, "pixel_acc": 0.9, "mean_acc": 0.7, "metric": {
        "name": "mIoU", "value": 0.6, "ci95_low": 0.55, "ci95_high": 0.65}}}
    other = {"cv": {**cv["cv"], "metric": {"name": "image mIoU", "value": 0.5, "ci95_low": 0.4, "ci95_high": 0.6}}}
    assert parent_metrics("cv", other)["cv/image mIoU"] == 0.5 and parent_metrics("cv", other)["cv/mIoU"] == 0.6
    assert headline("audit", {"audit": {"images": 3, "suspects": 2, "noise": {"k": 5}}}) == {"audit": {"images": 3, "suspects": 2}}
    assert set(HEADLINE) >= {"cv", "ensemble", "blend"}


def test_seed_ensembles_are_judged_with_every_seed_of_every_fold():
    """The variant specs (what the ensemble stage scores): with several seeds, a seed ensemble out of
    fold and a k-fold x seed ensemble on the holdout, over every fold and seed; with one seed, none.
    (The end-to-end test trains one seed to stay fast; these specs are what changes with more.)"""
    from pipeline.config import Params
    from pipeline.evaluation.variants import HOLDOUT, OOF, variants

    raw = Params().model_dump()
    raw["train"].update(folds=[0, 1], seeds=[3, 5])
    specs = {v.id: v for v in variants(Params.model_validate(raw).only("infer", "train", "paths"), has_round2=True)}
    assert specs["fold_seeds"].judged_on == OOF and specs["kfold_seeds"].judged_on == HOLDOUT
    for key in ("fold_seeds", "kfold_seeds"):
        assert sorted((r.fold, r.seed) for r in specs[key].members) == [(0, 3), (0, 5), (1, 3), (1, 5)]
    assert {(r.fold, r.seed) for r in specs["kfold"].members} == {(0, 3), (1, 3)}   # single models: the first seed
    raw["train"].update(seeds=[3])
    assert not {"fold_seeds", "kfold_seeds"} & {v.id for v in variants(Params.model_validate(raw).only(
        "infer", "train", "paths"), has_round2=True)}
