"""What every stage's `__main__` goes through: bad params or bad data end in one clear message
(exit code 2), never a traceback from deep inside a library."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from pipeline.config import ConfigError
from pipeline.data.coco import DataError


def run(main: Callable[[], object]) -> None:
    try:
        main()
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def fold_argument(description: str) -> int:
    """The `--fold K` flag of the per-fold stages (train@K, train_round2@K)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--fold", type=int, required=True)
    return ap.parse_args().fold
