"""Which pipeline execution a process belongs to: one `dvc repro` or one `dvc exp run` starts every
stage process as a descendant of one `dvc` process, so (host, dvc pid, dvc start time) names the
execution (`session_key`); `alive` tells whether it still runs (from /proc, Linux). A process with
no dvc ancestor is an execution of its own. PIPELINE_SESSION overrides the key."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path


def process(pid: int) -> tuple[int, list[str], str]:
    """(parent pid, argv, start time) of a process, from /proc (Linux)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return int(fields[1]), [a.decode(errors="replace") for a in argv if a], fields[19]


def _is_dvc(argv: list[str]) -> bool:
    names = [Path(a).name for a in argv[:3]]
    return any(n == "dvc" or n.startswith("dvc.") for n in names) or argv[1:3] == ["-m", "dvc"]


def session_key() -> str:
    """Identity of the current pipeline execution (see the module docstring)."""
    if os.environ.get("PIPELINE_SESSION"):
        return os.environ["PIPELINE_SESSION"]
    host = socket.gethostname()
    pid = os.getppid()
    try:
        for _ in range(12):
            if pid <= 1:
                break
            ppid, argv, start = process(pid)
            if _is_dvc(argv):
                return f"{host}:dvc:{pid}:{start}"
            pid = ppid
    except OSError:
        pass
    return f"{host}:standalone:{os.getpid()}:{time.time_ns()}"


def alive(key: str) -> bool:
    """Is the pipeline execution with this session key still running? (Unknown = yes.)"""
    host, kind, *rest = key.split(":") + ["", ""]
    if host != socket.gethostname() or kind not in ("dvc", "standalone"):
        return True
    try:
        start = process(int(rest[0]))[2]
        return kind == "standalone" or start == rest[1]
    except (OSError, ValueError, IndexError):
        return False
