"""Stage near_dups: find one photo repeated as a crop, resize, re-encode or brightness change under
another name, so the split can keep such images in one fold (pipeline/data/near_dups.py)."""
import pandas as pd

from pipeline import entrypoint
from pipeline.config import load_params
from pipeline.data.coco import load_test_set
from pipeline.data.corrections import dataset_from_params
from pipeline.data.near_dups import PAIR_COLUMNS, clusters, find_pairs, summary, with_test_images, write_report
from pipeline.io import atomic_dir
from pipeline.evaluation.headline import write_metrics
from pipeline.tracking import stage_run
from pipeline.workspace import NearDupFiles, Workspace

PARAMS = ("data", "near_dups", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    n = p.near_dups
    with stage_run("near_dups", p) as run:
        test = load_test_set(p.data) if n.include_test and p.data.test_json else None
        images = with_test_images(dataset_from_params(p.data, corrections=False).images, test)
        pairs = (find_pairs(images, n, n.workers) if n.enabled
                 else pd.DataFrame(columns=PAIR_COLUMNS))
        cluster = clusters(images.key.tolist(), pairs)
        ws = Workspace(p.paths)
        with atomic_dir(ws.near_dups.dir) as tmp:
            write_report(images, pairs, cluster, NearDupFiles(tmp))
        run.log_artifacts(ws.near_dups.dir, "near_dups")
        write_metrics(run, ws, "near_dups", {"near_dups": summary(images, pairs, cluster)})


if __name__ == "__main__":
    entrypoint.run(main)
