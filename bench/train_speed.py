"""Training and loader throughput, images/s, for one model / size / batch.

  loader: the training DataLoader over a mask cache (demo scenes generated at --size), with the
          default augmentations, `--workers` processes; no model.
  train:  forward + backward + optimizer step on batches already in memory (device-resident on GPU),
          so it measures what the model consumes, not what the loader delivers.
The ratio loader/train says whether data loading can keep up (issue target on a GPU: >= 3x for
Unet-ResNet34 at 512 px).

    python -m bench.train_speed [--model unet --encoder resnet34 --size 512 --batch 16 --workers 8]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline.data.augment import build_transform
from pipeline.data.coco import load_dataset
from pipeline.data.dataset import SegDataset, worker_init
from pipeline.data.demo import make_demo
from pipeline.data.masks import build_mask_cache
from pipeline.models.factory import build_model, encoder_of
from pipeline.models.losses import build_loss
from pipeline.training.loop import autocast
from pipeline.training.optim import build_optimizer

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


def train_rate(model_name: str, encoder: str, size: int, batch: int, steps: int, device: torch.device,
               amp: str, channels_last: bool) -> float:
    model = build_model(model_name, encoder, None, 12).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, encoder_of(model), "adamw", 1e-3, None, 1e-4)
    loss_fn = build_loss({"ce": 1.0, "dice": 0.5}).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 12, (batch, size, size), device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with autocast(device, amp):
            out = model(x)
        loss_fn(out, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="unet")
    ap.add_argument("--encoder", default="resnet34")
    cuda = torch.cuda.is_available()
    ap.add_argument("--size", type=int, default=512 if cuda else 128)
    ap.add_argument("--batch", type=int, default=16 if cuda else 8)
    ap.add_argument("--steps", type=int, default=30 if cuda else 5)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1) if cuda else 0)
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory() as tmp:
        make_demo(Path(tmp) / "data", args.images, 0, args.size, seed=0)
        ds = load_dataset(Path(tmp) / "data", ["train.json"])
        table = build_mask_cache(ds, Path(tmp) / "masks", "smaller_on_top", "keep", "UNKNOWN", None, workers=0)
        load = loader_rate(table, args.size, args.batch, args.workers, batches=max(4, args.steps))
    amp, cl = ("bf16", True) if cuda else ("off", False)
    train = train_rate(args.model, args.encoder, args.size, args.batch, args.steps, device, amp, cl)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}-{args.encoder} @ {args.size}px, batch {args.batch}, on {name}"
          f"{' (bf16 autocast, channels_last)' if cuda else ' (fp32)'}")
    print(f"  loader ({args.workers} workers, default augmentations): {load:8.1f} images/s")
    print(f"  training step (fwd + bwd + AdamW):              {train:8.1f} images/s")
    print(f"  loader / training: {load / train:.1f}x (GPU target >= 3x for unet-resnet34 @ 512)")


if __name__ == "__main__":
    main()
