"""Stage report: reports/index.html, one self-contained page of everything the pipeline found and
scored; prints the headline (CV mIoU, what is submitted and its holdout score, where the page is)."""
from pipeline import entrypoint
from pipeline.config import load_params
from pipeline.evaluation.report import write_report
from pipeline.tracking import stage_run

PARAMS = ("model", "encoder", "train", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    recipe = {"model": p.model, "encoder": p.encoder, "epochs": p.train.epochs, "image size": p.train.image_size,
              "input": p.train.input, "folds": len(p.train.folds), "seeds": len(p.train.seeds)}
    with stage_run("report", p) as run:
        path, head = write_report(p.paths, recipe)
        run.log_artifact(path, "report")
    sub = head["submitted"]
    print(f"CV mIoU {head['cv_mIoU']:.4f}" if head["cv_mIoU"] is not None else "CV mIoU: none", end="")
    print(f"; submitted ({sub['id']}): holdout mIoU {sub['mIoU']:.4f}" if sub.get("mIoU") is not None else "; no holdout")
    if "blend" in head:
        n, judged_on, miou, gain = head["blend"]
        print(f"blend of {n} experiments ({judged_on}): {miou:.4f}, {gain:+.4f} vs the best single experiment")
    if "audit" in head:
        print(f"label audit: {head['audit'][0]} suspects, most suspicious first in {head['audit'][1]}")
    print(f"report: {path.resolve().as_uri()}")


if __name__ == "__main__":
    entrypoint.run(main)
