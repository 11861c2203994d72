"""`dvc repro` on the demo data from a fresh copy of the repo (after install), then a no-op repro.

Targets: data half (demo data -> masks -> eda -> split) <= 2 min; the whole DAG, training
included, <= 5 min on 2 cores; a no-op repro <= 5 s.

    python -m bench.dag
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    return time.perf_counter() - start


def main() -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        for f in files:
            if (REPO / f).is_file() and f != "dvc.lock":
                (ws / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / f, ws / f)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_URI", "PIPELINE_SESSION", "DVC_"))}
        env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", MLFLOW_DISABLE_TELEMETRY="true")
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "bench"]):
            subprocess.run(cmd, cwd=ws, env=env, check=True, capture_output=True)
        data = timed(["dvc", "repro", "split"], ws, env)
        rest = timed(["dvc", "repro"], ws, env)
        noop = timed(["dvc", "repro"], ws, env)
    print(f"dvc repro, demo data, default params, {os.cpu_count()} cores, fresh clone")
    print(f"  data half (demo_data, masks, eda, split): {data:6.1f} s  (target <= 120 s)")
    print(f"  rest (train, cv, pseudo, round 2, ensemble, submit): {rest:6.1f} s")
    print(f"  whole DAG:                                {data + rest:6.1f} s  (target <= 300 s)")
    print(f"  no-op repro:                              {noop:6.1f} s  (target <= 5 s)")


if __name__ == "__main__":
    main()
