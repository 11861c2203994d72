"""bench/quality.py's arithmetic: the reference's LR schedule, the paired difference and its
interval, and merging runs."""
import json
import math
from functools import partial

import pandas as pd
import pytest
import torch

from bench.quality import merge, paired, warmup_cosine


@pytest.mark.parametrize("step, factor", [(0, 1 / 48), (23, 0.5), (47, 1.0), (48, 1.0), (144, 0.5), (239, None)])
def test_reference_schedule_known_answers(step, factor):
    expected = factor if factor is not None else 0.5 * (1 + math.cos(math.pi * 191 / 192))
    assert warmup_cosine(step, warmup=48, total=240) == pytest.approx(expected)


def test_reference_schedule_is_what_the_optimizer_sees():
    # The reference's LambdaLR once closed over a name its epoch loop reused for the running loss,
    # and lost its cosine; the factor is now a function of its arguments only.
    opt = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_cosine, warmup=4, total=20))
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-3 * warmup_cosine(s, 4, 20) for s in range(20)])
    assert seen[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3]) and seen[12] == pytest.approx(5e-4)


def rows(recipe, values, seeds=None):
    return [{"recipe": recipe, "seed": s, "mIoU": v, "pixel_acc": 0.5, "wall_s": 1.0, "cpu_s": 1.0, "IoU": [v]}
            for s, v in zip(seeds or range(len(values)), values)]


def test_paired_difference_known_answer():
    # differences 0.01, 0.02, 0.03: mean 0.02, sd 0.01, t(0.975, 2) = 4.3027 -> half-width 0.02484
    table = pd.DataFrame(rows("ref", [0.20, 0.21, 0.22]) + rows("new", [0.21, 0.23, 0.25]))
    assert paired(table, "new", "ref") == "+0.0200 [-0.0048, +0.0448], 3/3 seeds above"


def test_paired_uses_only_the_seeds_both_ran():
    table = pd.DataFrame(rows("ref", [0.20, 0.21, 0.5], seeds=[0, 1, 7]) + rows("new", [0.21, 0.20], seeds=[0, 1]))
    assert paired(table, "new", "ref").startswith("+0.0000 [")
    assert paired(pd.DataFrame(rows("ref", [0.2]) + rows("new", [0.25])), "new", "ref") == "+0.0500"


def test_merge_counts_a_repeated_run_once(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"data": "x", "classes": ["bg"], "rows": rows("ref", [0.2, 0.3])}))
    b.write_text(json.dumps({"data": "x", "classes": ["bg"], "rows": rows("ref", [0.4], seeds=[1])}))
    merge([str(a), str(b)])
    out = capsys.readouterr().out
    assert "| ref | 2 | 0.3000 | 0.2000 / 0.4000 |" in out
