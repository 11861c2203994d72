"""Each data stage (masks, near_dups, eda, split) as DVC runs it — one fresh Python process — on a
small dataset: 30 demo images of 128 px. Target: <= 3 s wall per stage on a quiet 2-core machine.

Prints, per stage, the whole process's wall time twice: as a later stage of a pipeline execution
(`dvc repro`: the stages share the MLflow logger process the first one started) and as the first or
only stage (`python -m stages.x`: it starts its own logger, which imports MLflow while the stage
works), and the stage module's import time (`python -X importtime`). The MLflow store's tables are
created once before timing.

    python -m bench.data_stages [--images 30] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ["masks", "near_dups", "eda", "split"]


def run(args: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return time.perf_counter() - start, out.stderr


def import_seconds(module: str, cwd: Path, env: dict) -> float:
    _, err = run(["-X", "importtime", "-c", f"import {module}"], cwd, env)
    total = [int(m) for m in re.findall(r"import time:\s+\d+ \|\s+(\d+) \| \S", err)]
    top = [int(m) for m in re.findall(r"import time:\s+\d+ \|\s+(\d+) \| (?! )", err)]
    return sum(top or total) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["demo"].update(n_train=a.images, n_test=0, image_size=128)
        params["data"].update(test_json=None)
        (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_URI", "PIPELINE_SESSION", "DVC_"))}
        env.update(PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true", DVC_ROOT=str(ws))
        shared = {**env, "PIPELINE_SESSION": "bench-data-stages"}   # one pipeline execution, as under dvc repro
        run(["-m", "stages.demo_data"], ws, shared)                # the data, the store's tables, the logger
        in_pipeline = {stage: [] for stage in STAGES}
        for _ in range(a.repeat):                                  # the DAG's order, as dvc repro runs it
            for stage in STAGES:
                in_pipeline[stage].append(run(["-m", f"stages.{stage}"], ws, shared)[0])
        rows = []
        for stage in STAGES:
            alone = [run(["-m", f"stages.{stage}"], ws, env)[0] for _ in range(a.repeat)]
            imports = statistics.median(import_seconds(f"stages.{stage}", ws, env) for _ in range(a.repeat))
            rows.append((stage, statistics.median(in_pipeline[stage]), statistics.median(alone), imports))
    print(f"{a.images} images of 128 px, {os.cpu_count()} cores; median of {a.repeat} runs, one process each")
    print(f"{'stage':<10} {'in a pipeline s':>16} {'alone s':>8} {'imports s':>10}   target <= 3 s")
    for stage, shared_s, alone_s, imp in rows:
        print(f"{stage:<10} {shared_s:16.2f} {alone_s:8.2f} {imp:10.2f}")


if __name__ == "__main__":
    main()
