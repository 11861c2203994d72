"""The team's runs table (`make ui`; not a DVC stage).

    python -m stages.ui [--host 127.0.0.1] [--port 5000] [--print-only]

Writes the experiment's runs view (pipeline/mlflow_store.py: one row per pipeline run, the recipe's
params and the headline scores, best CV first) and prints the URL that opens it. With the repo's own
store (no MLFLOW_TRACKING_URI) it first moves a copied repo's artifact paths, then serves `mlflow ui`
on mlflow.db; with a team's server (MLFLOW_TRACKING_URI=http://...) the URL is on that server.
"""
import argparse
import os
import sys
from pathlib import Path

from pipeline import entrypoint
from pipeline.mlflow_store import open_runs_view, tracking_uri, view_url

PARAMS = ()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--print-only", action="store_true", help="write the view and print its URL; serve nothing")
    args = ap.parse_args()
    uri = tracking_uri()
    exp_id, moved = open_runs_view(uri)
    if moved:
        print(f"mlflow.db: artifact paths moved from {moved} to this repo")
    served = uri.startswith(("http://", "https://"))
    print(f"runs table: {view_url(uri if served else f'http://{args.host}:{args.port}', exp_id)}", flush=True)
    if not (served or args.print_only):
        mlflow_cli = str(Path(sys.executable).parent / "mlflow")
        os.execv(mlflow_cli, [mlflow_cli, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)])


if __name__ == "__main__":
    entrypoint.run(main)
