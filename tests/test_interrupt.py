"""Nothing lost: a train stage killed with SIGKILL (no cleanup code runs) in any run state resumes
from its last checkpoint when rerun, and ends exactly where an uninterrupted run ends."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from pipeline.config import Params
from pipeline.models.checkpoint import load_checkpoint
from tests.helpers import REPO
from tests.helpers import easy_workspace

EPOCHS = 3


def workdir(tmp, name):
    raw = Params().model_dump()
    raw["paths"].update({k: str(tmp / name / k) for k in ("models", "metrics", "plots")},
                        masks=str(tmp / "masks"), split=str(tmp / "split"))
    raw["train"].update(folds=[0], epochs=EPOCHS, batch_size=6, image_size=64, augment=["hflip", "color"], cutmix=0.5,
                        swa_epochs=2, ema={"decay": 0.9, "warmup": True})
    raw["runtime"].update(gallery=1, save_every_s=0)
    (tmp / name).mkdir()
    (tmp / name / "params.yaml").write_text(yaml.safe_dump(Params.model_validate(raw).model_dump(), sort_keys=False))
    return tmp / name


def stage(work, kill_in: str | None = None, **kw):
    """The train stage as DVC runs it; kill_in: the run SIGKILLs itself at a fixed point of that state
    (tests.helpers.kill_in), so no cleanup code runs and no timing decides where."""
    run = [sys.executable, "-m", "stages.train", "--fold", "0", "--seed", "0"]
    if kill_in:
        run = [sys.executable, "-c", "import os, signal, sys, pytest, stages.train as t; "
               "from tests.helpers import kill_in; "
               f"kill_in(pytest.MonkeyPatch(), {kill_in!r}, lambda: os.kill(os.getpid(), signal.SIGKILL)); "
               "sys.argv[1:] = ['--fold', '0', '--seed', '0']; t.main()"]
    return subprocess.Popen(run, cwd=work, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.timeout(400)
def test_sigkilled_training_resumes_to_the_uninterrupted_result(tmp_path):
    easy_workspace(tmp_path, n=24)

    straight = workdir(tmp_path, "straight")
    out, _ = stage(straight).communicate(timeout=300)
    assert f"epoch {EPOCHS}/{EPOCHS}" in out, out

    killed = workdir(tmp_path, "killed")
    last = killed / "models/fold_0/seed_0/last.pt"
    proc = stage(killed)
    deadline = time.monotonic() + 200
    while not (last.exists() and load_checkpoint(last)["epoch"] >= 1):   # atomic writes: never half a file
        assert proc.poll() is None and time.monotonic() < deadline, "the stage ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ck = load_checkpoint(last)
    assert 1 <= ck["epoch"] < EPOCHS and "optimizer" in ck          # mid-run: resumable state

    # The rerun is killed in the next state too, while averaging (SWA saved, the EMA's BN pass); the
    # next rerun resumes in that state (every state, killed in-process: tests/test_training.py).
    proc = stage(killed, kill_in="averaging")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out
    assert load_checkpoint(last)["state"] == "averaging" and f"resuming after epoch {ck['epoch']}" in out, out
    out, _ = stage(killed).communicate(timeout=300)
    assert load_checkpoint(last)["state"] == "done" and "epoch 1/" not in out and "in state averaging" in out, out
    a = json.loads((straight / "metrics/details/train/fold_0_seed_0.json").read_text())["val"]
    b = json.loads((killed / "metrics/details/train/fold_0_seed_0.json").read_text())["val"]
    assert b["mIoU"] == pytest.approx(a["mIoU"], rel=1e-5) and b["best_epoch"] == a["best_epoch"]
    ha = load_checkpoint(straight / "models/fold_0/seed_0/last.pt")["history"]
    hb = load_checkpoint(last)["history"]
    assert [r["train/loss"] for r in hb] == pytest.approx([r["train/loss"] for r in ha], rel=1e-5)
    for name in ("swa", "ema"):
        wa, wb = (load_checkpoint(w / f"models/fold_0/seed_0/{name}.pt")["model"] for w in (straight, killed))
        assert all(torch.allclose(wb[k].float(), v.float(), rtol=1e-4, atol=1e-6) for k, v in wa.items()), name


@pytest.mark.timeout(300)
def test_ctrl_c_says_in_one_line_what_was_kept(tmp_path):
    """Ctrl-C (SIGINT to the stage and its loader workers) ends with one line naming the checkpoint
    kept and how to resume, exit status 130, no traceback."""
    easy_workspace(tmp_path, n=24)
    work = workdir(tmp_path, "ctrl_c")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["runtime"]["workers"] = 2
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    last = work / "models/fold_0/seed_0/last.pt"
    # as from a terminal: SIGINT handled by default (a suite started in the background, `make test &`,
    # hands its children SIGINT ignored, and Python then never raises KeyboardInterrupt)
    proc = stage(work, start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 200
    while not (last.exists() and load_checkpoint(last)["epoch"] >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, "the stage ended before it could be interrupted"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)            # what a terminal's Ctrl-C does: the whole process group
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    [line] = [l for l in out.splitlines() if l.startswith("interrupted:")]
    epoch = load_checkpoint(last)["epoch"]
    assert f"last.pt holds epoch {epoch} of {EPOCHS}; `dvc repro` resumes from there" in line
