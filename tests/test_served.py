"""The final ensemble as an MLflow model: registered by a stage run, loaded in a fresh process from
the registry, it gives the class maps `stages.predict` gives."""
from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import torch

from pipeline.config import Infer
from pipeline.inference.ensemble import Ensemble
from pipeline.inference.served import save_ensemble_model
from pipeline.inference.submission import predict_folder
from pipeline.models.checkpoint import InputSpec, save_checkpoint
from pipeline.models.factory import build_model
from pipeline.tracking import stage_run

CLASSES = ["Background", "a", "b"]
SPEC = InputSpec(tuple(CLASSES), max_side=100, eval_size=64, window=None)


def test_registered_ensemble_predicts_in_a_fresh_process_as_predict_does(tmp_path):
    torch.manual_seed(0)
    members = []
    for k in range(2):
        model = build_model("unet", "resnet18", None, len(CLASSES))
        for prm in model.parameters():   # random but not the default init: two different members
            prm.data.normal_(0, 0.05)
        path = tmp_path / f"m{k}.pt"
        save_checkpoint(path, model=model.state_dict(), classes=CLASSES, epoch=1,
                        params={"model": "unet", "encoder": "resnet18", "train.input": "resize"},
                        input_spec=SPEC.to_dict())
        members.append((path, [1.0, 3.0][k]))
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.jpg": (80, 120), "b.png": (64, 64), "sub/c.jpg": (150, 90)}.items():
        (photos / name).parent.mkdir(exist_ok=True)
        cv2.imwrite(str(photos / name), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    infer = Infer(tta=["identity", "hflip"], scales=[1.0, 1.5])
    ens = Ensemble.from_files(members, infer, torch.device("cpu"))
    assert ens.spec == SPEC
    assert predict_folder(ens, photos, tmp_path / "out") == 3

    save_ensemble_model(tmp_path / "model", members, infer, SPEC)
    with stage_run("submit") as run:
        run.log_model(tmp_path / "model", "model", "segmentation-ensemble", {"experiment": "t"}, ("mIoU", 0.5))

    files = ["a.jpg", "b.png", "sub/c.jpg"]
    script = ("import sys, numpy as np, pandas as pd, mlflow.pyfunc\n"
              "m = mlflow.pyfunc.load_model('models:/segmentation-ensemble@champion')\n"
              "out = m.predict(pd.DataFrame({'path': sys.argv[2:]}))\n"
              "np.savez(sys.argv[1], *out)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # the model brings its own code
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "maps.npz"), *[str(photos / f) for f in files]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    maps = np.load(tmp_path / "maps.npz")
    for i, f in enumerate(files):
        expected = cv2.imread(str(tmp_path / "out" / f.rsplit(".", 1)[0]) + ".png", cv2.IMREAD_UNCHANGED)
        assert maps[f"arr_{i}"].dtype == np.uint8 and np.array_equal(maps[f"arr_{i}"], expected), f
    assert len({m.tobytes() for m in maps.values()}) == 3
