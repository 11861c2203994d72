"""Stage masks: rasterise every labelled image once into the class-index PNG cache."""
import time

from pipeline import entrypoint
from pipeline.config import load_params
from pipeline.data.coco import load_test_set
from pipeline.data.corrections import dataset_from_params
from pipeline.data.masks import build_mask_cache
from pipeline.tracking import stage_run
from pipeline.workspace import Workspace

PARAMS = ("data", "masks", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    with stage_run("masks", p) as run:
        start = time.perf_counter()
        ds = dataset_from_params(p.data)
        test = load_test_set(p.data) if p.data.test_json else []   # a broken test set fails now, not after training
        index = build_mask_cache(ds, p.paths.masks, p.masks, p.masks.workers)
        run.log_metrics({"masks/images_per_s": len(index) / (time.perf_counter() - start)})  # MLflow only: not reproducible
        run.write_metrics(Workspace(p.paths).metrics_json("masks"), {"masks": {
            "images": len(index), "resized": int((index.height != index.orig_height).sum()),
            "skipped": int((ds.issues.severity == "error").sum()), "test_images": len(test)}})


if __name__ == "__main__":
    entrypoint.run(main)
