"""One offline page a team reads after `dvc repro`: reports/index.html, self-contained (figures inlined
as base64 PNG, no script, no remote anything), built from what the stages wrote:

  headline   CV mIoU with its interval, what is submitted and its holdout score (headline.submitted)
  data       EDA summary, class balance, overlapping labels, data issues, near-duplicates
  split      fold balance
  training   every model's curves (validation mIoU, training loss) by epoch
  scores     per-class CV IoU and accuracy, the out-of-fold confusion matrix
  ensembles  the variant table (each trick judged on images none of its members saw)
  blend      the blend across experiments (when blend.experiments names some)
  experiments every experiment of the repo: the leaderboard and the validation curves overlaid
  errors     the worst validation images (each class's worst image per model, and a table)
  test       the submission's gallery
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import pandas as pd

from pipeline.io import atomic_file
from pipeline.evaluation.headline import cv_score, read_headline, submitted
from pipeline.evaluation.leaderboard import dvc_images, experiment_curves, git_experiments, leaderboard
from pipeline.workspace import Member, Workspace

if TYPE_CHECKING:
    from pipeline.config import Paths

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1em 2em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
nav a { margin-right: 1em; } .muted { color: #666; font-size: 0.9em; }
.warn { background: #fff3cd; border-left: 4px solid #d39e00; padding: 0.4em 0.8em; }
.cards { display: flex; gap: 1em; flex-wrap: wrap; margin: 1em 0; }
.card { border: 1px solid #ddd; border-radius: 8px; padding: 0.8em 1.2em; min-width: 180px; }
.card b { display: block; font-size: 1.8em; } .card b span { font-size: 0.45em; font-weight: normal; margin-left: 0.4em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 1em; }
"""


def _png(path: Path) -> str:
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'


def _fig_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _table(df: pd.DataFrame, floats: str = "{:.4f}") -> str:
    return df.to_html(index=False, border=0, na_rep="—", float_format=lambda v: floats.format(v), escape=True)


def _kv(tree: dict) -> str:
    """A nested metrics dict as a two-column table (dotted keys; floats to 4 significant digits)."""
    flat = pd.json_normalize(tree).iloc[0] if tree else pd.Series(dtype=object)
    text = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in flat]
    return _table(pd.DataFrame({"": list(flat.index), "value": text}))


def _figure(path: Path, caption: str) -> str:
    return f"<figure>{_png(path)}<figcaption class='muted'>{html.escape(caption)}</figcaption></figure>" if path.exists() else ""


def _curves(histories: dict[str, pd.DataFrame]) -> str:
    """Validation mIoU and training loss by epoch, one line per model."""
    if not histories:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, h in histories.items():
        if "val/mIoU" in h:
            v = h.dropna(subset=["val/mIoU"])   # train.val_every > 1: validated epochs only
            a.plot(v["epoch"], v["val/mIoU"], marker=".", label=name)
        if "train/loss" in h:
            b.plot(h["epoch"], h["train/loss"], marker=".", label=name)
    a.set(title="validation mIoU", xlabel="epoch")
    b.set(title="training loss", xlabel="epoch", yscale="log")
    a.legend(fontsize=7)
    fig.tight_layout()
    return _fig_png(fig)


def headline(cv: dict, ensemble: dict, blend: Optional[dict] = None) -> dict[str, Any]:
    """The cards' numbers from stages cv, ensemble and blend's metrics: {'cv_mIoU', 'cv': headline.cv_score,
    'submitted': headline.submitted ({} before stage ensemble)}."""
    return {"cv_mIoU": cv.get("mIoU"), "cv": cv_score(cv), "submitted": submitted(ensemble, blend)}


STAGES = ("eda", "near_dups", "split", "cv", "ensemble", "audit")   # whose metrics JSON the page reads


def write_report(paths: "Paths", recipe: dict[str, Any], out: Optional[Path] = None) -> tuple[Path, dict]:
    """Build the page from the outputs under `paths` (the params' paths section); returns (path, headline)."""
    ws = Workspace(paths)
    m = {s: _json(ws.details_json(s)).get(s, {}) for s in STAGES}
    head = headline(m["cv"], m["ensemble"], read_headline(ws, "blend"))
    blend = _json(ws.blend.blend_json)
    if len(blend.get("experiments", [])) > 1:
        head["blend"] = (len(blend["experiments"]), blend["judged_on"], blend["blend_mIoU"], blend["gain_vs_best_single"])
    if m["audit"]:
        head["audit"] = (m["audit"]["suspects"], str(ws.audit.suspects_csv))
    sections = {"data": _data, "split": _split, "training": _training, "scores": _scores, "ensembles": _ensembles,
                "blend": _blend, "experiments": _experiments, "errors": _errors, "audit": _audit, "test": _test}
    parts = [_top(recipe, head, m["eda"], sections)] + [write(ws, m) for write in sections.values()]
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Segmentation report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    out = out or ws.report_html
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return out, head


def _top(recipe: dict[str, Any], head: dict, eda: dict, sections: dict) -> str:
    """Title, the recipe, links to the sections and the headline cards."""
    fmt = (lambda v: "—" if v is None else f"{v:.4f}")
    ci = (lambda c: f"<span class='muted'>[{c[0]:.4f}, {c[1]:.4f}]</span>" if c else "")
    cv, sub = head["cv"], head["submitted"]
    cards = [("CV mIoU (out-of-fold)", fmt(head["cv_mIoU"]) + (ci(cv["ci95"]) if cv["name"] == "mIoU" else ""))]
    if cv["name"] != "mIoU":
        cards.append((f"CV {cv['name']} (out-of-fold)", fmt(cv["value"]) + ci(cv["ci95"])))
    # What is submitted and its holdout score: judged, never picked, on the holdout (the variant table
    # below says whether another variant beats it by more than chance).
    cards.append((f"submitted ({sub.get('id', 'none').replace('_', ' ')}), holdout mIoU", fmt(sub.get("mIoU"))
                  + (ci(sub["ci95"]) if sub.get("ci95") and sub["metric_name"] == "mIoU" else "")))
    cards.append(("images (labelled)", str(eda.get("images", "—"))))
    return (f"<h1>Segmentation report</h1><p class='muted'>{html.escape(' · '.join(f'{k} {v}' for k, v in recipe.items()))}</p>"
            + "<nav>" + "".join(f"<a href='#{a}'>{a}</a>" for a in sections) + "</nav>"
            + "<div class='cards'>" + "".join(f"<div class='card'><b>{v}</b>{html.escape(k)}</div>" for k, v in cards)
            + "</div>")


def _data(ws: Workspace, m: dict) -> str:
    e = ws.eda
    parts = ["<h2 id='data'>Data</h2>" + (_kv(m["eda"]) if m["eda"] else ""),
             _figure(e.class_balance_png, "class balance") + "<div class='grid'>"
             + _figure(e.overlap_png, "pixels labelled twice, by class pair") + _figure(e.area_hist_png, "object sizes")
             + "</div>"]
    issues = pd.read_csv(e.issues_csv) if e.issues_csv.exists() else pd.DataFrame()
    if len(issues):
        kinds = issues.groupby([c for c in ("severity", "kind") if c in issues], dropna=False).size()
        parts.append("<h3>Data issues</h3>" + _table(kinds.reset_index(name="count")) +
                     f"<p class='muted'>first 20 of {len(issues)} (all in {html.escape(str(e.issues_csv))})</p>"
                     + _table(issues.head(20)))
    if m["near_dups"]:
        parts.append("<h3>Near-duplicates</h3>" + _kv(m["near_dups"])
                     + _figure(ws.near_dups.clusters_png, "near-duplicate clusters (kept in one fold)"))
    return "".join(parts)


def _split(ws: Workspace, m: dict) -> str:
    """Warnings first (uneven folds, a group bigger than a fold), then the split's figures."""
    split = dict(m["split"] or {})
    warnings = split.pop("warnings", [])
    groups = dict(split.get("groups") or {})
    oversized = groups.pop("oversized", [])
    if groups:
        split["groups"] = groups
    return ("<h2 id='split'>Split</h2>"
            + "".join(f"<p class='warn'>&#9888; {html.escape(w)}</p>" for w in warnings)
            + (_table(pd.DataFrame(oversized)) if oversized else "") + (_kv(split) if split else "")
            + _figure(ws.split_files.fold_balance_png, "class presence per validation fold"))


def _training(ws: Workspace, m: dict) -> str:
    """Every model's curves, and its best epoch's validation scores."""
    histories = {}
    for tag, prefix in (("train", ""), ("train_round2", "round 2 ")):
        histories.update({f"{prefix}{f.stem}": pd.read_csv(f) for f in sorted(ws.histories(tag).glob("*.csv"))})
    part = "<h2 id='training'>Training</h2>" + _curves(histories)
    member_metrics = [_json(f).get("val", {}) for f in sorted(ws.members_metrics("train").glob("*.json"))]
    if member_metrics:
        part += _table(pd.DataFrame([{k: r.get(k) for k in ("fold", "seed", "best_epoch", "val_images", "mIoU",
                                                              "pixel_acc", "train_s")} for r in member_metrics]))
    return part


def _scores(ws: Workspace, m: dict) -> str:
    """Per-class CV IoU, the leaderboard metric with its interval and shake-up, the OOF confusion."""
    cv, part = m["cv"], "<h2 id='scores'>Cross-validation scores</h2>"
    if not cv:
        return part
    per_class = pd.DataFrame({"class": list(cv.get("IoU", {})), "IoU": list(cv.get("IoU", {}).values())})
    if cv.get("metric"):
        mt = cv["metric"]
        part += (f"<p>CV {html.escape(mt['name'])} <b>{mt['value']:.4f}</b> (95 % interval over "
                 f"{mt['images']} images: [{mt['ci95_low']:.4f}, {mt['ci95_high']:.4f}]); on leaderboards of "
                 f"{mt['shakeup']['half']} images a half, public and private scores of one model differ by up to "
                 f"{mt['shakeup']['p95_abs']:.4f} 95 % of the time</p>")
    return (part + _table(per_class.sort_values("IoU")) + "<div class='grid'>"
            + _figure(ws.cv.iou_png, "per-class IoU, out-of-fold")
            + _figure(ws.cv.confusion_png, "out-of-fold confusion (rows: truth)") + "</div>")


def _ensembles(ws: Workspace, m: dict) -> str:
    """The variant table and the post-processing rules kept."""
    part, files = "<h2 id='ensembles'>Ensembles and tricks</h2>", ws.ensemble
    if not files.variants_csv.exists():
        return part
    v = pd.read_csv(files.variants_csv)
    cols = [c for c in ("variant", "judged_on", "images", "metric", "ci95_low", "ci95_high", "vs_submitted",
                        "vs_submitted_low", "vs_submitted_high", "mIoU", "pixel_acc", "images_per_s",
                        "extra_s_per_image") if c in v]
    part += ("<p class='muted'>each row judged only on images none of its members trained on; metric = the "
             "leaderboard's (params metric), with its 95 % bootstrap interval over images; vs_submitted: a holdout "
             "row's metric minus the submission's on the same images, with its paired 95 % interval</p>" +
             _table(v[cols].sort_values(["judged_on", "mIoU"], ascending=[True, False])))
    part += _choice(_json(files.choice_json))
    refine = _json(files.postprocess_json)
    kept = [r for r in refine.get("fitted", []) if r.get("rule") != "none"]
    if kept:
        part += ("<h3>Post-processing rules fitted out of fold</h3><p class='muted'>kept only where the "
                 "out-of-fold metric rose and no class lost more than 0.002 IoU; applied by submit and predict"
                 + (" (with the dense CRF)" if refine.get("crf") else "") + "</p>" + _table(pd.DataFrame(kept)))
    return part


def _choice(choice: dict) -> str:
    """What the final ensemble is and why: the recipe chosen out of fold with its evidence, and whether
    the choice helped on the holdout it never read."""
    if not choice:
        return ""
    if choice["mode"] != "auto":
        return f"<h3>Final ensemble</h3><p>infer.choose fixed: {choice['label']} (params decide)</p>"
    part = (f"<h3>Final ensemble, chosen out of fold</h3><p><b>{choice['label']}</b>, CRF "
            f"{'on' if choice['crf'] else 'off'}, post-processing rules {'on' if choice['rules'] else 'off'}. "
            "Each choice in order; an option replaces the current one only when its paired 95 % interval over the "
            "out-of-fold images lies above 0 (the simpler one wins ties). The holdout is read by none of it.</p>")
    h = choice.get("holdout")
    if h:
        verdict = ("helped" if h["low"] > 0 else "cost mIoU" if h["high"] < 0 else "made no difference beyond chance")
        part += (f"<p>On the holdout (never read by the choice): chosen {h['chosen']:.4f} vs the fixed params recipe "
                 f"{h['fixed']:.4f}, {h['diff']:+.4f} [{h['low']:+.4f}, {h['high']:+.4f}] paired: the choice "
                 f"<b>{verdict}</b>.</p>")
    rows = pd.DataFrame(choice["evidence"])
    cols = [c for c in ("choice", "option", "vs", "oof_metric", "diff", "low", "high", "taken") if c in rows]
    return part + _table(rows[cols])


def _blend(ws: Workspace, m: dict) -> str:
    part, blend = "<h2 id='blend'>Blend across experiments</h2>", _json(ws.blend.blend_json)
    if not blend:
        return part
    b = pd.read_csv(ws.blend.variants_csv)
    cols = [c for c in ("variant", "weights", "oof_mIoU", "holdout_mIoU", "holdout_pixel_acc", "vs_best_single") if c in b]
    return (part + f"<p class='muted'>weights fitted on out-of-fold predictions, judged on the {blend['judged_on']}: "
            f"blend {blend['blend_mIoU']:.4f} vs best single ({html.escape(blend['best_single'])}) "
            f"{blend['best_single_mIoU']:.4f}, {blend['gain_vs_best_single']:+.4f}"
            + ("" if len(blend["experiments"]) > 1 else " (no other experiments: set blend.experiments)")
            + "</p>" + _table(b[cols]))


def _experiments(ws: Workspace, m: dict) -> str:
    """Every experiment of the repo (the leaderboard, read from git as the report runs): CV with its
    interval, the paired difference from the best on the same out-of-fold images, the submitted
    holdout score, the params that differ; and their validation curves overlaid."""
    part = "<h2 id='experiments'>Experiments</h2>"
    rows = [r for r in leaderboard(git_experiments(), images=dvc_images())
            if r["cv_mIoU"] is not None or r["holdout_mIoU"] is not None]
    if not rows:
        return part
    part += ("<p class='muted'>every experiment of this repo as this report was built (live: "
             "<code>python -m stages.leaderboard</code>); vs_top: CV minus the top row's on the out-of-fold images "
             "both scored, with its paired 95 % interval (one holding 0: not told apart); holdout: what each "
             "submits, judged (never picked) there" + ("" if len(rows) > 1 else
             "; only this experiment so far: <code>dvc exp run -n NAME -S model=pspnet</code> adds one") + "</p>")
    part += _table(pd.DataFrame(rows).rename(columns={"holdout_mIoU": "submitted holdout mIoU"}))
    curves = {r["experiment"]: c for r in rows if (c := experiment_curves(r["experiment"], ws.histories("train"))) is not None}
    if len(curves) > 1:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.4))
        for name, c in curves.items():
            ax.plot(c["epoch"], c["val/mIoU"], marker=".", label=name)
        ax.set(title="validation mIoU (mean over an experiment's models)", xlabel="epoch")
        ax.legend(fontsize=7)
        fig.tight_layout()
        part += _fig_png(fig)
    return part


def _errors(ws: Workspace, m: dict) -> str:
    """The lowest per-image mIoU out of fold, and each model's gallery of worst images."""
    part = "<h2 id='errors'>Worst validation images</h2>"
    members = [Member(d) for d in sorted(ws.models(1).glob("fold_*/seed_*"))]
    worst = [pd.read_csv(b.val_images).assign(model=f"{b.dir.parent.name} {b.dir.name}")
             for b in members if b.val_images.exists()]
    if worst:
        table = pd.concat(worst).sort_values("mIoU").head(15)
        keep = ["model", "key", "mIoU"] + [c for c in table.columns if c.startswith("IoU/") and table[c].notna().any()]
        part += "<p class='muted'>lowest per-image mIoU, out-of-fold</p>" + _table(table[keep], "{:.2f}")
    return part + "".join(_figure(b.gallery_png, f"{b.dir.parent.name} {b.dir.name}: the worst validation image of "
                                                 "each class") for b in members)


def _audit(ws: Workspace, m: dict) -> str:
    part, a, audit = "<h2 id='audit'>Label audit</h2>", ws.audit, m["audit"]
    if not a.suspects_csv.exists():
        return part
    noise = audit.get("noise") or {}
    line = f"{audit.get('suspects', 0)} labels contradicted by confident out-of-fold predictions"
    if noise.get("injected"):
        line += (f"; of the {noise['injected']} labels corrupted on purpose (the demo's label_noise.csv), the top "
                 f"{noise['k']} find {noise['found']} (recall {noise['recall']:.2f})")
    fixed = m["eda"].get("corrections") or {}
    return (part + f"<p class='muted'>{html.escape(line)}; all in {html.escape(str(a.suspects_csv))}</p>"
            + _table(pd.read_csv(a.suspects_csv).head(15), "{:.2f}")
            + _figure(a.gallery_png, "most suspicious labels: image | label | out-of-fold prediction")
            + f"<p>To fix labels: fill the <code>action</code> column of {html.escape(str(a.review_csv))}, "
            f"edit {html.escape(str(a.review_coco_json))} in CVAT or FiftyOne, put both under "
            "<code>corrections/</code> and list them in <code>data.corrections</code> (corrections/README.md). "
            + ("Applied in this run: " + html.escape(", ".join(f"{n} {k}" for k, n in sorted(fixed.items())))
               if fixed else "No corrections applied in this run.") + "</p>")


def _test(ws: Workspace, m: dict) -> str:
    s = ws.submission
    return "<h2 id='test'>Test predictions</h2>" + _figure(s.gallery_png, f"{s.csv}: a sample")
