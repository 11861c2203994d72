"""The label-fix round trip on the demo, with a reviewer simulated from the answer key.

The demo corrupts labels on purpose (demo.label_noise; <demo>/label_noise.csv lists each one with its
true class). A reviewer reads the audit's export (reports/audit/review.csv, review_coco.json) and
accepts a suspect only when it is a real error: here, when the answer key says so. Accepted, a
relabelled annotation gets `relabel:<true class>`; a deleted object found as an "unlabelled object"
keeps the audit's proposed outline, with its true class. Everything else stays empty (not reviewed).

    python -m bench.label_fix --out corrections/demo_round1      # writes .csv and .json
    dvc exp run -S 'data.corrections=[corrections/demo_round1.csv,corrections/demo_round1.json]'

It prints how many of the injected errors the accepted fixes cover and how many remain.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def accept(review: pd.DataFrame, coco: dict, noise: pd.DataFrame) -> tuple[pd.DataFrame, dict, dict]:
    """(review with the reviewer's actions, the COCO json of accepted added objects, counts)."""
    review = review.copy()
    review["action"] = ""
    truth = noise.set_index("ann_id")
    fixed = set()
    for i, r in review.iterrows():
        if r.kind != "unlabelled object" and pd.notna(r.ann_id) and int(r.ann_id) in truth.index:
            n = truth.loc[int(r.ann_id)]
            if n.kind == "relabelled":
                review.at[i, "action"] = f"relabel:{n.true_class}"
                fixed.add(int(r.ann_id))
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    names = {c["name"]: c["id"] for c in coco["categories"]}
    deleted = noise[noise.kind == "deleted"]
    kept = []
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        cx, cy = x + w / 2, y + h / 2
        for n in deleted[deleted.file_name == files[a["image_id"]]].itertuples():
            bx, by, bw, bh = json.loads(n.bbox)
            if n.ann_id not in fixed and bx <= cx <= bx + bw and by <= cy <= by + bh:
                kept.append({**a, "category_id": names[n.true_class]})
                fixed.add(n.ann_id)
                break
    added = {**coco, "annotations": kept}
    counts = {"injected": len(noise), "fixed": len(fixed), "remaining": len(noise) - len(fixed),
              "relabels": int((review.action != "").sum()), "added": len(kept)}
    return review, added, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--audit", default="reports/audit")
    ap.add_argument("--noise", default="data/demo/label_noise.csv")
    ap.add_argument("--out", default="corrections/demo_round1", help="writes <out>.csv and <out>.json")
    a = ap.parse_args()
    review = pd.read_csv(Path(a.audit) / "review.csv", dtype={"key": str}, keep_default_na=False,
                         converters={"ann_id": lambda v: int(v) if v else None})
    coco = json.loads((Path(a.audit) / "review_coco.json").read_text())
    review, added, counts = accept(review, coco, pd.read_csv(a.noise))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    review["ann_id"] = review["ann_id"].astype("Int64")
    review.to_csv(f"{a.out}.csv", index=False)
    Path(f"{a.out}.json").write_text(json.dumps(added, indent=1))
    print(f"reviewed {len(review)} suspects: {counts['relabels']} relabelled, {counts['added']} missing objects "
          f"added; {counts['fixed']} of {counts['injected']} injected errors fixed, {counts['remaining']} remain "
          f"({counts['remaining'] / counts['injected']:.0%})")


if __name__ == "__main__":
    main()
