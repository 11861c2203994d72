"""Fixtures every test gets: MLflow pointed away from the repo; the longest files first. The helpers
the test files share are in tests/helpers.py."""
from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(autouse=True)
def _mlflow_in_tmp(tmp_path, monkeypatch):
    """Every test logs to its own sqlite file, never to the repo's mlflow.db. A URI an earlier test set
    in this process (mlflow.set_tracking_uri outlives the env var) is reset too: with pytest-xdist a
    worker runs files in any order."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(uri)
    monkeypatch.setenv("PIPELINE_SESSION", f"test-{tmp_path.name}")


@pytest.fixture
def case(tmp_path):
    """The label audit's known case (tests/helpers.audit_case): a dataset and its out-of-fold folder."""
    from tests.helpers import audit_case

    return audit_case(tmp_path)


# The longest files first: under `pytest -n auto --dist loadfile` (make test) each runs whole on one
# worker, so the end-to-end DAG starts at once and the other workers share the rest meanwhile.
LONGEST_FIRST = ("test_e2e.py", "test_distributed.py", "test_interrupt.py", "test_tracking.py",
                 "test_served.py", "test_training.py", "test_models.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: a file keeps its order
