"""Training, loader and inference throughput, images/s: the fast path vs a plain fp32 loop, in one run.

  loader:      the training DataLoader alone over a mask cache (demo scenes generated at --size),
               default augmentations, --workers processes.
  plain loop:  the real training run (pipeline.training.trainer.Trainer on fold 0 of the scenes: its
               loaders, train_epoch and train_step) with train.amp off and channels_last off: fp32, NCHW.
  fast loop:   the same run as the train stage runs it on a GPU: bf16 autocast, channels_last, pinned
               memory, persistent workers, non-blocking copies (+ torch.compile with --compile).
  Each loop is timed end to end (loader included) and model-only (batches already on the device):
  when the two agree, data loading is not the bottleneck.
  inference:   one view vs TTA (8 d4 views, batched), bf16 on a GPU.
Issue 5 targets on a GPU: fast >= 2.5x plain (end to end), loader never the bottleneck.

    python -m bench.train_speed [--model unet --encoder resnet34 --size 512 --batch 16 --workers 8 --compile]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.config import Masks, Params, Split
from pipeline.data.augment import build_transform
from pipeline.data.coco import load_dataset
from pipeline.data.dataset import SegDataset, worker_init
from pipeline.data.demo import make_demo
from pipeline.data.folds import make_folds
from pipeline.data.masks import build_mask_cache
from pipeline.inference.ensemble import Ensemble
from pipeline.models.factory import build_model
from pipeline.training.fold import load_fold
from pipeline.training.run import PARAMS
from pipeline.training.trainer import Trainer

AUGMENT = ["hflip", "vflip", "scale_rotate", "color"]


def loader_rate(table, size: int, batch: int, workers: int, batches: int) -> float:
    ds = SegDataset(table, build_transform(AUGMENT, size))
    dl = DataLoader(ds, batch, shuffle=True, num_workers=workers, worker_init_fn=worker_init,
                    persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), drop_last=True)
    it, n = iter(dl), 0
    next(it)  # start-up (worker spawn) is not throughput
    start = time.perf_counter()
    while n < batches * batch:
        try:
            x, _, _ = next(it)
        except StopIteration:
            it = iter(dl)
            continue
        n += len(x)
    return n / (time.perf_counter() - start)


def trainer(root: Path, args, device: torch.device, fast: bool) -> Trainer:
    """The train stage's Trainer for fold 0 of the workspace under `root`, set up (model, loaders, optimizer)."""
    raw = Params().model_dump()
    raw.update(model=args.model, encoder=args.encoder)
    raw["paths"].update({k: str(root / k) for k in ("masks", "split", "models", "metrics", "plots")})
    raw["train"].update(batch_size=args.batch, image_size=args.size, augment=AUGMENT, ema=None, epochs=args.epochs + 1,
                        amp="bf16" if fast and device.type == "cuda" else "off", channels_last=fast,
                        compile=fast and args.compile)
    raw["runtime"].update(workers=args.workers)
    job = load_fold(0, 0, Params.model_validate(raw).only(*PARAMS), False)
    job.device = device
    run = Trainer(job)
    run.setup()
    return run


def loop_rates(root: Path, args, device: torch.device, fast: bool) -> tuple[float, float]:
    """(end-to-end images/s through the real loader and training epoch, model-only images/s: train_step
    on one batch already on the device)."""
    cuda = device.type == "cuda"
    run = trainer(root, args, device, fast)
    run.train_epoch(0)  # warm-up: cuDNN autotuning, allocator, compilation, first worker start
    seconds = timed(lambda: [run.train_epoch(e) for e in range(1, args.epochs + 1)], cuda)
    end_to_end = args.epochs * len(run.train_loader) * args.batch / seconds

    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, len(run.job.classes), (args.batch, args.size, args.size), device=device)
    rng = np.random.default_rng(0)
    run.train_step(x, y, rng, steps=True)
    model_only = args.steps * args.batch / timed(lambda: [run.train_step(x, y, rng, steps=True)
                                                          for _ in range(args.steps)], cuda)
    return end_to_end, model_only


def inference_rates(args, device: torch.device) -> tuple[float, float]:
    model = build_model(args.model, args.encoder, None, 12).to(device).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    amp = "bf16" if device.type == "cuda" else "off"
    rates = []
    for views in (["identity"], ["d4"]):
        ens = Ensemble([(model, 1.0)], views, [1.0], device, amp)
        ens.proba(x)
        rates.append(args.steps * args.batch / timed(lambda: [ens.proba(x) for _ in range(args.steps)],
                                                      device.type == "cuda"))
    return rates[0], rates[1]


def timed(fn, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="unet")
    ap.add_argument("--encoder", default="resnet34")
    cuda = torch.cuda.is_available()
    ap.add_argument("--size", type=int, default=512 if cuda else 128)
    ap.add_argument("--batch", type=int, default=16 if cuda else 8)
    ap.add_argument("--steps", type=int, default=20 if cuda else 3, help="model-only and inference steps")
    ap.add_argument("--epochs", type=int, default=2 if cuda else 1, help="timed epochs per loop")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1) if cuda else 0)
    ap.add_argument("--images", type=int, default=160 if cuda else 32)
    ap.add_argument("--compile", action="store_true", help="torch.compile the fast loop's model")
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory() as tmp:
        make_demo(Path(tmp) / "data", args.images, 0, args.size, seed=0)
        ds = load_dataset(Path(tmp) / "data", ["train.json"])
        table = build_mask_cache(ds, Path(tmp) / "masks", Masks(), workers=0)
        (Path(tmp) / "split").mkdir()   # 4 random folds: fold 0's training images are 3/4 of the scenes
        make_folds(ds, Split(strategy="random", n_folds=4, holdout=0.0)).to_csv(Path(tmp) / "split/folds.csv", index=False)
        load = loader_rate(table, args.size, args.batch, args.workers, batches=max(4, args.steps))
        plain = loop_rates(Path(tmp), args, device, fast=False)
        fast = loop_rates(Path(tmp), args, device, fast=True)
    infer, tta = inference_rates(args, device)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}-{args.encoder} @ {args.size}px, batch {args.batch}, {args.workers} loader workers, on {name}")
    print(f"  loader alone (default augmentations):   {load:8.1f} images/s")
    print(f"  plain fp32 loop:  end to end {plain[0]:8.1f}   model only {plain[1]:8.1f} images/s")
    print(f"  fast loop{' + compile' if args.compile else ''}:       end to end {fast[0]:8.1f}   model only {fast[1]:8.1f} images/s"
          f"{'' if cuda else '  (CPU: fp32 either way; bf16 is CUDA-only)'}")
    print(f"  fast / plain (end to end): {fast[0] / plain[0]:.2f}x   (GPU target >= 2.5x)")
    print(f"  data loading bound: {'yes' if fast[0] < 0.9 * fast[1] else 'no'} (end to end vs model only)")
    print(f"  inference: 1 view {infer:8.1f} images/s   TTA d4 (8 views) {tta:8.1f} images/s")


if __name__ == "__main__":
    main()
