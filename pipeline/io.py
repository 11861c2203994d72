"""Atomic writes: every stage output appears whole or not at all (temp name, then rename);
byte-identical file detection; progress lines for long loops."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

import pandas as pd

T = TypeVar("T")
INDEX = "index.csv"   # every table of files (mask cache, pseudo-labels, out-of-fold) is <folder>/index.csv


class WriteFailed(Exception):
    """An output could not be written (disk full, read-only or unwritable folder); the message is
    one line naming the file and the cause. Nothing partial is left behind."""


def pid_alive(pid: int) -> bool:
    """Is process `pid` running (on this host)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(folder: Path, prefix: str, suffix: str) -> None:
    """Temporary files or folders `<prefix><pid><suffix>` left by a process that was killed (SIGKILL
    runs no clean-up): the next writer of the same output removes them."""
    try:
        found = list(folder.glob(f"{prefix}*{suffix}"))
    except OSError:
        return
    for stale in found:
        pid = stale.name[len(prefix):len(stale.name) - len(suffix)]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def shown_path(path: str | Path) -> str:
    """`path` as a message shows it: relative to the working directory when inside it, else whole."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def _size(n: Optional[int]) -> str:
    return "" if not n else f" (needs ~{n / 1e6:.0f} MB)" if n >= 1e6 else f" (needs ~{n / 1e3:.0f} KB)"


# errors that say the output cannot be written (not a bug, not a missing input)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}


def _writing(e: OSError, *tmp: Path) -> bool:
    """Is `e` the output failing to be written? (numpy's short writes carry no errno.)"""
    return e.errno in WRITE_ERRNOS or e.errno is None or (e.filename is not None and str(e.filename) in map(str, tmp))


def write_failed(e: OSError, path: str | Path, needs: Optional[int] = None) -> WriteFailed:
    """`e` as one line: 'no space left on device writing models/fold_0/seed_0/last.pt (needs ~160 MB)'."""
    cause = (e.strerror or "").lower() or f"short write ({e})"
    free = ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, None):
        try:
            free = f"; {shutil.disk_usage(Path(path).parent).free / 1e6:.0f} MB free there"
        except OSError:
            pass
    return WriteFailed(f"{cause} writing {shown_path(path)}{_size(needs)}{free}")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it replaces `path` in one rename.
    A failed write (disk full, no permission) is a WriteFailed naming `path`; the folder is removed."""
    path = Path(path)
    prefix = f"{path.name}.tmp-"
    tmp = path.with_name(f"{prefix}{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path.parent, prefix, "")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise write_failed(e, path) from e
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _writing(e, tmp, path):
            raise
        raise write_failed(e, path) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | Path, needs: Optional[int] = None) -> Iterator[Path]:
    """Yield a temporary name beside `path` (same suffix, so writers pick the same format); on
    success it replaces `path` in one rename, on failure it is removed. A failed write (disk full,
    no permission) is a WriteFailed naming `path` (and `needs`, the bytes it takes, when known)."""
    path = Path(path)
    prefix = f".{path.stem}.tmp-"
    tmp = path.with_name(f"{prefix}{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path.parent, prefix, path.suffix)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if not _writing(e, tmp, path):
            raise
        raise write_failed(e, path, needs) from e
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes | memoryview) -> Path:
    """Write `data` to `path` atomically (see atomic_file)."""
    with atomic_file(path, needs=len(data)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_image(path: str | Path, image, *options: int) -> bytes:
    """cv2.imwrite that fails loudly: an image OpenCV cannot encode, or a file that cannot be
    written (disk full), is a WriteFailed naming the file — cv2.imwrite only returns False. Not
    atomic by itself: for files inside an atomic_dir, or one-off pictures. Returns the bytes written."""
    import cv2

    path = Path(path)
    ok, encoded = cv2.imencode(path.suffix, image, list(options))
    if not ok:
        raise WriteFailed(f"OpenCV could not encode {path} ({getattr(image, 'shape', '?')})")
    data = encoded.tobytes()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        path.unlink(missing_ok=True)
        raise write_failed(e, path, len(data)) from e
    return data


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (sorted keys, NaN refused so DVC and MLflow can always read it)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return Path(path)


def read_index(folder: str | Path, file_columns: Iterable[str], name: str = INDEX) -> pd.DataFrame:
    """<folder>/index.csv with the file paths of `file_columns` (stored relative to the folder) made whole."""
    folder = Path(folder)
    index = pd.read_csv(folder / name)
    for col in file_columns:
        index[col] = [str(folder / f) for f in index[col]]
    return index


def identical_files(paths: Iterable[str | Path]) -> list[list[int]]:
    """Sets (2 or more) of positions in `paths` whose files are byte-identical, each in position order.

    Only files sharing a size are read and hashed, so a folder of distinct photos costs one stat
    each. Missing files are ignored.
    """
    paths = list(paths)
    by_size: dict[int, list[int]] = {}
    for i, p in enumerate(paths):
        try:
            by_size.setdefault(os.stat(p).st_size, []).append(i)
        except OSError:
            continue
    sets: list[list[int]] = []
    for same_size in (v for v in by_size.values() if len(v) > 1):
        by_hash: dict[str, list[int]] = {}
        for i in same_size:
            h = hashlib.md5()
            with open(paths[i], "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            by_hash.setdefault(h.hexdigest(), []).append(i)
        sets += [v for v in by_hash.values() if len(v) > 1]
    return sorted(sets)


def ignore_sigint() -> None:
    """Initializer for worker processes: Ctrl-C goes to the stage, which stops them; each worker
    printing its own KeyboardInterrupt traceback would only bury the one line that matters."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_init(initializer: Optional[Callable[..., None]], *args) -> None:
    ignore_sigint()
    if initializer is not None:
        initializer(*args)


def parallel_map(fn: Callable[[Any], T], tasks: list, label: str, workers: int = 0, serial_below: int = 16,
                 init: Optional[tuple[Callable[..., None], tuple]] = None,
                 keep: Optional[Callable[[T], Any]] = None) -> list:
    """[fn(t) for t in tasks], in order, across `workers` processes (0 = all cores; in this process
    for fewer than `serial_below` tasks), with progress lines. init = (initializer, args):
    `initializer(*args)` runs once per process that runs tasks. keep: applied to each result as it
    arrives, and what it returns is kept instead (so a large result can be folded into a shared
    buffer before the next one comes). Workers ignore Ctrl-C; on Ctrl-C the tasks not started are
    cancelled instead of run to the end, so the stage stops at once."""
    initializer, initargs = init or (None, ())
    workers = workers or os.cpu_count() or 1
    keep = keep or (lambda r: r)
    if workers == 1 or len(tasks) < serial_below:
        if initializer is not None:
            initializer(*initargs)
        return [keep(r) for r in progress(map(fn, tasks), len(tasks), label)]
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, initializer=_worker_init, initargs=(initializer, *initargs))
    try:
        chunk = max(1, min(8, len(tasks) // (workers * 8)))
        return [keep(r) for r in progress(pool.map(fn, tasks, chunksize=chunk), len(tasks), label)]
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress(items: Iterable[T], total: int, label: str, every_s: float = 10.0,
             log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> Iterator[T]:
    """Yield `items`, logging a plain line (not a TTY bar: DVC and CI logs keep it) at most every
    `every_s` seconds and at the end: done/total, rate, elapsed and ETA."""
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s or (done == total and now - start >= every_s):
            rate = done / max(now - start, 1e-9)
            eta = f", ETA {_duration((total - done) / rate)}" if done < total else ""
            log(f"{label}: {done}/{total} ({100 * done / max(total, 1):.0f}%), {rate:.1f}/s, "
                f"elapsed {_duration(now - start)}{eta}")
            last = now
