"""Helpers the test files (and bench/) share: hand-made COCO datasets, the easy training workspace,
a run killed in a chosen state, a real `mlflow server` (and a cable to unplug it), the tiny
end-to-end config and a copy of the repo as a fresh git repo. Fixtures live in conftest.py.
Heavy imports (torch, the training code) happen inside the helpers that need them, so the quick
subset (`make test-quick`) does not pay for them."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

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


def easy_dataset(root, n=48, size=64, seed=SEED):
    """Big red squares (class 1) and blue discs (class 2) on grey noise: easy to learn."""

    rng = np.random.default_rng(seed)
    images, anns = [], []
    (root / "img").mkdir(parents=True)
    for i in range(n):
        img = rng.normal(128, 20, (size, size, 3)).clip(0, 255).astype(np.uint8)
        x, y, s = rng.integers(4, size // 2 - 4, 3)
        s = 12 + s % 10
        img[y:y + s, x:x + s] = (40, 40, 220)                   # BGR red square
        poly = [[float(x), float(y), float(x + s), float(y), float(x + s), float(y + s), float(x), float(y + s)]]
        anns.append({"image_id": i, "category_id": 0, "segmentation": poly})
        cx, cy, r = int(rng.integers(size // 2 + 8, size - 10)), int(rng.integers(10, size - 10)), 8
        cv2.circle(img, (cx, cy), r, (220, 60, 40), -1)         # BGR blue disc
        circle = cv2.ellipse2Poly((cx, cy), (r, r), 0, 0, 360, 15).astype(float).ravel().tolist()
        anns.append({"image_id": i, "category_id": 1, "segmentation": [circle]})
        cv2.imwrite(str(root / f"img/{i:03d}.png"), img)
        images.append({"id": i, "file_name": f"img/{i:03d}.png", "width": size, "height": size})
    write_coco(root, images, anns, ["square", "disc"], write_images=False)


def params_for(tmp, runtime=None, **train):
    """Train params for the easy workspace; last.pt after every epoch (runtime.save_every_s 0) unless
    runtime says otherwise."""
    from pipeline.config import Params
    from pipeline.training.run import PARAMS

    raw = Params().model_dump()
    raw.update(model="unet", encoder="resnet18")
    raw["paths"].update(masks=str(tmp / "masks"), split=str(tmp / "split"), models=str(tmp / "models"),
                        metrics=str(tmp / "metrics"), plots=str(tmp / "plots"))
    raw["split"]["n_folds"] = 4   # easy_workspace's folds
    raw["train"].update(dict(epochs=6, batch_size=8, image_size=64, lr=3e-3, loss={"ce": 1.0}, augment=["hflip"],
                             warmup_epochs=0.5, ema=None), **train)   # EMA: opt in
    raw["runtime"].update(dict(workers=0, gallery=2, save_every_s=0), **(runtime or {}))
    return Params.model_validate(raw).only(*PARAMS)


def easy_workspace(tmp, n=48):
    """The easy dataset under tmp/data, its mask cache (tmp/masks) and 4 random folds (tmp/split)."""
    from pipeline.config import Masks, Split
    from pipeline.data.coco import load_dataset
    from pipeline.data.folds import make_folds
    from pipeline.data.masks import build_mask_cache

    easy_dataset(tmp / "data", n=n)
    ds = load_dataset(tmp / "data", ["train.json"])
    build_mask_cache(ds, tmp / "masks", Masks(), workers=1)
    (tmp / "split").mkdir()
    make_folds(ds, Split(strategy="random", n_folds=4, holdout=0.0, seed=SEED)).to_csv(tmp / "split/folds.csv", index=False)
    return tmp


class Killed(BaseException):
    """What the test's SIGUSR1 handler raises: the process dies there, as under a real kill."""


def kill_in(monkeypatch, state: str, die=None) -> None:
    """Make the next run die inside `state` (deterministically, at a fixed point): training — epoch 2
    (epoch 1 saved); averaging — the EMA (SWA's average done and saved); finishing — while writing
    the reports; done — while a finished run's reports are rewritten. die: what kills it (default: a
    SIGUSR1 whose handler raises Killed; tests/test_interrupt.py passes a real SIGKILL)."""
    import signal

    from pipeline.training import trainer as trainer_module

    if die is None:
        signal.signal(signal.SIGUSR1, lambda *_: (_ for _ in ()).throw(Killed(state)))
        die = lambda: signal.raise_signal(signal.SIGUSR1)   # noqa: E731
    calls = {"n": 0}
    if state == "training":
        real = trainer_module.Trainer.train_epoch

        def epoch(self, e):
            calls["n"] += 1
            if calls["n"] == 2:
                die()
            return real(self, e)
        monkeypatch.setattr(trainer_module.Trainer, "train_epoch", epoch)
    elif state == "averaging":
        real_average = trainer_module.Trainer.average_model
        monkeypatch.setattr(trainer_module.Trainer, "average_model",
                            lambda self, name, avg: die() if name == "ema" else real_average(self, name, avg))
    else:
        real_finish = trainer_module.Trainer.write_reports
        monkeypatch.setattr(trainer_module.Trainer, "write_reports", lambda self: die() or real_finish(self))


# Every assertion below is mechanics or a constructed known answer, never a learnt outcome of these
# 2-epoch models: training is deterministic per CPU, not across CPUs, and this must pass on any machine
# and with any PIPELINE_TEST_SEED (SEED above).
TINY = {"encoder": "mobilenet_v2",   # half ResNet-18's weights: every checkpoint DVC hashes, caches and pushes
        "demo": {"n_train": 24, "n_test": 4, "image_size": 64, "seed": SEED},
        "split": {"n_folds": 3, "holdout": 0.15, "seed": 42 + SEED},
        "train": {"folds": [0, 1], "seeds": [0], "epochs": 2, "image_size": 64, "batch_size": 4, "swa_epochs": 1,
                  "class_weights": "none"},
        "runtime": {"gallery": 2},
        # Below 1/12 (12 classes): every pixel's top probability clears it, whatever the teacher learnt,
        # so every test image is pseudo-labelled whole, a known answer (tests/test_pseudo.py covers the
        # pixels a threshold drops with a constructed teacher).
        "pseudo": {"epochs": 1, "threshold": 0.05, "min_kept": 0.3}}


def deep_update(d: dict, u: dict) -> dict:
    for k, v in u.items():
        d[k] = deep_update(d.get(k, {}), v) if isinstance(v, dict) else v
    return d


def sh(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def copy_as_repo(src: Path, dest: Path, env: dict, files: list[str], params: dict) -> None:
    """`files` of src (never .venv, outputs or dvc.lock) into dest, with `params` as params.yaml, as a
    fresh git repo with one commit (DVC experiments need one)."""
    for f in files:
        if (src / f).is_file() and f != "dvc.lock":
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / f, dest / f)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        sh(cmd, dest, env)


def source_files(root: Path, untracked: bool = True) -> list[str]:
    """The files git sees under root: committed, and (untracked=True) new ones it does not ignore."""
    extra = ["--others", "--exclude-standard"] if untracked else []
    return subprocess.run(["git", "ls-files", "--cached", *extra], cwd=root, capture_output=True, text=True,
                          check=True).stdout.split()


def photo(seed: int, h: int = 480, w: int = 640) -> np.ndarray:
    """A cluttered scene (RGB): smoothed noise plus 60 random shapes, different for every seed."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (3, 3), 0)
    img = np.ascontiguousarray(cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC))
    for _ in range(60):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        s = int(rng.integers(8, 60))
        kind = rng.integers(3)
        if kind == 0:
            cv2.rectangle(img, (x, y), (x + s, y + int(rng.integers(8, 60))), colour, -1)
        elif kind == 1:
            cv2.circle(img, (x, y), s // 2, colour, -1)
        else:
            cv2.line(img, (x, y), (int(rng.integers(0, w)), int(rng.integers(0, h))), colour, int(rng.integers(1, 5)))
    return img


AUDIT_CLASSES = ["Background", "can", "bottle"]   # the audit case's classes


def oof_dir(tmp_path, probs: np.ndarray, truth: np.ndarray, key: str):
    out = tmp_path / "oof"
    (out / "probs").mkdir(parents=True)
    (out / "masks").mkdir()
    np.save(out / "probs/0.npy", (probs * 255).round().astype(np.uint8))
    cv2.imwrite(str(out / "masks/0.png"), truth)
    (out / "classes.json").write_text(json.dumps({"classes": AUDIT_CLASSES, "max_side": None}))
    pd.DataFrame([{"key": key, "fold": 0, "height": truth.shape[0], "width": truth.shape[1],
                   "probs": "probs/0.npy", "mask": "masks/0.png"}]).to_csv(out / "index.csv", index=False)
    return out


def audit_case(tmp_path):
    """A 20x20 image: ann 10 a can the model agrees with; ann 11 labelled bottle that the model calls
    a can (0.8); an unlabelled 6x6 region the model calls a bottle (0.9); ann 12 a speck too small
    to judge anything but its own pixels."""
    write_coco(tmp_path / "data", [image(0, 20, 20)], [
        {"id": 10, "image_id": 0, "category_id": 1, "segmentation": square(0, 0, 8, 8)},
        {"id": 11, "image_id": 0, "category_id": 2, "segmentation": square(10, 0, 18, 8)},
        {"id": 12, "image_id": 0, "category_id": 2, "segmentation": square(18, 18, 20, 20)}],
        [{"id": 1, "name": "can"}, {"id": 2, "name": "bottle"}])
    from pipeline.data.coco import load_dataset

    ds = load_dataset(tmp_path / "data", ["train.json"])
    p = np.zeros((3, 20, 20), np.float32)
    p[0] = 0.9
    p[:, 0:8, 0:8] = np.array([0.05, 0.9, 0.05])[:, None, None]        # ann 10: a can, as labelled
    p[:, 0:8, 10:18] = np.array([0.1, 0.8, 0.1])[:, None, None]        # ann 11: labelled bottle, looks like a can
    p[:, 12:18, 0:6] = np.array([0.05, 0.05, 0.9])[:, None, None]      # no label: looks like a bottle
    p[:, 18:20, 18:20] = np.array([0.1, 0.1, 0.8])[:, None, None]      # ann 12: a bottle, as labelled
    truth = np.zeros((20, 20), np.uint8)
    truth[0:8, 0:8], truth[0:8, 10:18], truth[18:20, 18:20] = 1, 2, 2
    return ds, oof_dir(tmp_path, p, truth, ds.images.key[0])
