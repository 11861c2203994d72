"""The MLflow store the pipeline logs to: where it is, the runs table a team opens, and a local
store that moves with its repo. MLflow is imported lazily (by the caller passing a client).

Where: $MLFLOW_TRACKING_URI (a team's `mlflow server`), else sqlite:///<repo root>/mlflow.db — the
user's repo even when DVC runs a stage in a temporary workspace (`dvc exp run --temp/--queue`).

The runs table: MLflow's UI opens an experiment on six empty columns and hides 500 metrics and params
behind "Show more columns". MLflow ≥ 3.15 shares a runs-table view (columns, sort, filter) through an
experiment tag `mlflow.sharedViewState.<key>`, opened by `#/experiments/<id>/runs?viewStateShareKey=<key>`
(the UI's "share" button writes the same tag). ensure_runs_view() writes RUNS_VIEW there: one row per
pipeline run (parent runs), the recipe's params and the headline metrics, best CV first, in the
machine-learning (not GenAI) view. `make ui` prints its URL.

Moving: a local store records absolute artifact paths (<repo>/mlruns/...). relocate_store() rewrites
them when the repo was moved or copied, so the runs' artifacts and the registered models still load.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from pipeline.config import ConfigError

DEFAULT_EXPERIMENT = "segmentation"
RUNS_VIEW_KEY = "pipeline-runs"
VIEW_TAG = "mlflow.sharedViewState." + RUNS_VIEW_KEY
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"   # open on the runs table, not GenAI traces
# The columns a team compares experiments by: the recipe, then the headline (pipeline/evaluation/headline.py).
VIEW_PARAMS = ("model", "encoder", "train.lr", "train.epochs")
VIEW_METRICS = ("cv/mIoU", "cv/mIoU_ci95_low", "cv/mIoU_ci95_high", "holdout/mIoU", "train/minutes")
VIEW_TAGS = ("pipeline.submitted",)


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd())


def _user_repo(root: Path) -> Path:
    """The user's repo of a DVC temporary experiment workspace (<repo>/.dvc/tmp/exps/...), else root."""
    for parent in root.parents:
        if parent.name == "exps" and parent.parent.name == "tmp" and parent.parent.parent.name == ".dvc":
            return parent.parent.parent.parent
    return root


OUTBOX = ".mlflow-outbox"   # records a store did not take (pipeline/mlflow_logger.py), in the user's repo


def outbox_dir(root: Optional[str | Path] = None) -> Path:
    """<user's repo>/.mlflow-outbox: the repo of `root` (a stage's workspace, maybe a temporary one),
    else of DVC_ROOT or the working directory."""
    return _user_repo(Path(root or repo_root()).resolve()) / OUTBOX


def tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{_user_repo(repo_root().resolve()) / 'mlflow.db'}"


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)


@contextmanager
def sqlite_setup_lock(uri: str) -> Iterator[None]:
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


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """TrackingUnreachable, naming the server, when an HTTP tracking server does not answer within
    `timeout_s` (MLflow's own client would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
            r.read()
    except (OSError, ValueError) as e:
        why = getattr(e, "reason", None) or e
        why = getattr(why, "strerror", None) or str(why)
        raise TrackingUnreachable(f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) does not answer "
                                  f"({str(why).lower()})") from None


def runs_view_state() -> dict[str, Any]:
    """The runs table's state as MLflow's UI stores it (search facets + UI state; column ids are
    `<params|metrics|tags>.`<name>``): the recipe's params first, then the scores, narrow enough that
    all of them fit one screen beside the UI's assistant panel."""
    col = (lambda kind, name: f"{kind}.`{name}`")
    columns = [*(col("params", p) for p in VIEW_PARAMS), *(col("metrics", m) for m in VIEW_METRICS),
               *(col("tags", t) for t in VIEW_TAGS)]
    return {"searchFilter": "tags.`pipeline.role` = 'parent'", "orderByKey": col("metrics", "cv/mIoU"),
            "orderByAsc": False, "startTime": "ALL", "lifecycleFilter": "Active", "modelVersionFilter": "All Runs",
            "datasetsFilter": [], "selectedColumns": columns, "columnOrder": columns,
            "columnWidths": {c: 140 if c.startswith("tags.") else 90 for c in columns},
            "runListHidden": False, "viewMaximized": False, "isAccordionReordered": False,
            "groupBy": None, "groupsExpanded": {}, "useGroupedValuesInCharts": True, "hideEmptyCharts": True,
            "runsHiddenMode": "SHOW_ALL"}


def ensure_runs_view(client, experiment_id: str) -> None:
    """Write (or update) the experiment's shared runs view and its machine-learning kind."""
    tags = client.get_experiment(experiment_id).tags
    state = json.dumps(runs_view_state(), separators=(",", ":"))
    current = tags.get(VIEW_TAG)
    try:
        same = current is not None and json.loads(current).get("state") == state
    except ValueError:
        same = False
    if not same:
        now = int(time.time() * 1000)
        envelope = {"name": "pipeline runs: recipe and headline scores", "createdAt": now, "updatedAt": now,
                    "state": state}
        client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(envelope, separators=(",", ":")))
    if tags.get(KIND_TAG) != KIND:
        client.set_experiment_tag(experiment_id, KIND_TAG, KIND)


def open_runs_view(uri: str) -> tuple[str, Optional[str]]:
    """Ready the store at `uri` for a person: move a copied repo's artifact paths (local store), create
    the experiment if needed and write its runs view. Returns (experiment id, the folder the artifact
    paths moved from, or None)."""
    check_server(uri)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    moved = None
    with sqlite_setup_lock(uri):
        if uri.startswith("sqlite:///"):
            moved = relocate_store(Path(uri[len("sqlite:///"):]))
        client = mlflow.tracking.MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment_name())
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment_name())
        ensure_runs_view(client, exp_id)
    return exp_id, moved


def view_url(ui: str, experiment_id: str) -> str:
    """The URL that opens the runs view in the UI at `ui` (e.g. http://127.0.0.1:5000)."""
    return (f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW_KEY}"
            "&workflowType=machine_learning")


# (table, column) of a local store that hold artifact locations
_LOCATIONS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("model_versions", "source"),
              ("model_versions", "storage_location"), ("logged_models", "artifact_location"))


def relocate_store(db: Path) -> Optional[str]:
    """A local store (sqlite file `db`) recording artifacts under another folder's mlruns/ while they
    sit in mlruns/ beside `db` (the repo was moved or copied): rewrite those paths to this folder's.
    Returns the old folder, or None when nothing had to move."""
    if not db.exists():
        return None
    here = str(db.resolve().parent)
    with sqlite3.connect(db, timeout=60) as con:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        if "experiments" not in tables:
            return None
        moved = set()
        for (location,) in con.execute("select artifact_location from experiments"):
            loc = (location or "").removeprefix("file://")
            if "/mlruns/" not in loc:
                continue
            folder, rest = loc[:loc.rindex("/mlruns/")], loc[loc.rindex("/mlruns/") + len("/mlruns/"):]
            if folder != here and (Path(here) / "mlruns" / rest).exists():
                moved.add(folder)
        for old in sorted(moved):
            for table, column in _LOCATIONS:
                if table not in tables or column not in {r[1] for r in con.execute(f"pragma table_info({table})")}:
                    continue
                for scheme in ("", "file://"):
                    src, dst = f"{scheme}{old}/mlruns/", f"{scheme}{here}/mlruns/"
                    con.execute(f"update {table} set {column} = ? || substr({column}, ?) where {column} like ? escape '\\'",
                                (dst, len(src) + 1, _like(src) + "%"))
    return sorted(moved)[0] if moved else None


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
