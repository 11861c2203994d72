"""Blends across experiments: weights fitted out of fold (known answers), refusals of what cannot blend."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.config import Params
from pipeline.data.coco import DataError
from pipeline.evaluation.blend import Experiment, blend_members, check_compatible, hill_climb, load_experiment

CLASSES = ["Background", "can", "bottle"]


def probs(on_can, on_bottle, shape=(4, 4)):
    """(3, 4, 4) uint8: the top half is a can, the bottom half a bottle (truth below)."""
    p = np.zeros((3,) + shape, np.float32)
    p[:, :2] = np.array(on_can, np.float32)[:, None, None]
    p[:, 2:] = np.array(on_bottle, np.float32)[:, None, None]
    return (p * 255).round().astype(np.uint8)


TRUTH = np.array([[1] * 4] * 2 + [[2] * 4] * 2, np.uint8)


def test_hill_climbing_finds_the_complementary_pair_and_drops_noise():
    # A knows cans (calls bottles background), B knows bottles; C is confidently wrong everywhere.
    a = probs([0.1, 0.9, 0.0], [0.6, 0.0, 0.4])
    b = probs([0.6, 0.4, 0.0], [0.1, 0.0, 0.9])
    c = probs([0.0, 0.0, 1.0], [0.0, 1.0, 0.0])
    weights, steps = hill_climb([[a] * 3, [b] * 3, [c] * 3], [TRUTH] * 3, CLASSES, steps=10)
    assert weights == [0.5, 0.5, 0.0]
    assert [s["added"] for s in steps] == [0, 1] and steps[-1]["oof_mIoU"] == 1.0 and steps[0]["oof_mIoU"] < 1.0
    # one experiment alone: its own weight, however many steps
    assert hill_climb([[a]], [TRUTH], CLASSES, steps=5)[0] == [1.0]


def test_blend_members_weight_each_experiments_members_by_their_share(tmp_path):
    class Fixed(Experiment):
        def __init__(self, name, members):
            super().__init__(name, tmp_path, Params())
            self._m = members

        @property
        def members(self):
            return self._m

    one = Fixed("one", [(Path("a.pt"), 1.0), (Path("b.pt"), 3.0)])
    two = Fixed("two", [(Path("c.pt"), 1.0)])
    assert blend_members([one, two], [0.6, 0.4]) == [(Path("a.pt"), 0.15), (Path("b.pt"), pytest.approx(0.45)),
                                                     (Path("c.pt"), 0.4)]
    assert blend_members([one, two], [1.0, 0.0]) == [(Path("a.pt"), 0.25), (Path("b.pt"), 0.75)]


def workspace(root: Path, holdout_of: str = "z", tta=("identity", "hflip")) -> Path:
    """An experiment folder: params.yaml, split/folds.csv and oof/classes.json."""
    raw = Params().model_dump()
    raw["infer"]["tta"] = list(tta)
    (root / "data/split").mkdir(parents=True)
    (root / "data/oof").mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    pd.DataFrame({"key": ["x", "y", "z"], "fold": [0, 1, -1], "holdout": [k == holdout_of for k in "xyz"]}).to_csv(
        root / "data/split/folds.csv", index=False)
    (root / "data/oof/classes.json").write_text(json.dumps({"classes": CLASSES, "max_side": None}))
    return root


def test_only_experiments_with_one_split_classes_framing_and_tta_blend(tmp_path):
    base = load_experiment(str(workspace(tmp_path / "a")), tmp_path, tmp_path / "copies")
    check_compatible([base, load_experiment(str(workspace(tmp_path / "b")), tmp_path, tmp_path / "copies")])
    other = load_experiment(str(workspace(tmp_path / "c", holdout_of="y")), tmp_path, tmp_path / "copies")
    with pytest.raises(DataError, match=r"'.*c' differs from .*a' in its split \(folds.csv\)"):
        check_compatible([base, other])
    tta = load_experiment(str(workspace(tmp_path / "d", tta=["identity"])), tmp_path, tmp_path / "copies")
    with pytest.raises(DataError, match="infer TTA views and scales"):
        check_compatible([base, tta])
    renamed = workspace(tmp_path / "e")
    (renamed / "data/oof/classes.json").write_text(json.dumps({"classes": ["Background", "can", "jar"], "max_side": None}))
    with pytest.raises(DataError, match="classes and max_side"):
        check_compatible([base, load_experiment(str(renamed), tmp_path, tmp_path / "copies")])
    with pytest.raises(DataError, match="neither a folder with params.yaml nor a DVC experiment"):
        load_experiment("no-such-experiment", tmp_path, tmp_path / "copies")
