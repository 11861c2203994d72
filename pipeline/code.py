"""The pipeline's own code as data: which modules a module imports, transitively.

dvc.yaml lists each stage's import closure as its code deps (tests/test_dvc_contract.py checks
it), and a training run's identity hashes the closure of the training code — so editing the
report's HTML or the leaderboard retrains nothing, while editing the loss does."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_file(name: str) -> Path | None:
    parts = name.split(".")
    for candidate in (REPO.joinpath(*parts).with_suffix(".py"), REPO.joinpath(*parts, "__init__.py")):
        if candidate.exists():
            return candidate
    return None


def import_closure(path: Path, seen: set[Path] | None = None) -> set[Path]:
    """Every pipeline/ module file that `path` imports, transitively (package __init__s aside)."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(Path(path).read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if not name.startswith("pipeline"):
                continue
            f = module_file(name)
            if f and f.name != "__init__.py" and f not in seen:
                seen.add(f)
                import_closure(f, seen)
    return seen
