"""One offline page a team reads after `dvc repro`: reports/index.html, self-contained (figures inlined
as base64 PNG, no script, no remote anything), built from what the stages wrote:

  headline   CV mIoU, the best variant on the holdout and the final ensemble's, the submission
  data       EDA summary, class balance, overlapping labels, data issues, near-duplicates
  split      fold balance
  training   every model's curves (validation mIoU, training loss) by epoch
  scores     per-class CV IoU and accuracy, the out-of-fold confusion matrix
  ensembles  the variant table (each trick judged on images none of its members saw)
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
from pipeline.workspace import FINAL_VARIANT, Workspace

if TYPE_CHECKING:
    from pipeline.config import Paths

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1em 2em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
nav a { margin-right: 1em; } .muted { color: #666; font-size: 0.9em; }
.cards { display: flex; gap: 1em; flex-wrap: wrap; margin: 1em 0; }
.card { border: 1px solid #ddd; border-radius: 8px; padding: 0.8em 1.2em; min-width: 180px; }
.card b { display: block; font-size: 1.8em; }
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


def headline(cv: dict, ensemble: dict) -> dict[str, Any]:
    """{'cv_mIoU', 'best_holdout': (variant, mIoU) or None, 'final_holdout': mIoU or None}."""
    holdout = {k.split("/", 1)[1]: v["mIoU"] for k, v in ensemble.items() if k.startswith("holdout/") and "mIoU" in v}
    best = max(holdout, key=holdout.get) if holdout else None
    final = holdout.get(FINAL_VARIANT.split("/", 1)[1])
    return {"cv_mIoU": cv.get("mIoU"), "best_holdout": (best, holdout[best]) if best else None, "final_holdout": final}


def write_report(paths: "Paths", recipe: dict[str, Any], out: Optional[Path] = None) -> tuple[Path, dict]:
    """Build the page from the outputs under `paths` (the params' paths section); returns (path, headline)."""
    m, reports = Path(paths.metrics), Path(paths.reports)
    eda, near, split = _json(m / "eda.json").get("eda", {}), _json(m / "near_dups.json").get("near_dups", {}), \
        _json(m / "split.json").get("split", {})
    cv, ens = _json(m / "cv.json").get("cv", {}), _json(m / "ensemble.json").get("ensemble", {})
    head = headline(cv, ens)
    ws = Workspace(paths)
    blend, audit = _json(ws.blend_json), _json(m / "audit.json").get("audit", {})
    if len(blend.get("experiments", [])) > 1:
        head["blend"] = (len(blend["experiments"]), blend["judged_on"], blend["blend_mIoU"], blend["gain_vs_best_single"])
    if audit:
        head["audit"] = (audit["suspects"], str(reports / "audit/suspects.csv"))
    fmt = (lambda v: "—" if v is None else f"{v:.4f}")
    cards = [("CV mIoU (out-of-fold)", fmt(head["cv_mIoU"])),
             ("final ensemble, holdout", fmt(head["final_holdout"]))]
    if head["best_holdout"]:
        cards.append((f"best on holdout: {head['best_holdout'][0].replace('_', ' ')}", fmt(head["best_holdout"][1])))
    if "blend" in head:
        cards.append((f"blend of {head['blend'][0]} experiments, {head['blend'][1]}", fmt(head["blend"][2])))
    cards.append(("images (labelled)", str(eda.get("images", "—"))))

    parts = [f"<h1>Segmentation report</h1><p class='muted'>{html.escape(' · '.join(f'{k} {v}' for k, v in recipe.items()))}</p>",
             "<nav>" + "".join(f"<a href='#{a}'>{a}</a>" for a in ("data", "split", "training", "scores", "ensembles",
                                                                   "blend", "errors", "audit", "test")) + "</nav>",
             "<div class='cards'>" + "".join(f"<div class='card'><b>{v}</b>{html.escape(k)}</div>" for k, v in cards)
             + "</div>"]

    # data
    parts.append("<h2 id='data'>Data</h2>" + (_kv(eda) if eda else ""))
    e = Path(paths.eda)
    parts.append(_figure(e / "class_balance.png", "class balance") +
                 "<div class='grid'>" + _figure(e / "overlap_matrix.png", "pixels labelled twice, by class pair") +
                 _figure(e / "area_hist.png", "object sizes") + "</div>")
    if (e / "issues.csv").exists():
        issues = pd.read_csv(e / "issues.csv")
        if len(issues):
            kinds = issues.groupby([c for c in ("severity", "kind") if c in issues], dropna=False).size()
            parts.append("<h3>Data issues</h3>" + _table(kinds.reset_index(name="count")) +
                         f"<p class='muted'>first 20 of {len(issues)} (all in {html.escape(str(e / 'issues.csv'))})</p>"
                         + _table(issues.head(20)))
    if near:
        parts.append("<h3>Near-duplicates</h3>" + _kv(near) + _figure(Path(paths.near_dups) / "clusters.png", "near-duplicate clusters (kept in one fold)"))

    # split
    parts.append("<h2 id='split'>Split</h2>")
    if split:
        parts.append(_kv(split))
    parts.append(_figure(Path(paths.split) / "fold_balance.png", "class presence per validation fold"))

    # training
    histories = {p.stem: pd.read_csv(p) for p in sorted((Path(paths.plots) / "train").glob("*.csv"))}
    histories.update({f"round 2 {p.stem}": pd.read_csv(p) for p in sorted((Path(paths.plots) / "train_round2").glob("*.csv"))})
    parts.append("<h2 id='training'>Training</h2>" + _curves(histories))
    member_metrics = [json.loads(p.read_text()).get("val", {}) for p in sorted((m / "train").glob("*.json"))]
    if member_metrics:
        parts.append(_table(pd.DataFrame([{k: r.get(k) for k in ("fold", "seed", "best_epoch", "val_images", "mIoU",
                                                                  "pixel_acc", "train_s")} for r in member_metrics])))

    # scores
    parts.append("<h2 id='scores'>Cross-validation scores</h2>")
    if cv:
        per_class = pd.DataFrame({"class": list(cv.get("IoU", {})), "IoU": list(cv.get("IoU", {}).values())})
        if cv.get("metric"):   # the leaderboard's metric, its interval over images, the public/private shake-up
            mt = cv["metric"]
            parts.append(f"<p>CV {html.escape(mt['name'])} <b>{mt['value']:.4f}</b> (95 % interval over "
                         f"{mt['images']} images: [{mt['ci95_low']:.4f}, {mt['ci95_high']:.4f}]); on leaderboards of "
                         f"{mt['shakeup']['half']} images a half, public and private scores of one model differ by up to "
                         f"{mt['shakeup']['p95_abs']:.4f} 95 % of the time</p>")
        parts.append(_table(per_class.sort_values("IoU")) + "<div class='grid'>" +
                     _figure(Path(paths.plots) / "cv/iou.png", "per-class IoU, out-of-fold") +
                     _figure(Path(paths.plots) / "cv/confusion.png", "out-of-fold confusion (rows: truth)") + "</div>")

    # ensembles
    parts.append("<h2 id='ensembles'>Ensembles and tricks</h2>")
    variants = ws.variants_csv
    if variants.exists():
        v = pd.read_csv(variants)
        cols = [c for c in ("variant", "judged_on", "images", "metric", "ci95_low", "ci95_high", "mIoU", "pixel_acc",
                            "images_per_s", "extra_s_per_image") if c in v]
        parts.append("<p class='muted'>each row judged only on images none of its members trained on; metric = the "
                     "leaderboard's (params metric), with its 95 % bootstrap interval over images</p>" +
                     _table(v[cols].sort_values(["judged_on", "mIoU"], ascending=[True, False])))
        refine = _json(ws.postprocess_json)
        kept = [r for r in refine.get("fitted", []) if r.get("rule") != "none"]
        if kept:
            parts.append("<h3>Post-processing rules fitted out of fold</h3><p class='muted'>kept only where the "
                         "out-of-fold metric rose and no class lost more than 0.002 IoU; applied by submit and predict"
                         + (" (with the dense CRF)" if refine.get("crf") else "") + "</p>" + _table(pd.DataFrame(kept)))

    # blend across experiments
    parts.append("<h2 id='blend'>Blend across experiments</h2>")
    if blend:
        b = pd.read_csv(ws.blend_variants_csv)
        cols = [c for c in ("variant", "weights", "oof_mIoU", "holdout_mIoU", "holdout_pixel_acc", "vs_best_single") if c in b]
        parts.append(f"<p class='muted'>weights fitted on out-of-fold predictions, judged on the {blend['judged_on']}: "
                     f"blend {blend['blend_mIoU']:.4f} vs best single ({html.escape(blend['best_single'])}) "
                     f"{blend['best_single_mIoU']:.4f}, {blend['gain_vs_best_single']:+.4f}"
                     + ("" if len(blend["experiments"]) > 1 else " (no other experiments: set blend.experiments)")
                     + "</p>" + _table(b[cols]))

    # errors
    parts.append("<h2 id='errors'>Worst validation images</h2>")
    worst = []
    for csv in sorted(Path(paths.models).glob("fold_*/seed_*/val_images.csv")):
        t = pd.read_csv(csv)
        t.insert(0, "model", f"{csv.parent.parent.name} {csv.parent.name}")
        worst.append(t)
    if worst:
        table = pd.concat(worst).sort_values("mIoU").head(15)
        keep = ["model", "key", "mIoU"] + [c for c in table.columns if c.startswith("IoU/") and table[c].notna().any()]
        parts.append("<p class='muted'>lowest per-image mIoU, out-of-fold</p>" + _table(table[keep], "{:.2f}"))
    for g in sorted(Path(paths.models).glob("fold_*/seed_*/reports/gallery.png")):
        parts.append(_figure(g, f"{g.parent.parent.parent.name} {g.parent.parent.name}: the worst validation image of each class"))

    # label audit
    parts.append("<h2 id='audit'>Label audit</h2>")
    audit_dir = reports / "audit"
    if (audit_dir / "suspects.csv").exists():
        noise = audit.get("noise") or {}
        line = f"{audit.get('suspects', 0)} labels contradicted by confident out-of-fold predictions"
        if noise.get("injected"):
            line += (f"; of the {noise['injected']} labels corrupted on purpose (label_noise.csv), the top "
                     f"{noise['k']} find {noise['found']} (recall {noise['recall']:.2f})")
        parts.append(f"<p class='muted'>{html.escape(line)}; all in {html.escape(str(audit_dir / 'suspects.csv'))}</p>"
                     + _table(pd.read_csv(audit_dir / "suspects.csv").head(15), "{:.2f}")
                     + _figure(audit_dir / "gallery.png", "most suspicious labels: image | label | out-of-fold prediction"))
        fixed = eda.get("corrections") or {}
        parts.append(f"<p>To fix labels: fill the <code>action</code> column of {html.escape(str(audit_dir / 'review.csv'))}, "
                     f"edit {html.escape(str(audit_dir / 'review_coco.json'))} in CVAT or FiftyOne, put both under "
                     "<code>corrections/</code> and list them in <code>data.corrections</code> (corrections/README.md). "
                     + ("Applied in this run: " + html.escape(", ".join(f"{n} {k}" for k, n in sorted(fixed.items())))
                        if fixed else "No corrections applied in this run.") + "</p>")

    # test
    parts.append("<h2 id='test'>Test predictions</h2>" +
                 _figure(Path(paths.submission) / "gallery.png", f"{paths.submission}/submission.csv: a sample"))

    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Segmentation report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    out = out or reports / "index.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return out, head
