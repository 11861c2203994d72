"""MLflow runs: one parent per pipeline execution, one child per stage, status and params honest."""
from __future__ import annotations

import json
import re

import mlflow
import pytest

from pipeline.config import Params
from pipeline.session import session_key
from pipeline.tracking import _sqlite_setup_lock, champion_moves, stage_run, tracking_uri


def runs(experiment="segmentation"):
    """The experiment's runs; the store's set-up lock is taken like the logger takes it, since a
    logger may be creating the tables at that moment."""
    mlflow.set_tracking_uri(tracking_uri())
    with _sqlite_setup_lock(tracking_uri()):
        return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def test_stages_of_one_session_share_a_parent(tmp_path):
    with stage_run("masks", Params().only("masks")) as run:
        run.log_metrics({"masks/images": 3})
    with stage_run("eda", Params().only("eda", "split")) as run:
        run.write_metrics(tmp_path / "m.json", {"eda": {"images": 3}}, tmp_path / "details" / "m.json",
                          {"eda": {"images": 3, "overlap": {"images": 1}, "name": "x"}})
    all_runs = runs()
    parents = [r for r in all_runs if r.data.tags.get("pipeline.role") == "parent"]
    children = [r for r in all_runs if r.data.tags.get("pipeline.role") == "stage"]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert parent.info.status == "FINISHED"
    eda = next(c for c in children if c.data.tags["pipeline.stage"] == "eda")
    assert eda.data.metrics == {"eda/images": 3.0, "eda/overlap/images": 1.0}   # the details, on the stage's run
    assert json.loads((tmp_path / "m.json").read_text()) == {"eda": {"images": 3}}   # the headline, for DVC
    assert eda.data.params["split.strategy"] == "multilabel" and eda.data.params["split.n_folds"] == "2"
    assert json.loads((tmp_path / "details" / "m.json").read_text())["eda"]["overlap"]["images"] == 1
    masks = next(c for c in children if c.data.tags["pipeline.stage"] == "masks")
    assert masks.data.params["masks.overlap"] == "smaller_on_top" and masks.data.params["masks.max_side"] == "null"


def test_failed_stage_marks_parent_failed():
    with pytest.raises(RuntimeError):
        with stage_run("split"):
            raise RuntimeError("boom")
    [child] = [r for r in runs() if r.data.tags.get("pipeline.role") == "stage"]
    [parent] = [r for r in runs() if r.data.tags.get("pipeline.role") == "parent"]
    assert child.info.status == "FAILED" and parent.info.status == "FAILED"


def test_different_sessions_get_different_parents(monkeypatch):
    for key in ("one", "two"):
        monkeypatch.setenv("PIPELINE_SESSION", key)
        with stage_run("eda"):
            pass
    assert len([r for r in runs() if r.data.tags.get("pipeline.role") == "parent"]) == 2


def test_runs_named_after_the_dvc_experiment_with_its_own_params(monkeypatch, tmp_path):
    """Parent: '<experiment> · <date>'; its stage runs carry the experiment too, so two experiments'
    curves overlaid in the UI are told apart (without a DVC experiment the recipe names them,
    'unet-mobilenet_v2 · ...': tests/test_e2e.py). Its params are the workspace's the stage runs in,
    not DVC_ROOT's (which `dvc exp run --temp/--queue` points at the user's repo)."""
    monkeypatch.setenv("DVC_EXP_NAME", "pspnet-try")
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "params.yaml").write_text("model: pspnet\ntrain: {epochs: 7}\n")
    monkeypatch.chdir(tmp_path / "exp")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))   # the user's repo: another params.yaml, or none
    with stage_run("eda"):
        pass
    [parent] = [r for r in runs() if r.data.tags.get("pipeline.role") == "parent"]
    [child] = [r for r in runs() if r.data.tags.get("pipeline.role") == "stage"]
    assert re.fullmatch(r"pspnet-try · \d\d-\d\d \d\d:\d\d", parent.info.run_name), parent.info.run_name
    assert parent.data.tags["dvc.exp_name"] == "pspnet-try" and child.info.run_name == "pspnet-try · eda"
    assert parent.data.params["train.epochs"] == "7" and parent.data.params["model"] == "pspnet"


def test_champion_moves_only_to_a_better_out_of_fold_score(tmp_path):
    """Every registered version is tagged; @champion moves only when a version beats it in the same
    out-of-fold metric: not to a worse, an equal, an unscored or an otherwise-scored one."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "MLmodel").write_text("flavors: {}\n")
    scores = [("mIoU", 0.5), ("mIoU", 0.4), ("mIoU", 0.6), ("image mIoU", 0.9)]
    with stage_run("submit") as run:   # one logger registers them in order, as four pipelines' would
        for i, score in enumerate(scores):
            run.log_model(folder, "model", "ens", {"experiment": f"e{i}"}, score)
    client = mlflow.tracking.MlflowClient(tracking_uri())
    champion = client.get_model_version_by_alias("ens", "champion")
    assert str(champion.version) == "3" and champion.tags["experiment"] == "e2" and float(champion.tags["cv.score"]) == 0.6
    versions = {str(v.version): v.tags for v in client.search_model_versions("name='ens'")}
    assert {k: v["experiment"] for k, v in versions.items()} == {str(i + 1): f"e{i}" for i in range(len(scores))}
    assert versions["4"]["cv.metric"] == "image mIoU"
    # the rule itself, on the champion's tags: only a strictly better score in the same metric moves it
    tags = {"cv.metric": "mIoU", "cv.score": "0.6"}
    assert champion_moves(None, "mIoU", 0.1) and champion_moves(tags, "mIoU", 0.61)
    assert not champion_moves(tags, "mIoU", 0.6) and not champion_moves(tags, "mIoU", 0.59)
    assert not champion_moves(tags, "image mIoU", 0.9) and not champion_moves({"cv.metric": "mIoU"}, "mIoU", 0.9)


def test_standalone_session_key_outside_dvc(monkeypatch):
    monkeypatch.delenv("PIPELINE_SESSION")
    assert ":standalone:" in session_key()      # pytest has no dvc ancestor


def killed_stage(tmp_path, sig: int) -> int:
    """Run a stage that logs one metric in a child process, send it `sig` once it is working, and
    return its exit status."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    script = "import time\nfrom pipeline.tracking import stage_run\nwith stage_run('slow') as run:\n" \
             "    run.log_metrics({'x': 1.0})\n    print('ready', flush=True)\n    time.sleep(120)\n"
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(sig)
    return proc.wait(timeout=60)


def test_sigterm_marks_the_runs_failed(tmp_path):
    import signal

    assert killed_stage(tmp_path, signal.SIGTERM) == 128 + signal.SIGTERM
    statuses = {r.data.tags.get("pipeline.role"): r.info.status for r in runs()}
    assert statuses == {"parent": "FAILED", "stage": "FAILED"}


def test_sigkill_marks_the_runs_killed_at_once(tmp_path):
    """SIGKILL runs no cleanup code in the stage; the logger sees its connection close and ends the
    runs as KILLED, without waiting for the next pipeline to notice."""
    import signal
    import time

    assert killed_stage(tmp_path, signal.SIGKILL) == -signal.SIGKILL
    for _ in range(300):
        found = {r.data.tags.get("pipeline.role"): r for r in runs()}
        if len(found) == 2 and "RUNNING" not in {r.info.status for r in found.values()}:
            break
        time.sleep(0.1)
    assert {k: r.info.status for k, r in found.items()} == {"parent": "KILLED", "stage": "KILLED"}
    assert found["stage"].data.metrics == {"x": 1.0}


def test_temporary_dvc_workspaces_log_to_the_users_repo(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo/.dvc/tmp/exps/tmpab12cd"))
    assert tracking_uri() == f"sqlite:///{tmp_path / 'repo/mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert tracking_uri() == f"sqlite:///{tmp_path / 'repo/mlflow.db'}"


STAGE = """
import sys
from pipeline.tracking import stage_run
with stage_run("slow") as run:
    run.log_metrics({"x": 1.0})
    print("ready", flush=True)
    sys.stdin.readline()             # the test stops the server meanwhile
    run.log_metrics({"y": 2.0})
    open("note.txt", "w").write("made while the server was down")
    run.log_artifact("note.txt", "notes")
"""


def test_a_tracking_outage_never_fails_a_stage_and_its_records_are_sent_later(tmp_path):
    """The network to the server goes down in the middle of one stage and is down when the next
    starts: both stages end well (exit 0) in bounded time with one line saying where their records
    wait; once it is back, `python -m pipeline.tracking sync` sends them — one parent, every metric
    and artifact, true statuses."""
    import os
    import subprocess
    import sys
    import time

    from tests.helpers import REPO, Cable, mlflow_server

    with mlflow_server(tmp_path / "server") as server:
        cable = Cable(int(server.rsplit(":", 1)[1]))
        url = f"http://127.0.0.1:{cable.port}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(REPO), "PIPELINE_SESSION": "outage"}
        stage = subprocess.Popen([sys.executable, "-c", STAGE], cwd=tmp_path, env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert stage.stdout.readline().strip() == "ready"
        cable.unplug()
        began = time.monotonic()
        _, err = stage.communicate("go\n", timeout=120)
        assert stage.returncode == 0 and "Traceback" not in err, err
        [line] = err.splitlines()
        assert line.startswith("mlflow: the MLflow store failed (") and "records are kept in .mlflow-outbox/" in line, line
        (tmp_path / "params.yaml").write_text("demo:\n  n_train: 4\n  n_test: 1\n")
        out = subprocess.run([sys.executable, "-m", "stages.demo_data"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and (tmp_path / "data/demo/train.json").exists(), out.stderr
        [line] = out.stderr.splitlines()
        assert line.startswith(f"mlflow: the MLflow tracking server {url} (MLFLOW_TRACKING_URI) does not answer ("), line
        assert time.monotonic() - began < 60                           # seconds of waiting, not MLflow's minutes
        assert len(list((tmp_path / ".mlflow-outbox").glob("*.json"))) == 2
        cable.plug()
        sync = subprocess.run([sys.executable, "-m", "pipeline.tracking", "sync"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert sync.returncode == 0 and "sent 2 kept record(s)" in sync.stdout, sync.stdout + sync.stderr
        assert not list((tmp_path / ".mlflow-outbox").iterdir())
        mlflow.set_tracking_uri(url)
        found = mlflow.search_runs(experiment_names=["segmentation"], output_format="list")
        [parent] = [r for r in found if r.data.tags["pipeline.role"] == "parent"]
        kids = {r.data.tags["pipeline.stage"]: r for r in found if r.data.tags["pipeline.role"] == "stage"}
        assert set(kids) == {"slow", "demo_data"} and parent.info.status == "FINISHED"
        assert all(k.data.tags["mlflow.parentRunId"] == parent.info.run_id and k.info.status == "FINISHED"
                   for k in kids.values())
        assert kids["slow"].data.metrics == {"x": 1.0, "y": 2.0} and kids["demo_data"].data.params["demo.n_train"] == "4"
        client = mlflow.tracking.MlflowClient(url)
        note = client.download_artifacts(kids["slow"].info.run_id, "notes/note.txt", str(tmp_path))
        assert open(note).read() == "made while the server was down"
        cable.unplug()


def test_runs_left_running_by_a_killed_pipeline_are_marked_killed(monkeypatch):
    import socket

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.tracking.MlflowClient()
    exp = client.create_experiment("segmentation")
    dead = f"{socket.gethostname()}:dvc:999999999:1"          # no such process
    parent = client.create_run(exp, tags={"pipeline.session": dead, "pipeline.role": "parent"})
    child = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id, "pipeline.role": "stage"})
    elsewhere = client.create_run(exp, tags={"pipeline.session": "otherhost:dvc:1:1", "pipeline.role": "parent"})
    with stage_run("eda"):
        pass
    status = {r.info.run_id: r.info.status for r in runs()}
    assert status[parent.info.run_id] == status[child.info.run_id] == "KILLED"
    assert status[elsewhere.info.run_id] == "RUNNING"             # another host's: cannot know, left alone


def _wait_for(predicate, seconds=15.0):
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    return predicate()


def _fake_dvc(monkeypatch):
    """A process standing in for `dvc repro`: the session is tied to its pid and start time."""
    import socket
    import subprocess

    from pipeline.session import process

    proc = subprocess.Popen(["sleep", "60"])
    monkeypatch.setenv("PIPELINE_SESSION", f"{socket.gethostname()}:dvc:{proc.pid}:{process(proc.pid)[2]}")
    return proc


def _parent_status():
    return [r.info.status for r in runs() if r.data.tags.get("pipeline.role") == "parent"]


def test_parent_reads_running_between_stages_and_finished_when_dvc_ends(monkeypatch):
    dvc = _fake_dvc(monkeypatch)
    try:
        with stage_run("masks"):
            pass
        assert _parent_status() == ["RUNNING"]                 # the pipeline is not over: more stages may come
        with stage_run("eda"):
            pass
        assert _parent_status() == ["RUNNING"]
        assert {r.info.status for r in runs() if r.data.tags.get("pipeline.role") == "stage"} == {"FINISHED"}
    finally:
        dvc.kill()
        dvc.wait()
    assert _wait_for(lambda: _parent_status() == ["FINISHED"]), _parent_status()


def test_a_failed_stage_fails_the_parent_at_once_and_for_good(monkeypatch):
    dvc = _fake_dvc(monkeypatch)
    try:
        with pytest.raises(RuntimeError):
            with stage_run("split"):
                raise RuntimeError("boom")
        assert _parent_status() == ["FAILED"]
        with stage_run("eda"):                                 # dvc repro --keep-going runs other stages on
            pass
        assert _parent_status() == ["FAILED"]
    finally:
        dvc.kill()
        dvc.wait()
    import time

    time.sleep(2)
    assert _parent_status() == ["FAILED"]


def test_a_local_store_moves_with_its_repo(tmp_path):
    """A copied or moved repo: relocate_store() points its runs, experiments and model versions at the
    artifacts beside the moved mlflow.db (MLflow records absolute paths), so they load again."""
    import shutil

    from pipeline.mlflow_store import relocate_store

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    client = mlflow.tracking.MlflowClient(f"sqlite:///{old / 'mlflow.db'}")
    exp = client.create_experiment("segmentation", artifact_location=str(old / "mlruns" / "1"))
    run = client.create_run(exp)
    (tmp_path / "note.txt").write_text("hello")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"), "notes")
    client.create_registered_model("ens")
    client.create_model_version("ens", f"{run.info.artifact_uri}/notes", run.info.run_id)
    assert relocate_store(old / "mlflow.db") is None          # nothing moved yet
    shutil.move(old, new)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{new / 'mlflow.db'}")
    assert relocate_store(new / "mlflow.db") == str(old)
    got = client.download_artifacts(run.info.run_id, "notes/note.txt", str(tmp_path))
    assert open(got).read() == "hello" and client.get_run(run.info.run_id).info.artifact_uri.startswith(str(new))
    assert client.get_model_version("ens", "1").source.startswith(str(new))
    assert relocate_store(new / "mlflow.db") is None          # idempotent


def test_a_kept_record_the_store_refuses_is_set_aside_and_the_rest_is_sent(tmp_path, monkeypatch):
    """The outbox never blocks on one record: one whose run the store no longer has (a 404) moves to
    .mlflow-outbox/refused/, and an artifact that is gone is skipped; the next record is sent."""
    from pipeline.mlflow_logger import Logger, keep

    monkeypatch.chdir(tmp_path)
    uri = tracking_uri()
    spec = {"uri": uri, "experiment": "segmentation", "session": "s1", "stage": "eda", "fold": None, "seed": None,
            "root": str(tmp_path), "dvc_stage": None, "dvc_exp_name": None, "params": {}, "params_file": {}, "t": 1.0}
    ops = [{"op": "metrics", "metrics": {"x": 1.0}, "step": None, "parent": False, "t": 2.0},
           {"op": "artifact", "path": str(tmp_path / "gone.png"), "artifact_path": None, "t": 3.0}]
    stale = {"kind": "stage", "uri": uri, "experiment": "segmentation", "root": str(tmp_path), "session": "s0",
             "spec": spec, "run_id": "0" * 32, "parent_id": "1" * 32, "ops": ops[:1], "status": "FINISHED", "dvc": False}
    keep(stale)
    keep({**stale, "session": "s1", "run_id": None, "parent_id": None, "ops": ops})
    assert Logger().send_outbox() == (1, 0)
    assert len(list((tmp_path / ".mlflow-outbox/refused").glob("*.json"))) == 1
    [child] = [r for r in runs() if r.data.tags.get("pipeline.role") == "stage"]
    assert child.data.metrics == {"x": 1.0} and child.info.status == "FINISHED"
