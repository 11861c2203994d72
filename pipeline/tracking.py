"""MLflow, as stages see it: one parent run per pipeline execution, one child run per stage (and fold).

A pipeline execution is one `dvc repro` or one `dvc exp run`: every stage process DVC starts for it
descends from the same `dvc` process, so (host, dvc pid, dvc start time) identifies it (pipeline/session.py).
A stage opens its run with `with stage_run(...) as run:` and logs through `run`; each call is one
line to the execution's logger process (pipeline/mlflow_logger.py: the protocol, how parents are
created and ended, and what happens in an outage). A stage run by hand (`python -m stages.eda`) gets
a parent of its own, ended with it. Set PIPELINE_SESSION to group runs yourself (the parent then
takes the status of its last stage).

Tracking URI: $MLFLOW_TRACKING_URI, else sqlite:///<repo root>/mlflow.db (pipeline/mlflow_store.py:
where the store is, the runs view it shows, a local store moving with its repo). Experiment:
$MLFLOW_EXPERIMENT_NAME, else "segmentation". Stages never import MLflow; telemetry is off.

Tracking never fails a stage that did its work: a server that does not answer (or a store that
fails) is one line, the records wait in <repo>/.mlflow-outbox/ and are sent by the next stage that
reaches the store, or by `python -m pipeline.tracking sync`. A pipeline killed with SIGKILL cannot
mark its runs; the next pipeline execution on the same host marks parents (and their stage runs)
whose dvc process is gone as KILLED.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from pipeline.config import PARAMS_FILE, ConfigError, ParamsView, flatten, load_params
from pipeline.io import shown_path, write_json
from pipeline.session import session_key
from pipeline.mlflow_store import TrackingUnreachable, check_server, experiment_name, tracking_uri
from pipeline.mlflow_store import sqlite_setup_lock as _sqlite_setup_lock  # noqa: F401 (tests take it like the logger)
SESSION_TAG = "pipeline.session"
LABEL_TAG = "pipeline.experiment"   # the parent's and its stage runs' experiment label (experiment_label)


def git_sha(root: Optional[str] = None) -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=root or os.getcwd())
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _clean(value: Any) -> str:
    return "null" if value is None else str(value)


def experiment_label(exp_name: Optional[str], params: dict[str, Any]) -> str:
    """What runs are called: the DVC experiment's name, else the recipe (model-encoder)."""
    if exp_name:
        return exp_name
    model, encoder = params.get("model"), params.get("encoder")
    return "-".join(str(v) for v in (model, encoder) if v)


CHAMPION = "champion"
CHAMPION_METRIC_TAG, CHAMPION_SCORE_TAG = "cv.metric", "cv.score"


def champion_moves(champion_tags: Optional[dict[str, str]], metric: str, score: float) -> bool:
    """Does a version scoring `score` (out of fold, in `metric`) take the alias from the champion
    (its version tags; None: there is none)? Only by beating it in the same metric: a champion scored
    in another metric, or with no score, keeps the alias (compare them yourself)."""
    if champion_tags is None:
        return True
    try:
        best = float(champion_tags[CHAMPION_SCORE_TAG])
    except (KeyError, ValueError):
        return False
    return champion_tags.get(CHAMPION_METRIC_TAG) == metric and score > best


class TrackingFailed(ConfigError):
    """The MLflow logger failed; the message says how."""


# ---------------------------------------------------------------------------------------------------
# The client side of the logger (pipeline/mlflow_logger.py, where the protocol is described).
# ---------------------------------------------------------------------------------------------------
START_TIMEOUT_S = 30.0


def _socket_path(spec: dict) -> Path:
    import hashlib
    import tempfile

    key = hashlib.md5("\0".join([spec["session"], spec["uri"], spec["experiment"]]).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"pipeline-mlflow-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"{key}.sock"


def _connect(spec: dict) -> socket.socket:
    """A connection to this pipeline execution's logger, started if there is none."""
    import fcntl

    path = _socket_path(spec)

    def attempt() -> Optional[socket.socket]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except OSError:
            s.close()
            return None

    conn = attempt()
    if conn:
        return conn
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # two stages starting at once start one logger
        conn = attempt()
        if conn:
            return conn
        path.unlink(missing_ok=True)       # a logger that died left its socket file
        code_root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code_root, os.environ.get("PYTHONPATH")])),
               "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true"), "DO_NOT_TRACK": "1"}
        with open(path.with_suffix(".log"), "a") as log:
            subprocess.Popen([sys.executable, "-m", "pipeline.mlflow_logger", "serve", str(path), spec["session"]],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            conn = attempt()
            if conn:
                return conn
            time.sleep(0.01)
    raise TrackingFailed(f"the MLflow logger did not start; see {path.with_suffix('.log')}")


class StageRun:
    """Handle a stage uses to log; metric keys are slash-namespaced (`eda/images`, `val/mIoU`).
    Each call is one JSON line to the logger and returns at once."""

    def __init__(self, conn: socket.socket, log: Path):
        self.conn, self.log = conn, log
        self.out = conn.makefile("w", encoding="utf-8")
        self.broken = False

    def _send(self, **message: Any) -> None:
        if self.broken:
            return
        try:
            self.out.write(json.dumps({**message, "t": time.time()}) + "\n")
            self.out.flush()
        except OSError:
            self.broken = True   # close() reports it

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None, parent: bool = False) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._send(op="metrics", metrics=clean, step=step, parent=parent)

    def set_tags(self, tags: dict[str, str], parent: bool = False) -> None:
        self._send(op="tags", tags={k: str(v) for k, v in tags.items()}, parent=parent)

    def log_artifacts(self, folder: str | Path, artifact_path: Optional[str] = None) -> None:
        self._send(op="artifacts", path=str(Path(folder).resolve()), artifact_path=artifact_path)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._send(op="artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def log_model(self, folder: str | Path, artifact_path: str, registered_name: Optional[str] = None,
                  tags: Optional[dict[str, str]] = None, score: Optional[tuple[str, float]] = None) -> None:
        """Log a saved MLflow model folder as this run's artifacts and, with a name, register it as the
        next version of that model (`models:/<name>/<version>`), tagged with `tags`. score = (metric
        name, out-of-fold value): the alias `champion` moves to this version only if it beats the
        champion's score in the same metric (`models:/<name>@champion`); never on a holdout score."""
        self._send(op="model", path=str(Path(folder).resolve()), artifact_path=artifact_path, name=registered_name,
                   tags={k: str(v) for k, v in (tags or {}).items()}, score=list(score) if score else None)

    def write_metrics(self, path: str | Path, metrics: dict[str, Any], details_path: Optional[str | Path] = None,
                      details: Optional[dict[str, Any]] = None) -> Path:
        """Write the DVC metrics JSON `path` (the stage's few headline numbers, nested as given) and,
        with `details`, everything the stage measured to `details_path`, a file DVC does not read as
        metrics (pipeline/evaluation/headline.py). The numeric leaves of the details (else of the
        headline) go to this stage's MLflow run."""
        write_json(path, metrics)
        if details is not None:
            write_json(details_path, details)
        flat = {k.replace(".", "/"): v for k, v in flatten(details if details is not None else metrics).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.log_metrics(flat)
        return Path(path)

    def close(self, status: str) -> None:
        """End the runs with `status`; return once the logger has written everything — or kept it
        in the outbox, which this prints in one line. Tracking never fails a stage that did its work."""
        self._send(op="end", status=status)
        try:
            answer = self.conn.makefile("r", encoding="utf-8").readline().strip()
        except OSError as e:
            answer = f"lost the logger's connection broke ({e})"
        finally:
            self.conn.close()
        kind, _, rest = answer.partition(" ")
        if kind == "kept":
            n, path, cause = (rest.split(" ", 2) + ["", ""])[:3]
            print(f"mlflow: {cause}; this stage's {n} records are kept in {shown_path(path)} and sent by the next stage "
                  "that reaches the store, or now: `python -m pipeline.tracking sync`", file=sys.stderr, flush=True)
        elif kind != "ok":
            print(f"mlflow: this stage's MLflow records are incomplete: {rest or 'the logger stopped'} "
                  f"(its log: {self.log})", file=sys.stderr, flush=True)


@contextmanager
def stage_run(stage: str, params: Optional[ParamsView] = None, fold: Optional[int] = None,
              seed: Optional[int] = None) -> Iterator[StageRun]:
    """Open this stage's child run under the pipeline execution's parent run (see "The logger")."""
    uri = tracking_uri()
    try:
        check_server(uri)
        offline = None
    except TrackingUnreachable as e:   # the stage works on; its records wait in the outbox (one line at its end)
        offline = str(e)
    # The workspace the stage runs in: its params and commit. (Not DVC_ROOT: `dvc exp run --temp/--queue`
    # points that at the user's repo while the stage runs in a copy.) Sent whole, since a temporary
    # workspace is gone by the time records kept in the outbox are sent.
    root = os.getcwd()
    spec = dict(uri=uri, experiment=experiment_name(), session=session_key(), stage=stage, fold=fold, seed=seed,
                root=root, dvc_root=os.environ.get("DVC_ROOT"), git_sha=git_sha(root), offline=offline,
                dvc_stage=os.environ.get("DVC_STAGE"), dvc_exp_name=os.environ.get("DVC_EXP_NAME"),
                params={k: _clean(v)[:6000] for k, v in params.flat().items()} if params is not None else {},
                params_file=_params_file(root))
    run = StageRun(_connect(spec), _socket_path(spec).with_suffix(".log"))
    run._send(op="start", **spec)
    status = "FAILED"
    # SIGTERM (kill, a cancelled CI job, a scheduler) would end the process without closing the runs;
    # as an exception it unwinds through here and both runs are marked FAILED.
    previous = (signal.signal(signal.SIGTERM, _exit_on_sigterm)
                if threading.current_thread() is threading.main_thread() else None)
    try:
        yield run
        status = "FINISHED"
    finally:
        try:
            run.close(status)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _params_file(root: str) -> dict[str, str]:
    """The workspace's whole params file, flat (defaults filled in when it is this pipeline's)."""
    path = Path(root) / PARAMS_FILE
    try:
        tree: Any = load_params(path)
    except ConfigError:
        try:
            tree = yaml.safe_load(path.read_text()) or {}   # missing, or not (only) this pipeline's params
        except (OSError, yaml.YAMLError):
            tree = {}
    return {k: _clean(v)[:6000] for k, v in flatten(tree).items()}


def _exit_on_sigterm(signum, frame) -> None:
    sys.exit(128 + signum)


def main() -> None:
    """`python -m pipeline.tracking sync`: send the records the outbox keeps (an outage's)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("command", choices=["sync"])
    ap.parse_args()
    # The logger's code, run as the logger runs (a process): stages never import it, so a change to it
    # reruns no stage.
    sys.exit(subprocess.run([sys.executable, "-m", "pipeline.mlflow_logger", "sync"]).returncode)


if __name__ == "__main__":
    main()


