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


@dataclass(frozen=True)
class Member:
    """One trained model's folder: <models>/fold_<k>/seed_<s>/ (stage train@<k>-<s>)."""
    dir: Path

    @classmethod
    def of(cls, models: str | Path, fold: int, seed: int) -> "Member":
        return cls(Path(models) / f"fold_{fold}" / f"seed_{seed}")

    def checkpoint(self, name: str) -> Path:
        """best | last | swa | ema -> <name>.pt."""
        return self.dir / f"{name}.pt"

    def val_confusion(self, average: str | None = None) -> Path:
        """The fold's out-of-fold confusion matrix (best epoch), or an average's (swa, ema)."""
        return self.dir / (f"val_confusion_{average}.npy" if average else "val_confusion.npy")

    @property
    def image_confusions(self) -> Path:
        return self.dir / "val_image_confusions.npz"

    @property
    def val_images(self) -> Path:
        return self.dir / "val_images.csv"

    @property
    def reports(self) -> Path:
        return self.dir / "reports"


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

    # the split (stage split)
    @property
    def split(self) -> Path:
        return self._dir("split")

    @property
    def folds_csv(self) -> Path:
        return self.split / FOLDS_CSV

    # trained models
    def models(self, round: int = 1) -> Path:
        return self._dir("models_round2" if round == 2 else "models")

    def member(self, fold: int, seed: int, round: int = 1) -> Member:
        return Member.of(self.models(round), fold, seed)

    def history_csv(self, tag: str, fold: int, seed: int) -> Path:
        """plots/<train | train_round2>/fold_<k>_seed_<s>.csv: the run's per-epoch history."""
        return self._dir("plots") / tag / f"{member_name(fold, seed)}.csv"

    def member_metrics(self, tag: str, fold: int, seed: int) -> Path:
        return self._dir("metrics") / tag / f"{member_name(fold, seed)}.json"

    # pseudo-labels, out-of-fold predictions
    def pseudo_fold(self, fold: int) -> Path:
        return self._dir("pseudo") / f"fold_{fold}"

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
    def cv_image_confusions(self) -> Path:
        """plots/cv/image_confusions.npz: every out-of-fold image's confusion (the leaderboard's pairs)."""
        return self._dir("plots") / "cv" / "image_confusions.npz"

    @property
    def ensemble_reports(self) -> Path:
        return self._dir("reports") / "ensemble"

    @property
    def variants_csv(self) -> Path:
        return self.ensemble_reports / "variants.csv"

    @property
    def postprocess_json(self) -> Path:
        """What submit, predict and the MLflow model apply after the probabilities (CRF, fitted rules)."""
        return self.ensemble_reports / "postprocess.json"

    @property
    def blend_reports(self) -> Path:
        return self._dir("reports") / "blend"

    @property
    def blend_variants_csv(self) -> Path:
        return self.blend_reports / "variants.csv"

    @property
    def blend_json(self) -> Path:
        """The fitted blend: its experiments' weights and members (what submit uses with blend.experiments)."""
        return self.blend_reports / "blend.json"

    def metrics_json(self, stage: str) -> Path:
        return self._dir("metrics") / f"{stage}.json"

FINAL_VARIANT = "holdout/final"   # metrics/ensemble.json key of the final ensemble judged on the holdout
