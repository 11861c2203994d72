"""A team's shared tracking: a real `mlflow server` on localhost, stages logging to it over HTTP,
and the runs read back through its REST API."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest(url: str, endpoint: str, body: dict | None = None, **query) -> dict:
    full = f"{url}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(full, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture
def server(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server",
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("mlflow server did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
            time.sleep(0.5)
    yield url, tmp_path
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.timeout(300)
def test_stages_log_to_a_shared_server(server, tmp_path):
    url, root = server
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text("demo:\n  n_train: 6\n  n_test: 2\n  image_size: 64\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "PIPELINE_SESSION": "team-run-1", "PYTHONPATH": str(REPO)}
    for stage in ("demo_data", "eda"):
        out = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=work, env=env, capture_output=True,
                             text=True, timeout=180)
        assert out.returncode == 0, out.stderr

    exp = rest(url, "experiments/get-by-name", experiment_name="segmentation")["experiment"]
    found = rest(url, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in found}
    parents = [r for r in found if tags[r["info"]["run_id"]].get("pipeline.role") == "parent"]
    stages = {tags[r["info"]["run_id"]]["pipeline.stage"]: r for r in found
              if tags[r["info"]["run_id"]].get("pipeline.role") == "stage"}
    assert len(parents) == 1 and set(stages) == {"demo_data", "eda"}
    assert all(tags[r["info"]["run_id"]]["mlflow.parentRunId"] == parents[0]["info"]["run_id"] for r in stages.values())
    assert all(r["info"]["status"] == "FINISHED" for r in found)
    eda = stages["eda"]
    metrics = {m["key"]: m["value"] for m in eda["data"]["metrics"]}
    assert metrics["eda/images"] == 6
    files = rest(url, "artifacts/list", run_id=eda["info"]["run_id"], path="eda").get("files", [])
    assert {"eda/class_balance.png", "eda/overlap_matrix.png"} <= {f["path"] for f in files}
    # The artifacts went through the server into its artifact store, not into the stage's folder.
    assert any((root / "artifacts").rglob("class_balance.png")) and not (work / "mlruns").exists()
