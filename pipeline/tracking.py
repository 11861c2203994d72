"""MLflow: one parent run per pipeline execution, one child run per stage (and per fold).

A pipeline execution is one `dvc repro` or one `dvc exp run`: every stage process DVC starts for it
descends from the same `dvc` process, so (host, dvc pid, dvc start time) identifies it. The first
stage to run creates the parent run (named after the DVC experiment when there is one, with the
whole params file logged flat); later stages find it by tag and nest under it. Each stage marks the
parent FINISHED (or FAILED) when it ends, so the parent's status is that of the last stage run.
A stage run by hand (`python -m stages.eda`) gets a parent of its own. Set PIPELINE_SESSION to
group runs yourself.

Tracking URI: $MLFLOW_TRACKING_URI, else sqlite:///<repo root>/mlflow.db — the user's repo even
when DVC runs the stage in a temporary workspace (`dvc exp run --temp/--queue`). A tracking server
that does not answer is reported before the stage does any work. Experiment:
$MLFLOW_EXPERIMENT_NAME, else "segmentation". MLflow is imported lazily, telemetry off.

A pipeline killed with SIGKILL cannot mark its runs; the next pipeline execution on the same host
marks parents (and their stage runs) whose dvc process is gone as KILLED.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from pipeline.config import PARAMS_FILE, ConfigError, ParamsView, flatten, load_params
from pipeline.io import write_json

DEFAULT_EXPERIMENT = "segmentation"
SESSION_TAG = "pipeline.session"


def _mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    import mlflow

    return mlflow


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd())


def tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = repo_root().resolve()
    for parent in root.parents:  # DVC's temporary experiment workspaces live in <repo>/.dvc/tmp/exps/...
        if parent.name == "exps" and parent.parent.name == "tmp" and parent.parent.parent.name == ".dvc":
            root = parent.parent.parent.parent
            break
    return f"sqlite:///{root / 'mlflow.db'}"


@contextmanager
def _sqlite_setup_lock(uri: str) -> Iterator[None]:
    """Parallel experiments (`dvc queue start -j N`) share one sqlite file: the first to touch it
    creates its tables, and two doing that at once collide. A file lock makes set-up one at a time."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock = Path(uri[len("sqlite:///"):] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


class TrackingUnreachable(ConfigError):
    pass


def check_server(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, naming the server, when an HTTP tracking server does not answer (MLflow's own
    client would retry for minutes, after the stage had done its work)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
            r.read()
    except (OSError, ValueError) as e:
        raise TrackingUnreachable(f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) does not answer: {e}. "
                                  "Start it, or unset MLFLOW_TRACKING_URI to log to mlflow.db in the repo") from None


def _proc(pid: int) -> tuple[int, list[str], str]:
    """(parent pid, argv, start time) of a process, from /proc (Linux)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return int(fields[1]), [a.decode(errors="replace") for a in argv if a], fields[19]


def _is_dvc(argv: list[str]) -> bool:
    names = [Path(a).name for a in argv[:3]]
    return any(n == "dvc" or n.startswith("dvc.") for n in names) or argv[1:3] == ["-m", "dvc"]


def session_key() -> str:
    """Identity of the current pipeline execution (see the module docstring)."""
    if os.environ.get("PIPELINE_SESSION"):
        return os.environ["PIPELINE_SESSION"]
    host = socket.gethostname()
    pid = os.getppid()
    try:
        for _ in range(12):
            if pid <= 1:
                break
            ppid, argv, start = _proc(pid)
            if _is_dvc(argv):
                return f"{host}:dvc:{pid}:{start}"
            pid = ppid
    except OSError:
        pass
    return f"{host}:standalone:{os.getpid()}:{time.time_ns()}"


def git_sha() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=repo_root())
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _clean(value: Any) -> str:
    return "null" if value is None else str(value)


def _parent_run(client, experiment_id: str, key: str) -> str:
    found = client.search_runs([experiment_id], filter_string=f"tags.`{SESSION_TAG}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    exp_name = os.environ.get("DVC_EXP_NAME")
    name = exp_name or f"repro {time.strftime('%Y-%m-%d %H:%M:%S')}"
    tags = {SESSION_TAG: key, "pipeline.role": "parent", "git.sha": _clean(git_sha()),
            "dvc.exp_name": _clean(exp_name), "mlflow.runName": name}
    _mark_killed(client, experiment_id)
    run = client.create_run(experiment_id, tags=tags, run_name=name)
    params_file = repo_root() / PARAMS_FILE
    if params_file.exists():
        flat = flatten(load_params(params_file))
        from mlflow.entities import Param

        client.log_batch(run.info.run_id, params=[Param(k, _clean(v)[:6000]) for k, v in sorted(flat.items())])
    return run.info.run_id


def _alive(key: str) -> bool:
    """Is the pipeline execution with this session key still running? (Unknown = yes.)"""
    host, kind, *rest = key.split(":") + ["", ""]
    if host != socket.gethostname() or kind not in ("dvc", "standalone"):
        return True
    try:
        start = _proc(int(rest[0]))[2]
        return kind == "standalone" or start == rest[1]
    except (OSError, ValueError, IndexError):
        return False


def _mark_killed(client, experiment_id: str) -> None:
    """Runs left RUNNING by a pipeline that was SIGKILLed (nothing could mark them) become KILLED."""
    stale = client.search_runs([experiment_id], "tags.`pipeline.role` = 'parent' and attributes.status = 'RUNNING'",
                               max_results=200)
    for parent in stale:
        if _alive(parent.data.tags.get(SESSION_TAG, "")):
            continue
        kids = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and "
                                  "attributes.status = 'RUNNING'", max_results=1000)
        for run in [*kids, parent]:
            client.set_terminated(run.info.run_id, status="KILLED")


class StageRun:
    """Handle a stage uses to log; metric keys are slash-namespaced (`eda/images`, `val/mIoU`)."""

    def __init__(self, mlflow, run_id: str, parent_id: str):
        self.mlflow, self.run_id, self.parent_id = mlflow, run_id, parent_id

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None, parent: bool = False) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self.mlflow.log_metrics(clean, step=step)
        if parent:
            client = self.mlflow.tracking.MlflowClient()
            for k, v in clean.items():
                client.log_metric(self.parent_id, k, v, step=step or 0)

    def log_artifacts(self, folder: str | Path, artifact_path: Optional[str] = None) -> None:
        self.mlflow.log_artifacts(str(folder), artifact_path)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path)

    def write_metrics(self, path: str | Path, metrics: dict[str, Any], parent: bool = False) -> Path:
        """Write the DVC metrics JSON (nested as given) and log its numeric leaves to MLflow."""
        write_json(path, metrics)
        flat = {k.replace(".", "/"): v for k, v in flatten(metrics).items() if isinstance(v, (int, float))
                and not isinstance(v, bool)}
        self.log_metrics(flat, parent=parent)
        return Path(path)


@contextmanager
def stage_run(stage: str, params: Optional[ParamsView] = None, fold: Optional[int] = None,
              seed: Optional[int] = None) -> Iterator[StageRun]:
    """Open this stage's child run under the pipeline execution's parent run."""
    mlflow = _mlflow()
    uri = tracking_uri()
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    with _sqlite_setup_lock(uri):
        client = mlflow.tracking.MlflowClient()  # creates (or migrates) the store's tables
        exp = client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp else client.create_experiment(exp_name)
        parent_id = _parent_run(client, exp_id, session_key())
    client.update_run(parent_id, status="RUNNING")
    name = stage if fold is None else f"{stage}@{fold}" if seed is None else f"{stage}@{fold}-{seed}"  # = DVC's
    tags = {"pipeline.stage": stage, "pipeline.role": "stage", "git.sha": _clean(git_sha()),
            "dvc.stage": _clean(os.environ.get("DVC_STAGE")), "dvc.exp_name": _clean(os.environ.get("DVC_EXP_NAME"))}
    if fold is not None:
        tags["pipeline.fold"] = str(fold)
    if seed is not None:
        tags["pipeline.seed"] = str(seed)
    status = "FAILED"
    # SIGTERM (kill, a cancelled CI job, a scheduler) would end the process without closing the runs;
    # as an exception it unwinds through here and both runs are marked FAILED.
    previous = (signal.signal(signal.SIGTERM, _exit_on_sigterm)
                if threading.current_thread() is threading.main_thread() else None)
    with mlflow.start_run(experiment_id=exp_id, run_name=name, parent_run_id=parent_id, tags=tags) as run:
        try:
            if params is not None:
                mlflow.log_params({k: _clean(v)[:6000] for k, v in params.flat().items()})
            yield StageRun(mlflow, run.info.run_id, parent_id)
            status = "FINISHED"
        finally:
            if status == "FAILED":
                mlflow.set_tag("pipeline.failed", "true")
            client.set_terminated(parent_id, status=status)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame) -> None:
    sys.exit(128 + signum)
