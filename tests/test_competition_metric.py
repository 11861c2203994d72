"""The competition's metric and how sure a difference is, with constructed known answers: dataset
and per-image mIoU (native or at 256 px), bootstrap intervals, paired comparisons of experiments and
variants on the same images, and the public/private shake-up."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation import stats
from pipeline.evaluation.metrics import Metric
from pipeline.evaluation.judge import VariantTable, summary_lines
from pipeline.evaluation.variants import HOLDOUT, OOF, Variant

pytestmark = pytest.mark.quick   # `make test-quick`: config, data, metrics, the model zoo in about a minute


# ---------------------------------------------------------------------------------------------- metric
# Three 2x2 images, classes Background (0) and 1, worked by hand:
#   A  truth 0 0 / 1 1   pred the same           IoU bg 1, cls1 1          image mIoU 1
#   B  truth 0 0 / 0 0   pred 0 0 / 0 1          IoU bg 3/4, cls1 0/1      image mIoU 0.375
#   C  truth 1 1 / 1 1   pred the same           bg in neither: left out   image mIoU 1
# per-image mIoU = (1 + 0.375 + 1) / 3; dataset: bg tp 5, union 6; cls1 tp 6, union 7 -> (5/6 + 6/7) / 2.
TRUTHS = [np.array([[0, 0], [1, 1]]), np.zeros((2, 2), int), np.ones((2, 2), int)]
PREDS = [np.array([[0, 0], [1, 1]]), np.array([[0, 0], [0, 1]]), np.ones((2, 2), int)]


def per_image(metric, preds=PREDS, truths=TRUTHS, n=2):
    return np.stack([metric.count(p, t, n).numpy() for p, t in zip(preds, truths)])


def test_dataset_and_per_image_miou_hand_worked():
    assert Metric("dataset").value(per_image(Metric("dataset"))) == pytest.approx((5 / 6 + 6 / 7) / 2)
    assert Metric("per_image").value(per_image(Metric("per_image"))) == pytest.approx((1 + 0.375 + 1) / 3)
    assert Metric("per_image").name == "per-image mIoU" and Metric("dataset", 256).name == "mIoU @256"
    with pytest.raises(ValueError, match="dataset | per_image"):
        Metric("mean")


def test_metric_at_256_scores_the_resized_maps():
    """A 512-px prediction with a one-pixel speckle at (1, 1): nearest resizing to 256 keeps even pixels
    only, so the speckle is gone at 256 (as the PredictionString scores it) but costs class 1 natively."""
    truth, pred = np.zeros((512, 512), int), np.zeros((512, 512), int)
    pred[1, 1] = 1
    native, at256 = Metric("dataset"), Metric("dataset", 256)
    assert native.value(per_image(native, [pred], [truth])) == pytest.approx((262143 / 262144 + 0) / 2)
    assert at256.value(per_image(at256, [pred], [truth])) == 1.0
    assert per_image(at256, [pred], [truth]).sum() == 256 * 256
    pred[2:4, 2:4] = 1                                   # a 2x2 object on even pixels survives as one pixel
    assert per_image(at256, [pred], [truth])[0, 0, 1] == 1


@pytest.mark.parametrize("kind", ["dataset", "per_image"])
def test_resample_counts_weigh_images(kind):
    """values() with counts [2, 1, 0] is the metric of the images A, A, B stacked."""
    m = Metric(kind)
    per = per_image(m)
    stacked = np.stack([per[0], per[0], per[1]])
    assert m.values(np.array([[2, 1, 0]]), per)[0] == pytest.approx(m.value(stacked))


# ----------------------------------------------------------------------------------------------- stats
def noisy_images(n=40, seed=0, flip=0.2):
    """n 16x16 images: truth a random 2-class map, prediction with a fraction `flip` of pixels wrong."""
    rng = np.random.default_rng(seed)
    truths = [rng.integers(0, 2, (16, 16)) for _ in range(n)]
    preds = [np.where(rng.random((16, 16)) < flip, 1 - t, t) for t in truths]
    return truths, preds


@pytest.mark.parametrize("kind", ["dataset", "per_image"])
def test_identical_experiments_differ_by_exactly_zero(kind):
    m = Metric(kind)
    truths, preds = noisy_images()
    a = per_image(m, preds, truths)
    assert stats.paired(m, a, a.copy()) == {"diff": 0.0, "low": 0.0, "high": 0.0}
    lo, hi = stats.interval(m, a)
    assert lo < m.value(a) < hi
    assert stats.interval(m, a) == (lo, hi)              # seeded: the same interval every time


@pytest.mark.parametrize("kind", ["dataset", "per_image"])
def test_a_clearly_better_experiment_excludes_zero(kind):
    m = Metric(kind)
    truths, worse = noisy_images(flip=0.3)
    better = [np.where(np.random.default_rng(i).random(t.shape) < 0.1, 1 - t, t) for i, t in enumerate(truths)]
    a, b = per_image(m, better, truths), per_image(m, worse, truths)
    d = stats.paired(m, a, b)
    assert 0 < d["low"] <= d["diff"] <= d["high"]
    flipped = stats.paired(m, b, a)
    assert flipped["diff"] == pytest.approx(-d["diff"]) and flipped["high"] < 0
    with pytest.raises(ValueError, match="same images"):
        stats.paired(m, a, b[:-1])


def test_variant_rows_are_compared_with_the_submission_on_the_same_images():
    """vs_submitted: a holdout row identical to the submission differs by exactly 0; a clearly better
    one has its paired interval above 0 and is the note the stage prints; out-of-fold rows (other
    images) get no comparison."""
    m = Metric("dataset")
    truths, worse = noisy_images(flip=0.3)
    better = [np.where(np.random.default_rng(i).random(t.shape) < 0.1, 1 - t, t) for i, t in enumerate(truths)]
    table = VariantTable(["Background", "object"], m)
    table.add(Variant("fold", "fold model", OOF), per_image(m, better, truths), 1.0)
    table.add(Variant("kfold", "k-fold ensemble", HOLDOUT), per_image(m, better, truths), 1.0)
    table.add(Variant("kfold_round2", "round-2 k-fold ensemble", HOLDOUT), per_image(m, worse, truths), 1.0)
    table.add(Variant("final", "final ensemble", HOLDOUT), per_image(m, worse, truths), 1.0)
    table.compare_to(f"{HOLDOUT}/final")
    t = table.frame().set_index("id")
    assert t.loc["kfold_round2", ["vs_submitted", "vs_submitted_low", "vs_submitted_high"]].tolist() == [0, 0, 0]
    assert 0 < t.loc["kfold", "vs_submitted_low"] < t.loc["kfold", "vs_submitted"] == pytest.approx(
        m.value(per_image(m, better, truths)) - m.value(per_image(m, worse, truths)))
    assert t[["vs_submitted"]].isna().loc[["fold", "final"]].all().all()
    submitted = {"variant": "final ensemble", "metric_name": "mIoU", "metric": t.loc["final", "metric"],
                 "ci95_low": t.loc["final", "ci95_low"], "ci95_high": t.loc["final", "ci95_high"]}
    lines = summary_lines(submitted, [{}], table.frame())
    assert lines[-1].startswith(f"note: on the holdout, k-fold ensemble beats the submission by "
                                f"{t.loc['kfold', 'vs_submitted']:+.4f} [")
    same = VariantTable(["Background", "object"], m)
    for v in ("kfold", "final"):
        same.add(Variant(v, v, HOLDOUT), per_image(m, worse, truths), 1.0)
    same.compare_to(f"{HOLDOUT}/final")
    assert not any(line.startswith("note:") for line in summary_lines(submitted, [{}], same.frame()))


def test_shakeup_is_zero_when_every_image_scores_alike_and_shrinks_with_more_images():
    m = Metric("dataset")
    same = np.repeat(per_image(m, PREDS[1:2], TRUTHS[1:2]), 50, axis=0)
    assert stats.shakeup(m, same, half=20)["sd"] == 0.0
    truths, preds = noisy_images(n=60, flip=0.25)
    varied = per_image(m, [np.where(np.random.default_rng(i).random(t.shape) < 0.05 * (i % 7), 1 - t, t)
                           for i, t in enumerate(truths)], truths)
    small, big = stats.shakeup(m, varied, half=10), stats.shakeup(m, varied, half=400)
    assert small["sd"] > big["sd"] > 0 and small["p95_abs"] > big["p95_abs"]
