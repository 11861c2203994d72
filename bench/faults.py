"""Faults a team meets, injected into a real `dvc repro` of a tiny demo config (issue 35), each rerun
compared with the clean run: metrics (times left out), every model file's md5 in dvc.lock,
submission.csv. Each fault must end in the clean run's results or in one clear line.

    python -m bench.faults            # ~15 min on 2 cores

1. a damaged round-2 best.pt (16 KB of random bytes in the middle) and a truncated round-1 last.pt:
   `dvc repro` stops with one `error:` line naming the file, nothing committed; restoring it with
   `dvc checkout -f <file>` (as the line says) ends where the clean run did;
2. an identical retrain (a member's folder deleted) gives byte-identical checkpoints (same dvc.lock);
3. a full disk (RLIMIT_FSIZE, EFBIG: the same path as ENOSPC) while training: one line naming the
   checkpoint and its size, no temporary file left; the rerun ends where the clean run did;
4. SIGKILL in the middle of training: the rerun resumes and ends where the clean run did, with no
   temporary file left behind;
5. an MLflow server that does not answer: `dvc repro` succeeds, one line per stage; the records are
   sent by `python -m pipeline.tracking sync` once a server answers on that address.
(Kills between stages and queued experiments' params: tests/test_tracking_dvc.py.)
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from pipeline.models.checkpoint import load_checkpoint
from tests.helpers import free_port, mlflow_server
from tests.helpers import TINY, copy_as_repo, deep_update, source_files

REPO = Path(__file__).resolve().parents[1]
TIMES = ("minutes", "_s", "train_min", "seconds", "time")


def run(cmd: str, ws: Path, env: dict, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=ws, env=env, capture_output=True, text=True, timeout=timeout)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def untimed(tree):
    if isinstance(tree, dict):
        return {k: untimed(v) for k, v in tree.items() if not any(t in k for t in TIMES)}
    return tree


def snapshot(ws: Path) -> dict:
    """What a run ends with: metrics without times, the lock's model hashes, the submission."""
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    models = {f"{name}:{o['path']}": o["md5"] for name, st in lock.items() for o in st.get("outs", [])
              if o["path"].startswith("models")}
    metrics = {str(p.relative_to(ws)): untimed(json.loads(p.read_text())) for p in sorted((ws / "metrics").glob("*.json"))}
    tensors = {str(p.relative_to(ws)): load_checkpoint(p)["model"] for p in sorted(ws.glob("models*/fold_*/seed_*/*.pt"))}
    return {"models": models, "metrics": metrics, "submission": md5(ws / "submission/submission.csv"), "tensors": tensors}


def differences(ws: Path, clean: dict, exact: bool = True) -> list[str]:
    """What differs from the clean run: byte for byte (exact), or — after a resumed run, whose float
    sums may take another order — metrics within 1e-4 and every checkpoint tensor within 1e-4."""
    now = snapshot(ws)
    if exact:
        return [k for k in ("models", "metrics", "submission") if now[k] != clean[k]]
    out = []
    flat_now, flat_clean = pd.json_normalize(now["metrics"]).iloc[0], pd.json_normalize(clean["metrics"]).iloc[0]
    for key, want in flat_clean.items():
        got = flat_now.get(key)
        if isinstance(want, float) and not (isinstance(got, float) and abs(got - want) <= 1e-4 * max(1.0, abs(want))):
            out.append(f"metrics {key}: {want} -> {got}")
    for pt in sorted(clean["tensors"]):
        a, b = clean["tensors"][pt], load_checkpoint(ws / pt)["model"]
        if any(not torch.allclose(b[k].float(), v.float(), rtol=1e-4, atol=1e-6) for k, v in a.items()):
            out.append(pt)
    return out


def leftovers(ws: Path) -> list[str]:
    return [str(p.relative_to(ws)) for p in ws.rglob("*.tmp-*") if ".dvc" not in p.parts]


def errors(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("error:")]


def report(name: str, ok: bool, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    return ok


def main() -> None:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        ws.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_URI", "PIPELINE_SESSION", "DVC_"))}
        env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", MLFLOW_DISABLE_TELEMETRY="true")
        params = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
        copy_as_repo(REPO, ws, env, source_files(REPO), params)
        began = time.perf_counter()
        out = run("dvc repro", ws, env)
        assert out.returncode == 0, out.stdout + out.stderr
        clean = snapshot(ws)
        assert not differences(ws, clean) and not differences(ws, clean, exact=False)
        print(f"clean dvc repro: {time.perf_counter() - began:.0f} s, {len(clean['models'])} model folders", flush=True)

        # 1. damaged checkpoints
        for rel, how in (("models_round2/fold_1/seed_0/best.pt", "16 KB of random bytes"),
                         ("models/fold_0/seed_0/last.pt", "truncated to half")):
            f = ws / rel
            data = bytearray(f.read_bytes())
            if how.startswith("16"):
                mid = len(data) // 2
                data[mid:mid + 16384] = random.Random(0).randbytes(16384)
            else:
                data = data[:len(data) // 2]
            f.write_bytes(bytes(data))
            lock = (ws / "dvc.lock").read_text()
            out = run("dvc repro", ws, env)
            lines = errors(out)
            stopped = (out.returncode != 0 and len(lines) == 1 and rel in lines[0] and "Traceback" not in out.stderr
                       and (ws / "dvc.lock").read_text() == lock)
            restored = run(f"dvc checkout -f {rel} && dvc repro", ws, env)
            same = restored.returncode == 0 and not differences(ws, clean)
            results.append(report(f"damaged checkpoint ({how}, {rel})", stopped and same,
                                  f"exit {out.returncode}, {lines}; after `dvc checkout -f`: "
                                  f"{'same as the clean run' if same else 'DIFFERENT'}"))

        # 2. identical retrain
        member = "models/fold_1/seed_0"
        out = run(f"rm -rf {member} && dvc repro", ws, env)
        diff = differences(ws, clean) if out.returncode == 0 else ["failed"]
        results.append(report("identical retrain", not diff, f"{member} retrained: dvc.lock's md5s, metrics and "
                                                             f"submission {'identical' if not diff else diff}"))

        # 3. disk full while training (RLIMIT_FSIZE: files may grow to 4 MB)
        member = "models/fold_0/seed_0"
        out = run(f"rm -rf {member} && trap '' XFSZ && ulimit -f 4096 && dvc repro", ws, env)
        lines = errors(out)
        left = leftovers(ws)
        one_line = out.returncode != 0 and len(lines) == 1 and "writing models/fold_0/seed_0/" in lines[0] and not left
        out = run("dvc repro", ws, env)
        diff = differences(ws, clean) if out.returncode == 0 else ["failed"]
        results.append(report("disk full while training", one_line and not diff,
                              f"{lines}, leftovers {left}; rerun {'byte-identical to the clean run' if not diff else diff}"))

        # 4. SIGKILL in the middle of training
        run(f"rm -rf {member}", ws, env)
        proc = subprocess.Popen(["dvc", "repro"], cwd=ws, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.monotonic() + 600
        while not (ws / member / "last.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out = run("dvc repro", ws, env)
        left = leftovers(ws)
        diff = differences(ws, clean, exact=False) if out.returncode == 0 else ["failed"]
        results.append(report("SIGKILL while training", not diff and not left,
                              f"resumed rerun {'equals the clean run (metrics and every tensor within 1e-4)' if not diff else diff}, "
                              f"leftovers {left}"))

        # 5. MLflow server down for a whole repro, then back
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        began = time.perf_counter()
        out = run("dvc repro -f eda split", ws, {**env, "MLFLOW_TRACKING_URI": url})
        spent = time.perf_counter() - began
        lines = [line for line in out.stderr.splitlines() if line.startswith("mlflow:")]
        kept = len(list((ws / ".mlflow-outbox").glob("*.json")))
        with mlflow_server(Path(tmp) / "server", port):
            sync = run("python -m pipeline.tracking sync", ws, {**env, "MLFLOW_TRACKING_URI": url})
            import mlflow

            mlflow.set_tracking_uri(url)
            runs = mlflow.search_runs(experiment_names=["segmentation"], output_format="list")
        statuses = sorted({r.info.status for r in runs})
        ok = out.returncode == 0 and kept >= 2 and sync.returncode == 0 and statuses == ["FINISHED"] and spent < 120
        results.append(report("MLflow server down", ok, f"repro exit {out.returncode} in {spent:.0f} s, "
                                                        f"{len(lines)} mlflow lines, {kept} records kept; sync: "
                                                        f"{sync.stdout.strip()}; {len(runs)} runs, statuses {statuses}"))
    print(f"{sum(results)}/{len(results)} faults handled")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
