"""Every experiment on one line, best first (not a DVC stage: run it on demand).

    python -m stages.leaderboard [--sort cv_mIoU|holdout_mIoU] [--md | --csv]

Columns: experiment, CV mIoU, the CV metric's 95 % interval over images, the paired difference from
the top row on the same out-of-fold images, the holdout mIoU of what it submits with its interval and
the submitted variant's id, training minutes (all folds, seeds and rounds), and the params that differ
between the rows.
"""
import argparse

from pipeline import entrypoint
from pipeline.evaluation.leaderboard import dvc_images, git_experiments, leaderboard, render

PARAMS = ()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sort", default="cv_mIoU", choices=["cv_mIoU", "holdout_mIoU"])
    fmt = ap.add_mutually_exclusive_group()
    fmt.add_argument("--md", action="store_const", const="md", dest="fmt", help="a markdown table")
    fmt.add_argument("--csv", action="store_const", const="csv", dest="fmt", help="CSV")
    args = ap.parse_args()
    print(render(leaderboard(git_experiments(), args.sort, dvc_images()), args.fmt or "text"))


if __name__ == "__main__":
    entrypoint.run(main)
