"""MLflow: one parent run per pipeline execution, one child run per stage (and per fold).

A pipeline execution is one `dvc repro` or one `dvc exp run`: every stage process DVC starts for it
descends from the same `dvc` process, so (host, dvc pid, dvc start time) identifies it. The first
stage to run creates the parent run (named after the DVC experiment when there is one, with the
whole params file logged flat); later stages find it by tag and nest under it. The parent reads
RUNNING while the pipeline runs (between stages too), FAILED (or KILLED) as soon as a stage fails
(or dies), and FINISHED when the `dvc` process ends with every stage done. A stage run by hand
(`python -m stages.eda`) gets a parent of its own, finished with it. Set PIPELINE_SESSION to group
runs yourself (the parent then takes the status of its last stage).

Tracking URI: $MLFLOW_TRACKING_URI, else sqlite:///<repo root>/mlflow.db (pipeline/mlflow_store.py:
where the store is, the runs view it shows, a local store moving with its repo). A tracking server
that does not answer is reported before the stage does any work. Experiment:
$MLFLOW_EXPERIMENT_NAME, else "segmentation". MLflow is imported lazily, telemetry off.

A pipeline killed with SIGKILL cannot mark its runs; the next pipeline execution on the same host
marks parents (and their stage runs) whose dvc process is gone as KILLED.
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

from pipeline.config import PARAMS_FILE, ConfigError, ParamsView, flatten, load_params
from pipeline.io import write_json
from pipeline.mlflow_store import check_server, ensure_runs_view, experiment_name, relocate_store, tracking_uri
from pipeline.mlflow_store import sqlite_setup_lock as _sqlite_setup_lock
SESSION_TAG = "pipeline.session"
LABEL_TAG = "pipeline.experiment"   # the parent's and its stage runs' experiment label (experiment_label)


def _mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    import mlflow

    return mlflow


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


def _parent_run(client, experiment_id: str, spec: dict) -> tuple[str, str]:
    """(run id, experiment label) of this pipeline execution's parent run, created by its first stage:
    named '<experiment or model-encoder> · <month-day hour:minute>', with the params file logged flat."""
    key = spec["session"]
    found = client.search_runs([experiment_id], filter_string=f"tags.`{SESSION_TAG}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id, found[0].data.tags.get(LABEL_TAG, "")
    params_file = Path(spec["root"]) / PARAMS_FILE
    flat = flatten(load_params(params_file)) if params_file.exists() else {}
    label = experiment_label(spec["dvc_exp_name"], flat)
    name = f"{label or 'pipeline'} · {time.strftime('%m-%d %H:%M')}"
    tags = {SESSION_TAG: key, "pipeline.role": "parent", "git.sha": _clean(git_sha(spec["root"])),
            "dvc.exp_name": _clean(spec["dvc_exp_name"]), LABEL_TAG: label, "mlflow.runName": name}
    _mark_killed(client, experiment_id)
    run = client.create_run(experiment_id, tags=tags, run_name=name)
    if flat:
        from mlflow.entities import Param

        client.log_batch(run.info.run_id, params=[Param(k, _clean(v)[:6000]) for k, v in sorted(flat.items())])
    return run.info.run_id, label


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
# The logger: one process per pipeline execution, shared by its stages.
#
# Importing MLflow and opening its store cost ~3 s per process, more than a small data stage's own
# work. So stages do not import MLflow: the first stage of a pipeline execution starts a logger
# process (`python -m pipeline.tracking <socket>`), which binds a unix socket at once and imports
# MLflow while the stage works; every stage of that execution connects to it and sends JSON lines
# (start, metrics, artifacts, end). The stage's last call waits for the logger's answer, so when a
# stage exits its runs are written (or it fails, saying why). The logger of a `dvc` execution lives
# as long as the dvc process, keeping the parent RUNNING between stages, and marks it FINISHED when
# dvc ends; any other logger leaves when no stage has been connected for IDLE_S seconds, or at once
# when its pipeline execution is gone. A stage that
# dies without ending its run (SIGKILL) closes its connection: its runs are marked KILLED at once.
# (wandb's "service" process solves the same start-up cost the same way.)
# ---------------------------------------------------------------------------------------------------
IDLE_S = 20.0
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
            subprocess.Popen([sys.executable, "-m", "pipeline.tracking", str(path), spec["session"]],
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

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.out = conn.makefile("w", encoding="utf-8")
        self.broken = False

    def _send(self, **message: Any) -> None:
        if self.broken:
            return
        try:
            self.out.write(json.dumps(message) + "\n")
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
        """End the runs with `status`; return once the logger has written everything."""
        self._send(op="end", status=status)
        try:
            answer = self.conn.makefile("r", encoding="utf-8").readline().strip()
        except OSError as e:
            answer = f"error: {e}"
        finally:
            self.conn.close()
        if answer != "ok" and status == "FINISHED":
            raise TrackingFailed(f"MLflow logging failed ({answer or 'the logger stopped'}); the stage's outputs "
                                 "are written, its MLflow run is incomplete")


@contextmanager
def stage_run(stage: str, params: Optional[ParamsView] = None, fold: Optional[int] = None,
              seed: Optional[int] = None) -> Iterator[StageRun]:
    """Open this stage's child run under the pipeline execution's parent run (see "The logger")."""
    uri = tracking_uri()
    check_server(uri)
    spec = dict(uri=uri, experiment=experiment_name(),
                session=session_key(), stage=stage, fold=fold, seed=seed,
                # the workspace the stage runs in: its params and commit. (Not DVC_ROOT: `dvc exp run
                # --temp/--queue` points that at the user's repo while the stage runs in a copy.)
                root=os.getcwd(),
                dvc_stage=os.environ.get("DVC_STAGE"), dvc_exp_name=os.environ.get("DVC_EXP_NAME"),
                params={k: _clean(v)[:6000] for k, v in params.flat().items()} if params is not None else {})
    run = StageRun(_connect(spec))
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


def _exit_on_sigterm(signum, frame) -> None:
    sys.exit(128 + signum)


class _Logger:
    """The logger process's state: MLflow imported once, one client, one thread per stage."""

    def __init__(self):
        self.lock = threading.Lock()
        self.client = None
        self.parents: dict[str, bool] = {}   # parent run id -> a stage of it failed (dvc sessions)
        self.views: set[str] = set()          # experiments whose runs view is up to date

    def mlflow_client(self, uri: str):
        with self.lock:
            if self.client is None:
                mlflow = _mlflow()
                mlflow.set_tracking_uri(uri)
                with _sqlite_setup_lock(uri):
                    if uri.startswith("sqlite:///"):
                        relocate_store(Path(uri[len("sqlite:///"):]))   # a repo moved or copied: its artifacts too
                    self.client = mlflow.tracking.MlflowClient(uri)  # creates (or migrates) the store's tables
            return self.client

    def open_runs(self, spec: dict) -> tuple[str, str]:
        """Parent (found or created) and this stage's child run; returns (run id, parent id)."""
        client = self.mlflow_client(spec["uri"])
        with self.lock, _sqlite_setup_lock(spec["uri"]):
            exp = client.get_experiment_by_name(spec["experiment"])
            exp_id = exp.experiment_id if exp else client.create_experiment(spec["experiment"])
            if exp_id not in self.views:   # the runs table a team opens (mlflow_store.RUNS_VIEW_KEY)
                ensure_runs_view(client, exp_id)
                self.views.add(exp_id)
            parent_id, label = _parent_run(client, exp_id, spec)
            failed = self.parents.setdefault(parent_id, False)
        if not failed:   # a parent FAILED by one stage stays FAILED (dvc repro --keep-going runs on)
            client.update_run(parent_id, status="RUNNING")
        stage, fold, seed = spec["stage"], spec["fold"], spec["seed"]
        name = stage if fold is None else f"{stage}@{fold}" if seed is None else f"{stage}@{fold}-{seed}"  # = DVC's
        name = f"{label} · {name}" if label else name   # curves of two experiments overlaid stay told apart
        tags = {"pipeline.stage": stage, "pipeline.role": "stage", "git.sha": _clean(git_sha(spec["root"])),
                LABEL_TAG: label,
                "dvc.stage": _clean(spec["dvc_stage"]), "dvc.exp_name": _clean(spec["dvc_exp_name"]),
                "mlflow.parentRunId": parent_id}
        if fold is not None:
            tags["pipeline.fold"] = str(fold)
        if seed is not None:
            tags["pipeline.seed"] = str(seed)
        run = client.create_run(exp_id, tags=tags, run_name=name)
        if spec["params"]:
            from mlflow.entities import Param

            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in spec["params"].items()])
        return run.info.run_id, parent_id

    def handle(self, conn: socket.socket, dvc: bool = False) -> None:
        """One stage's connection: its messages in order, then the answer ('ok' or 'error: ...').
        dvc: the session is a dvc process, which `finish` marks FINISHED when it ends; otherwise the
        stage's end is the parent's end."""
        client = run_id = parent_id = None
        status, answer = "KILLED", "ok"
        try:
            for line in conn.makefile("r", encoding="utf-8"):
                m = json.loads(line)
                op = m.pop("op")
                if op == "start":
                    run_id, parent_id = self.open_runs(m)
                    spec_uri = m["uri"]
                    client = self.client
                elif op == "metrics":
                    from mlflow.entities import Metric

                    now = int(time.time() * 1000)
                    batch = [Metric(k, v, now, m["step"] or 0) for k, v in m["metrics"].items()]
                    for target in [run_id, parent_id] if m["parent"] else [run_id]:
                        for i in range(0, len(batch), 1000):
                            client.log_batch(target, metrics=batch[i:i + 1000])
                elif op == "tags":
                    for k, v in m["tags"].items():
                        client.set_tag(parent_id if m.get("parent") else run_id, k, v)
                elif op == "artifacts":
                    client.log_artifacts(run_id, m["path"], m["artifact_path"])
                elif op == "artifact":
                    client.log_artifact(run_id, m["path"], m["artifact_path"])
                elif op == "model":
                    client.log_artifacts(run_id, m["path"], m["artifact_path"])
                    if m["name"]:
                        self.register(client, m["name"], run_id, m["artifact_path"], m.get("tags") or {},
                                      m.get("score"), spec_uri)
                elif op == "end":
                    status = m["status"]
                    break
        except Exception as e:   # reported to the stage, which fails saying so
            status, answer = "FAILED", f"error: {type(e).__name__}: {e}"
            print(answer, file=sys.stderr, flush=True)
        try:
            if run_id is not None:
                if status != "FINISHED":
                    client.set_tag(run_id, "pipeline.failed", "true")
                client.set_terminated(run_id, status=status)
                if status != "FINISHED":
                    with self.lock:
                        self.parents[parent_id] = True
                if status != "FINISHED" or not dvc:
                    client.set_terminated(parent_id, status=status)
        except Exception as e:
            answer = f"error: {type(e).__name__}: {e}"
        try:
            conn.sendall((answer + "\n").encode())
        except OSError:
            pass
        conn.close()

    def register(self, client, name: str, run_id: str, artifact_path: str, tags: dict[str, str],
                 score: Optional[list], uri: str) -> None:
        """A new version of `name`, tagged; `champion` moves to it only if it beats the champion's
        out-of-fold score in the same metric (the compare-and-move is one at a time per store)."""
        from mlflow.exceptions import MlflowException

        with self.lock:
            try:
                client.get_registered_model(name)
            except MlflowException:
                client.create_registered_model(name, description="the pipeline's final ensemble (stage submit); "
                                               "@champion: the best out-of-fold score so far")
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
        if score:
            tags = {**tags, CHAMPION_METRIC_TAG: score[0], CHAMPION_SCORE_TAG: repr(float(score[1]))}
        version = client.create_model_version(name, source, run_id, tags=tags)
        if not score:
            return
        with self.lock, _sqlite_setup_lock(uri):
            try:
                champ = client.get_model_version_by_alias(name, CHAMPION)
            except MlflowException:
                champ = None
            if champion_moves(champ.tags if champ else None, score[0], float(score[1])):
                client.set_registered_model_alias(name, CHAMPION, version.version)
                print(f"registry: {name} version {version.version} is the new @{CHAMPION} "
                      f"({score[0]} {float(score[1]):.4f} out of fold)", file=sys.stderr, flush=True)

    def finish(self) -> None:
        """The dvc process has ended: its parent runs that no stage failed are FINISHED."""
        for parent_id, failed in self.parents.items():
            if not failed and self.client is not None:
                self.client.set_terminated(parent_id, status="FINISHED")


def serve(path: str, session: str) -> None:
    """The logger process's main loop (see "The logger")."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the stage, which ends its run
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    server.settimeout(0.5)
    logger, active, served, idle_since = _Logger(), [], 0, time.monotonic()
    standalone, dvc = ":standalone:" in session, ":dvc:" in session
    try:
        while True:
            try:
                conn, _ = server.accept()
                t = threading.Thread(target=logger.handle, args=(conn, dvc))
                t.start()
                active.append(t)
                served += 1
                continue
            except socket.timeout:
                pass
            active = [t for t in active if t.is_alive()]
            if active:
                idle_since = time.monotonic()
                continue
            if dvc:   # the pipeline's parent stays RUNNING between stages: wait for dvc itself
                if not _alive(session):
                    break
                continue
            finished = served and (standalone or not _alive(session))   # nobody else will come
            if finished or time.monotonic() - idle_since > IDLE_S:
                break
    finally:
        server.close()
        Path(path).unlink(missing_ok=True)
        logger.finish()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
