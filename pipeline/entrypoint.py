"""What every stage's `__main__` goes through: bad params or bad data end in one clear message
(exit code 2), never a traceback from deep inside a library."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from pipeline.config import ConfigError
from pipeline.data.coco import DataError
from pipeline.io import WriteFailed


_KEPT = ["every output is written whole or not at all, so nothing half-done is left; `dvc repro` runs the stage again"]


def kept(message: str) -> None:
    """Say what an interruption would keep (a stage updates it as it saves progress)."""
    _KEPT[0] = message


def run(main: Callable[[], object]) -> None:
    try:
        _run(main)
    except SystemExit as e:
        if e.code not in (0, None):
            params_note()
        raise
    except BaseException:
        params_note()
        raise


def params_note() -> None:
    """A failed `dvc exp run -S ...` in the workspace leaves its values in params.yaml, for the next
    experiment to inherit unnoticed: say so, and how to undo it."""
    root = os.environ.get("DVC_ROOT")
    if not os.environ.get("DVC_EXP_NAME") or not root or Path(root).resolve() != Path.cwd().resolve():
        return   # not an experiment, or one in a temporary workspace (--temp, --queue): the workspace is untouched
    try:
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "params.yaml"], cwd=root, timeout=10).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return
    if changed:
        print("note: this experiment's `-S` values stay in params.yaml after the failure (`git diff params.yaml`); "
              "`git checkout params.yaml` restores it before the next experiment", file=sys.stderr)


def _run(main: Callable[[], object]) -> None:
    try:
        main()
    except (ConfigError, DataError, FloatingPointError, WriteFailed) as e:  # FloatingPointError: NaN/inf loss, see loop.py
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:   # disk full, permissions, a vanished file: the cause and the path, in one line
        if e.errno is None:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {(e.strerror or str(e)).lower()}{where}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"interrupted: {_KEPT[0]}", file=sys.stderr)
        sys.exit(130)


def member_arguments(description: str) -> tuple[int, int]:
    """The `--fold K --seed S` flags of the per-model stages (train@K-S, train_round2@K-S)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--fold", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    args = ap.parse_args()
    return args.fold, args.seed
