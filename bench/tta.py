"""TTA cost: n views batched into one forward pass vs n separate single-view passes.

Target (issue 4): n views cost <= 1.1 x n single-view passes. Batching usually makes it cheaper.

    python -m bench.tta [--model unet --encoder resnet18 --size 128 --batch 4]
"""
from __future__ import annotations

import argparse
import time

import torch

from pipeline.inference.tta import tta_proba
from pipeline.models.factory import build_model
from pipeline.devices import autocast


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    cuda = torch.cuda.is_available()
    ap.add_argument("--model", default="unet")
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--size", type=int, default=512 if cuda else 128)
    ap.add_argument("--batch", type=int, default=16 if cuda else 4)
    ap.add_argument("--repeats", type=int, default=10 if cuda else 3)
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    model = build_model(args.model, args.encoder, None, 12).to(device).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    ac = autocast(device, "bf16" if cuda else "off")
    one = timed(lambda: tta_proba(model, x, ["identity"], autocast=ac), args.repeats)
    print(f"{args.model}-{args.encoder} @ {args.size}px, batch {args.batch}, {device}")
    print(f"  1 view: {args.batch / one:8.1f} images/s")
    for views in (["identity", "hflip"], ["d4"]):
        n = 8 if views == ["d4"] else len(views)
        t = timed(lambda: tta_proba(model, x, views, autocast=ac), args.repeats)
        print(f"  {n} views ({'+'.join(views)}): {args.batch / t:8.1f} images/s, cost {t / one:.2f} single passes "
              f"= {t / (n * one):.2f} x n (target <= 1.1)")


if __name__ == "__main__":
    main()
