"""The final ensemble as an MLflow model: its checkpoints, TTA views, scales, weights and image
preparation in one folder that `mlflow.pyfunc.load_model(uri).predict(...)` runs in any process,
giving the class maps `stages.predict` gives. The `pipeline` package travels inside the model
(code_paths), so loading needs the requirements, not this repository.

    model = mlflow.pyfunc.load_model("models:/segmentation-ensemble@champion")
    maps = model.predict(pd.DataFrame({"path": ["photo1.jpg", "photo2.jpg"]}))
    # -> [(H, W) uint8 class map per image, at its own size, in input order]
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow.pyfunc
import pandas as pd

from pipeline.io import atomic_dir

if TYPE_CHECKING:
    from pipeline.config import Infer
    from pipeline.models.checkpoint import InputSpec

CONFIG = "ensemble.json"


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: load_context rebuilds the Ensemble from the checkpoints; predict takes a
    DataFrame with a `path` column (or a list of paths)."""

    def load_context(self, context) -> None:
        from pipeline.devices import pick_device
        from pipeline.inference.ensemble import Ensemble, load_member
        from pipeline.inference.postprocess import Refiner
        from pipeline.models.checkpoint import InputSpec

        cfg = json.loads(Path(context.artifacts["config"]).read_text())
        device = pick_device(cfg["device"])
        loaded = [load_member(context.artifacts[f"member_{i}"], device, cfg["batch_size"]) for i in range(len(cfg["weights"]))]
        self.spec = InputSpec.common([s for _, s in loaded], "the MLflow model's checkpoints")
        self.ensemble = Ensemble([(m, w) for (m, _), w in zip(loaded, cfg["weights"])], cfg["tta"], cfg["scales"],
                                 device, cfg["amp"], Refiner.from_json(cfg["refine"]) if cfg.get("refine") else None,
                                 self.spec)
        self.spec.check("the MLflow model", **{k: v for k, v in cfg["input_spec"].items()
                                               if k in ("eval_size", "max_side", "classes")})
        self.cfg = cfg

    def predict(self, context, model_input, params=None) -> list:
        from pipeline.inference.submission import image_table, predict_images

        paths = list(model_input["path"]) if isinstance(model_input, pd.DataFrame) else list(model_input)
        table = image_table(paths)
        out: list = [None] * len(paths)
        for i, pred in predict_images(self.ensemble, table, self.cfg["batch_size"]):
            out[i] = pred
        return out


def export_ensemble_model(folder: str | Path, members: list[tuple[Path, float]], infer: "Infer", spec: InputSpec,
                          refine=None) -> Path:
    """Replace `folder` (atomically) with <folder>/model, the MLflow model folder; return that path."""
    with atomic_dir(folder) as tmp:
        save_ensemble_model(tmp / "model", members, infer, spec, refine)
    return Path(folder) / "model"


def save_ensemble_model(path: str | Path, members: list[tuple[Path, float]], infer: "Infer", spec: InputSpec,
                        refine=None) -> Path:
    """Write the MLflow model folder (`MLmodel`, the checkpoints, ensemble.json, the pipeline code).
    spec: the members' InputSpec (the served model prepares images by the checkpoints' own spec and
    checks they still share it); refine: a postprocess.Refiner (CRF, fitted rules) applied after the
    probabilities."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = path.parent / f".{path.name}.{CONFIG}"
    config.write_text(json.dumps({"weights": [w for _, w in members], "tta": list(infer.tta),
                                  "scales": list(infer.scales), "batch_size": infer.batch_size, "amp": infer.amp,
                                  "device": infer.device, "input_spec": spec.to_dict(),
                                  "refine": refine.to_json() if refine is not None and refine.active else None},
                                 indent=1))
    try:
        mlflow.pyfunc.save_model(
            str(path), python_model=EnsembleModel(),
            artifacts={"config": str(config), **{f"member_{i}": str(p) for i, (p, _) in enumerate(members)}},
            code_paths=[str(Path(__file__).resolve().parents[1])],
            pip_requirements=[f"{m}=={_version(m)}" for m in ("torch", "torchvision", "segmentation-models-pytorch",
                                                            "albumentations", "opencv-python-headless", "pandas",
                                                            "pycocotools", "timm", "scipy", "pydensecrf2")])
    finally:
        config.unlink(missing_ok=True)
    return path


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)
