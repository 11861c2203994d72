"""The final ensemble's recipe as the stages that use it see it: with `infer.choose: auto` the ensemble
stage chooses round, checkpoints, TTA views and scales out of fold and writes them to
reports/ensemble/choice.json (the CRF and the post-processing rules it chose go to postprocess.json,
which every user of the final ensemble already applies); `final_params` gives those stages their params
with `infer` set to that choice. With `infer.choose: fixed`, or before the ensemble stage has run,
params decide."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from pipeline.workspace import Workspace

if TYPE_CHECKING:
    from pipeline.config import Infer, ParamsView

RECIPE = ("round", "checkpoints", "tta", "scales")   # what choice.json's recipe sets in `infer`


def chosen_infer(infer: "Infer", ws: Workspace) -> "Infer":
    """`infer` with the chosen recipe (infer.choose auto and choice.json written), else itself."""
    f = ws.ensemble.choice_json
    if infer.choose != "auto" or not f.exists():
        return infer
    recipe = json.loads(f.read_text())["recipe"]
    return infer.model_copy(update={k: recipe[k] for k in RECIPE})


def final_params(p: "ParamsView") -> "ParamsView":
    """Params with `infer` as the final ensemble uses it (see chosen_infer); `p` must declare infer and paths."""
    return p.replacing(infer=chosen_infer(p.infer, Workspace(p.paths)))
