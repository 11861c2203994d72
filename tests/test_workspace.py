"""The Workspace names every output file once: folder objects name their files, and no stage or
library module spells an output file name of its own."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from pipeline import workspace
from pipeline.config import Paths
from tests.helpers import REPO

pytestmark = pytest.mark.quick   # `make test-quick`: config, data, metrics, the model zoo in about a minute

FOLDERS = sorted((c for c in vars(workspace).values() if isinstance(c, type) and issubclass(c, workspace.Folder)
                  and c is not workspace.Folder), key=lambda c: c.__name__)
# Modules that own a per-image file format (cache entries named after their image) or a format's
# inner file: the only places besides workspace.py that may spell a file name.
FORMAT_OWNERS = {"pipeline/data/masks.py", "pipeline/evaluation/oof.py", "pipeline/inference/pseudo.py",
                 "pipeline/inference/submission.py", "pipeline/inference/served.py", "pipeline/io.py",
                 "pipeline/config.py", "pipeline/data/corrections.py", "pipeline/workspace.py",
                 "pipeline/mlflow_logger.py"}   # the outbox: records the logger alone writes and reads
FILE_NAME = re.compile(r"[\w./{}-]*\.(csv|png|json|npy|npz|html|pt)$")


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda c: c.__name__)
def test_a_folder_names_distinct_files_under_its_dir(folder, tmp_path):
    files = {k: v for k, v in vars(folder).items() if isinstance(v, workspace._File)}
    assert files, folder
    names = [f.name for f in files.values()]
    assert len(set(names)) == len(names), names
    on_tmp, on_final = folder(tmp_path / "tmp"), folder(tmp_path / "final")
    for attr in files:   # the writer's temp folder and the reader's final one: the same name
        a, b = getattr(on_tmp, attr), getattr(on_final, attr)
        assert a.relative_to(tmp_path / "tmp") == b.relative_to(tmp_path / "final") and a != b


def test_every_workspace_path_lies_under_its_params_folder():
    paths = Paths()
    ws = workspace.Workspace(paths, root="/exp")
    folders = {name: Path("/exp") / value for name, value in paths.model_dump().items()}
    got = [ws.eda.issues_csv, ws.near_dups.pairs_csv, ws.folds_csv, ws.split_files.fold_balance_png,
           ws.cv_image_confusions, ws.ensemble.variants_csv, ws.blend.blend_json, ws.audit.review_csv,
           ws.pseudo.report_csv, ws.submission.csv, ws.demo.label_noise_csv, ws.report_html,
           ws.metrics_json("cv"), ws.member(1, 2).gallery_png, ws.member(1, 2, round=2).checkpoint("best")]
    expected = ["eda", "near_dups", "split", "split", "metrics", "reports", "reports", "reports", "pseudo",
                "submission", "demo", "reports", "metrics", "models", "models_round2"]
    for path, folder in zip(got, expected):
        assert path.is_relative_to(folders[folder]), (path, folder)
    assert ws.member(1, 2).gallery_png == Path("/exp/models/fold_1/seed_2/reports/gallery.png")


def _spelled_file_names(path: Path) -> list[str]:
    """String constants (f-string parts too) that look like a file name."""
    return [n.value for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and "\n" not in n.value
            and " " not in n.value and FILE_NAME.fullmatch(n.value)]


@pytest.mark.parametrize("path", sorted([*(REPO / "stages").glob("*.py"), *(REPO / "pipeline").rglob("*.py")]),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_spells_an_output_file_name(path):
    if str(path.relative_to(REPO)) in FORMAT_OWNERS:
        return
    assert not _spelled_file_names(path), "name it in pipeline/workspace.py"


def test_the_check_finds_a_spelled_name(tmp_path):
    f = tmp_path / "stage.py"
    f.write_text('out = folder / "suspects.csv"\nmsg = f"see {x}/index.html"\nok = "a sentence about x.csv"\n')
    assert _spelled_file_names(f) == ["suspects.csv", "/index.html"]
