"""What the submit stage delivers: the final ensemble's (or, with blend.experiments, the fitted blend's)
predictions for test.json's images -> submission.csv, a gallery of the first few, and the same
ensemble as an MLflow model folder a user can take away."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pipeline.data.coco import load_test_set
from pipeline.data.masks import read_classes
from pipeline.devices import pick_device
from pipeline.evaluation.blend import submitted_members
from pipeline.evaluation.plots import plot_test_gallery
from pipeline.inference.ensemble import Ensemble
from pipeline.inference.postprocess import Refiner
from pipeline.inference.recipe import final_params
from pipeline.inference.served import export_ensemble_model
from pipeline.inference.submission import write_submission
from pipeline.workspace import SubmissionFiles, Workspace

if TYPE_CHECKING:
    from pipeline.config import ParamsView, Paths


@dataclass
class Submitted:
    images: int                # test images predicted
    gallery: Optional[Path]    # gallery.png of the first submit.gallery predictions (None when 0)
    model: Path                # the MLflow model folder


def submit(p: "ParamsView", out: SubmissionFiles) -> Submitted:
    """For params `p` (data, infer, train, blend, submit, paths): write the submission CSV, its gallery
    and the MLflow model into `out`. Test images are prepared as training's were (the mask cache's max_side)."""
    cache = read_classes(p.paths.masks)
    classes, max_side = cache["classes"], cache.get("max_side")
    images = load_test_set(p.data)
    p = final_params(p)   # the recipe the ensemble stage chose (infer.choose auto), else params'
    members = submitted_members(p)
    refine = submitted_refiner(p.paths)
    ens = Ensemble.from_files(members, p.infer, pick_device(p.infer.device), refine)
    spec = ens.spec   # test images are prepared as the checkpoints say; params and the cache must agree
    spec.check("submit", eval_size=p.train.eval_size, max_side=max_side, classes=classes)
    out.dir.mkdir(parents=True, exist_ok=True)
    kept = write_submission(ens, images, out.csv, p.submit.size, p.infer.batch_size, p.submit.gallery)
    gallery = plot_test_gallery(images, kept, classes, out.gallery_png) if kept else None
    model = export_ensemble_model(out.model, members, p.infer, spec, refine)
    return Submitted(len(images), gallery, model)


def submitted_refiner(paths: "Paths") -> Refiner:
    """What the ensemble stage decided the submission applies after the probabilities (CRF when
    infer.crf.enabled, the rules fitted out of fold when infer.postprocess): reports/ensemble/postprocess.json."""
    f = Workspace(paths).ensemble.postprocess_json
    if not f.exists():
        print(f"note: {f} not found (run the ensemble stage): class maps are the plain argmax")
        return Refiner()
    return Refiner.load(f)
