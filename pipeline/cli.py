"""What every stage's `__main__` goes through: bad params or bad data end in one clear message
(exit code 2), never a traceback from deep inside a library."""
from __future__ import annotations

import argparse
import sys
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
