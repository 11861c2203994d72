"""Devices: which one a stage runs on (`pick_device`), mixed precision (`autocast`), and a GPU pool for
parallel experiments, where each training process claims free GPUs through lock files:

    export PIPELINE_GPU_POOL=/tmp/gpu-pool     # any folder every queue worker can see
    dvc exp run --queue -S model=pspnet ; dvc exp run --queue -S model=unet ; ...
    dvc queue start -j 4                       # 4 experiments at once, one GPU each

With PIPELINE_GPU_POOL set and CUDA_VISIBLE_DEVICES not, a GPU stage takes an exclusive `flock` on
<pool>/gpu<i>.lock for each GPU it uses, waiting while all are taken, and sets CUDA_VISIBLE_DEVICES
to them before CUDA starts. The kernel drops the locks when the process ends — however it ends,
SIGKILL included — so a crashed experiment never strands a GPU. Without PIPELINE_GPU_POOL nothing
changes. An explicit CUDA_VISIBLE_DEVICES always wins; torchrun workers leave the claim to their launcher.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pipeline.config import ConfigError

if TYPE_CHECKING:
    import torch

_held: list = []  # open lock files: released when the process exits


def gpu_count() -> int:
    """GPUs on this machine, counted without initialising CUDA (CUDA_VISIBLE_DEVICES is read at init)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def claim(n: int, pool: str | Path, total: Optional[int] = None, poll_s: float = 2.0,
          timeout_s: Optional[float] = None) -> list[int]:
    """Lock `n` free GPUs of `total` (default: all on this machine) under `pool`; wait for them."""
    total = gpu_count() if total is None else total
    if total < n:
        raise RuntimeError(f"{n} GPU(s) wanted from the pool {pool}, but this machine has {total}")
    Path(pool).mkdir(parents=True, exist_ok=True)
    start, announced = time.monotonic(), False
    while True:
        got = []
        for i in range(total):
            f = open(Path(pool) / f"gpu{i}.lock", "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            got.append((i, f))
            if len(got) == n:
                _held.extend(f for _, f in got)
                for i, f in got:  # who holds it, for `cat <pool>/gpu*.lock`
                    f.truncate(0)
                    f.write(f"pid {os.getpid()} {os.getcwd()}\n")
                    f.flush()
                return [i for i, _ in got]
        for _, f in got:  # not enough: give back and wait, so two waiters cannot deadlock
            f.close()
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"no {n} free GPU(s) in {pool} after {timeout_s} s")
        if not announced:
            print(f"waiting for {n} free GPU(s) in {pool} ...", flush=True)
            announced = True
        time.sleep(poll_s)


def pin(n: int = 1) -> Optional[list[int]]:
    """Claim GPUs from $PIPELINE_GPU_POOL and make them this process's (and its children's) only ones."""
    pool = os.environ.get("PIPELINE_GPU_POOL")
    # torchrun workers: their launcher claimed for all of them (or the user chose the GPUs)
    if not pool or "CUDA_VISIBLE_DEVICES" in os.environ or "LOCAL_RANK" in os.environ or gpu_count() == 0:
        return None
    ids = claim(n, pool)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, ids))
    print(f"GPU pool {pool}: using GPU {os.environ['CUDA_VISIBLE_DEVICES']}", flush=True)
    return ids


def pick_device(name: str) -> "torch.device":
    """cpu / cuda / auto (cuda when there is one). With $PIPELINE_GPU_POOL set, claims a free GPU first."""
    import torch  # here, not at the top: a queue worker claims its GPU before anything imports torch

    if name != "cpu":
        pin(1)
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def autocast(device: "torch.device", amp: str):
    """bf16/fp16 autocast on CUDA; CPU always runs fp32 (CPU half precision is slow and lossy)."""
    import torch

    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
