"""Quality on real photos, side by side: a plain PyTorch + smp reference against the pipeline.

    python -m bench.quality --data /path/to/roboflow-export [--work /tmp/quality] [--epochs 5] [--seeds 0 1] [--out r.json]
    python -m bench.quality --merge r0.json r1.json ...   # one table from runs made apart (e.g. a seed each)

The dataset is a COCO-format export with photos (Roboflow layout: <split>/_annotations.coco.json
beside its images); every labelled split is pooled (the test split is not used). Validation is fold 0
of a 5-fold split that keeps near-duplicates together (the pipeline's near_dups and split logic; the
exports' own train/valid split puts crops of one photo on both sides), so no recipe is judged on a
crop of a photo it trained on. The same training and validation images go to every recipe:

  reference     written here in plain PyTorch + smp, reading the COCO json itself (pycocotools):
                FPN-ResNet34 from scratch, images resized to 320x320, random 256 crops, flip +
                affine + brightness/contrast, CE + 0.5 Dice, AdamW 1e-3 (wd 1e-4), 1 warmup epoch
                then per-step cosine, batch 8; predicts the whole 320x320 image.
  pipeline      the project's train_fold and ensemble path with the same recipe in params
                (masks.max_side 320, train.input crop, crop_scale [1, 1], crop_infer whole).
  pipeline, photos preset   presets/photos.yaml, the recipe docs/data.md recommends for real photos.

Each recipe's final weights (no epoch picked on the validation images) predict the validation images
at 320x320; one independent scorer, torchmetrics' MulticlassJaccardIndex (macro) over the whole
validation set, scores them against masks the bench rasterises itself (pycocotools, smaller objects
painted on top, centre-aligned nearest resize). Time: wall and process CPU seconds of data preparation, training
and prediction. Prints a markdown table: each recipe's mean over --seeds, every seed's mIoU, and
its difference from the reference paired by seed with a 95 % t-interval (seed noise is large at 5
epochs: read a difference as real only when its interval excludes 0).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import segmentation_models_pytorch as smp  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402
from scipy import stats  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex  # noqa: E402

from pipeline.config import Masks, Params, Split  # noqa: E402
from pipeline.data.coco import load_dataset  # noqa: E402
from pipeline.data.folds import make_folds, near_pairs  # noqa: E402
from pipeline.data.masks import build_mask_cache, read_classes  # noqa: E402
from pipeline.data.near_dups import find_pairs  # noqa: E402
from pipeline.inference.ensemble import Ensemble, image_files, load_member  # noqa: E402
from pipeline.io import identical_files  # noqa: E402
from pipeline.training.run import PARAMS, train_fold  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIDE, CROP = 320, 256


class Clock:
    """Wall and process-CPU seconds (all threads) of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


# ---------------------------------------------------------------- the plain reference, self-contained
def reference_classes(jsons: list[Path]) -> tuple[list[str], dict[tuple[str, int], int]]:
    """Class names by first appearance in the categories lists (background 0; one class per name)."""
    names, ids = ["Background"], {}
    for j in jsons:
        for c in json.loads(j.read_text())["categories"]:
            if c["name"] not in names:
                names.append(c["name"])
            ids[(str(j), c["id"])] = names.index(c["name"])
    return names, ids


def reference_sample(j: Path, image: dict, anns: list[dict], ids: dict) -> tuple[np.ndarray, np.ndarray]:
    """(320, 320, 3) uint8 RGB and (320, 320) uint8 mask: objects painted largest first (smaller on top)."""
    h, w = image["height"], image["width"]
    bgr = cv2.imread(str(j.parent / image["file_name"]), cv2.IMREAD_COLOR)
    mask = np.zeros((h, w), np.uint8)
    shapes = []
    for a in anns:
        seg = a["segmentation"]
        if isinstance(seg, list):
            seg = [p for p in seg if len(p) >= 6]
            if not seg:
                continue
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        else:
            rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
        shapes.append((float(mask_utils.area(rle)), ids[(str(j), a["category_id"])], rle))
    for _, cls, rle in sorted(shapes, key=lambda s: -s[0]):
        mask[mask_utils.decode(rle).astype(bool)] = cls
    image_rgb = cv2.resize(bgr, (SIDE, SIDE), interpolation=cv2.INTER_AREA)[..., ::-1].copy()
    # centre-aligned nearest: INTER_NEAREST would shift the labels up-left of the INTER_AREA image
    return image_rgb, cv2.resize(mask, (SIDE, SIDE), interpolation=cv2.INTER_NEAREST_EXACT)


def reference_data(jsons: list[Path], keys: set[str], ids: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for j in jsons:
        raw = json.loads(j.read_text())
        by_image: dict[int, list] = {}
        for a in raw["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        for im in raw["images"]:
            key = f"{j.parent.name}/{im['file_name']}"
            if key in keys:
                out[key] = reference_sample(j, im, by_image.get(im["id"], []), ids)
    return out


class Crops(torch.utils.data.Dataset):
    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        out = self.transform(image=self.samples[i][0], mask=self.samples[i][1])
        return out["image"], out["mask"].long()


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR factor at optimizer step `step`: linear warmup over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def reference_train(train: list, n_cls: int, epochs: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    transform = A.Compose([
        A.RandomCrop(CROP, CROP), A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.75, 1.25), rotate=(-20, 20), translate_percent=(-0.05, 0.05), fill=0, fill_mask=255, p=0.5),
        A.RandomBrightnessContrast(p=0.5), A.Normalize(), ToTensorV2()], seed=seed)
    loader = torch.utils.data.DataLoader(Crops(train, transform), batch_size=8, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    model = smp.FPN("resnet34", encoder_weights=None, classes=n_cls)
    ce, dice = torch.nn.CrossEntropyLoss(ignore_index=255), smp.losses.DiceLoss("multiclass", ignore_index=255)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_cosine, warmup=len(loader),
                                                           total=len(loader) * epochs))
    for epoch in range(epochs):
        model.train()
        running = 0.0
        for x, y in loader:
            logits = model(x)
            loss = ce(logits, y) + 0.5 * dice(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(x)
        print(f"  reference epoch {epoch + 1}/{epochs}: train loss {running / (len(loader) * 8):.4f}", flush=True)
    return model.eval()


@torch.no_grad()
def reference_predict(model: torch.nn.Module, val: list) -> list[np.ndarray]:
    norm = A.Compose([A.Normalize(), ToTensorV2()])
    return [model(norm(image=img)["image"][None]).argmax(1)[0].numpy().astype(np.uint8) for img, _ in val]


# ---------------------------------------------------------------- the pipeline, as params
def pipeline_params(work: Path, recipe: dict) -> Params:
    """params.yaml's defaults, the bench's paths, then the recipe's overrides (section by section)."""
    raw = Params().model_dump()
    raw["paths"].update(masks=str(work / "masks"), split=str(work / "split"), models=str(work / "models"),
                        metrics=str(work / "metrics"), plots=str(work / "plots"))
    for section, values in recipe.items():
        if isinstance(values, dict):
            raw[section].update(values)
        else:
            raw[section] = values
    raw["train"].update(folds=[0])
    raw["runtime"].update(gallery=0, workers=0)
    return Params.model_validate(raw)


SAME_RECIPE = {
    "model": "fpn", "encoder": "resnet34",
    "train": {"epochs": 5, "batch_size": 8, "image_size": CROP, "input": "crop", "crop_scale": [1.0, 1.0],
              "crop_infer": "whole", "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "scheduler": "cosine",
              "warmup_epochs": 1.0, "clip_grad": None, "loss": {"ce": 1.0, "dice": 0.5}, "class_weights": "none",
              "augment": ["hflip", "scale_rotate", "brightness_contrast"], "val_every": 5},
    "masks": {"max_side": SIDE},
}


def run_pipeline(name: str, recipe: dict, ds, folds: pd.DataFrame, work: Path, val_keys: list[str],
                 seed: int) -> tuple[list, Clock]:
    work.mkdir(parents=True, exist_ok=True)
    p = pipeline_params(work, {**recipe, "train": {**recipe["train"], "seeds": [seed]}})
    with Clock() as clock:
        build_mask_cache(ds, p.paths.masks, p.masks, workers=1)
        (work / "split").mkdir(exist_ok=True)
        folds.to_csv(work / "split/folds.csv", index=False)
        print(f"{name}: training", flush=True)
        train_fold(0, seed, p.only(*PARAMS))
        # last (or SWA) weights: best.pt's epoch was picked on these very validation images
        ckpt = "swa" if p.train.swa_epochs and "swa" in p.infer.checkpoints else "last"
        model, _ = load_member(work / f"models/fold_0/seed_{seed}/{ckpt}.pt", torch.device("cpu"), p.infer.batch_size)
        ens = Ensemble([(model, 1.0)], p.infer.tta if recipe.get("infer") else ["identity"], p.infer.scales,
                       torch.device("cpu"))
        index = pd.read_csv(Path(p.paths.masks) / "index.csv").set_index("key").loc[val_keys].reset_index()
        images = ds.images.set_index("key").loc[val_keys, ["path", "height", "width"]].reset_index(drop=True)
        max_side = read_classes(p.paths.masks).get("max_side")
        preds = dict(ens.predict(image_files(images, p.train.eval_size, max_side), list(zip(index.height, index.width)),
                                 p.infer.batch_size))
    return [preds[i] for i in range(len(index))], clock


# ---------------------------------------------------------------- one scorer for every recipe
def score(preds: list[np.ndarray], truths: list[np.ndarray], n_cls: int) -> dict:
    miou = MulticlassJaccardIndex(n_cls, average="macro", ignore_index=255)
    acc = MulticlassAccuracy(n_cls, average="micro", ignore_index=255)
    per_class = MulticlassJaccardIndex(n_cls, average="none", ignore_index=255)
    for p, t in zip(preds, truths):
        assert p.shape == t.shape, (p.shape, t.shape)
        pt, tt = torch.from_numpy(p.astype(np.int64)), torch.from_numpy(t.astype(np.int64))
        for m in (miou, acc, per_class):
            m.update(pt[None], tt[None])
    return {"mIoU": float(miou.compute()), "pixel_acc": float(acc.compute()),
            "IoU": [round(float(v), 4) for v in per_class.compute()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="Roboflow-style COCO export (folders with _annotations.coco.json)")
    ap.add_argument("--work", default="/tmp/bench-quality")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--only", default="reference,pipeline,photos", help="recipes to run, comma-separated")
    ap.add_argument("--preset", nargs="+", default=[str(REPO / "presets/photos.yaml")],
                    help="preset recipe file(s) to run (recipe 'photos')")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; the table shows each recipe's mean")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="only print one table from earlier --out files")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge)
    if not args.data:
        ap.error("--data is required (or --merge)")
    torch.set_num_threads(os.cpu_count() or 1)
    root, work = Path(args.data), Path(args.work)
    jsons = sorted(j for j in root.glob("*/_annotations.coco.json") if j.parent.name != "test")
    rel = [str(j.relative_to(root)) for j in jsons]
    ds = load_dataset(root, rel, [j.parent.name for j in jsons], strict=False)
    print(f"{len(ds.images)} labelled photos from {', '.join(rel)}; finding near-duplicates ...", flush=True)
    pairs = find_pairs(ds.images)
    near = near_pairs(ds.images.key, pairs)
    folds = make_folds(ds, Split(strategy="multilabel", n_folds=5, holdout=0.0, seed=0),
                       duplicates=identical_files(ds.images.path), near=near)
    val_keys = folds.key[folds.fold == 0].tolist()
    train_keys = folds.key[folds.fold != 0].tolist()
    names, ids = reference_classes(jsons)
    assert names == ds.classes, (names, ds.classes)
    n_cls = len(names)
    print(f"{len(train_keys)} training, {len(val_keys)} validation photos; {len(pairs)} near-duplicate pairs kept "
          f"on one side; {n_cls} classes", flush=True)
    truth_data = reference_data(jsons, set(val_keys), ids)
    truths = [truth_data[k][1] for k in val_keys]

    rows, recipes = [], args.only.split(",")
    epochs = {"train": {"epochs": args.epochs}}
    for seed in args.seeds:
        if "reference" in recipes:
            with Clock() as clock:
                data = reference_data(jsons, set(train_keys) | set(val_keys), ids)
                model = reference_train([data[k] for k in train_keys], n_cls, args.epochs, seed)
                preds = reference_predict(model, [data[k] for k in val_keys])
            rows.append({"recipe": "reference (plain PyTorch + smp)", "seed": seed, **score(preds, truths, n_cls),
                         "wall_s": clock.wall, "cpu_s": clock.cpu})
            print(rows[-1], flush=True)
        if "pipeline" in recipes:
            recipe = {**SAME_RECIPE, "train": {**SAME_RECIPE["train"], **epochs["train"]}}
            preds, clock = run_pipeline("pipeline", recipe, ds, folds, work / "pipeline", val_keys, seed)
            rows.append({"recipe": "pipeline, same recipe", "seed": seed, **score(preds, truths, n_cls),
                         "wall_s": clock.wall, "cpu_s": clock.cpu})
            print(rows[-1], flush=True)
        for file in args.preset if "photos" in recipes else []:
            # the preset as a user applies it, at the bench's resolution and epochs
            preset = yaml.safe_load(Path(file).read_text())
            recipe = {k: ({**v, **epochs["train"]} if k == "train" else v) for k, v in preset.items()}
            recipe["masks"] = {**recipe.get("masks", {}), "max_side": SIDE}
            preds, clock = run_pipeline(Path(file).stem, recipe, ds, folds, work / Path(file).stem, val_keys, seed)
            rows.append({"recipe": f"pipeline, {Path(file).stem} preset", "seed": seed,
                         **score(preds, truths, n_cls), "wall_s": clock.wall, "cpu_s": clock.cpu})
            print(rows[-1], flush=True)

    meta = {"data": root.name, "train": len(train_keys), "val": len(val_keys), "classes": names,
            "epochs": args.epochs, "cpus": os.cpu_count(), "torch": torch.__version__}
    if args.out:
        Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=1))
    report(rows, meta)


def paired(table: pd.DataFrame, name: str, ref: str) -> str:
    """Δ vs the reference over the seeds both ran: mean, and the 95 % t-interval of the paired differences."""
    a = table[table.recipe == name].set_index("seed")["mIoU"]
    b = table[table.recipe == ref].set_index("seed")["mIoU"]
    d = (a - b).dropna()
    if len(d) < 2:
        return f"{d.mean():+.4f}" if len(d) else "—"
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return f"{d.mean():+.4f} [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}], {int((d > 0).sum())}/{len(d)} seeds above"


def report(rows: list[dict], meta: dict) -> None:
    """The markdown table: each recipe's mean over its seeds, every seed's mIoU, Δ vs the reference
    (paired by seed, with its 95 % interval), time; then every run's per-class IoU."""
    table = pd.DataFrame(rows).sort_values(["recipe", "seed"], kind="stable")
    order = list(dict.fromkeys(r["recipe"] for r in rows))
    mean = table.groupby("recipe")[["mIoU", "pixel_acc", "wall_s", "cpu_s"]].mean().loc[order]
    per_seed = table.groupby("recipe")["mIoU"].agg(lambda v: " / ".join(f"{x:.4f}" for x in v))
    seeds = sorted(set(table.seed))
    ref = next((r for r in order if r.startswith("reference")), None)
    print(f"\n{meta.get('data', '?')}: {meta.get('train', '?')} training / {meta.get('val', '?')} validation photos, "
          f"{len(meta.get('classes', []))} classes, {meta.get('epochs', '?')} epochs, {SIDE}x{SIDE}, seeds {seeds}, "
          f"{meta.get('cpus', '?')} CPU cores, torch {meta.get('torch', '?')}\n")
    print("| recipe | seeds | mIoU (mean) | per seed | Δ vs reference (paired by seed, 95 % CI) | pixel acc | "
          "wall s | CPU s | CPU × reference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in mean.iterrows():
        d = paired(table, name, ref) if ref and name != ref else "—"
        ratio = f"{r['cpu_s'] / mean.loc[ref, 'cpu_s']:.2f}" if ref else "—"
        n = int((table.recipe == name).sum())
        print(f"| {name} | {n} | {r['mIoU']:.4f} | {per_seed[name]} | {d} | {r['pixel_acc']:.4f} | "
              f"{r['wall_s']:.0f} | {r['cpu_s']:.0f} | {ratio} |")
    print("\nper-class IoU (" + ", ".join(meta.get("classes", [])) + "):")
    for _, r in table.iterrows():
        print(f"  {r['recipe']}, seed {r['seed']}: {r['IoU']}")


def merge(files: list[str]) -> None:
    """One table from the --out files of several runs (e.g. one seed per run); a run repeated
    (same recipe and seed) counts once, the last file winning."""
    rows, meta = {}, {}
    for file in files:
        data = json.loads(Path(file).read_text())
        meta = {**meta, **{k: v for k, v in data.items() if k != "rows"}}
        for r in data["rows"]:
            rows[(r["recipe"], r["seed"])] = r
    report(list(rows.values()), meta)


if __name__ == "__main__":
    main()
