"""The real thing: `dvc repro` in a temporary copy of the repo with a tiny params file, logging to a
real `mlflow server` as a team's machines do; then a second member clones it and blends."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from pipeline.evaluation.leaderboard import git_experiments, leaderboard
from tests.helpers import REPO, TINY, copy_as_repo, deep_update, mlflow_server, sh, source_files

# The folds x seeds matrix, one seed: each stage process costs seconds of imports, and the suite must
# stay under 10 minutes on 2 cores. What more seeds change (the seed-ensemble variants) is checked in
# tests/test_metrics.py; cv over several seeds too.
MEMBERS = [f"{k}-0" for k in (0, 1)]
DATA_HALF = ("demo_data", "masks", "near_dups", "eda", "split")










@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A copy of the repo's files as a fresh git repo, with tiny params; MLflow: the team's server."""
    ws = tmp_path_factory.mktemp("ws")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_URI", "PIPELINE_SESSION", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    copy_as_repo(REPO, ws, env, source_files(REPO), deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), TINY))
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield ws, {**env, "MLFLOW_TRACKING_URI": url}


@pytest.fixture(scope="module")
def repro(workspace):
    """One real `dvc repro` of the whole DAG, shared by every test below that reads its outputs."""
    ws, env = workspace
    return ws, env, sh(["dvc", "repro"], ws, env, timeout=900)


def read(ws: Path, metrics: str) -> dict:
    """Everything stage `metrics` measured (metrics/details/; DVC reads only the headline)."""
    return json.loads((ws / f"metrics/details/{metrics}.json").read_text())[metrics]


@pytest.mark.timeout(900)  # the whole DAG once (the fixture); the suite's default limit is 300 s a test
def test_every_stage_runs_and_the_data_half_is_complete(repro):
    ws, env, first = repro
    for stage in (*DATA_HALF, *(f"train@{m}" for m in MEMBERS), "cv", "pseudo",
                  *(f"train_round2@{m}" for m in MEMBERS), "ensemble", "oof", "audit", "blend", "submit", "report"):
        assert f"Running stage '{stage}'" in first
    index = pd.read_csv(ws / "data/masks/index.csv")
    assert len(index) == 24 and all((ws / m).exists() for m in index["mask"])
    folds = pd.read_csv(ws / "data/split/folds.csv")
    assert set(folds[~folds.holdout].fold) == {0, 1, 2} and folds.holdout.sum() >= 1
    split = read(ws, "split")
    assert split["duplicate_images"] == 0 and split["duplicates_apart"] == 0 and folds.duplicate_of.isna().all()
    near = read(ws, "near_dups")
    assert near["images"] == 28 and near["pairs"] == 0     # distinct demo scenes: no false near-duplicates
    assert (ws / "reports/near_dups/clusters.png").exists() and split["near_dups"]["joined"] is True
    eda = read(ws, "eda")
    assert eda["images"] == 24 and eda["classes"] == 11
    assert {"class_balance.png", "overlap_matrix.png", "area_hist.png", "issues.csv"} <= {
        p.name for p in (ws / "reports/eda").iterdir()}


def lock_outs(ws: Path, stages) -> dict:
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    return {(s, o["path"]): (o["md5"], o["size"]) for s in stages for o in lock[s]["outs"]}


@pytest.mark.timeout(300)
def test_the_data_half_is_byte_identical_with_other_thread_counts(repro, tmp_path):
    """demo data, masks, near-duplicates, EDA and split: the same bytes (DVC's md5 of each output)
    with another thread count and one worker process as with the suite's threads and all cores. Training is
    deterministic per machine only; the data half must not depend on the machine at all."""
    ws, env, _ = repro
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["runtime"]["data_workers"] = 1
    other = "1" if env.get("OMP_NUM_THREADS") != "1" else "2"
    env1 = {**{k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"},   # its own store, not the team's
            "OMP_NUM_THREADS": other, "OPENBLAS_NUM_THREADS": other, "MKL_NUM_THREADS": other}
    copy_as_repo(ws, tmp_path / "ws", env1, source_files(ws, untracked=False), params)
    sh(["dvc", "repro", *DATA_HALF], tmp_path / "ws", env1)
    assert lock_outs(tmp_path / "ws", DATA_HALF) == lock_outs(ws, DATA_HALF)


def test_each_member_trains_and_cv_and_the_variants_are_scored(repro):
    ws, _, _ = repro
    for k in (0, 1):
        for s in (0,):
            assert {"best.pt", "last.pt", "swa.pt", "val_confusion.npy", "val_confusion_swa.npy"} <= {
                p.name for p in (ws / f"models/fold_{k}/seed_{s}").iterdir()}
            fold = json.loads((ws / f"metrics/details/train/fold_{k}_seed_{s}.json").read_text())["val"]
            assert 0 <= fold["mIoU"] <= 1 and fold["best_epoch"] in (1, 2)
            assert (ws / f"models_round2/fold_{k}/seed_{s}/best.pt").exists()
    cv = read(ws, "cv")
    assert set(cv["per_fold_mIoU"]) == {"0", "1"} and set(cv["per_seed_mIoU"]) == {"0"} and 0 <= cv["mIoU"] <= 1
    ens = read(ws, "ensemble")["variants"]
    # Two routes, one answer: single-model rows use the first seed, which cv scores on its own too.
    assert ens["out_of_fold/fold"]["mIoU"] == pytest.approx(cv["per_seed_mIoU"]["0"])
    assert {"holdout/kfold", "holdout/kfold_tta", "out_of_fold/fold_tta",
            "out_of_fold/fold_swa", "out_of_fold/fold_swa_tta", "out_of_fold/fold_round2",
            "holdout/kfold_round2", "holdout/final", "holdout/chosen",
            } <= set(ens)
    # infer.choose auto (the default): the recipe chosen out of fold, its evidence, chosen vs fixed on the holdout
    choice = json.loads((ws / "reports/ensemble/choice.json").read_text())
    assert choice["mode"] == "auto" and [r["choice"] for r in choice["evidence"] if r["taken"]][:4] == [
        "round", "checkpoints", "tta", "scales"]
    assert set(choice["holdout"]) >= {"chosen", "fixed", "diff", "low", "high"}
    assert read(ws, "ensemble")["submitted"]["id"].startswith("chosen")


def test_pseudo_labels_keep_what_the_threshold_implies(repro):
    """A threshold below 1/n_classes keeps every pixel of every test image, for each fold's teacher."""
    ws, _, _ = repro
    pseudo = read(ws, "pseudo")
    assert pseudo["test_images"] == 4 and pseudo["left_out_in_labelled_pool"] == 0
    for k in (0, 1):
        assert pseudo[f"fold_{k}"] == {"images": 4, "pixel_kept_fraction": 1.0}
        index = pd.read_csv(ws / f"data/pseudo/fold_{k}/index.csv")
        assert (index.px_255 == 0).all() and (index.kept_fraction == 1.0).all()
        assert index[[c for c in index if c.startswith("px_") and c != "px_255"]].sum(axis=1).eq(index.height * index.width).all()


def test_oof_audit_and_blend_of_this_experiment_alone(repro):
    """Out-of-fold probabilities of the trained folds' validation images; the label audit counts the
    labels the demo corrupted on purpose; the blend of this experiment alone is its final ensemble."""
    ws, _, first = repro
    folds = pd.read_csv(ws / "data/split/folds.csv")
    oof = pd.read_csv(ws / "data/oof/index.csv")
    assert sorted(oof.key) == sorted(folds.key[folds.fold.isin([0, 1]) & ~folds.holdout]) and set(oof.fold) == {0, 1}
    audit = read(ws, "audit")
    assert len(pd.read_csv(ws / "data/demo/label_noise.csv")) >= audit["noise"]["injected"]
    assert audit["noise"]["injected"] >= 1 and audit["suspects"] == len(pd.read_csv(ws / "reports/audit/suspects.csv"))
    review = pd.read_csv(ws / "reports/audit/review.csv")   # the reviewer's worksheet: top_k suspects, actions empty
    assert len(review) == min(audit["suspects"], 25) and review.action.isna().all()
    coco = json.loads((ws / "reports/audit/review_coco.json").read_text())
    assert len(coco["annotations"]) == (review.kind == "unlabelled object").sum()
    blend = json.loads((ws / "reports/blend/blend.json").read_text())
    assert blend["blend_mIoU"] == read(ws, "ensemble")["variants"]["holdout/chosen"]["mIoU"]   # the chosen recipe
    assert "label audit:" in first and "labels corrupted on purpose" in first


def test_submission_and_the_offline_report(repro):
    ws, _, first = repro
    csv.field_size_limit(10**7)
    rows = list(csv.reader(open(ws / "submission/submission.csv")))
    test_ids = [im["file_name"] for im in json.loads((ws / "data/demo/test.json").read_text())["images"]]
    assert [r[0] for r in rows[1:]] == test_ids and all(len(r[1].split(" ")) == 256 * 256 for r in rows[1:])
    # The report: one offline page, and the headline printed at the end of the repro.
    cv = read(ws, "cv")
    page = (ws / "reports/index.html").read_text()
    ci = f"<span class='muted'>[{cv['metric']['ci95_low']:.4f}, {cv['metric']['ci95_high']:.4f}]</span>"
    assert f"<b>{cv['mIoU']:.4f}{ci}</b>CV mIoU" in page and page.count("data:image/png;base64,") >= 12
    assert not re.findall(r"(?:src|href)=[\"']?(?:https?:)?//", page) and "<script" not in page
    assert "fold_1 seed_0: the worst validation image of each class" in page and "lowest per-image mIoU" in page
    assert all((ws / f"models/fold_{m[0]}/seed_{m[2]}/val_images.csv").exists() for m in MEMBERS)
    sub = read(ws, "ensemble")["submitted"]
    assert f"CV mIoU {cv['mIoU']:.4f}; submitted ({sub['id']}): holdout mIoU {sub['mIoU']:.4f}" in first
    assert "report: file://" in first and f"<b>{sub['mIoU']:.4f}<span" in page and "best on holdout" not in page


def test_dvc_plots_and_the_leaderboard(repro):
    ws, env, _ = repro
    # `dvc plots show` renders the per-fold histories and the figures, in a page that loads nothing remote.
    assert "fold_1_seed_0.csv" in sh(["dvc", "plots", "show", "--json"], ws, env)
    for cmd in (["show"], ["diff", "HEAD"]):
        sh(["dvc", "plots", *cmd, "-o", str(ws / f"plots_{cmd[0]}")], ws, env)
        page = (ws / f"plots_{cmd[0]}/index.html").read_text()
        assert "/* vega-embed@6.18.2 */" in page and "vegaEmbed(" in page
        assert not re.findall(r"<(?:script|link|img|iframe)[^>]+(?:src|href)=[\"']?(?:https?:)?//", page)
        assert {"workspace_reports_eda_class_balance.png", "workspace_plots_cv_confusion.png"} <= {
            f.name for f in (ws / f"plots_{cmd[0]}/static").iterdir()}
    # The leaderboard reads the headline metrics git holds (as stages.leaderboard does).
    board = {r["experiment"]: {k: str(v) for k, v in r.items()} for r in leaderboard(git_experiments(cwd=str(ws)))}
    assert float(board["workspace"]["cv_mIoU"]) == pytest.approx(read(ws, "cv")["mIoU"], abs=1e-4), board
    sub = read(ws, "ensemble")["submitted"]   # one truth: the submitted variant, read by its id
    assert float(board["workspace"]["holdout_mIoU"]) == pytest.approx(sub["mIoU"], abs=1e-4)
    assert board["workspace"]["submitted"] == sub["id"] and float(board["workspace"]["train_min"]) > 0
    # What DVC reads as metrics is the headline: few numbers (the details stay in metrics/details/).
    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], ws, env))
    numbers = [v for files in shown.values() for f in files["data"].values()
               for v in pd.json_normalize(f["data"]).iloc[0].tolist() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert 20 <= len(numbers) <= 40, len(numbers)


def parents_of(url: str) -> tuple[list, list]:
    """(parent runs oldest first, all runs) on the tracking server, once every parent has finished
    (a parent reads RUNNING until its dvc process ends; its logger then marks it FINISHED)."""
    mlflow.set_tracking_uri(url)
    for _ in range(100):
        runs = mlflow.search_runs(experiment_names=["segmentation"], output_format="list")
        parents = sorted((r for r in runs if r.data.tags.get("pipeline.role") == "parent"), key=lambda r: r.info.start_time)
        if all(p.info.status == "FINISHED" for p in parents):
            break
        time.sleep(0.1)
    return parents, runs


@pytest.mark.timeout(300)
def test_a_rerun_reuses_finished_training_and_mlflow_records_each_repro(repro):
    """A second repro is a no-op. A train stage DVC reruns (adding a seed or a fold changes the `train`
    section every train stage reads) finds its finished run (same params, data, code) and reuses it:
    nothing retrains and its outputs are byte-identical, so nothing downstream is stale."""
    ws, env, _ = repro
    assert "Data and pipelines are up to date" in sh(["dvc", "repro"], ws, env)
    forced = sh(["dvc", "repro", "--force", "--single-item", "train@1-0"], ws, env)
    assert "fold 1 seed 0: already trained with these params, data and code; reusing it" in forced, forced
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], ws, env)

    # MLflow (the team's server): one parent per repro that ran stages, named after the recipe.
    parents, runs = parents_of(env["MLFLOW_TRACKING_URI"])
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    assert all(re.fullmatch(r"unet-mobilenet_v2 · \d\d-\d\d \d\d:\d\d", p.info.run_name) for p in parents)
    # The final ensemble is registered as an MLflow model (tests/test_served.py loads one in a fresh
    # process), tagged with its scores; the first version is the champion.
    client = mlflow.tracking.MlflowClient()
    [version] = client.search_model_versions("name='segmentation-ensemble'")
    assert version.tags["submitted"] == read(ws, "ensemble")["submitted"]["id"] and version.tags["cv.metric"] == "mIoU"
    assert float(version.tags["cv.score"]) == pytest.approx(read(ws, "cv")["metric"]["value"])
    assert str(client.get_model_version_by_alias("segmentation-ensemble", "champion").version) == str(version.version)
    assert (ws / "submission/model/model/MLmodel").exists()
    kids = {p.info.run_id: sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id)
            for p in parents}
    assert kids[parents[0].info.run_id] == sorted(f"unet-mobilenet_v2 · {s}" for s in [
        *DATA_HALF, "cv", "ensemble", "pseudo", "report", "submit", "oof", "audit", "blend",
        *(f"train@{m}" for m in MEMBERS), *(f"train_round2@{m}" for m in MEMBERS)])
    assert kids[parents[1].info.run_id] == ["unet-mobilenet_v2 · train@1-0"]
    # The parent carries the headline, each number under one name: CV with its interval, per-class CV
    # IoU, the submitted variant's holdout score with its interval, training minutes.
    head, sub = parents[0].data.metrics, read(ws, "ensemble")["submitted"]
    assert len(head) <= 25 and head["cv/mIoU"] == pytest.approx(read(ws, "cv")["mIoU"])
    assert {"cv/mIoU_ci95_low", "cv/mIoU_ci95_high", "cv/IoU/Battery", "holdout/mIoU_ci95_low", "train/minutes",
            "choice/holdout_vs_fixed", "choice/holdout_vs_fixed_low"} <= set(head)   # the chosen recipe minus the fixed
    assert head["holdout/mIoU"] == pytest.approx(sub["mIoU"]) and parents[0].data.tags["pipeline.submitted"] == sub["id"]
    for parent in parents:   # a reused run still shows the whole curve
        run = next(r for r in runs if r.info.run_name.endswith("train@1-0")
                   and r.data.tags["mlflow.parentRunId"] == parent.info.run_id)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mIoU")] == [1, 2]
    assert run.data.tags["pipeline.fold"] == "1" and run.data.tags["pipeline.seed"] == "0" and run.data.params["train.epochs"] == "2"
    reports = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/gallery.png", "reports/confusion.png", "reports/iou.png", "reports/curves.png"} <= reports
    assert parents[0].data.params["model"] == "unet" and parents[0].data.params["split.n_folds"] == "3"
    eda_run = next(r for r in runs if r.data.tags.get("pipeline.stage") == "eda")
    arts = {a.path for a in client.list_artifacts(eda_run.info.run_id, "eda")}
    assert "eda/overlap_matrix.png" in arts and "eda/class_balance.png" in arts
    assert not (ws / "mlruns").exists() and not (ws / "mlflow.db").exists()   # runs and artifacts live on the server
    assert eda_run.data.metrics["eda/images"] == 24
    # The runs table opens ready: the experiment carries the shared view `make ui` links to.
    exp = client.get_experiment_by_name("segmentation")
    view = json.loads(json.loads(exp.tags["mlflow.sharedViewState.pipeline-runs"])["state"])
    assert "metrics.`cv/mIoU`" in view["selectedColumns"] and view["orderByKey"] == "metrics.`cv/mIoU`"
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.timeout(600)
def test_a_team_shares_experiments_through_git_dvc_remotes_and_one_mlflow_server(repro, tmp_path):
    """Member A (the repro above) pushes the baseline and an experiment to the team's bare git repo and
    DVC remote; member B clones, pulls A's experiment, sees it in the leaderboard and on the MLflow
    server, and blends it with the baseline without retraining. `twin` is A's baseline saved as an
    experiment (no second DAG to train), so the fitted blend keeps one of the two, scores what that one
    scores, and the submission is unchanged."""
    a, env, _ = repro
    git, store, b = tmp_path / "team.git", tmp_path / "dvc-store", tmp_path / "member-b"
    sh(["git", "init", "-q", "--bare", str(git)], tmp_path, env)
    commit = ["git", "-c", "user.name=a", "-c", "user.email=a@t", "commit", "-qm"]
    for cmd in (["git", "remote", "add", "origin", str(git)], ["dvc", "remote", "add", "-d", "team", str(store)],
                ["git", "add", "-A"], [*commit, "baseline"], ["git", "push", "-q", "origin", "HEAD:main"],
                ["dvc", "push"], ["dvc", "exp", "save", "-n", "twin"], ["dvc", "exp", "push", "origin", "twin"]):
        sh(cmd, a, env)
    blend = json.loads((a / "reports/blend/blend.json").read_text())
    submission = (a / "submission/submission.csv").read_bytes()

    sh(["git", "clone", "-q", "--branch", "main", str(git), str(b)], tmp_path, env)
    for cmd in (["dvc", "pull"], ["dvc", "exp", "pull", "origin", "twin"]):
        sh(cmd, b, env)
    board = {r["experiment"]: r for r in leaderboard(git_experiments(cwd=str(b)))}   # as stages.leaderboard reads it
    assert "twin" in board and board["twin"]["cv_mIoU"] == pytest.approx(read(a, "cv")["mIoU"], abs=1e-4), board

    out = sh(["dvc", "exp", "run", "-n", "pair", "-S", "blend.experiments=[twin]"], b, env)
    assert "blend of 2 experiments (holdout)" in out and "(+0.0000)" in out, out
    assert "Running stage 'train" not in out and "Running stage 'blend'" in out   # only the blend and what reads it
    pair = json.loads((b / "reports/blend/blend.json").read_text())
    assert [e["name"] for e in pair["experiments"]] == ["this experiment", "twin"]
    assert sorted(e["weight"] for e in pair["experiments"]) == [0.0, 1.0]
    assert pair["blend_mIoU"] == pair["best_single_mIoU"] == blend["blend_mIoU"]
    table = pd.read_csv(b / "reports/blend/variants.csv")
    assert list(table.variant) == ["this experiment alone", "twin alone", "equal-weight blend",
                                   "fitted blend (OOF hill-climbing)"] and table.holdout_mIoU.nunique() == 1
    assert (table.vs_best_single == 0).all()
    # What was copied of the twin: its chosen recipe (choice.json) and that recipe's checkpoints (the same
    # data and code as this workspace: the same choice)
    twin = json.loads((b / "data/blend/twin/reports/ensemble/choice.json").read_text())["recipe"]
    assert twin == json.loads((b / "reports/ensemble/choice.json").read_text())["recipe"]
    folder = "models" if twin["round"] == 1 else "models_round2"
    assert all((b / f"data/blend/twin/{folder}/fold_1/seed_0/{c}.pt").exists() for c in twin["checkpoints"])
    assert (b / "submission/submission.csv").read_bytes() == submission
    # One truth for "submitted": B's headline, leaderboard row, report card and parent run agree.
    head = json.loads((b / "metrics/blend.json").read_text())["blend"]
    page = (b / "reports/index.html").read_text()
    assert f"<b>{head['mIoU']:.4f}</b>submitted (blend of 2 experiments)" in page and "twin" in page
    parents, _ = parents_of(env["MLFLOW_TRACKING_URI"])
    pair_run = next(p for p in parents if p.data.tags.get("dvc.exp_name") == "pair")
    assert pair_run.info.run_name.startswith("pair · ") and pair_run.data.metrics["holdout/mIoU"] == pytest.approx(head["mIoU"])
    assert pair_run.data.tags["pipeline.submitted"] == "blend_of_2_experiments"
    assert {p.data.tags["dvc.exp_name"] for p in parents} == {"null", "pair"}   # A's repros and B's experiment, one server
    # `dvc exp show` fits a screen: the params and headline metrics that differ between the experiments.
    columns = sh(["dvc", "exp", "show", "--csv", "--only-changed"], b, env).splitlines()[0].split(",")
    assert len(columns) <= 60, columns


def test_bad_params_fail_before_work_with_a_clear_message(workspace):
    ws, env = workspace
    bad = ws / "bad"
    bad.mkdir()
    (bad / "params.yaml").write_text("masks:\n  overlap: biggest\n")
    out = subprocess.run([sys.executable, "-m", "stages.masks"], cwd=bad, env={**env, "PYTHONPATH": str(ws)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "masks.overlap: 'biggest' is not a valid choice" in out.stderr and "Traceback" not in out.stderr
