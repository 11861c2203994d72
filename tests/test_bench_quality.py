"""bench/quality.py's table arithmetic: the paired difference and its interval, and merging runs."""
import json

import pandas as pd

from bench.quality import merge, paired


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

