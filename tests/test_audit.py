"""Label audit on hand-made out-of-fold probabilities: known suspects, known ranks, known recall."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline.evaluation.audit import find_suspects, noise_recall, plot_suspects

def test_suspects_are_found_ranked_and_scored(case, tmp_path):
    ds, oof = case
    suspects, images = find_suspects(oof, ds, min_confidence=0.5, min_area=12)
    assert suspects[["kind", "ann_id", "labelled", "predicted"]].values.tolist() == [
        ["unlabelled object", pd.NA, "Background", "bottle"],
        ["looks like another class", 11, "bottle", "can"]]
    assert suspects.score.tolist() == pytest.approx([0.9 - 0.05, 0.8 - 0.1], abs=2 / 255)
    assert suspects["rank"].tolist() == [1, 2] and json.loads(suspects.bbox[0]) == [0, 12, 6, 6]
    assert suspects.pixels.tolist() == [36, 64]
    # 64 of the 132 labelled pixels are contradicted; 36 of 400 predicted where nothing is labelled
    assert images.disagreement[0] == pytest.approx(64 / 132) and images.unlabelled_share[0] == pytest.approx(36 / 400)
    assert plot_suspects(suspects, oof, ds, tmp_path / "gallery.png", 5).stat().st_size > 0
    # Annotations of a class no model learnt (UNKNOWN with masks.unknown: background) are not judged.
    assert 11 not in set(find_suspects(oof, ds, 0.5, 12, untrained={2})[0].ann_id)
    # A region smaller than min_area, or less confident than min_confidence, is not a suspect.
    assert "unlabelled object" not in set(find_suspects(oof, ds, 0.5, 37)[0].kind)
    assert "unlabelled object" not in set(find_suspects(oof, ds, 0.95, 12)[0].kind)


def test_noise_recall_counts_what_the_top_k_find(case):
    ds, oof = case
    suspects, _ = find_suspects(oof, ds, 0.5, 12)
    file = ds.images.file_name[0]
    noise = pd.DataFrame([
        {"ann_id": 11, "file_name": file, "kind": "relabelled", "bbox": "[10, 0, 8, 8]"},     # found (rank 2)
        {"ann_id": 10, "file_name": file, "kind": "relabelled", "bbox": "[0, 0, 8, 8]"},      # not a suspect
        {"ann_id": 99, "file_name": file, "kind": "deleted", "bbox": "[0, 12, 6, 6]"},        # found (rank 1)
        {"ann_id": 98, "file_name": "elsewhere.png", "kind": "deleted", "bbox": "[0, 0, 4, 4]"}])  # no OOF
    key = ds.images.key[0]
    r = noise_recall(suspects, noise, ds, {key: 20}, k=2)
    assert (r["injected"], r["found"], r["recall"]) == (3, 2, pytest.approx(2 / 3))
    assert r["relabelled/recall"] == 0.5 and r["deleted/recall"] == 1.0
    assert noise_recall(suspects, noise, ds, {key: 20}, k=1)["found"] == 1   # only the deleted one in the top 1
    # boxes compare at full resolution: OOF probabilities at half the width still match
    assert noise_recall(suspects.assign(bbox=["[0, 6, 3, 3]", "[5, 0, 4, 4]"]), noise, ds, {key: 10}, 2)["found"] == 2
