"""The GPU pool that pins parallel queue experiments to their own GPUs (real processes, real flock)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from pipeline.devices import claim, pin
from tests.helpers import REPO

HOLDER = "import sys, time\nfrom pipeline.devices import claim\nprint(claim({n}, sys.argv[1], total=2), flush=True)\ntime.sleep(60)\n"


def holder(pool, n=1):
    p = subprocess.Popen([sys.executable, "-c", HOLDER.format(n=n), str(pool)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    return p, p.stdout.readline().strip()


def test_each_process_gets_its_own_gpu_and_a_killed_one_gives_it_back(tmp_path):
    a, got_a = holder(tmp_path)
    b, got_b = holder(tmp_path)
    try:
        assert {got_a, got_b} == {"[0]", "[1]"}
        with pytest.raises(TimeoutError, match="no 1 free GPU"):
            claim(1, tmp_path, total=2, poll_s=0.05, timeout_s=0.3)
        a.send_signal(signal.SIGKILL)          # no cleanup code runs: the kernel drops the lock
        a.wait()
        assert claim(1, tmp_path, total=2, poll_s=0.05, timeout_s=10) == [int(got_a.strip("[]"))]
    finally:
        for p in (a, b):
            p.kill()
            p.wait()


def test_a_multi_gpu_claim_takes_all_or_nothing(tmp_path):
    a, got = holder(tmp_path, n=1)
    try:
        with pytest.raises(TimeoutError):
            claim(2, tmp_path, total=2, poll_s=0.05, timeout_s=0.3)
        with pytest.raises(RuntimeError, match="has 2"):
            claim(3, tmp_path, total=2)
    finally:
        a.kill()
        a.wait()
    assert claim(2, tmp_path, total=2, timeout_s=5) == [0, 1]


def test_pin_leaves_an_explicit_choice_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_GPU_POOL", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert pin() is None and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.delenv("PIPELINE_GPU_POOL")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert pin() is None and "CUDA_VISIBLE_DEVICES" not in os.environ
