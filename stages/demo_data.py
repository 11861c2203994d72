"""Stage demo_data: write the built-in synthetic dataset to paths.demo."""
from pipeline import entrypoint
from pipeline.config import load_params
from pipeline.data.demo import make_demo
from pipeline.tracking import stage_run

PARAMS = ("demo", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    with stage_run("demo_data", p) as run:
        summary = make_demo(p.paths.demo, **p.demo.model_dump())
        run.log_metrics({f"demo/{k}": v for k, v in summary.items()})


if __name__ == "__main__":
    entrypoint.run(main)
