"""Several processes, one model: DistributedDataParallel under torchrun.

`runtime.devices: N` (N > 1) makes the train stages relaunch themselves under torchrun with N
processes (or start them under torchrun yourself: the usual RANK/WORLD_SIZE/LOCAL_RANK environment
is honoured). gloo on CPU, NCCL on CUDA (one GPU per process, BatchNorm synchronised).

Each rank takes its share of every global batch: a DistributedSampler over one seeded permutation,
so the global batches are exactly the single-process ones (train.batch_size stays the global batch).
Gradients are averaged by DDP; validation is sharded without padding and its confusion matrix and
losses are summed across ranks, so the metrics are those of a single-process run. Only rank 0
writes checkpoints, metrics files and MLflow runs.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as td

from pipeline.devices import pin


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all ranks (in place; returned for chaining)."""
        if self.on:
            td.all_reduce(t, op=td.ReduceOp.SUM)
        return t

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average per-rank means (every rank holds the same number of samples)."""
        if not self.on or not values:
            return values
        t = self.sum(torch.tensor(list(values.values()), dtype=torch.float64)) / self.world
        return dict(zip(values, t.tolist()))

    def barrier(self) -> None:
        if self.on:
            td.barrier()


def from_env() -> Dist:
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def relaunch(devices: int, module: str, device: str = "auto") -> None:
    """With devices > 1 and not yet under torchrun: run `python -m module <same args>` under torchrun
    with `devices` processes on this machine, and exit with its status. With $PIPELINE_GPU_POOL set,
    the GPUs are claimed here, for all the processes (see pipeline/devices.py)."""
    if devices <= 1 or "LOCAL_RANK" in os.environ:
        return
    if device != "cpu":
        pin(devices)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
           "-m", module, *sys.argv[1:]]
    print("running under torchrun:", " ".join(cmd[1:]), flush=True)
    sys.exit(subprocess.call(cmd))


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group if this is a torchrun worker; return it and this rank's device."""
    d = from_env()
    if not d.on:
        return d, device
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not td.is_initialized():
        # CUDA tensors over NCCL; the CPU ones (confusion matrices, loss sums) over gloo
        td.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return d, device


def teardown() -> None:
    if td.is_initialized():
        td.destroy_process_group()


def wrap(model: torch.nn.Module, d: Dist, device: torch.device) -> torch.nn.Module:
    """The module that trains: DDP around `model` when distributed (BN synchronised on CUDA)."""
    if not d.on:
        return model
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # build_model drops what a model never uses; a parameter that still gets no gradient (a branch a
    # model skips) is found each step instead of stalling the reduction. (static_graph would be
    # cheaper but fails with no_sync, which gradient accumulation uses.)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                     find_unused_parameters=True)
