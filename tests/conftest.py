"""Shared fixtures: hand-made COCO datasets in tmp_path, and MLflow pointed away from the repo."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
REPO = Path(__file__).resolve().parents[1]
# Added to the seeds of every test that trains or draws data (PIPELINE_TEST_SEED=7 make test): the
# suite must pass whatever the seed, since no test may assert a learnt outcome of a tiny model.
SEED = int(os.environ.get("PIPELINE_TEST_SEED", "0"))


def square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    """Axis-aligned polygon; pycocotools fills pixels x0..x1-1, y0..y1-1 (area (x1-x0)*(y1-y0))."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def write_coco(root: Path, images: list[dict], annotations: list[dict], categories: list[dict] | list[str],
               name: str = "train.json", write_images: bool = True) -> Path:
    """Write a COCO json (and blank image files of the declared size) under root."""
    root.mkdir(parents=True, exist_ok=True)
    if categories and isinstance(categories[0], str):
        categories = [{"id": i, "name": n} for i, n in enumerate(categories)]
    for im in images:
        if write_images:
            p = root / im["file_name"]
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((im["height"], im["width"], 3), 127, np.uint8)).save(p)
    for i, a in enumerate(annotations):
        a.setdefault("id", i)
        a.setdefault("iscrowd", 0)
    path = root / name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def image(i: int, w: int = 10, h: int = 8, folder: str = "imgs") -> dict:
    return {"id": i, "file_name": f"{folder}/{i:03d}.png", "width": w, "height": h}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(folder: Path, port: int = 0) -> Iterator[str]:
    """A real `mlflow server` on `port` (0: a free one) of localhost (store and artifacts under
    `folder`): its URL."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server",
                             "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                             "--artifacts-destination", str(folder / "artifacts"),
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
                pytest.fail("mlflow server did not start:\n" + (folder / "server.log").read_text()[-3000:])
            time.sleep(0.5)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class Cable:
    """A TCP proxy on a free localhost port in front of `target_port`: unplug() cuts every open
    connection and refuses new ones (a network outage, the server itself untouched); plug() ends it."""

    def __init__(self, target_port: int):
        import threading

        self.target, self.port, self.open, self.listener = target_port, free_port(), [], None
        self.lock = threading.Lock()
        self.plug()

    def plug(self) -> None:
        import threading

        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def unplug(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)   # wakes the accept() blocked on it (close alone would not)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            for s in self.open:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.open.clear()

    def _accept(self, listener) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            with self.lock:
                self.open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


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


# The longest files first: under `pytest -n auto --dist loadfile` (make test) each runs whole on one
# worker, so the end-to-end DAG starts at once and the other workers share the rest meanwhile.
LONGEST_FIRST = ("test_e2e.py", "test_distributed.py", "test_interrupt.py", "test_tracking.py",
                 "test_served.py", "test_training.py", "test_models.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: a file keeps its order
