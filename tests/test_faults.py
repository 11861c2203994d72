"""Faults a team meets (issue 35): a full disk, a killed stage's leftovers, an MLflow outage. Each
ends in the clean run's results or in one line naming the path and the cause — never a traceback,
a partial file or a silently changed output. (Damaged checkpoints: tests/test_training.py; the
same faults injected into a real `dvc repro`: bench/faults.py.)"""
from __future__ import annotations

import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline import entrypoint
from pipeline.io import WriteFailed, atomic_dir, atomic_file, write_json
from pipeline.models.checkpoint import save_checkpoint


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def small_disk():
    """Files may grow to 64 KB (RLIMIT_FSIZE): writes past it fail with EFBIG, as a full disk fails
    with ENOSPC — the same path through the code, no privileges needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing_partial(tmp_path, small_disk, capsys):
    out = tmp_path / "models/fold_0/seed_0"
    write_json(out / "metrics.json", {"a": 1})                # small files still go through
    with pytest.raises(WriteFailed, match=r"^file too large writing .*models/fold_0/seed_0/last\.pt \(needs ~1 MB\)$"):
        save_checkpoint(out / "last.pt", model={"w": torch.zeros(256, 1024)})
    with pytest.raises(WriteFailed, match=r"writing .*val_confusion\.npy"):
        with atomic_file(out / "val_confusion.npy") as tmp:
            np.save(tmp, np.zeros(100_000))
    with pytest.raises(WriteFailed, match=r"writing .*/reports$"):
        with atomic_dir(tmp_path / "reports") as tmp:
            (tmp / "big.bin").write_bytes(bytes(100_000))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["fold_0", "metrics.json", "models", "seed_0"]
    # What a stage's __main__ shows: the line, exit status 2, no traceback.
    with pytest.raises(SystemExit) as stop:
        entrypoint.run(lambda: save_checkpoint(out / "best.pt", model={"w": torch.zeros(256, 1024)}))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: file too large writing ") and err.count("\n") == 1


def test_a_killed_writers_temporary_files_are_removed_by_the_next_write(tmp_path):
    dead, alive = dead_pid(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        leftovers = [tmp_path / f".last.tmp-{dead}.pt", tmp_path / f"eda.tmp-{dead}"]
        running = [tmp_path / f".last.tmp-{alive.pid}.pt", tmp_path / f"eda.tmp-{alive.pid}"]
        for p in leftovers + running:
            p.mkdir() if p.suffix != ".pt" else p.write_bytes(b"half a checkpoint")
        with atomic_file(tmp_path / "last.pt") as tmp:
            tmp.write_bytes(b"x")
        with atomic_dir(tmp_path / "eda") as tmp:
            (tmp / "report.html").write_text("ok")
        assert not any(p.exists() for p in leftovers)
        assert all(p.exists() for p in running)   # another process's write in progress is left alone
    finally:
        alive.kill()


def test_a_failed_experiment_says_how_to_undo_its_params(tmp_path, monkeypatch, capsys):
    """`dvc exp run -S lr=…` in the workspace writes params.yaml before the stages run; a stage that
    fails leaves the value there for the next experiment to inherit: the stage says so."""
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.001\n")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "x"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, env={**__import__("os").environ, **env})
    (tmp_path / "params.yaml").write_text("train:\n  lr: 10.0\n")          # what -S wrote
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "hot")

    def fails():
        raise FloatingPointError("loss is nan")

    with pytest.raises(SystemExit):
        entrypoint.run(fails)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: loss is nan" and "`git checkout params.yaml` restores it" in err[1]
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / ".dvc/tmp/exps/tmp1"))  # --temp/--queue: the workspace is untouched
    with pytest.raises(SystemExit):
        entrypoint.run(fails)
    assert capsys.readouterr().err.splitlines() == ["error: loss is nan"]
