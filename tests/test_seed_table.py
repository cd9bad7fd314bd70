"""data/fashion/seed_table.py: the demo tables of the README and docs/experiments.md from results.json files."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "fashion"))
import seed_table  # noqa: E402


def run(l2c_long, base_zs):
    return {"rows": {"base_clip": {"long_i2t_r1": 1.0, "multilingual_unseen_t2i_r1": 0.2, "zeroshot_top1": base_zs},
                     "llm2clip": {"long_i2t_r1": l2c_long, "zeroshot_top1": 12.0}}}


def test_heads_means_and_missing_cells():
    lines = seed_table.table([run(50.0, 30.0), run(54.0, 31.0)])
    assert lines[0] == "| row | long i2t | fr t2i | zero-shot |"
    assert lines[2] == "| base_clip | 1.0 ± 0.0 | 0.2 ± 0.0 | 30.5 ± 0.7 |"
    assert lines[3] == "| llm2clip | 52.0 ± 2.8 | - | 12.0 ± 0.0 |"  # sample std of 50, 54: 2.83
    assert seed_table.table([run(50.0, 30.0)])[3] == "| llm2clip | 50.0 | - | 12.0 |"
