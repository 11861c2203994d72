"""The label-fix round trip: the audit exports its suspects for a reviewer (review.csv, review_coco.json);
the reviewer's files are overlaid on the labels (data.corrections), never written into the dataset."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mask_utils

from pipeline.config import Params
from pipeline.data.coco import DataError
from pipeline.data.corrections import dataset_from_params
from pipeline.data.corrections import apply_corrections
from pipeline.data.eda import analyse
from pipeline.evaluation.audit import REVIEW_COLUMNS, find_suspects, review_coco, review_sheet


def audit_params(**kw):
    return Params().audit.model_copy(update={"min_confidence": 0.5, "min_area": 12, **kw})


def exported(case, tmp_path):
    ds, oof = case
    suspects, _ = find_suspects(oof, ds, 0.5, 12)
    sheet = review_sheet(suspects, ds, {ds.images.key[0]: 20}, k=25)
    coco = review_coco(suspects, oof, ds, audit_params())
    return ds, sheet, coco


def test_the_export_lists_each_suspect_with_a_suggestion_and_an_empty_action(case, tmp_path):
    _, sheet, coco = exported(case, tmp_path)
    assert list(sheet.columns) == REVIEW_COLUMNS
    assert sheet.suggested.tolist() == ["draw bottle (review_coco.json)", "relabel:can"]
    assert sheet.action.tolist() == ["", ""] and sheet.ann_id.tolist()[1] == 11
    assert json.loads(sheet.bbox[0]) == [0, 12, 6, 6]
    # The COCO export: the dataset's classes by name, the suspect image, the missing object's outline.
    assert [c["name"] for c in coco["categories"]] == ["can", "bottle"]
    assert [im["file_name"] for im in coco["images"]] == ["imgs/000.png"]
    (ann,) = coco["annotations"]
    assert ann["category_id"] == 2 and ann["attributes"]["suspect_rank"] == 1
    rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], 20, 20))
    drawn = mask_utils.decode(rle).astype(bool)
    region = np.zeros((20, 20), bool)
    region[12:18, 0:6] = True
    np.testing.assert_array_equal(drawn, region)              # rasterises back to the very pixels


def test_the_exports_are_valid_corrections_and_fix_what_the_reviewer_accepts(case, tmp_path):
    ds, sheet, coco = exported(case, tmp_path)
    folder = tmp_path / "corrections"
    folder.mkdir()
    sheet.loc[sheet.ann_id == 11, "action"] = "relabel:can"     # the reviewer agrees with row 2...
    sheet.to_csv(folder / "round1.csv", index=False)
    (folder / "round1.json").write_text(json.dumps(coco))      # ...and keeps the proposed bottle
    before = (tmp_path / "data/train.json").read_bytes()
    fixed = apply_corrections(ds, [folder / "round1.csv", folder / "round1.json"])
    assert (tmp_path / "data/train.json").read_bytes() == before            # the dataset is never edited
    assert ds.annotations.set_index("ann_id").class_idx[11] == 2            # nor the loaded one
    anns = fixed.annotations.set_index("ann_id")
    assert anns.class_idx[11] == 1 and len(fixed.annotations) == len(ds.annotations) + 1
    assert fixed.annotations.class_idx.iloc[-1] == 2                        # the added bottle
    notes = fixed.issues[fixed.issues.kind == "correction"]
    assert notes.action.tolist() == ["relabelled", "added"] and (notes.severity == "info").all()
    eda = analyse(fixed, overlap="smaller_on_top")                          # the EDA report records them
    assert eda.summary["corrections"] == {"relabelled": 1, "added": 1} and eda.summary["issues"]["notes"] == 2
    assert eda.tables["class_stats"].set_index("class").instances["bottle"] == 2   # 11 is a can now; 12 and the added one
    # Judged again on the same out-of-fold predictions, annotation 11 is no longer a suspect.
    suspects, _ = find_suspects(case[1], fixed, 0.5, 12)
    assert 11 not in suspects.ann_id.dropna().tolist()


def test_delete_and_ok(case, tmp_path):
    ds, _ = case
    f = tmp_path / "c.csv"
    pd.DataFrame({"key": [ds.images.key[0]] * 2, "ann_id": [12, 10], "action": ["delete", "ok"]}).to_csv(f, index=False)
    fixed = apply_corrections(ds, [f])
    assert sorted(fixed.annotations.ann_id) == [10, 11]


@pytest.mark.parametrize("rows, message", [
    ({"ann_id": [99], "action": ["delete"]}, r"c.csv: 1 correction\(s\) cannot be applied:\n  line 2: no annotation 99 on image"),
    ({"ann_id": [11], "action": ["relabel:cup"]}, r"line 2: relabel to unknown class 'cup'"),
    ({"ann_id": [11], "action": ["fix"]}, r"line 2: action 'fix' is not one of"),
    ({"ann_id": [None], "action": ["delete"]}, r"line 2: ann_id nan is not an annotation id \(added objects go in a json\)"),
])
def test_a_correction_that_cannot_apply_is_an_error_naming_file_and_line(case, tmp_path, rows, message):
    ds, _ = case
    f = tmp_path / "c.csv"
    pd.DataFrame({"key": [ds.images.key[0]], **rows}).to_csv(f, index=False)
    with pytest.raises(DataError, match=message):
        apply_corrections(ds, [f])


def test_an_added_object_on_an_unknown_image_or_class_is_an_error(case, tmp_path):
    ds, _ = case
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"images": [{"id": 1, "file_name": "nope.png"}], "categories": [{"id": 5, "name": "can"}],
                             "annotations": [{"id": 7, "image_id": 1, "category_id": 5, "segmentation": [[0, 0, 2, 0, 2, 2]]}]}))
    with pytest.raises(DataError, match=r"c.json: 1 added annotation\(s\) cannot be used:\n  annotation 7: image 'nope.png'"):
        apply_corrections(ds, [f])
    with pytest.raises(DataError, match="not found"):
        apply_corrections(ds, [tmp_path / "missing.csv"])


def test_params_accept_only_files_under_corrections_and_the_loader_applies_them(case, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="under corrections/"):
        Params.model_validate({**Params().model_dump(), "data": {"corrections": ["fixes.csv"]}})
    ds, _ = case
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corrections").mkdir()
    pd.DataFrame({"key": [ds.images.key[0]], "ann_id": [11], "action": ["delete"]}).to_csv(
        tmp_path / "corrections/r.csv", index=False)
    data = Params().data.model_copy(update={"root": str(tmp_path / "data"), "test_json": None,
                                            "corrections": ["corrections/r.csv"]})
    assert 11 not in dataset_from_params(data).annotations.ann_id.tolist()
    assert 11 in dataset_from_params(data.model_copy(update={"corrections": []})).annotations.ann_id.tolist()
    assert 11 in dataset_from_params(data, corrections=False).annotations.ann_id.tolist()   # the split's view


def test_the_simulated_reviewer_accepts_only_what_the_answer_key_confirms():
    from bench.label_fix import accept

    review = pd.DataFrame([
        {"kind": "looks like another class", "ann_id": 5, "action": ""},     # injected: relabel back
        {"kind": "looks like another class", "ann_id": 6, "action": ""},     # a model error: left alone
        {"kind": "unlabelled object", "ann_id": None, "action": ""}])
    coco = {"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "can"}, {"id": 2, "name": "bottle"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 4, 4]},    # inside deleted 8
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [40, 40, 4, 4]}]}   # nothing there
    noise = pd.DataFrame([
        {"ann_id": 5, "file_name": "a.png", "kind": "relabelled", "true_class": "bottle", "bbox": "[0, 0, 5, 5]"},
        {"ann_id": 8, "file_name": "a.png", "kind": "deleted", "true_class": "bottle", "bbox": "[8, 8, 8, 8]"},
        {"ann_id": 9, "file_name": "b.png", "kind": "deleted", "true_class": "can", "bbox": "[0, 0, 5, 5]"}])
    out, added, counts = accept(review, coco, noise)
    assert out.action.tolist() == ["relabel:bottle", "", ""]
    assert [(a["id"], a["category_id"]) for a in added["annotations"]] == [(1, 2)]   # the true class
    assert counts == {"injected": 3, "fixed": 2, "remaining": 1, "relabels": 1, "added": 1}
