"""The competition's last mile, with constructed known answers: the leaderboard's two metrics (dataset
and per-image mIoU, native or at 256 px), bootstrap intervals, paired comparisons and the shake-up,
post-processing rules fitted out of fold, the dense CRF, weight EMA and multi-scale training."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from pipeline.config import Params
from pipeline.evaluation import stats
from pipeline.evaluation.metrics import Metric
from pipeline.evaluation.rules import fit_rules
from pipeline.evaluation.variants import HOLDOUT, OOF, Variant, VariantTable, summary_lines
from pipeline.inference.postprocess import Crf, Refiner, Rules, apply_rules, crf_refine
from pipeline.training.loop import rescale
from pipeline.training.nets import ema_average
from pipeline.training.run import train_fold
from tests.helpers import easy_workspace, params_for

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


# ------------------------------------------------------------------------------------ post-processing
def probs_of(pred: np.ndarray, truth: np.ndarray, n: int = 3) -> np.ndarray:
    """(n, H, W) probabilities: 0.9 on the predicted class, 0.08 on the truth where they differ
    (the runner-up the rules fall back to), 0.02 elsewhere: no bias of +-1 can flip a pixel."""
    p = np.full((n, *pred.shape), 0.02, np.float32)
    np.put_along_axis(p, pred[None], 0.9, axis=0)
    differ = pred != truth
    runner = np.where(differ, truth, -1)
    for c in range(n):
        p[c][runner == c] = 0.08
    return p


def constructed_oof(n_images=6, size=64):
    """Truth: a 20x20 object of class 1 and a true 3x3 object of class 2 (0.2 % of the image).
    Prediction: the same, plus five 2x2 speckles of class 1 on background and a 4x4 hole in the object."""
    rng = np.random.default_rng(0)
    truths, preds = [], []
    for _ in range(n_images):
        t = np.zeros((size, size), np.int64)
        y, x = rng.integers(2, 20, 2)
        t[y:y + 20, x:x + 20] = 1
        t[50:53, 50:53] = 2
        p = t.copy()
        p[y + 8:y + 12, x + 8:x + 12] = 0                    # a hole the models missed
        for sy, sx in ((45, 5), (5, 45), (58, 20), (30, 58), (58, 58)):
            p[sy:sy + 2, sx:sx + 2] = 1                      # speckles
        truths.append(t)
        preds.append(p)
    return truths, preds


def test_rules_remove_speckles_fill_holes_and_keep_a_true_small_object():
    truths, preds = constructed_oof()
    probs = [probs_of(p, t) for p, t in zip(preds, truths)]
    m = Metric("dataset")
    rules, kept = fit_rules(probs, truths, ["Background", "object", "small"], m)
    assert not any(rules.bias)                               # a bias cannot flip these pixels: none kept
    assert rules.min_size[2] == 0                            # removing 0.2 % regions would delete the true object
    assert rules.min_size[1] > 0 or rules.min_size[0] > 0
    for p, t in zip(probs, truths):
        np.testing.assert_array_equal(apply_rules(p, rules), t)   # speckles gone, hole filled, small object kept
    assert kept[0]["rule"] == "none" and kept[-1]["metric"] == 1.0
    assert all(k["gain"] > 0 for k in kept[1:])


def test_a_rule_that_would_hurt_a_class_is_not_kept():
    """Every class-2 region is a 3x3 true object: removing small class-2 regions only loses IoU."""
    truths, _ = constructed_oof()
    probs = [probs_of(t, t) for t in truths]
    rules, kept = fit_rules(probs, truths, ["Background", "object", "small"], Metric("dataset"))
    assert not rules.active and [k["rule"] for k in kept] == ["none"]


def test_rules_apply_at_any_resolution_and_survive_json():
    """Sizes are fractions of the image: a 2x2 speckle at 64 px is an 8x8 speckle at 256 px."""
    t = np.zeros((64, 64), int)
    p = t.copy()
    p[10:12, 10:12] = 1
    rules = Rules.none(2).changed(1, min_size=0.002)
    assert apply_rules(probs_of(p, t, 2), rules).sum() == 0
    big = np.kron(p, np.ones((4, 4), int))
    assert apply_rules(probs_of(big, np.zeros_like(big), 2), rules).sum() == 0
    ref = Refiner(rules, Crf(iterations=3))
    back = Refiner.from_json(ref.to_json())
    assert back == ref and back.active and not Refiner().active


# ----------------------------------------------------------------------------------------------- CRF
def test_crf_follows_colour_edges_where_the_probabilities_are_unsure():
    """Left half black (class 0), right half white (class 1); probabilities only lean 55/45 the right
    way under heavy noise, so the argmax is wrong on many pixels; the bilateral kernel fixes them."""
    rng = np.random.default_rng(0)
    truth = np.zeros((48, 48), int)
    truth[:, 24:] = 1
    image = np.where(truth[..., None] == 1, 255, 0).astype(np.uint8).repeat(3, axis=2)
    p1 = np.clip(np.where(truth == 1, 0.55, 0.45) + rng.uniform(-0.25, 0.25, truth.shape), 0.01, 0.99)
    prob = np.stack([1 - p1, p1]).astype(np.float32)
    before = (prob.argmax(0) != truth).mean()
    refined = crf_refine(prob, image, Crf())
    assert refined.shape == prob.shape and np.allclose(refined.sum(0), 1, atol=1e-4)
    after = (refined.argmax(0) != truth).mean()
    assert before > 0.2 and after < 0.02
    ref = Refiner(crf=Crf())
    np.testing.assert_array_equal(ref(prob, lambda: image), refined.argmax(0))


# ----------------------------------------------------------------------------------------------- EMA
def test_ema_average_known_answer():
    """AveragedModel copies the first weights; update n then moves by 1 - decay_n towards the model,
    decay_n = min(decay, (1 + n) / (10 + n)) with warmup (TensorFlow's num_updates ramp), else decay."""
    for warmup, decay_1 in ((True, 2 / 11), (False, 0.9)):
        net = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.BatchNorm1d(2))
        ema = AveragedModel(net, multi_avg_fn=ema_average(0.9, warmup), use_buffers=True)
        w0, m0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([1.0, -1.0])
        w1, m1 = torch.zeros(2, 2), torch.zeros(2)
        with torch.no_grad():
            net[0].weight.copy_(w0)
            net[1].running_mean.copy_(m0)
            net[1].num_batches_tracked.fill_(3)
            ema.update_parameters(net)
            net[0].weight.copy_(w1)
            net[1].running_mean.copy_(m1)
            net[1].num_batches_tracked.fill_(7)
            ema.update_parameters(net)
        torch.testing.assert_close(ema.module[0].weight, decay_1 * w0 + (1 - decay_1) * w1)
        torch.testing.assert_close(ema.module[1].running_mean, decay_1 * m0 + (1 - decay_1) * m1)   # BN buffers too
        assert int(ema.module[1].num_batches_tracked) == 7   # integer buffers follow the model


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    return easy_workspace(tmp_path_factory.mktemp("easy_ema"), n=24)


# EMA: validated, saved, counted and resumed to the same weights — tests/test_training.py (the run
# killed in every state, whose uninterrupted run trains with SWA and EMA).


# ------------------------------------------------------------------------------------------ multi-scale
def test_batch_sides_are_multiples_of_32():
    t = Params().train                                      # image_size 64
    assert [t.batch_side(s) for s in (0.25, 0.75, 1.0, 1.25, 2.0)] == [32, 64, 64, 64, 128]
    t512 = t.model_copy(update={"image_size": 512})
    assert [t512.batch_side(s) for s in (0.75, 1.0, 1.25)] == [384, 512, 640]


def test_rescale_keeps_labels_labels():
    x = torch.rand(2, 3, 64, 64)
    y = torch.randint(0, 4, (2, 64, 64))
    y[:, :8] = 255
    x2, y2 = rescale(x, y, 96)
    assert x2.shape == (2, 3, 96, 96) and y2.shape == (2, 96, 96) and y2.dtype == y.dtype
    assert set(y2.unique().tolist()) <= set(y.unique().tolist()) and (y2[:, :12] == 255).all()
    assert rescale(x, y, 64)[0] is x


def test_training_draws_one_scale_per_batch(easy, monkeypatch):
    from pipeline.training import loop

    seen, real = [], loop.rescale
    monkeypatch.setattr(loop, "rescale", lambda x, y, side: seen.append(side) or real(x, y, side))
    train_fold(1, 0, params_for(easy, epochs=2, batch_size=4, scales=[0.5, 1.0, 1.5]))
    assert len(seen) == 2 * (18 // 4) and set(seen) <= {32, 64, 96} and len(set(seen)) > 1
