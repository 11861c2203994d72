"""Training: it writes what it promises, resumes to the same result, and mixing/augmenting keeps labels
on their pixels. No test here asserts what a tiny model learnt (a score, a confidence): that moves with
the CPU's floating-point path. Learnt quality is measured in bench/ (bench/quality.py)."""
from __future__ import annotations

import shutil
import zipfile

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import Params
from pipeline.data.augment import AUGMENTATIONS
from pipeline.data.coco import DataError
from pipeline.data.mix import cutmix, paste_classes
from pipeline.training import trainer as trainer_module
from pipeline.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.training.trainer import rescale
from pipeline.training.run import PARAMS, train_fold
from tests.helpers import Killed, easy_workspace, kill_in, params_for







@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return easy_workspace(tmp_path_factory.mktemp("easy"))


def test_training_writes_its_checkpoints_reports_and_history(prepared):
    p = params_for(prepared)
    s = train_fold(0, 0, p)
    assert 0 <= s["mIoU"] <= 1, s
    out = prepared / "models/fold_0/seed_0"
    assert {"best.pt", "last.pt", "val_confusion.npy"} <= {f.name for f in out.iterdir()}
    assert {"confusion.png", "iou.png", "curves.png", "gallery.png"} == {f.name for f in (out / "reports").iterdir()}
    best = load_checkpoint(out / "best.pt")                       # weights_only=True
    assert best["classes"] == ["Background", "square", "disc"] and best["params"]["train.epochs"] == "6"
    assert np.load(out / "val_confusion.npy").sum() == 12 * 64 * 64   # every validation pixel, once
    history = (prepared / "plots/train/fold_0_seed_0.csv").read_text().splitlines()
    assert len(history) == 7 and history[0].startswith("epoch,")
    # The reported scores are the best epoch's own validation (kept in best.pt), not a second pass.
    rows = pd.read_csv(prepared / "plots/train/fold_0_seed_0.csv")
    assert s["mIoU"] == rows["val/mIoU"].max() == rows["val/mIoU"][best["epoch"] - 1]
    assert np.array_equal(best["confusion"].numpy(), np.load(out / "val_confusion.npy"))
    # Every validation image's own confusion is kept too (the worst-per-class gallery, val_images.csv).
    assert torch.equal(best["image_confusions"].sum(0), best["confusion"])
    images = pd.read_csv(out / "val_images.csv")
    assert len(images) == 12 and images["mIoU"].is_monotonic_increasing and images["IoU/disc"].notna().all()


def test_a_finished_run_is_reused_not_retrained(prepared, monkeypatch):
    """Adding a seed or a fold reruns every train stage in DVC's eyes; the finished ones must not retrain."""
    before = load_checkpoint(prepared / "models/fold_0/seed_0/best.pt")

    def no_training(*a, **k):
        raise RuntimeError("retrained")

    monkeypatch.setattr(trainer_module.Trainer, "train_epoch", no_training)
    again = train_fold(0, 0, params_for(prepared, folds=[0, 2], seeds=[0, 5]))   # other members: same run
    after = load_checkpoint(prepared / "models/fold_0/seed_0/best.pt")
    assert again["mIoU"] == before["scores"]["mIoU"] and after["epoch"] == before["epoch"]
    # An image changed under the same name and size (only the index's digest tells), a renamed class.
    for file, old, new in (("index.csv", pd.read_csv(prepared / "masks/index.csv").digest[0], "0" * 32),
                           ("classes.json", '"disc"', '"disk"')):
        original, member = (prepared / "masks" / file).read_bytes(), prepared / "models/fold_0/seed_0"
        shutil.copytree(member, prepared / "kept")   # a run that is not reused starts afresh: it is deleted
        try:
            (prepared / "masks" / file).write_text(original.decode().replace(old, new))
            with pytest.raises(RuntimeError, match="retrained"):
                train_fold(0, 0, params_for(prepared))
        finally:
            (prepared / "masks" / file).write_bytes(original)
            shutil.rmtree(member)
            (prepared / "kept").rename(member)
        assert train_fold(0, 0, params_for(prepared))["mIoU"] == before["scores"]["mIoU"]   # reused again
    with pytest.raises(RuntimeError, match="retrained"):     # a different recipe is a different run
        train_fold(0, 0, params_for(prepared, lr=1e-3))


def killed_in_epoch_2(monkeypatch, train) -> None:
    """Run `train` with its second validation raising KeyboardInterrupt (a run killed after epoch 1
    was saved), then restore validation."""
    real_validate, calls = trainer_module.Trainer.validate, {"n": 0}

    def dies_in_epoch_2(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real_validate(self, *a, **k)

    monkeypatch.setattr(trainer_module.Trainer, "validate", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.setattr(trainer_module.Trainer, "validate", real_validate)


def test_interrupted_training_resumes_to_the_same_result(prepared, monkeypatch):
    p = params_for(prepared, epochs=3, cutmix=0.5, augment=["hflip", "color"])
    straight = train_fold(1, 0, p)
    straight_hist = load_checkpoint(prepared / "models/fold_1/seed_0/last.pt")["history"]
    shutil.rmtree(prepared / "models/fold_1")          # or the finished run would be reused

    killed_in_epoch_2(monkeypatch, lambda: train_fold(1, 0, p))
    assert load_checkpoint(prepared / "models/fold_1/seed_0/last.pt")["epoch"] == 1
    resumed = train_fold(1, 0, p)
    resumed_hist = load_checkpoint(prepared / "models/fold_1/seed_0/last.pt")["history"]
    assert [h["epoch"] for h in resumed_hist] == [1, 2, 3]
    for a, b in zip(straight_hist, resumed_hist):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
    assert resumed["mIoU"] == pytest.approx(straight["mIoU"], rel=1e-5)


def test_runtime_settings_and_non_training_code_retrain_nothing(prepared, monkeypatch):
    """A run's identity is its recipe, data and training code: other workers, another device, a
    smaller gallery (runtime:) or an edited report/leaderboard module reuse the finished run."""
    from pipeline.training.fold import load_fold, training_code

    p = params_for(prepared, epochs=2)
    shutil.rmtree(prepared / "models/fold_1", ignore_errors=True)
    train_fold(1, 0, p)
    raw = Params().model_dump()
    other = params_for(prepared, epochs=2)._params.model_dump()
    other["runtime"].update(workers=1, device="cpu", gallery=0, infer_batch_size=3, data_workers=2)
    other = Params.model_validate(other).only(*PARAMS)
    assert load_fold(1, 0, other, False).identity() == load_fold(1, 0, p, False).identity()
    with monkeypatch.context() as m:
        n = counting(m)
        train_fold(1, 0, other)
    assert n == {"epochs": 0, "averages": [], "finished": 1}        # reused: its reports rewritten only
    code = {str(f.relative_to(f.parents[2])) for f in training_code()}
    assert {"pipeline/training/trainer.py", "pipeline/models/losses.py", "pipeline/data/augment.py"} <= code
    assert not code & {"pipeline/evaluation/report.py", "pipeline/evaluation/leaderboard.py",
                       "pipeline/evaluation/variants.py", "pipeline/tracking.py"}
    assert raw["runtime"] and "workers" not in raw["train"]


def test_checkpoints_carry_their_input_spec_and_a_disagreeing_params_file_stops(prepared):
    """predict/submit/oof/pseudo/the MLflow model prepare images by the checkpoint's InputSpec; a
    params.yaml or mask cache that now says otherwise is a clear error, never a silent resize."""
    from pipeline.config import ConfigError, Infer
    from pipeline.inference.ensemble import Ensemble
    from pipeline.models.checkpoint import InputSpec, save_checkpoint

    p = params_for(prepared, epochs=1, image_size=64)
    shutil.rmtree(prepared / "models/fold_3", ignore_errors=True)
    train_fold(3, 0, p)
    out = prepared / "models/fold_3/seed_0"
    specs = {n: InputSpec.of(out / f"{n}.pt", load_checkpoint(out / f"{n}.pt")) for n in ("best", "last")}
    assert specs["best"] == specs["last"] == InputSpec(("Background", "square", "disc"), None, 64, None)
    ens = Ensemble.from_files([(out / "best.pt", 1.0)], Infer(), torch.device("cpu"))
    assert ens.spec == specs["best"]
    ens.spec.check("predict", eval_size=64, max_side=None, classes=["Background", "square", "disc"])
    with pytest.raises(ConfigError, match=r"predict: .*eval_size: trained with 64, now 128.*max_side: trained "
                                          r"with None, now 512"):
        ens.spec.check("predict", eval_size=128, max_side=512)
    other = load_checkpoint(out / "best.pt")
    other["input_spec"] = {**other["input_spec"], "max_side": 256}
    save_checkpoint(prepared / "other.pt", **other)
    with pytest.raises(ConfigError, match="differently prepared inputs"):
        Ensemble.from_files([(out / "best.pt", 1.0), (prepared / "other.pt", 1.0)], Infer(), torch.device("cpu"))
    del other["input_spec"]
    save_checkpoint(prepared / "old.pt", **other)
    with pytest.raises(ConfigError, match="old.pt: the checkpoint has no input spec"):
        Ensemble.from_files([(prepared / "old.pt", 1.0)], Infer(), torch.device("cpu"))






def counting(monkeypatch) -> dict:
    """Count the epochs trained, the averages computed and the reports written from now on."""
    n = {"epochs": 0, "averages": [], "finished": 0}
    Trainer = trainer_module.Trainer
    epoch, average, finish = Trainer.train_epoch, Trainer.average_model, Trainer.write_reports
    monkeypatch.setattr(Trainer, "train_epoch", lambda self, e: n.update(epochs=n["epochs"] + 1) or epoch(self, e))
    monkeypatch.setattr(Trainer, "average_model",
                        lambda self, name, avg: n["averages"].append(name) or average(self, name, avg))
    monkeypatch.setattr(Trainer, "write_reports", lambda self: n.update(finished=n["finished"] + 1) or finish(self))
    return n


def outputs(out) -> dict:
    """What a finished run leaves: weights of best/swa/ema, the confusions, the history's losses."""
    got = {name: load_checkpoint(out / f"{name}.pt")["model"] for name in ("best", "swa", "ema")}
    got.update({f.name: np.load(f) for f in sorted(out.glob("val_confusion*.npy"))})
    got["losses"] = [h["train/loss"] for h in load_checkpoint(out / "last.pt")["history"]]
    return got


def test_short_epochs_are_saved_every_save_every_s_and_the_run_still_resumes(prepared, monkeypatch):
    """runtime.save_every_s: an epoch shorter than it since the last save leaves last.pt alone (the
    last epoch's is always written); a run killed before any save starts afresh and ends where an
    uninterrupted one does."""
    p = params_for(prepared, runtime={"save_every_s": 3600}, epochs=3)
    out = prepared / "models/fold_2/seed_0"
    shutil.rmtree(prepared / "models/fold_2", ignore_errors=True)
    with monkeypatch.context() as m:
        kill_in(m, "training")            # dies in epoch 2: epoch 1 was not saved
        with pytest.raises(Killed):
            train_fold(2, 0, p)
    assert not (out / "last.pt").exists()
    train_fold(2, 0, p)
    last = load_checkpoint(out / "last.pt")
    assert last["state"] == "done" and [h["epoch"] for h in last["history"]] == [1, 2, 3]
    shutil.rmtree(prepared / "models/fold_2")
    with monkeypatch.context() as m:
        kill_in(m, "training")
        with pytest.raises(Killed):
            train_fold(2, 0, params_for(prepared, runtime={"save_every_s": 0}, epochs=3))
    assert load_checkpoint(out / "last.pt")["epoch"] == 1   # 0: every epoch
    shutil.rmtree(prepared / "models/fold_2")


def test_a_run_killed_in_any_state_resumes_in_it_and_equals_an_uninterrupted_one(prepared, monkeypatch):
    """The run state in last.pt (training -> averaging -> finishing -> done): a run killed in any of
    them resumes there — no finished epoch is retrained, no finished average recomputed — and
    leaves what an uninterrupted run leaves."""
    p = params_for(prepared, epochs=3, swa_epochs=2, ema={"decay": 0.9, "warmup": True})
    out = prepared / "models/fold_2/seed_0"
    shutil.rmtree(prepared / "models/fold_2", ignore_errors=True)
    train_fold(2, 0, p)
    assert load_checkpoint(out / "last.pt")["state"] == "done"
    straight = outputs(out)
    averages_of_an_uninterrupted_run(out)
    shutil.rmtree(prepared / "models/fold_2")
    with monkeypatch.context() as m:
        kill_in(m, "training")
        with pytest.raises(Killed):
            train_fold(2, 0, p)
    assert load_checkpoint(out / "last.pt")["state"] == "training"
    # One run after another, each killed in the next state (the last one not at all; then a finished
    # run killed while its reports are rewritten): (epochs trained, averages computed, reports written)
    # by each, and the state it leaves.
    chain = [("averaging", (2, ["swa"], 0)),   # resumes after epoch 1, killed before the EMA
             ("finishing", (0, ["ema"], 0)),   # resumes with SWA done: only the EMA, killed in the reports
             (None, (0, [], 1)),               # resumes in finishing: the reports only
             ("done", (0, [], 0)), (None, (0, [], 1))]
    for kill, counts in chain:
        with monkeypatch.context() as m:
            n = counting(m)
            if kill:
                kill_in(m, kill)
                with pytest.raises(Killed):
                    train_fold(2, 0, p)
            else:
                train_fold(2, 0, p)
        assert (n["epochs"], n["averages"], n["finished"]) == counts, kill
        assert load_checkpoint(out / "last.pt")["state"] == (kill or "done")
        if kill:
            continue
        resumed = outputs(out)   # what the uninterrupted run left
        assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-5)
        for name in ("best", "swa", "ema"):
            for k, v in straight[name].items():
                assert torch.allclose(resumed[name][k].float(), v.float(), rtol=1e-4, atol=1e-6), (name, k)
        for f in [k for k in straight if k.startswith("val_confusion")]:
            assert np.abs(resumed[f] - straight[f]).sum() <= 0.001 * straight[f].sum(), f


def test_a_damaged_checkpoint_of_any_kind_is_never_used(prepared, tmp_path):
    """A byte flipped in the middle of best/swa/ema/last.pt, or a truncated file: the stage stops
    with one error naming the file and how to restore it, before anything is reused, retrained or
    deleted (the previous test left fold 2 finished, with all four kinds)."""
    p = params_for(prepared, epochs=3, swa_epochs=2, ema={"decay": 0.9, "warmup": True})
    out = prepared / "models/fold_2/seed_0"
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    for name in ("best", "swa", "ema", "last", "truncated"):
        file = out / f"{'best' if name == 'truncated' else name}.pt"
        data = bytearray(before[file])
        if name == "truncated":
            data = data[:len(data) // 2]
        else:
            data[len(data) // 2] ^= 0x10
        file.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=rf"{file}: damaged checkpoint .*`dvc checkout -f {file}`"):
            train_fold(2, 0, p)
        with pytest.raises(CheckpointError, match="damaged"):
            load_checkpoint(file)                          # and so on every load (predict, oof, served...)
        assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == {**before, file: bytes(data)}
        file.write_bytes(before[file])
    # Byte-reproducible: the archive names no (temporary) file, so one state saved twice, under two
    # names, is the same bytes; an identical retrain gives an identical dvc.lock (bench/faults.py).
    ck = load_checkpoint(out / "best.pt")
    for name in ("a.pt", "b.pt"):
        save_checkpoint(tmp_path / name, **ck)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert {n.split("/")[0] for n in zipfile.ZipFile(out / "best.pt").namelist()} == {"archive"}


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(prepared, monkeypatch):
    p = params_for(prepared, epochs=3)
    real, calls = trainer_module.Trainer.train_epoch, {"n": 0}

    def poisoned(self, epoch):
        calls["n"] += 1
        if calls["n"] == 2:                                    # epoch 2: the loss blows up
            real_loss = self.loss_fn
            poison = lambda logits, y: real_loss(logits, y) * float("nan")   # noqa: E731
            poison.last = {}
            self.loss_fn = poison
        return real(self, epoch)

    monkeypatch.setattr(trainer_module.Trainer, "train_epoch", poisoned)
    with pytest.raises(FloatingPointError, match=r"fold 3 seed 0 epoch 2: loss is nan at batch 0; the last good"):
        train_fold(3, 0, p)
    out = prepared / "models/fold_3/seed_0"
    last, best = load_checkpoint(out / "last.pt"), load_checkpoint(out / "best.pt")
    assert last["epoch"] == best["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_val_every_validates_every_nth_epoch_and_the_last(prepared, monkeypatch):
    real_validate, calls = trainer_module.Trainer.validate, []
    monkeypatch.setattr(trainer_module.Trainer, "validate", lambda self, m: calls.append(1) or real_validate(self, m))
    s = train_fold(3, 0, params_for(prepared, epochs=5, val_every=2))
    assert len(calls) == 3                                        # epochs 2, 4 and 5 (the last)
    hist = load_checkpoint(prepared / "models/fold_3/seed_0/last.pt")["history"]
    assert [h["epoch"] for h in hist if "val/mIoU" in h] == [2, 4, 5] and len(hist) == 5
    best = load_checkpoint(prepared / "models/fold_3/seed_0/best.pt")
    assert best["epoch"] in (2, 4, 5) and s["mIoU"] == max(h["val/mIoU"] for h in hist if "val/mIoU" in h)
    assert (prepared / "models/fold_3/seed_0/reports/curves.png").exists()


def averages_of_an_uninterrupted_run(out) -> None:
    """SWA over the last 2 of 3 epochs and an EMA of every optimizer step, as one run leaves them
    (fold 2: 36 training images, full batches of 8): validated on all 12 validation images, saved."""
    swa, ema, last = (load_checkpoint(out / f"{n}.pt") for n in ("swa", "ema", "last"))
    weights = [k for k, v in last["model"].items() if v.is_floating_point() and "running_" not in k]
    assert not all(torch.equal(swa["model"][k], last["model"][k]) for k in weights)   # an average of 2 epochs
    bn = [k for k in last["model"] if k.endswith("running_mean")]
    assert not all(torch.equal(swa["model"][k], last["model"][k]) for k in bn)   # BN statistics recomputed
    assert ema["steps"] == 3 * (36 // 8) and ema["ema_decay"] == 0.9 and swa["swa_epochs"] == 2
    assert not torch.equal(ema["model"]["segmentation_head.0.weight"], last["model"]["segmentation_head.0.weight"])
    for name in ("swa", "ema"):
        assert np.load(out / f"val_confusion_{name}.npy").sum() == 12 * 64 * 64
        assert load_checkpoint(out / f"{name}.pt")["scores"]["mIoU"] >= 0   # kept for a reused run's MLflow record


def test_swa_over_one_epoch_is_that_epochs_weights(prepared):
    """And last.pt keeps the last epoch's weights, whichever epoch was best (the reports are made
    with best.pt's: they once stayed in the model when last.pt was saved)."""
    train_fold(2, 0, params_for(prepared, epochs=2, swa_epochs=1))
    out = prepared / "models/fold_2/seed_0"
    swa, last = load_checkpoint(out / "swa.pt"), load_checkpoint(out / "last.pt")
    weights = [k for k, v in last["model"].items() if v.is_floating_point() and "running_" not in k]
    assert all(torch.equal(swa["model"][k], last["model"][k]) for k in weights)


def test_fold_tables_never_train_on_validation_or_holdout(tmp_path):
    import pandas as pd

    from pipeline.data.dataset import fold_tables

    keys = [f"k{i}" for i in range(20)]
    (tmp_path / "m").mkdir()
    (tmp_path / "s").mkdir()
    pd.DataFrame({"key": keys, "image": keys, "mask": keys}).to_csv(tmp_path / "m/index.csv", index=False)
    fold = [i % 3 for i in range(20)]
    holdout = [i >= 17 for i in range(20)]
    fold = [-1 if h else f for f, h in zip(fold, holdout)]
    pd.DataFrame({"key": keys, "fold": fold, "holdout": holdout}).to_csv(tmp_path / "s/folds.csv", index=False)
    for k in range(3):
        train, val = fold_tables(tmp_path / "m", tmp_path / "s", k)
        assert set(val.key) == {keys[i] for i in range(17) if i % 3 == k}
        assert set(train.key) == {keys[i] for i in range(17) if i % 3 != k}   # no val, no holdout
    with pytest.raises(DataError, match="fold 5: .* 0 validation images"):
        fold_tables(tmp_path / "m", tmp_path / "s", 5)


def test_cutmix_moves_pixels_and_labels_together():
    n, h, w = 6, 32, 32
    ids = torch.arange(n).view(n, 1, 1)
    images = ids.view(n, 1, 1, 1).expand(n, 3, h, w).float().clone()
    masks = ids.expand(n, h, w).clone()
    assert cutmix(images, masks, np.random.default_rng(0), p=1.0)
    assert torch.equal(images[:, 0].long(), masks) and torch.equal(images[:, 1], images[:, 2])
    assert (masks != ids).any()                                   # something was mixed
    assert not cutmix(images, masks, np.random.default_rng(0), p=0.0)


def test_copy_paste_known_answer():
    image, mask = torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.long)
    donor_image, donor_mask = torch.ones(3, 4, 4), torch.zeros(4, 4, dtype=torch.long)
    donor_mask[0, :2] = 7
    donor_mask[3, 3] = 2                                          # a class not asked for
    assert paste_classes(image, mask, donor_image, donor_mask, torch.tensor([7])) == 2
    assert mask[0, :2].tolist() == [7, 7] and mask.sum() == 14 and image[:, 0, :2].eq(1).all() and image.sum() == 6


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_augmentation_keeps_labels_on_their_pixels(name):
    rng = np.random.default_rng(0)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:40, 8:30] = 1
    mask[40:60, 35:60] = 2
    image = np.stack([mask * 100, rng.integers(0, 50, (64, 64)), mask * 50], -1).astype(np.uint8)
    t = AUGMENTATIONS[name]()
    t.p = 1.0
    out = A.Compose([t], seed=3)(image=image, mask=mask)
    img, m = out["image"], out["mask"]
    assert m.shape == (64, 64) and set(np.unique(m)) <= {0, 1, 2, 255}
    labelled = m != 255
    if name != "color":  # colour jitter changes values, never positions
        agree = (np.abs(img[..., 0].astype(int) - m.astype(int) * 100) < 30)[labelled]
        assert agree.mean() > 0.97
    if name in ("cutout", "gridmask"):
        assert (m == 255).any() and (img[m == 255] == 0).all()    # invented pixels are ignored, not labelled


@pytest.mark.parametrize("framing, crop_infer", [("crop", "slide"), ("crop", "whole"), ("resize", "slide")])
def test_a_model_is_predicted_exactly_as_it_was_validated(prepared, framing, crop_infer):
    """train.input crop: 32-pixel crops of the 64-pixel images at random scales; validation slides
    32-pixel windows over whole images, or sees them in one pass (resize: whole images squashed to 32). The ensemble path
    (ensemble, submit, predict, pseudo) loads best.pt and must give the very confusion matrix
    training kept for that epoch."""
    from pipeline.data.dataset import fold_tables
    from pipeline.evaluation.scoring import score
    from pipeline.inference.ensemble import Ensemble, load_member
    from pipeline.inference.slide import SlidingWindow

    p = params_for(prepared, input=framing, crop_infer=crop_infer, image_size=32, crop_scale=(0.75, 1.25), epochs=4,
                   folds=[2])
    s = train_fold(2, 0, p)
    best = load_checkpoint(prepared / "models/fold_2/seed_0/best.pt")
    assert best["params"]["train.input"] == framing and s["mIoU"] == best["scores"]["mIoU"]
    model, spec = load_member(prepared / "models/fold_2/seed_0/best.pt", torch.device("cpu"), p.train.batch_size)
    assert isinstance(model, SlidingWindow) == (framing == "crop")
    assert getattr(model, "whole", False) == (framing == "crop" and crop_infer == "whole")
    val = fold_tables(prepared / "masks", prepared / "split", 2)[1]
    ens = Ensemble([(model, 1.0)], ["identity"], [1.0], torch.device("cpu"), spec=spec)
    assert spec.eval_size == p.train.eval_size
    cm, _ = score(ens, val, p.train.batch_size)
    assert p.train.eval_size == (None if framing == "crop" else 32) and cm.numpy().sum() == len(val) * 64 * 64
    assert np.array_equal(cm.numpy(), best["confusion"].numpy())


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


def test_training_draws_one_scale_per_batch(prepared, monkeypatch):
    seen, real = [], trainer_module.rescale
    monkeypatch.setattr(trainer_module, "rescale", lambda x, y, side: seen.append(side) or real(x, y, side))
    train_fold(1, 0, params_for(prepared, epochs=2, batch_size=4, scales=[0.5, 1.0, 1.5]))
    assert len(seen) == 2 * (36 // 4) and set(seen) <= {32, 64, 96} and len(set(seen)) > 1
