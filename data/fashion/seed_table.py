"""The demo tables of the README and docs/experiments.md: one Markdown row per model over demo runs (their results.json, as demo.sh writes
them), mean ± sample std over the runs, or the values themselves for one run; "-" where a row lacks a score.
    python data/fashion/seed_table.py out/demo out/demo_seed2 out/demo_seed3
"""
import json
import statistics
import sys

def head(key):
    """Column head of a results.json score: de = multilingual, fr = the unseen language."""
    key = key.replace("multilingual_unseen_", "fr ").replace("multilingual_", "de ")
    return key.removesuffix("_r1").removesuffix("_top1").replace("zeroshot", "zero-shot").replace("_", " ")

def table(runs):
    """Markdown lines for a list of results.json dicts (the first run's rows and column order)."""
    rows = runs[0]["rows"]
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    lines = ["| row | " + " | ".join(map(head, keys)) + " |", "|---" * (len(keys) + 1) + "|"]
    for name in rows:
        cells = []
        for k in keys:
            v = [run["rows"][name][k] for run in runs if k in run["rows"][name]]
            cells.append("-" if not v else f"{v[0]:.1f}" if len(v) == 1 else
                         f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines

if __name__ == "__main__":
    runs = [json.load(open(f"{d}/results.json")) for d in sys.argv[1:]]
    print(f"seeds {[r['seed'] for r in runs]}, seconds {[r['seconds'] for r in runs]}, {runs[0]['device']}")
    print("\n".join(table(runs)))
