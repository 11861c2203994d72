"""Stage eda: class balance, areas, overlapping labels and malformed annotations, from the json alone."""
from pipeline import cli
from pipeline.config import load_params
from pipeline.data.coco import dataset_from_params
from pipeline.data.eda import analyse, write_report
from pipeline.io import atomic_dir
from pipeline.tracking import stage_run
from pipeline.workspace import EdaFiles, Workspace

PARAMS = ("data", "masks", "eda", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    with stage_run("eda", p) as run:
        ds = dataset_from_params(p.data)
        result = analyse(ds, p.masks.overlap, p.masks.unknown, p.masks.unknown_name,
                         workers=p.masks.workers)
        with atomic_dir(p.paths.eda) as out:
            write_report(result, EdaFiles(out))
        run.log_artifacts(p.paths.eda, "eda")
        run.write_metrics(Workspace(p.paths).metrics_json("eda"), {"eda": result.summary})


if __name__ == "__main__":
    cli.run(main)
