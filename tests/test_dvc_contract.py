"""dvc.yaml declares, for each stage, exactly the params sections and the code it reads."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import yaml

from pipeline.code import import_closure, module_file
from tests.helpers import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(DVC))
def test_stage_declares_exactly_its_params_and_code(name):
    stage = DVC[name].get("do", DVC[name])  # a foreach stage keeps its body under `do` (matrix stages do not)
    assert stage["cmd"].split(" --")[0] == f"python -m stages.{name}"
    module = importlib.import_module(f"stages.{name}")
    assert set(stage["params"]) == set(module.PARAMS)
    assert "runtime" not in stage["params"]   # how it runs here never reruns a stage
    code = {d for d in stage["deps"] if d.endswith(".py")}
    expected = {str(p.relative_to(REPO)) for p in import_closure(REPO / "stages" / f"{name}.py")}
    assert code == expected | {f"stages/{name}.py"}
    # Stages that read the dataset depend on its folder; every output path comes from `paths`.
    assert ("${data.root}" in stage["deps"]) == ("data" in module.PARAMS)
    # Stages that overlay data.corrections on the labels depend on that folder (the split and the
    # near-duplicates read the labels as given: fixing a label never moves an image between folds).
    src = (REPO / "stages" / f"{name}.py").read_text()
    applies = "dataset_from_params(" in src and "corrections=False" not in src
    assert ("corrections" in stage["deps"]) == applies
    outs = [next(iter(o)) if isinstance(o, dict) else o
            for o in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", [])]
    assert outs and all(str(o).startswith("${paths.") for o in outs)


ON_DEMAND = {"predict", "leaderboard", "ui"}  # commands, not DAG stages


def test_every_stage_module_is_in_the_dag():
    modules = {p.stem for p in (REPO / "stages").glob("*.py") if p.stem != "__init__"}
    assert modules - ON_DEMAND == set(DVC)


# The library's floors, lowest first: a module imports only from its own floor or below, so a
# shared leaf (confusion matrix, model-folder layout, autocast) lives below every user.
LAYERS = [{"io", "code", "config", "devices", "labels", "mlflow_store", "session", "tracking", "mlflow_logger", "presets", "workspace"}, {"data", "entrypoint"}, {"models"}, {"inference"}, {"evaluation"},
          {"training", "delivery"}]


def _floor(path: Path) -> int:
    part = path.relative_to(REPO / "pipeline").parts[0].removesuffix(".py")
    return next(i for i, names in enumerate(LAYERS) if part in names)


@pytest.mark.parametrize("path", sorted((REPO / "pipeline").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_never_go_up_a_floor(path):
    if path.name == "__init__.py":
        return
    up = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            files = {f for f in map(module_file, names) if f and f.name != "__init__.py"}
            up += [str(f.relative_to(REPO)) for f in files if _floor(f) > _floor(path)]
    assert not up, f"{path.relative_to(REPO)} imports from a higher floor: {up}"


def test_dvc_plots_page_is_self_contained():
    """.dvc/config points DVC at the vendored page: vega inline, DVC's placeholders there, no CDN."""
    import configparser
    import re

    config = configparser.ConfigParser()
    config.read(REPO / ".dvc/config")
    page_path = (REPO / ".dvc" / config["plots"]["html_template"]).resolve()
    assert page_path == REPO / "vendor/dvc_plots.html"
    page = page_path.read_text()
    assert "{plot_divs}" in page and "{scripts}" not in page    # DVC's CDN scripts have nowhere to go
    for name in ("vega@5", "vega-lite@5", "vega-embed@6"):
        assert f"/* {name}" in page
    assert not re.findall(r"<(?:script|link)[^>]+(?:src|href)=", page)
