"""Stage oof: each fold's final-ensemble members (the recipe the ensemble stage chose, with infer.choose
auto) predict their own validation images -> paths.oof (small uint8 probabilities for the label audit
and for blend weights)."""

from pipeline import entrypoint
from pipeline.config import load_params
from pipeline.devices import pick_device
from pipeline.evaluation.oof import write_oof
from pipeline.models.checkpoint import ModelSet
from pipeline.evaluation.headline import write_metrics
from pipeline.inference.recipe import final_params
from pipeline.tracking import stage_run
from pipeline.workspace import Workspace

PARAMS = ("infer", "train", "oof", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    with stage_run("oof", p) as run:
        p = final_params(p)   # infer as the ensemble stage chose it (infer.choose auto), else params'
        s = write_oof(ModelSet.final(p.infer, p.train, Workspace(p.paths)), p, pick_device(p.infer.device))
        print(f"out-of-fold (final ensemble's members per fold, TTA, at most {p.oof.max_side} px): "
              f"mIoU {s['mIoU']:.4f} -> {p.paths.oof}")
        write_metrics(run, Workspace(p.paths), "oof", {"oof": {
            "mIoU": s["mIoU"], "pixel_acc": s["pixel_acc"], "IoU": {k: v for k, v in s["IoU"].items() if v is not None}}})


if __name__ == "__main__":
    entrypoint.run(main)
