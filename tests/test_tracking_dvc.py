"""MLflow records of real DVC executions (a three-stage toy DAG, so each call costs seconds): one
parent per `dvc repro` / `dvc exp run`, FINISHED only when the pipeline completed, KILLED when dvc
died between stages, and each queued experiment's parent logging the params it ran with."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.helpers import REPO

STAGE = ("python -c \"import yaml; from pipeline.tracking import stage_run; "
         "lr = yaml.safe_load(open('params.yaml'))['lr']; open('{name}.txt', 'w').write(str(lr)); "
         "run = stage_run('{name}'); r = run.__enter__(); r.log_metrics({{'lr': lr}}); run.__exit__(None, None, None)\"")
KILL_DVC = ("python -c \"import os; from pipeline.session import session_key; "
            "os.kill(int(session_key().split(':')[2]), 9)\"")   # dvc dies with no stage running


def dag(kill_after_one: bool = False) -> dict:
    one = {"cmd": STAGE.format(name="one"), "params": ["lr"], "outs": ["one.txt"]}
    two = {"cmd": KILL_DVC if kill_after_one else STAGE.format(name="two"), "deps": ["one.txt"], "outs": ["two.txt"]}
    three = {"cmd": STAGE.format(name="three"), "deps": ["two.txt"], "outs": ["three.txt"]}
    return {"stages": {"one": one, "two": two, "three": three}}


@pytest.fixture
def toy(tmp_path):
    """A git + DVC repo with the toy DAG, logging to its own mlflow.db; (repo, env)."""
    repo = tmp_path / "toy"
    repo.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("PIPELINE_SESSION", None)
    (repo / "params.yaml").write_text("lr: 0.003\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dag()))
    (repo / ".gitignore").write_text("mlflow.db*\n.mlflow-outbox/\n/one.txt\n/two.txt\n/three.txt\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "toy"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    return repo, env


def parents(repo: Path, settled=lambda ps: all(p.info.status != "RUNNING" for p in ps), seconds: float = 90):
    """The parent runs (oldest first) once `settled` holds: a logger ends its parent after dvc ends."""
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    deadline = time.monotonic() + seconds
    while True:
        found = mlflow.search_runs(experiment_names=["segmentation"], output_format="list")
        ps = sorted((r for r in found if r.data.tags.get("pipeline.role") == "parent"), key=lambda r: r.info.start_time)
        if (ps and settled(ps)) or time.monotonic() > deadline:
            return ps
        time.sleep(0.5)


def test_a_dvc_repro_killed_between_stages_leaves_a_killed_parent_and_a_rerun_a_finished_one(toy):
    repo, env = toy
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dag(kill_after_one=True)))
    out = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == -9, out.stdout + out.stderr
    [killed] = parents(repo)
    assert killed.info.status == "KILLED"
    assert killed.data.tags["pipeline.incomplete"] == "dvc ended before these stages ran: three, two"
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dag()))
    subprocess.run(["dvc", "repro"], cwd=repo, env=env, check=True, capture_output=True, timeout=300)
    ps = parents(repo, lambda ps: len(ps) == 2 and ps[1].info.status != "RUNNING")
    assert [p.info.status for p in ps] == ["KILLED", "FINISHED"] and "pipeline.incomplete" not in ps[1].data.tags
    found = mlflow.search_runs(experiment_names=["segmentation"], output_format="list")
    kids = sorted(r.data.tags["pipeline.stage"] for r in found if r.data.tags.get("mlflow.parentRunId") == ps[1].info.run_id)
    assert kids == ["three", "two"]          # one execution, one parent: stage one was up to date


def test_queued_experiments_parents_log_the_params_they_ran_with(toy):
    repo, env = toy
    for lr in ("0.1", "0.2"):
        subprocess.run(["dvc", "exp", "run", "--queue", "-S", f"lr={lr}", "-n", f"lr{lr}"], cwd=repo, env=env, check=True,
                       capture_output=True, timeout=120)
    out = subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=300)   # a guard against a hang: under a loaded 2-core machine the workers start slowly
    assert out.returncode == 0, out.stderr
    ps = parents(repo, lambda ps: len(ps) == 2 and all(p.info.status != "RUNNING" for p in ps), seconds=240)
    got = {p.data.tags["dvc.exp_name"]: (p.data.params["lr"], p.info.status) for p in ps}
    assert got == {"lr0.1": ("0.1", "FINISHED"), "lr0.2": ("0.2", "FINISHED")}, got
    (repo / ".dvc/tmp").exists() and subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=env, capture_output=True)
    shutil.rmtree(repo / ".dvc/tmp", ignore_errors=True)


def test_the_logger_reads_what_dvc_was_asked_to_run():
    from pipeline.mlflow_logger import _dvc_targets

    py, dvc = "/venv/bin/python3", "/venv/bin/dvc"
    assert _dvc_targets([py, dvc, "repro"]) == ([py, dvc], "repro", [])
    assert _dvc_targets([py, "-m", "dvc", "repro", "-s", "train@0-0"]) == ([py, "-m", "dvc"], "repro", ["-s", "train@0-0"])
    assert _dvc_targets([dvc, "exp", "run", "-S", "lr=0.1"]) == ([dvc], "exp", ["-S", "lr=0.1"])
    assert _dvc_targets([py, dvc, "exp", "exec-run", "--infofile", "x"])[1] == "exp"
    assert _dvc_targets(["sleep", "60"]) is None and _dvc_targets([py, dvc, "status"]) is None
