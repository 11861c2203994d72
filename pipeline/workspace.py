"""Where everything lives: every path of the layout, named once.

Folders come from params `paths`; the file names under them are written here and nowhere else, so
a reader and its writer cannot drift apart. `Workspace(paths, root)` with another root is another
experiment's layout (the blend stage reads other workspaces); `Member` is one trained model's folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.io import INDEX

FOLDS_CSV = "folds.csv"   # the split: every labelled image's fold and holdout flag
CLASSES_JSON = "classes.json"   # the mask cache's class names and how it was painted (copied into the OOF folder)


class _File:
    """A file of a folder's layout: `folder.<attr>` is `folder.dir / name`."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, folder: Any, owner: Any = None) -> Any:
        return self if folder is None else folder.dir / self.name


@dataclass(frozen=True)
class Folder:
    """An output folder whose files the subclass names. Built on the final folder to read it, and on
    a stage's temporary folder (`atomic_dir`) to write it: one name either way."""
    dir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "dir", Path(self.dir))


class Member(Folder):
    """One trained model's folder: <models>/fold_<k>/seed_<s>/ (stage train@<k>-<s>)."""
    image_confusions = _File("val_image_confusions.npz")
    val_images = _File("val_images.csv")
    reports = _File("reports")   # the figures below, logged to the fold's MLflow run
    confusion_png = _File("reports/confusion.png")
    iou_png = _File("reports/iou.png")
    curves_png = _File("reports/curves.png")
    gallery_png = _File("reports/gallery.png")   # each class's worst validation image
    # Each epoch's wall seconds: machine-local, so kept out of last.pt (an identical retrain gives
    # byte-identical checkpoints) and out of the folder's DVC hash (.dvcignore)
    epoch_seconds = _File("epoch_seconds.json")

    @classmethod
    def of(cls, models: str | Path, fold: int, seed: int) -> "Member":
        return cls(Path(models) / f"fold_{fold}" / f"seed_{seed}")

    def checkpoint(self, name: str) -> Path:
        """best | last | swa | ema -> <name>.pt."""
        return self.dir / f"{name}.pt"

    def val_confusion(self, average: str | None = None) -> Path:
        """The fold's out-of-fold confusion matrix (best epoch), or an average's (swa, ema)."""
        return self.dir / (f"val_confusion_{average}.npy" if average else "val_confusion.npy")


class DemoFiles(Folder):
    """paths.demo (stage demo_data): the synthetic dataset, and the label errors put in on purpose."""
    train_json = _File("train.json")
    test_json = _File("test.json")
    test_gt_json = _File("test_gt.json")   # the test images' true labels (for checks, never read by training)
    label_noise_csv = _File("label_noise.csv")


class EdaFiles(Folder):
    """paths.eda (stage eda): one CSV per table (`table`), and the figures."""
    issues_csv = _File("issues.csv")
    class_balance_png = _File("class_balance.png")
    overlap_png = _File("overlap_matrix.png")
    area_hist_png = _File("area_hist.png")

    def table(self, name: str) -> Path:
        return self.dir / f"{name}.csv"


class NearDupFiles(Folder):
    """paths.near_dups (stage near_dups)."""
    pairs_csv = _File("pairs.csv")
    clusters_csv = _File("clusters.csv")
    clusters_png = _File("clusters.png")


class SplitFiles(Folder):
    """paths.split (stage split)."""
    folds_csv = _File(FOLDS_CSV)
    balance_csv = _File("balance.csv")
    fold_balance_png = _File("fold_balance.png")


class CvFiles(Folder):
    """plots/cv (stage cv): its figures."""
    old_image_confusions = _File("image_confusions.npz")   # where experiments before 2026-12 kept cv_image_confusions
    confusion_png = _File("confusion.png")
    iou_png = _File("iou.png")


class EnsembleFiles(Folder):
    """reports/ensemble (stage ensemble)."""
    variants_csv = _File("variants.csv")
    postprocess_json = _File("postprocess.json")   # what submit, predict and the MLflow model apply (CRF, fitted rules)
    choice_json = _File("choice.json")   # the final ensemble's recipe chosen out of fold, and its evidence


class BlendFiles(Folder):
    """reports/blend (stage blend)."""
    variants_csv = _File("variants.csv")
    blend_json = _File("blend.json")   # the experiments' weights and members (what submit uses with blend.experiments)


class AuditFiles(Folder):
    """reports/audit (stage audit); review.csv and review_coco.json are the reviewer's to edit."""
    suspects_csv = _File("suspects.csv")
    images_csv = _File("images.csv")
    gallery_png = _File("gallery.png")
    review_csv = _File("review.csv")
    review_coco_json = _File("review_coco.json")


class PseudoFiles(Folder):
    """paths.pseudo (stage pseudo): a pseudo-labelled set per fold, and the stage's report."""
    report_csv = _File("report.csv")
    left_out_csv = _File("left_out.csv")   # test images also in the labelled pool: never pseudo-labelled

    def fold(self, k: int) -> Path:
        return self.dir / f"fold_{k}"


class SubmissionFiles(Folder):
    """paths.submission (stage submit)."""
    csv = _File("submission.csv")
    gallery_png = _File("gallery.png")
    model = _File("model")   # the MLflow model of the ensemble


def member_name(fold: int, seed: int) -> str:
    """The file stem of a model's metrics and history: fold_<k>_seed_<s>."""
    return f"fold_{fold}_seed_{seed}"


class Workspace:
    """Every output path of an experiment's layout."""

    def __init__(self, paths: Any, root: str | Path = ""):
        self.paths, self.root = paths, Path(root)

    def _dir(self, name: str) -> Path:
        return self.root / getattr(self.paths, name)

    # the mask cache (stage masks)
    @property
    def masks(self) -> Path:
        return self._dir("masks")

    @property
    def mask_index(self) -> Path:
        return self.masks / INDEX

    @property
    def classes_json(self) -> Path:
        return self.masks / CLASSES_JSON

    # the data stages' outputs
    @property
    def demo(self) -> DemoFiles:
        return DemoFiles(self._dir("demo"))

    @property
    def eda(self) -> EdaFiles:
        return EdaFiles(self._dir("eda"))

    @property
    def near_dups(self) -> NearDupFiles:
        return NearDupFiles(self._dir("near_dups"))

    @property
    def split(self) -> Path:
        return self._dir("split")

    @property
    def split_files(self) -> SplitFiles:
        return SplitFiles(self.split)

    @property
    def folds_csv(self) -> Path:
        return self.split_files.folds_csv

    # trained models
    def models(self, round: int = 1) -> Path:
        return self._dir("models_round2" if round == 2 else "models")

    def member(self, fold: int, seed: int, round: int = 1) -> Member:
        return Member.of(self.models(round), fold, seed)

    def histories(self, tag: str) -> Path:
        """plots/<train | train_round2>: every run's per-epoch history."""
        return self._dir("plots") / tag

    def history_csv(self, tag: str, fold: int, seed: int) -> Path:
        return self.histories(tag) / f"{member_name(fold, seed)}.csv"

    def members_metrics(self, tag: str) -> Path:
        """metrics/details/<train | train_round2>: every run's best-epoch scores (not DVC metrics)."""
        return self._dir("metrics") / "details" / tag

    def member_metrics(self, tag: str, fold: int, seed: int) -> Path:
        return self.members_metrics(tag) / f"{member_name(fold, seed)}.json"

    # pseudo-labels, out-of-fold predictions
    @property
    def pseudo(self) -> PseudoFiles:
        return PseudoFiles(self._dir("pseudo"))

    def pseudo_fold(self, fold: int) -> Path:
        return self.pseudo.fold(fold)

    def pseudo_index(self, fold: int) -> Path:
        return self.pseudo_fold(fold) / INDEX

    @property
    def oof(self) -> Path:
        return self._dir("oof")

    @property
    def oof_index(self) -> Path:
        return self.oof / INDEX

    # what the evaluation stages write
    @property
    def cv(self) -> CvFiles:
        return CvFiles(self._dir("plots") / "cv")

    @property
    def ensemble(self) -> EnsembleFiles:
        return EnsembleFiles(self._dir("reports") / "ensemble")

    @property
    def blend(self) -> BlendFiles:
        return BlendFiles(self._dir("reports") / "blend")

    @property
    def blend_copies(self) -> Path:
        """paths.blend: the other experiments' checkpoints, copied from DVC's cache."""
        return self._dir("blend")

    @property
    def blend_experiments_json(self) -> Path:
        """What the blend stage copied from where."""
        return self.blend_copies / "experiments.json"

    @property
    def audit(self) -> AuditFiles:
        return AuditFiles(self._dir("reports") / "audit")

    @property
    def submission(self) -> SubmissionFiles:
        return SubmissionFiles(self._dir("submission"))

    @property
    def report_html(self) -> Path:
        """The one offline page (stage report)."""
        return self._dir("reports") / "index.html"

    def metrics_json(self, stage: str) -> Path:
        """metrics/<stage>.json: the stage's few headline numbers, what DVC reads as its metrics."""
        return self._dir("metrics") / f"{stage}.json"

    def details_json(self, stage: str) -> Path:
        """metrics/details/<stage>.json: everything the stage measured (the report reads it; DVC does not)."""
        return self._dir("metrics") / "details" / f"{stage}.json"

    @property
    def cv_image_confusions(self) -> Path:
        """metrics/details/cv_image_confusions.npz (stage cv): every out-of-fold image's key and (C, C)
        confusion, the leaderboard's paired comparisons."""
        return self._dir("metrics") / "details" / "cv_image_confusions.npz"
