"""The real thing: `dvc repro` in a temporary copy of the repo with a tiny params file."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from tests.conftest import REPO

TINY = {"demo": {"n_train": 24, "n_test": 4, "image_size": 64, "seed": 0},
        "split": {"n_folds": 3, "holdout": 0.15},
        "train": {"folds": [0, 1], "seeds": [0, 1], "epochs": 2, "image_size": 64, "batch_size": 4, "gallery": 2, "swa_epochs": 1,
                  "class_weights": "none"},   # 2 epochs: unweighted, the teacher is sure enough to pseudo-label
        "pseudo": {"epochs": 1, "threshold": 0.4, "min_kept": 0.3}}  # a 2-seed teacher of 2 epochs is unsure


def deep_update(d: dict, u: dict) -> dict:
    for k, v in u.items():
        d[k] = deep_update(d.get(k, {}), v) if isinstance(v, dict) else v
    return d


def sh(cmd: list[str], cwd: Path, env: dict) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A copy of the repo's files (never .venv or outputs) as a fresh git repo, with tiny params."""
    ws = tmp_path_factory.mktemp("ws")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file() and f != "dvc.lock":
            (ws / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, ws / f)
    params = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_URI", "PIPELINE_SESSION", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        sh(cmd, ws, env)
    return ws, env


@pytest.mark.timeout(600)  # the whole DAG once; the suite's default limit is 300 s a test
def test_dvc_repro_end_to_end(workspace):
    ws, env = workspace
    first = sh(["dvc", "repro"], ws, env)
    members = [f"{k}-{s}" for k in (0, 1) for s in (0, 1)]   # the folds x seeds matrix
    for stage in ("demo_data", "masks", "near_dups", "eda", "split", *(f"train@{m}" for m in members), "cv", "pseudo",
                  *(f"train_round2@{m}" for m in members), "ensemble", "oof", "audit", "blend", "submit", "report"):
        assert f"Running stage '{stage}'" in first

    index = pd.read_csv(ws / "data/masks/index.csv")
    assert len(index) == 24 and all((ws / m).exists() for m in index["mask"])
    folds = pd.read_csv(ws / "data/split/folds.csv")
    assert set(folds[~folds.holdout].fold) == {0, 1, 2} and folds.holdout.sum() >= 1
    split = json.loads((ws / "metrics/split.json").read_text())["split"]
    assert split["duplicate_images"] == 0 and split["duplicates_apart"] == 0 and folds.duplicate_of.isna().all()
    near = json.loads((ws / "metrics/near_dups.json").read_text())["near_dups"]
    assert near["images"] == 28 and near["pairs"] == 0     # distinct demo scenes: no false near-duplicates
    assert (ws / "reports/near_dups/clusters.png").exists() and split["near_dups"]["joined"] is True
    eda = json.loads((ws / "metrics/eda.json").read_text())["eda"]
    assert eda["images"] == 24 and eda["classes"] == 11
    assert {"class_balance.png", "overlap_matrix.png", "area_hist.png", "issues.csv"} <= {
        p.name for p in (ws / "reports/eda").iterdir()}

    for k in (0, 1):
        for s in (0, 1):
            assert {"best.pt", "last.pt", "swa.pt", "val_confusion.npy", "val_confusion_swa.npy"} <= {
                p.name for p in (ws / f"models/fold_{k}/seed_{s}").iterdir()}
            fold = json.loads((ws / f"metrics/train/fold_{k}_seed_{s}.json").read_text())["val"]
            assert 0 <= fold["mIoU"] <= 1 and fold["best_epoch"] in (1, 2)
            assert (ws / f"models_round2/fold_{k}/seed_{s}/best.pt").exists()
    cv = json.loads((ws / "metrics/cv.json").read_text())["cv"]
    assert set(cv["per_fold_mIoU"]) == {"0", "1"} and set(cv["per_seed_mIoU"]) == {"0", "1"} and 0 < cv["mIoU"] <= 1
    ens = json.loads((ws / "metrics/ensemble.json").read_text())["ensemble"]
    # Two routes, one answer: single-model rows use the first seed, which cv scores on its own too.
    assert ens["out_of_fold/fold_model"]["mIoU"] == pytest.approx(cv["per_seed_mIoU"]["0"])
    assert {"holdout/k_fold_ensemble", "holdout/k_fold_ensemble_TTA", "out_of_fold/fold_model_TTA",
            "out_of_fold/fold_model_SWA", "out_of_fold/fold_model_SWA_TTA", "out_of_fold/round_2_fold_model_pseudo_labels",
            "holdout/round_2_k_fold_ensemble_pseudo_labels", "holdout/final_ensemble_infer_params_round_2",
            "out_of_fold/fold_model_seed_ensemble_2_seeds", "holdout/k_fold_x_seed_ensemble_2_seeds"} <= set(ens)
    # Out-of-fold probabilities of the trained folds' validation images; the label audit counts the labels
    # the demo corrupted on purpose; the blend of this experiment alone is its final ensemble, exactly.
    oof = pd.read_csv(ws / "data/oof/index.csv")
    assert sorted(oof.key) == sorted(folds.key[folds.fold.isin([0, 1]) & ~folds.holdout]) and set(oof.fold) == {0, 1}
    audit = json.loads((ws / "metrics/audit.json").read_text())["audit"]
    assert len(pd.read_csv(ws / "data/demo/label_noise.csv")) >= audit["noise"]["injected"]
    assert audit["noise"]["injected"] >= 1 and audit["suspects"] == len(pd.read_csv(ws / "reports/audit/suspects.csv"))
    blend = json.loads((ws / "reports/blend/blend.json").read_text())
    assert blend["blend_mIoU"] == ens["holdout/final_ensemble_infer_params_round_2"]["mIoU"]
    assert "label audit:" in first and "labels corrupted on purpose" in first
    pseudo = json.loads((ws / "metrics/pseudo.json").read_text())["pseudo"]
    assert pseudo["test_images"] == 4 and pseudo["fold_0"]["images"] >= 1     # something confident enough
    csv.field_size_limit(10**7)
    rows = list(csv.reader(open(ws / "submission/submission.csv")))
    test_ids = [im["file_name"] for im in json.loads((ws / "data/demo/test.json").read_text())["images"]]
    assert [r[0] for r in rows[1:]] == test_ids and all(len(r[1].split(" ")) == 256 * 256 for r in rows[1:])
    # The report: one offline page, and the headline printed at the end of the repro.
    page = (ws / "reports/index.html").read_text()
    assert f"<b>{cv['mIoU']:.4f}</b>CV mIoU" in page and page.count("data:image/png;base64,") >= 12
    assert not re.findall(r"(?:src|href)=[\"']?(?:https?:)?//", page) and "<script" not in page
    assert "fold_1 seed_1: the worst validation image of each class" in page and "lowest per-image mIoU" in page
    assert all((ws / f"models/fold_{m[0]}/seed_{m[2]}/val_images.csv").exists() for m in members)
    assert f"CV mIoU {cv['mIoU']:.4f}; best on the holdout: " in first and "report: file://" in first
    # `dvc plots show` renders the per-fold histories and the figures, in a page that loads nothing remote.
    assert "fold_0_seed_1.csv" in sh(["dvc", "plots", "show", "--json"], ws, env)
    for cmd in (["show"], ["diff", "HEAD"]):
        sh(["dvc", "plots", *cmd, "-o", str(ws / f"plots_{cmd[0]}")], ws, env)
        page = (ws / f"plots_{cmd[0]}/index.html").read_text()
        assert "/* vega-embed@6.18.2 */" in page and "vegaEmbed(" in page
        assert not re.findall(r"<(?:script|link|img|iframe)[^>]+(?:src|href)=[\"']?(?:https?:)?//", page)
        assert {"workspace_reports_eda_class_balance.png", "workspace_plots_cv_confusion.png"} <= {
            f.name for f in (ws / f"plots_{cmd[0]}/static").iterdir()}
    # The leaderboard reads the workspace's metrics through `dvc exp show`.
    out = subprocess.run([sys.executable, "-m", "stages.leaderboard", "--csv"], cwd=ws, env=env, capture_output=True,
                         text=True, timeout=120)
    board = {r["experiment"]: r for r in csv.DictReader(out.stdout.splitlines())}
    assert float(board["workspace"]["cv_mIoU"]) == pytest.approx(cv["mIoU"], abs=1e-4), out.stdout + out.stderr
    assert float(board["workspace"]["holdout_mIoU"]) == pytest.approx(
        ens["holdout/final_ensemble_infer_params_round_2"]["mIoU"], abs=1e-4) and float(board["workspace"]["train_min"]) > 0

    # A second repro is a no-op. A train stage DVC reruns (adding a seed or a fold changes the `train`
    # section every train stage reads) finds its finished run (same params, data, code) and reuses it:
    # nothing retrains and its outputs are byte-identical, so nothing downstream is stale.
    assert "Data and pipelines are up to date" in sh(["dvc", "repro"], ws, env)
    forced = sh(["dvc", "repro", "--force", "--single-item", "train@1-1"], ws, env)
    assert "fold 1 seed 1: already trained with these params, data and code; reusing it" in forced, forced
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], ws, env)

    # MLflow (default store: sqlite at the repo root): one parent per repro that ran stages.
    # A parent reads RUNNING until its dvc process ends; its logger then marks it FINISHED.
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    for _ in range(100):
        runs = mlflow.search_runs(experiment_names=["segmentation"], output_format="list")
        parents = sorted((r for r in runs if r.data.tags.get("pipeline.role") == "parent"), key=lambda r: r.info.start_time)
        if all(p.info.status == "FINISHED" for p in parents):
            break
        time.sleep(0.1)
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    # The final ensemble is registered as an MLflow model (tests/test_served.py loads one in a fresh process).
    versions = mlflow.tracking.MlflowClient().search_model_versions("name='segmentation-ensemble'")
    assert len(versions) == 1 and (ws / "submission/model/model/MLmodel").exists()
    kids = {p.info.run_id: sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id)
            for p in parents}
    assert kids[parents[0].info.run_id] == sorted(["cv", "demo_data", "eda", "ensemble", "masks", "near_dups", "pseudo", "report", "split", "submit",
                                                   "oof", "audit", "blend",
                                                   *(f"train@{m}" for m in members), *(f"train_round2@{m}" for m in members)])
    assert kids[parents[1].info.run_id] == ["train@1-1"]
    assert "ensemble/holdout/k_fold_ensemble/mIoU" in parents[0].data.metrics
    # CV lands on the parent run, so experiments compare side by side in the MLflow UI.
    assert 0 < parents[0].data.metrics["cv/mIoU"] <= 1
    client = mlflow.tracking.MlflowClient()
    for parent in parents:   # a reused run still shows the whole curve
        run = next(r for r in runs if r.info.run_name == "train@1-1" and r.data.tags["mlflow.parentRunId"] == parent.info.run_id)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mIoU")] == [1, 2]
    assert run.data.tags["pipeline.fold"] == "1" and run.data.tags["pipeline.seed"] == "1" and run.data.params["train.epochs"] == "2"
    reports = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/gallery.png", "reports/confusion.png", "reports/iou.png", "reports/curves.png"} <= reports
    assert parents[0].data.params["model"] == "unet" and parents[0].data.params["split.n_folds"] == "3"
    eda_run = next(r for r in runs if r.info.run_name == "eda")
    arts = {a.path for a in client.list_artifacts(eda_run.info.run_id, "eda")}
    assert "eda/overlap_matrix.png" in arts and "eda/class_balance.png" in arts
    assert eda_run.data.metrics["eda/images"] == 24

    # Ensembles across experiments: a named DVC experiment is blended from DVC's cache. `twin` is this
    # experiment saved as one, so the fitted blend keeps one of the two (a step adding the other cannot
    # improve), scores what the single one scores, and the submission is unchanged.
    submission = (ws / "submission/submission.csv").read_bytes()
    sh(["dvc", "exp", "save", "-n", "twin"], ws, env)
    out = sh(["dvc", "exp", "run", "-n", "pair", "-S", "blend.experiments=[twin]"], ws, env)
    assert "blend of 2 experiments (holdout)" in out and "(+0.0000)" in out, out
    pair = json.loads((ws / "reports/blend/blend.json").read_text())
    assert [e["name"] for e in pair["experiments"]] == ["this experiment", "twin"]
    assert sorted(e["weight"] for e in pair["experiments"]) == [0.0, 1.0]
    assert pair["blend_mIoU"] == pair["best_single_mIoU"] == blend["blend_mIoU"]
    table = pd.read_csv(ws / "reports/blend/variants.csv")
    assert list(table.variant) == ["this experiment alone", "twin alone", "equal-weight blend",
                                   "fitted blend (OOF hill-climbing)"] and table.holdout_mIoU.nunique() == 1
    assert (table.vs_best_single == 0).all()
    assert (ws / "data/blend/twin/models_round2/fold_0/seed_1/best.pt").exists()
    assert (ws / "submission/submission.csv").read_bytes() == submission


def test_bad_params_fail_before_work_with_a_clear_message(workspace):
    ws, env = workspace
    bad = ws / "bad"
    bad.mkdir()
    (bad / "params.yaml").write_text("masks:\n  overlap: biggest\n")
    out = subprocess.run([sys.executable, "-m", "stages.masks"], cwd=bad, env={**env, "PYTHONPATH": str(ws)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "masks.overlap: 'biggest' is not a valid choice" in out.stderr and "Traceback" not in out.stderr
