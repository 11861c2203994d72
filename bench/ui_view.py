"""The runs table `make ui` opens, as a browser shows it: a repeatable screenshot check.

    python -m bench.ui_view [--repo .] [--out bench/results/ui-view.png] [--size 1920,1080]

Writes the runs view into the repo's MLflow store (stages.ui --print-only), serves `mlflow ui` on a
free port, screenshots the printed URL with headless Chromium (Debian: `apt-get install chromium`)
(look at it: the grid renders columns lazily, so a DOM dump is no proof of what a screen shows).
Needs a store with at least one pipeline run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipeline.mlflow_store import VIEW_METRICS, VIEW_PARAMS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=".")
    ap.add_argument("--out", default="bench/results/ui-view.png")
    ap.add_argument("--size", default="1920,1080")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        sys.exit("no chromium on PATH (Debian: apt-get install -y chromium)")
    repo = Path(args.repo).resolve()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("MLFLOW_TRACKING_URI", None)
    url = subprocess.run([sys.executable, "-m", "stages.ui", "--print-only", "--port", str(port)], cwd=repo, env=env,
                         capture_output=True, text=True, check=True).stdout.split("runs table: ")[-1].strip()
    ui = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri",
                           f"sqlite:///{repo / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port)],
                          cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        out = Path(args.out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000"]
        subprocess.run([chromium, *flags, f"--screenshot={out}", f"--window-size={args.size}", url],
                       capture_output=True, timeout=180, check=True)
    finally:
        ui.terminate()
    print(f"{url}\nscreenshot: {out} (look for the columns {', '.join((*VIEW_PARAMS, *VIEW_METRICS))})")


if __name__ == "__main__":
    main()
