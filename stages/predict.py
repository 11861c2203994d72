"""Predict new images with the final ensemble (not a DVC stage: run it on demand).

    python -m stages.predict --images DIR --out DIR
writes OUT/<name>.png (class indices) and OUT/<name>_overlay.jpg for every image under DIR.
"""
import argparse

from pipeline import entrypoint
from pipeline.config import load_params
from pipeline.data.masks import read_classes
from pipeline.delivery import submitted_refiner
from pipeline.inference.ensemble import final_ensemble
from pipeline.models.checkpoint import ModelSet
from pipeline.workspace import Workspace
from pipeline.inference.recipe import final_params
from pipeline.inference.submission import predict_folder
from pipeline.devices import pick_device

PARAMS = ("infer", "train", "paths")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="folder of images (searched recursively)")
    ap.add_argument("--out", required=True, help="output folder; must not overlap --images")
    args = ap.parse_args()
    p = final_params(load_params().only(*PARAMS))   # the recipe the ensemble stage chose (infer.choose auto)
    cache = read_classes(p.paths.masks)   # classes, and how training images were prepared (max_side)
    ens = final_ensemble(p.infer, ModelSet.final(p.infer, p.train, Workspace(p.paths)), pick_device(p.infer.device))
    ens.refine = submitted_refiner(p.paths) if submitted_refiner(p.paths).active else None   # as submit applies
    spec = ens.spec   # images are prepared as the models' checkpoints say; params and cache must agree
    spec.check("stages.predict", eval_size=p.train.eval_size, max_side=cache.get("max_side"), classes=cache["classes"])
    n = predict_folder(ens, args.images, args.out, p.infer.batch_size)
    print(f"wrote {n} predictions to {args.out}")


if __name__ == "__main__":
    entrypoint.run(main)
