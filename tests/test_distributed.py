"""DDP: the real train stage with train.devices: 2 relaunches itself under torchrun (gloo, 2 CPU
processes) and ends with the metrics of the 1-process run; only rank 0 writes files and MLflow."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest
import yaml

from pipeline.config import Params
from tests.conftest import REPO
from tests.test_training import easy_workspace


def run_stage(tmp, name: str, devices: int) -> dict:
    raw = Params().model_dump()
    # VGG16 LargeFOV: no BatchNorm (on CPU its statistics are per process: SyncBatchNorm is CUDA-only),
    # and dropout off (each process draws its own masks): then one process and two must agree.
    raw["model"] = "deeplabv1"
    raw["paths"].update({k: str(tmp / name / k) for k in ("models", "metrics", "plots")},
                        masks=str(tmp / "masks"), split=str(tmp / "split"))
    raw["train"].update(folds=[0], epochs=2, batch_size=6, image_size=32, optimizer="sgd", lr=0.01, loss={"ce": 1.0},
                        augment=[], gallery=1, devices=devices, dropout=0.0)
    work = tmp / name
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(Params.model_validate(raw).model_dump(), sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "stages.train", "--fold", "0", "--seed", "0"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    metrics = json.loads((work / "metrics/train/fold_0_seed_0.json").read_text())["val"]
    history = (work / "plots/train/fold_0_seed_0.csv").read_text().splitlines()
    return {"metrics": metrics, "history": [dict(zip(history[0].split(","), map(float, r.split(",")))) for r in history[1:]],
            "log": out.stdout + out.stderr}


@pytest.mark.timeout(600)
def test_two_gloo_processes_match_one(tmp_path):
    easy_workspace(tmp_path, n=24)

    one, two = run_stage(tmp_path, "one", 1), run_stage(tmp_path, "two", 2)
    assert "torchrun" in two["log"] and two["log"].count("epoch 2/2") == 1   # rank 0 alone reports
    for a, b in zip(one["history"], two["history"], strict=True):
        for key in ("train/loss", "val/loss", "val/mIoU", "val/pixel_acc"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key   # float summation order only
    for key in ("mIoU", "pixel_acc", "mean_acc", "best_epoch", "val_images"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-6), key

    runs = mlflow.search_runs(experiment_names=["segmentation"], output_format="list")
    assert sorted(r.info.run_name for r in runs if r.data.tags.get("pipeline.role") == "stage") == ["train@0-0"] * 2
