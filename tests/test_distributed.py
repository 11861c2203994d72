"""DDP: the real train stage with train.devices: 2 relaunches itself under torchrun (gloo, 2 CPU
processes) and ends with the metrics of the 1-process run; only rank 0 writes files and MLflow."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
import yaml

from pipeline.config import Params
from tests.helpers import REPO
from tests.helpers import easy_workspace


def run_stage(tmp, name: str, devices: int) -> dict:
    raw = Params().model_dump()
    # VGG16 LargeFOV: no BatchNorm (on CPU its statistics are per process: SyncBatchNorm is CUDA-only),
    # and dropout off (each process draws its own masks): then one process and two must agree.
    raw["model"] = "deeplabv1"
    raw["paths"].update({k: str(tmp / name / k) for k in ("models", "metrics", "plots")},
                        masks=str(tmp / "masks"), split=str(tmp / "split"))
    raw["train"].update(folds=[0], epochs=2, batch_size=6, image_size=32, optimizer="sgd", lr=0.01, loss={"ce": 1.0},
                        augment=[], dropout=0.0)
    raw["runtime"].update(gallery=1, devices=devices)
    work = tmp / name
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(Params.model_validate(raw).model_dump(), sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "stages.train", "--fold", "0", "--seed", "0"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    metrics = json.loads((work / "metrics/details/train/fold_0_seed_0.json").read_text())["val"]
    history = (work / "plots/train/fold_0_seed_0.csv").read_text().splitlines()
    return {"metrics": metrics, "history": [dict(zip(history[0].split(","), map(float, r.split(",")))) for r in history[1:]],
            "confusion": np.load(work / "models/fold_0/seed_0/val_confusion.npy"), "log": out.stdout + out.stderr}


@pytest.mark.timeout(600)
def test_two_gloo_processes_match_one(tmp_path):
    easy_workspace(tmp_path, n=24)

    one, two = run_stage(tmp_path, "one", 1), run_stage(tmp_path, "two", 2)
    assert "torchrun" in two["log"] and two["log"].count("epoch 2/2") == 1   # rank 0 alone reports
    # The losses differ by float summation order only. Scores come from argmaxes, where a pixel whose
    # two top logits are that close may flip on some CPU: the validation confusions may differ by a
    # few pixels (here at most 0.1 %), never in what was counted.
    for a, b in zip(one["history"], two["history"], strict=True):
        for key in ("train/loss", "val/loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    c1, c2 = one["confusion"], two["confusion"]
    assert c1.sum() == c2.sum() == 6 * 64 * 64 and (c1.sum(1) == c2.sum(1)).all()   # same pixels, same truth
    assert np.abs(c1 - c2).sum() / 2 <= 0.001 * c1.sum()
    for key in ("best_epoch", "val_images"):
        assert two["metrics"][key] == one["metrics"][key], key

    runs = mlflow.search_runs(experiment_names=["segmentation"], output_format="list")
    assert sorted(r.info.run_name.split(" · ")[-1] for r in runs if r.data.tags.get("pipeline.role") == "stage") == [
        "train@0-0"] * 2


class HalfUsed(torch.nn.Module):
    """A model with a layer its forward never uses."""

    def __init__(self):
        super().__init__()
        self.used, self.unused = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.used(x)


def _steps_with_an_unused_parameter(rank: int, init: str) -> None:
    import torch
    import torch.distributed as td

    from pipeline.training.distributed import Dist, wrap

    td.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        ddp = wrap(HalfUsed(), Dist(rank=rank, world=2, local_rank=rank), torch.device("cpu"))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for step in range(6):            # plain DDP fails on the 2nd step: a parameter never got its gradient
            x = torch.randn(3, 4, generator=torch.Generator().manual_seed(rank * 100 + step))
            if step % 2 == 0:            # gradient accumulation, as the training loop does it
                with ddp.no_sync():
                    ddp(x).sum().backward()
                continue
            ddp(x).sum().backward()
            opt.step()
            opt.zero_grad()
        weights = [torch.zeros(2, 4) for _ in range(2)]
        td.all_gather(weights, ddp.module.used.weight.detach())
        assert torch.equal(weights[0], weights[1])     # gradients were averaged: the replicas agree
    finally:
        td.destroy_process_group()


def test_ddp_survives_a_parameter_without_gradient(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_steps_with_an_unused_parameter, args=(f"file://{tmp_path / 'rendezvous'}",), nprocs=2, join=True)
