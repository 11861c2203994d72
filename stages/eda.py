"""Stage eda: class balance, areas, overlapping labels and malformed annotations, from the json alone."""
from pipeline import entrypoint
from pipeline.config import load_params
from pipeline.data.corrections import dataset_from_params
from pipeline.data.eda import analyse, write_report
from pipeline.io import atomic_dir
from pipeline.evaluation.headline import write_metrics
from pipeline.tracking import stage_run
from pipeline.workspace import EdaFiles, Workspace

PARAMS = ("data", "masks", "eda", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    with stage_run("eda", p) as run:
        ds = dataset_from_params(p.data)
        result = analyse(ds, p.masks.overlap, p.masks.unknown, p.masks.unknown_name,
                         workers=p.masks.workers)
        ws = Workspace(p.paths)
        with atomic_dir(ws.eda.dir) as tmp:
            write_report(result, EdaFiles(tmp))
        run.log_artifacts(ws.eda.dir, "eda")
        write_metrics(run, ws, "eda", {"eda": result.summary})


if __name__ == "__main__":
    entrypoint.run(main)
