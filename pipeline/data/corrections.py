"""Label fixes as an overlay: the user's json files are never edited; a reviewer's decisions live in
files under corrections/ (params data.corrections, hashed by DVC with that folder) and are applied to
the loaded dataset, so every stage that reads the labels (masks, EDA, split, audit) sees the fixed ones.

  a CSV   columns key, ann_id, action: relabel:<class name> | delete | ok (ok: reviewed, the label
          stands; other columns, such as the audit export's, are ignored). key is the image key (the
          file_name as the audit lists it), ann_id the annotation's id in the json.
  a json  COCO with `images` (file_name as in the dataset's json, or the image key, to find the image) and `annotations` (segmentation,
          category_id by this file's own `categories`, matched to the dataset's classes by name): objects
          the labels missed, e.g. drawn in CVAT on the audit's export.

Every applied fix is recorded in the dataset's issues (severity note, kind correction), which the EDA
report lists; a row naming an unknown image, annotation or class is an error naming the file and row.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.data.coco import Dataset, DataError, check_segmentation, load_dataset

ACTIONS = ("relabel:<class>", "delete", "ok")


def apply_corrections(ds: Dataset, files: list[str | Path]) -> Dataset:
    """`ds` with every correction file applied in order (a new Dataset; `ds` is unchanged)."""
    anns, notes = ds.annotations.copy(), []
    for f in map(Path, files):
        if not f.is_file():
            raise DataError(f"data.corrections: {f} not found")
        if f.suffix == ".csv":
            anns = _apply_csv(anns, ds, f, notes)
        else:
            anns = pd.concat([anns, _added(ds, f, notes)], ignore_index=True)
    issues = pd.concat([ds.issues, pd.DataFrame(notes, columns=ds.issues.columns)], ignore_index=True) if notes else ds.issues
    return replace(ds, annotations=anns.reset_index(drop=True), issues=issues)


def _note(f: Path, key: str, ann_id, detail: str, action: str) -> dict:
    return {"severity": "info", "kind": "correction", "file": str(f), "image_id": None, "ann_id": ann_id,
            "detail": f"{key}: {detail}", "action": action}


def _apply_csv(anns: pd.DataFrame, ds: Dataset, f: Path, notes: list[dict]) -> pd.DataFrame:
    rows = pd.read_csv(f, dtype={"key": str})
    missing = {"key", "ann_id", "action"} - set(rows.columns)
    if missing:
        raise DataError(f"{f}: needs columns key, ann_id, action (missing {sorted(missing)})")
    drop, problems = set(), []
    for n, r in enumerate(rows.itertuples(), start=2):   # line numbers as a spreadsheet shows them
        action = str(r.action).strip()
        if action in ("", "nan", "ok"):
            continue
        try:
            aid = int(r.ann_id)
        except (TypeError, ValueError):
            problems.append(f"line {n}: ann_id {r.ann_id!r} is not an annotation id (added objects go in a json)")
            continue
        hit = anns.index[(anns.key == r.key) & (anns.ann_id == aid)]
        if not len(hit):
            problems.append(f"line {n}: no annotation {aid} on image {r.key!r}")
            continue
        if action == "delete":
            drop.update(hit)
            notes.append(_note(f, r.key, aid, "deleted", "deleted"))
        elif action.startswith("relabel:"):
            name = action.split(":", 1)[1].strip()
            if name not in ds.classes[1:]:
                problems.append(f"line {n}: relabel to unknown class {name!r} (classes: {ds.classes[1:]})")
                continue
            old = ds.classes[int(anns.loc[hit[0], "class_idx"])]
            anns.loc[hit, "class_idx"] = ds.classes.index(name)
            notes.append(_note(f, r.key, aid, f"relabelled {old} -> {name}", "relabelled"))
        else:
            problems.append(f"line {n}: action {action!r} is not one of {', '.join(ACTIONS)}")
    if problems:
        raise DataError(f"{f}: {len(problems)} correction(s) cannot be applied:\n  " + "\n  ".join(problems[:20]))
    return anns.drop(index=sorted(drop))


def _added(ds: Dataset, f: Path, notes: list[dict]) -> pd.DataFrame:
    try:
        raw = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{f}: not a readable COCO json: {e}") from None
    names = {int(c["id"]): c["name"] for c in raw.get("categories", [])}
    images = {int(im["id"]): str(im["file_name"]) for im in raw.get("images", [])}
    sizes = ds.images.set_index("key")[["height", "width"]]
    once = ds.images.drop_duplicates("file_name", keep=False)
    key_of = {**dict(zip(once.file_name, once.key)), **{k: k for k in ds.images.key}}   # file_name as in your json, or key
    rows, problems = [], []
    for a in raw.get("annotations", []):
        name = names.get(int(a.get("category_id", -1)))
        file_name = images.get(int(a.get("image_id", -1)))
        key = key_of.get(file_name)
        if key is None:
            problems.append(f"annotation {a.get('id')}: image {file_name!r} is not in the dataset")
            continue
        if name not in ds.classes[1:]:
            problems.append(f"annotation {a.get('id')}: category {name!r} is not one of {ds.classes[1:]}")
            continue
        bad, _ = check_segmentation(a.get("segmentation"), int(sizes.height[key]), int(sizes.width[key]))
        if bad:
            problems.append(f"annotation {a.get('id')}: {bad}")
            continue
        rows.append({"ann_id": a.get("id"), "key": key, "class_idx": ds.classes.index(name),
                     "iscrowd": int(bool(a.get("iscrowd", 0))), "segmentation": a["segmentation"], "json_area": None})
        notes.append(_note(f, key, a.get("id"), f"added {name}", "added"))
    if problems:
        raise DataError(f"{f}: {len(problems)} added annotation(s) cannot be used:\n  " + "\n  ".join(problems[:20]))
    return pd.DataFrame(rows, columns=ds.annotations.columns)


def dataset_from_params(data: Any, check_files: bool = True, corrections: bool = True) -> Dataset:
    """Load the labelled pool named by the `data` params section, with data.corrections applied unless
    `corrections` is False (the split: label fixes never move an image between folds or into the
    holdout, so runs before and after a fix are judged on the same images and can be blended)."""
    files = [data.train_json] + ([data.val_json] if data.val_json else [])
    dirs = [data.images_of("train")] + ([data.images_of("val")] if data.val_json else [])
    ds = load_dataset(data.root, files, dirs, data.strict, check_files)
    if corrections and data.corrections:   # a reviewer's label fixes, overlaid (apply_corrections)
        ds = apply_corrections(ds, data.corrections)
    return ds
