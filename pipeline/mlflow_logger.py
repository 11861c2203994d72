"""The MLflow logger: one process per pipeline execution, shared by its stages (client: tracking.py).

Importing MLflow and opening its store cost ~3 s per process, more than a small data stage's own
work. So stages do not import MLflow: the first stage of a pipeline execution starts a logger process
(`python -m pipeline.mlflow_logger serve <socket> <session>`), which binds a unix socket at once and
imports MLflow while the stage works; every stage of that execution connects to it.

The protocol: a stage sends JSON lines — `start` (its spec: store, experiment, session, stage, fold,
seed, workspace, params), then any of `metrics`, `tags`, `artifact`, `artifacts`, `model`, then
`end` (its status) — and waits for one answer line: `ok`, `kept <n> <file> <cause>` (records kept in
the outbox, below) or `lost <cause>`. A connection that closes without `end` is a stage that died:
its runs are marked KILLED at once.

Runs: the first stage of an execution creates the parent run (found again by its session tag); each
stage a child. The parent reads RUNNING while the pipeline runs, FAILED (or KILLED) as soon as a stage
fails (or dies), and when the `dvc` process ends: FINISHED if the pipeline completed — `dvc status`
of what `dvc repro` was asked to run is clean, or `dvc exp run`'s experiment ref was saved — else
KILLED, tagged with the stages that never ran (a `dvc repro` killed between stages). The logger of
a `dvc` execution lives as long as the dvc process; any other leaves when no stage has been connected
for IDLE_S seconds, or at once when its pipeline execution is gone.

Outages never cost a stage its work. Every MLflow call the logger makes waits a bounded time
(LOGGER_HTTP: seconds, not MLflow's minutes of retries). When the store does not answer or fails
(server down, disk full), what a stage sent and could not be written — from the first failed call
on, with copies of its artifacts — is kept as one record in `<repo>/.mlflow-outbox/`, the stage
succeeds and prints one line saying so, and the records are sent, in order, by the next stage that
reaches the store, or by `python -m pipeline.tracking sync`. (wandb's "service" process solves the
start-up cost the same way; its offline mode and `wandb sync`, the outage.)
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.io import atomic_file, pid_alive, shown_path
from pipeline.mlflow_store import ensure_runs_view, outbox_dir, relocate_store
from pipeline.mlflow_store import sqlite_setup_lock as _sqlite_setup_lock
from pipeline.session import alive, process
from pipeline.tracking import (CHAMPION, CHAMPION_METRIC_TAG, CHAMPION_SCORE_TAG, LABEL_TAG, SESSION_TAG, _clean,
                               champion_moves, experiment_label)

IDLE_S = 20.0
# MLflow's HTTP client retries 7 times with exponential backoff (minutes) and waits 120 s a call by
# default; the logger waits seconds, then keeps the records (users may still set their own).
LOGGER_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
               "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}   # 'View run at' per run end: `sync` prints one line
COMPLETION_WAIT_S = 60.0   # how long a queued experiment's ref may take to reach the user's repo


def _mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    for k, v in LOGGER_HTTP.items():
        os.environ.setdefault(k, v)
    import mlflow

    return mlflow


# ---- parent runs -------------------------------------------------------------------------------------
def _parent_run(client, experiment_id: str, spec: dict) -> tuple[str, str]:
    """(run id, experiment label) of this pipeline execution's parent run, created by its first stage:
    named '<experiment or model-encoder> · <month-day hour:minute>', with the params file logged flat."""
    key = spec["session"]
    found = client.search_runs([experiment_id], filter_string=f"tags.`{SESSION_TAG}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id, found[0].data.tags.get(LABEL_TAG, "")
    flat = spec.get("params_file") or {}   # the workspace's whole params file, as the stage read it
    label = experiment_label(spec["dvc_exp_name"], flat)
    name = f"{label or 'pipeline'} · {time.strftime('%m-%d %H:%M', time.localtime(spec.get('t', time.time())))}"
    tags = {SESSION_TAG: key, "pipeline.role": "parent", "git.sha": _clean(spec.get("git_sha")),
            "dvc.exp_name": _clean(spec["dvc_exp_name"]), LABEL_TAG: label, "mlflow.runName": name}
    _mark_killed(client, experiment_id)
    run = client.create_run(experiment_id, tags=tags, run_name=name, start_time=int(spec.get("t", time.time()) * 1000))
    if flat:
        from mlflow.entities import Param

        client.log_batch(run.info.run_id, params=[Param(k, _clean(v)[:6000]) for k, v in sorted(flat.items())])
    return run.info.run_id, label


def _mark_killed(client, experiment_id: str) -> None:
    """Runs left RUNNING by a pipeline that was SIGKILLed (nothing could mark them) become KILLED."""
    stale = client.search_runs([experiment_id], "tags.`pipeline.role` = 'parent' and attributes.status = 'RUNNING'",
                               max_results=200)
    for parent in stale:
        if alive(parent.data.tags.get(SESSION_TAG, "")):
            continue
        kids = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and "
                                  "attributes.status = 'RUNNING'", max_results=1000)
        for run in [*kids, parent]:
            client.set_terminated(run.info.run_id, status="KILLED")


# ---- did the pipeline complete? --------------------------------------------------------------------
def _dvc_targets(argv: list[str]) -> Optional[tuple[list[str], str, list[str]]]:
    """(the command line up to dvc's command, 'repro' | 'exp', the words after it) of a dvc
    process's argv, or None when it is neither (`python -m dvc repro -s x` -> (['python', '-m',
    'dvc'], 'repro', ['-s', 'x']))."""
    for i, word in enumerate(argv):
        if word == "repro":
            return argv[:i], "repro", argv[i + 1:]
        if word in ("exp", "experiments") and argv[i + 1:i + 2] in (["run"], ["exec-run"]):
            return argv[:i], "exp", argv[i + 2:]
    return None


def _exp_saved(name: str, since: float, *repos: str) -> bool:
    """Has an experiment ref named `name` been written at or after `since` in one of `repos`?"""
    for repo in repos:
        if not repo or not Path(repo).exists():
            continue
        out = subprocess.run(["git", "-C", repo, "for-each-ref", "--format=%(refname) %(creatordate:unix)", "refs/exps/"],
                             capture_output=True, text=True, timeout=30)
        for line in out.stdout.splitlines():
            ref, _, when = line.rpartition(" ")
            if ref.endswith("/" + name) and when.isdigit() and int(when) >= since - 5:
                return True
    return False


def _not_run(dvc: list[str], root: str, how: list[str]) -> Optional[list[str]]:
    """The stages `dvc repro <how>` should have run that `dvc status` (run by the same `dvc` command
    line) still shows changed ([] = none), or None when that cannot be told (no workspace, dvc busy)."""
    targets = [w for w in how if not w.startswith("-")]
    flags = set(how) - set(targets)
    if flags & {"--downstream", "--dry"}:
        targets = []   # what ran was more than the targets' upstream: judge the whole DAG
    cmd = [*dvc, "status", "--json", *targets]
    if targets and not flags & {"-s", "--single-item"}:
        cmd.append("--with-deps")
    for _ in range(10):
        if not Path(root, "dvc.yaml").exists():
            return None
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
        if out.returncode == 0:
            try:
                return sorted(json.loads(out.stdout or "{}"))
            except ValueError:
                return None
        if "lock" not in out.stderr.lower():
            return None
        time.sleep(1.0)   # another dvc process holds the repo's lock
    return None


@dataclass
class Execution:
    """What the logger knows of its pipeline execution, to tell at its end whether it completed."""
    session: str
    argv: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    root: Optional[str] = None          # the workspace its stages ran in
    user_repo: Optional[str] = None     # DVC_ROOT (the user's repo, also for --temp/--queue)
    exp_name: Optional[str] = None

    def outcome(self) -> tuple[str, Optional[str]]:
        """(FINISHED or KILLED, why KILLED) once the dvc process has ended."""
        what = _dvc_targets(self.argv)
        if what is None or self.root is None:
            return "FINISHED", None   # not a dvc command line we can judge
        dvc, kind, how = what
        if kind == "exp" and not self.exp_name:
            return "FINISHED", None
        if kind == "exp":
            deadline = time.monotonic() + COMPLETION_WAIT_S
            while True:
                if _exp_saved(self.exp_name, self.started, self.root, self.user_repo or ""):
                    return "FINISHED", None
                if time.monotonic() > deadline:
                    return "KILLED", f"dvc ended before experiment {self.exp_name} was saved"
                time.sleep(1.0)
        left = _not_run(dvc, self.root, how)
        if left:
            return "KILLED", "dvc ended before these stages ran: " + ", ".join(left)
        return "FINISHED", None


# ---- the outbox ---------------------------------------------------------------------------------------
def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_file)
    else:
        _link_file(src, dst)


def _link_file(src, dst) -> None:
    try:
        os.link(src, dst)   # same disk: no copy (the workspace file may change later; a link keeps this one)
    except OSError:
        shutil.copy2(src, dst)


def keep(record: dict, folder: Optional[Path] = None) -> Path:
    """Write a record the store could not take to the outbox, with copies of the files its ops name
    (a temporary experiment's workspace is gone by the time it is sent)."""
    folder = Path(folder or outbox_dir(record.get("root")))
    name = f"{time.time_ns()}-{os.getpid()}-{threading.get_ident()}"
    files = folder / f"{name}.files"
    for i, op in enumerate(record.get("ops", [])):
        if op["op"] in ("artifact", "artifacts", "model") and Path(op["path"]).exists():
            dst = files / str(i) / Path(op["path"]).name
            _link_or_copy(Path(op["path"]), dst)
            op["path"] = str(dst)
    with atomic_file(folder / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(record))
    return folder / f"{name}.json"


def pending(folder: Path) -> list[Path]:
    """Records waiting in the outbox, oldest first (also those a killed sender had claimed)."""
    if not folder.exists():
        return []
    found = []
    for p in folder.iterdir():
        if p.suffix == ".json":
            found.append(p)
        elif ".json.sending-" in p.name and not pid_alive(int(p.name.rsplit("-", 1)[1])):
            found.append(p)
    return sorted(found, key=lambda p: p.name)


def _base(record: Path) -> str:
    """A record's name without `.json` (and without a sender's `.sending-<pid>`)."""
    return record.name.split(".json")[0]


def _claim(path: Path) -> Optional[Path]:
    claimed = path.with_name(f"{_base(path)}.json.sending-{os.getpid()}")
    try:
        os.rename(path, claimed)
        return claimed
    except OSError:
        return None   # another sender took it


def _forget(claimed: Path) -> None:
    shutil.rmtree(claimed.with_name(f"{_base(claimed)}.files"), ignore_errors=True)
    claimed.unlink(missing_ok=True)


def _release(claimed: Path) -> None:
    os.rename(claimed, claimed.with_name(f"{_base(claimed)}.json"))


REFUSED = "refused"   # the outbox's sub-folder for records the store answered with a client error


def _refused(e: Exception) -> bool:
    """Did the store answer, refusing the record (an HTTP 4xx: a bad value, a deleted run)? An outage
    or a store error (5xx, database full) is worth another try; this is not."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:
        return False
    return isinstance(e, MlflowException) and 400 <= e.get_http_status_code() < 500


def _set_aside(claimed: Path, folder: Path) -> Path:
    base = _base(claimed)
    folder.mkdir(parents=True, exist_ok=True)
    files = claimed.with_name(f"{base}.files")
    if files.exists():
        os.rename(files, folder / files.name)
    os.rename(claimed, folder / f"{base}.json")
    return folder / f"{base}.json"


def _cause(e: Exception) -> str:
    """An MLflow failure in a few words: 'the store failed: <first line>'."""
    text = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    return f"the MLflow store failed ({type(e).__name__}: {text})"


# ---- the logger ---------------------------------------------------------------------------------------
@dataclass
class StageState:
    """One stage's conversation: its spec and runs once created, and the ops applied so far."""
    spec: Optional[dict] = None
    run_id: Optional[str] = None
    parent_id: Optional[str] = None


class Logger:
    """The logger process's state: MLflow imported once, one client, one thread per stage."""

    def __init__(self, execution: Optional[Execution] = None):
        self.lock = threading.Lock()
        self.clients: dict[str, Any] = {}
        self.parents: dict[str, bool] = {}   # parent run id -> a stage of it failed (dvc sessions)
        self.failed = False                  # a stage of this execution failed or died
        self.views: set[str] = set()         # experiments whose runs view is up to date
        self.execution = execution
        self.kept = False                    # a stage of this execution kept records in the outbox
        self.uri: Optional[str] = None       # the store and experiment of this execution (its first stage's)
        self.experiment: Optional[str] = None
        self.sending = threading.Lock()      # one sender of the outbox at a time (records of a session in order)

    def client(self, uri: str):
        with self.lock:
            if uri not in self.clients:
                mlflow = _mlflow()
                with _sqlite_setup_lock(uri):
                    if uri.startswith("sqlite:///"):
                        relocate_store(Path(uri[len("sqlite:///"):]))   # a repo moved or copied: its artifacts too
                    self.clients[uri] = mlflow.tracking.MlflowClient(uri)  # creates (or migrates) the tables
            return self.clients[uri]

    def open_runs(self, spec: dict, reopen: bool = True) -> tuple[str, str]:
        """Parent (found or created) and this stage's child run; returns (run id, parent id).
        reopen: mark the parent RUNNING again (a live stage; not a record sent late)."""
        client = self.client(spec["uri"])
        with self.lock, _sqlite_setup_lock(spec["uri"]):
            exp = client.get_experiment_by_name(spec["experiment"])
            exp_id = exp.experiment_id if exp else client.create_experiment(spec["experiment"])
            if exp_id not in self.views:   # the runs table a team opens (mlflow_store.RUNS_VIEW_KEY)
                ensure_runs_view(client, exp_id)
                self.views.add(exp_id)
            parent_id, label = _parent_run(client, exp_id, spec)
            failed = self.parents.setdefault(parent_id, False)
        if reopen and not failed:   # a parent FAILED by one stage stays FAILED (dvc repro --keep-going runs on)
            client.update_run(parent_id, status="RUNNING")
        stage, fold, seed = spec["stage"], spec["fold"], spec["seed"]
        name = stage if fold is None else f"{stage}@{fold}" if seed is None else f"{stage}@{fold}-{seed}"  # = DVC's
        name = f"{label} · {name}" if label else name   # curves of two experiments overlaid stay told apart
        tags = {"pipeline.stage": stage, "pipeline.role": "stage", "git.sha": _clean(spec.get("git_sha")),
                LABEL_TAG: label, "dvc.stage": _clean(spec["dvc_stage"]), "dvc.exp_name": _clean(spec["dvc_exp_name"]),
                "mlflow.parentRunId": parent_id}
        if fold is not None:
            tags["pipeline.fold"] = str(fold)
        if seed is not None:
            tags["pipeline.seed"] = str(seed)
        run = client.create_run(exp_id, tags=tags, run_name=name, start_time=int(spec.get("t", time.time()) * 1000))
        if spec["params"]:
            from mlflow.entities import Param

            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in spec["params"].items()])
        return run.info.run_id, parent_id

    def apply(self, st: StageState, m: dict) -> None:
        """One op of a stage (live, or from the outbox) against the store."""
        op = m["op"]
        if op == "start":
            st.spec = m
            st.run_id, st.parent_id = self.open_runs(m, reopen=not m.get("late"))
            return
        client = self.client(st.spec["uri"])
        if op == "metrics":
            from mlflow.entities import Metric

            batch = [Metric(k, v, int(m["t"] * 1000), m["step"] or 0) for k, v in m["metrics"].items()]
            for target in [st.run_id, st.parent_id] if m["parent"] else [st.run_id]:
                for i in range(0, len(batch), 1000):
                    client.log_batch(target, metrics=batch[i:i + 1000])
        elif op == "tags":
            from mlflow.entities import RunTag

            client.log_batch(st.parent_id if m.get("parent") else st.run_id,
                             tags=[RunTag(k, v) for k, v in m["tags"].items()])
        elif op == "artifacts":
            client.log_artifacts(st.run_id, m["path"], m["artifact_path"])
        elif op == "artifact":
            client.log_artifact(st.run_id, m["path"], m["artifact_path"])
        elif op == "model":
            client.log_artifacts(st.run_id, m["path"], m["artifact_path"])
            if m["name"]:
                self.register(client, m["name"], st.run_id, m["artifact_path"], m.get("tags") or {}, m.get("score"),
                              st.spec["uri"])

    def end(self, st: StageState, status: str, dvc: bool, live: bool = True) -> None:
        """End the stage's run with `status`; a stage that failed or died ends the parent with it
        (for good: later stages of `dvc repro --keep-going` leave it so), and outside dvc the stage's
        end is the parent's end. live: a stage of this logger's execution (not a record sent late)."""
        client = self.client(st.spec["uri"])
        if status != "FINISHED" and live:
            with self.lock:
                self.failed = True
                self.parents[st.parent_id] = True
        client.set_terminated(st.run_id, status=status)
        if status != "FINISHED" or not dvc:
            client.set_terminated(st.parent_id, status=status)
        if status != "FINISHED":
            client.set_tag(st.run_id, "pipeline.failed", "true")

    def handle(self, conn: socket.socket, dvc: bool = False) -> None:
        """One stage's connection: its messages in order, then the answer (see the protocol)."""
        st, ops, status, failure = StageState(), [], "KILLED", None
        for line in conn.makefile("r", encoding="utf-8"):
            m = json.loads(line)
            m.setdefault("t", time.time())
            if m["op"] == "end":
                status = m["status"]
                break
            if m["op"] == "start":
                self.uri, self.experiment = self.uri or m["uri"], self.experiment or m["experiment"]
            if m["op"] == "start" and self.execution is not None:
                self.execution.root = self.execution.root or m["root"]
                self.execution.user_repo = self.execution.user_repo or m.get("dvc_root")
                self.execution.exp_name = self.execution.exp_name or m.get("dvc_exp_name")
            if failure is None and not m.get("offline"):
                try:
                    self.apply(st, m)
                    continue
                except Exception as e:   # the store did not answer, or failed: keep the rest
                    failure = _cause(e)
                    print(f"mlflow: {failure}", file=sys.stderr, flush=True)
            elif failure is None:
                failure = m["offline"]
            if m["op"] == "start":
                st.spec = m
            ops.append(m)
        if failure is None:
            try:
                self.end(st, status, dvc)
            except Exception as e:
                failure = _cause(e)
                ops.append({"op": "noop"})
        answer = "ok"
        if failure is not None:
            if status != "FINISHED":
                with self.lock:
                    self.failed = True
            answer = self.keep_stage(st, ops, status, dvc, failure)
        try:
            conn.sendall((answer + "\n").encode())
        except OSError:
            pass
        conn.close()
        if failure is None and st.spec is not None:   # the store answers: send what earlier stages kept
            self.send_outbox(st.spec["uri"], st.spec.get("root"))

    def keep_stage(self, st: StageState, ops: list[dict], status: str, dvc: bool, failure: str) -> str:
        spec = st.spec or {}
        record = {"kind": "stage", "uri": spec.get("uri"), "experiment": spec.get("experiment"),
                  "root": spec.get("root"), "session": spec.get("session"), "spec": spec, "run_id": st.run_id,
                  "parent_id": st.parent_id, "ops": [o for o in ops if o["op"] not in ("start", "noop")],
                  "status": status, "dvc": dvc, "cause": failure}
        try:
            path = keep(record)
        except Exception as e:
            return f"lost {failure}; and keeping the records failed too: {type(e).__name__}: {e}"
        self.kept = True
        return f"kept {len(record['ops']) + 1} {path} {failure}"

    def send(self, record: dict) -> None:
        """Apply a record from the outbox: its stage's runs (created now if they never were), its ops
        in order, its end; or a pipeline's end."""
        if record["kind"] == "pipeline_end":
            client = self.client(record["uri"])
            exp = client.get_experiment_by_name(record["experiment"])
            found = client.search_runs([exp.experiment_id], f"tags.`{SESSION_TAG}` = '{record['session']}'",
                                       max_results=1) if exp else []
            for parent in found:
                if parent.info.status in ("RUNNING", "SCHEDULED"):
                    client.set_terminated(parent.info.run_id, status=record["status"])
                for k, v in (record.get("tags") or {}).items():
                    client.set_tag(parent.info.run_id, k, v)
            return
        st = StageState(spec=record["spec"], run_id=record["run_id"], parent_id=record["parent_id"])
        if st.run_id is None:
            self.apply(st, {**record["spec"], "op": "start", "late": True})
        for m in record["ops"]:
            if m["op"] in ("artifact", "artifacts", "model") and not Path(m["path"]).exists():
                print(f"mlflow: {m['path']} is gone; the record is sent without it", file=sys.stderr, flush=True)
                continue
            self.apply(st, m)
        self.end(st, record["status"], record["dvc"], live=False)

    def send_outbox(self, uri: Optional[str] = None, root: Optional[str] = None) -> tuple[int, int]:
        """Send the outbox's records (those for `uri`, or all), oldest first, stopping at the first
        that cannot be sent (one the store refuses is set aside). Returns (sent, left)."""
        folder = outbox_dir(root)
        sent = 0
        if not pending(folder) or not self.sending.acquire(blocking=False):
            return 0, len(pending(folder))
        try:
            sent = self._send_records(folder, uri)
        finally:
            self.sending.release()
        return sent, len(pending(folder))

    def _send_records(self, folder: Path, uri: Optional[str]) -> int:
        sent = 0
        for path in pending(folder):
            claimed = _claim(path)
            if claimed is None:
                continue
            try:
                record = json.loads(claimed.read_text())
            except (OSError, ValueError):
                _forget(claimed)   # a record half written by a process that died: nothing to send
                continue
            if uri is not None and record.get("uri") != uri:
                _release(claimed)
                continue
            try:
                self.send(record)
            except Exception as e:
                if _refused(e):   # the store answers and says no: set it aside, send the rest
                    kept = _set_aside(claimed, folder / REFUSED)
                    print(f"mlflow: the store refused a kept record ({type(e).__name__}: {str(e)[:200]}); "
                          f"it is in {kept}", file=sys.stderr, flush=True)
                    continue
                _release(claimed)
                print(f"mlflow: outbox not sent yet ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr, flush=True)
                break
            _forget(claimed)
            sent += 1
        return sent

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
        """The dvc process has ended: its parent (unless a stage failed it) is FINISHED if the
        pipeline completed, else KILLED; kept in the outbox if the store does not answer, or if some
        of its stages' records wait there (the end goes after them)."""
        uri, experiment = self.uri, self.experiment
        if self.execution is None or uri is None or self.failed:
            return
        status, why = self.execution.outcome()
        tags = {"pipeline.incomplete": why} if why else {}
        if not self.kept:
            try:
                client = self.client(uri)
                for parent_id, failed in self.parents.items():
                    if not failed:
                        client.set_terminated(parent_id, status=status)
                        for k, v in tags.items():
                            client.set_tag(parent_id, k, v)
                return
            except Exception as e:
                print(f"mlflow: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        root = self.execution.root
        keep({"kind": "pipeline_end", "uri": uri, "experiment": experiment, "root": root,
              "session": self.execution.session, "status": status, "tags": tags})
        try:
            self.send_outbox(uri, root)
        except Exception:
            pass


def serve(path: str, session: str) -> None:
    """The logger process's main loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the stage, which ends its run
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    server.settimeout(0.5)
    standalone, dvc = ":standalone:" in session, ":dvc:" in session
    execution = None
    if dvc:
        try:
            execution = Execution(session, argv=process(int(session.split(":")[2]))[1])
        except (OSError, ValueError, IndexError):
            execution = Execution(session)
    logger, active, served, idle_since = Logger(execution), [], 0, time.monotonic()
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
                if not alive(session):
                    break
                continue
            finished = served and (standalone or not alive(session))   # nobody else will come
            if finished or time.monotonic() - idle_since > IDLE_S:
                break
    finally:
        server.close()
        Path(path).unlink(missing_ok=True)
        logger.finish()


def sync() -> None:
    """Send every record waiting in the repo's outbox (`python -m pipeline.tracking sync`)."""
    folder = outbox_dir()
    sent, left = Logger().send_outbox(None)
    print(f"mlflow: sent {sent} kept record(s) to their store" + (
        f"; {left} still waiting in {shown_path(folder)} (is the store reachable? see the line above)" if left else ""))
    if left:
        sys.exit(1)


if __name__ == "__main__":
    if sys.argv[1] == "serve":   # `serve <socket> <session>`: started by tracking._connect
        serve(sys.argv[2], sys.argv[3])
    else:
        sync()
