"""What every stage's `__main__` goes through: bad params or bad data end in one clear message
(exit code 2), never a traceback from deep inside a library."""
from __future__ import annotations

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
