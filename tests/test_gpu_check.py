"""bench/gpu_check.py, the one script for a lent GPU, run as --tiny: every part on the CPU at toy
sizes. Checked: it ends cleanly, writes at most 8 files (the CSVs and summary.md), every step ran,
the summary holds every headline row of bench/RESULTS.md and names what --tiny skips."""

import os
import subprocess
import sys

import pytest

from bench.csvlog import read_rows
from bench.gpu_check import FILES, HEADLINE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_results_md_has_the_headline_rows():
    text = open(os.path.join(ROOT, "bench", "RESULTS.md")).read()
    for what, target in HEADLINE:
        assert f"| {what} |  | {target} |  |" in text, what


@pytest.mark.slow
def test_tiny_run(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    cmd = [sys.executable, "-m", "bench.gpu_check", "--tiny", f"--out={out}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = set(os.listdir(out))
    assert files <= set(FILES) and len(files) <= 8, files
    assert {"summary.md", "steps.csv", "correctness.csv", "kernels.csv", "llama.csv",
            "stage2.csv"} <= files  # demo.csv: the demo is skipped
    steps = read_rows(out / "steps.csv")
    assert [r["part"] for r in steps if r["status"] != "ok"] == [], steps
    assert {r["part"] for r in steps} == {"0", "1", "2", "3", "4"}

    summary = (out / "summary.md").read_text()
    for what, target in HEADLINE:
        assert f"| {what} | " in summary and f" | {target} | " in summary, what
    lines = summary.splitlines()
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ")}
    for what in ("kernel tests natively on CUDA", "stage-2 step in bf16", "distributed path",
                 "contrastive fwd+bwd", "contrastive at N=131072", "structure fwd+bwd",
                 "Llama encoder"):  # measured in --tiny too (at toy sizes)
        row = next(v for k, v in rows.items() if k.startswith(what))
        assert row.endswith("| tiny |"), row
    for skipped in ("kernel tests natively on CUDA", "NCCL", "torch.compile", "the demo"):
        assert any(line.startswith("- skipped: ") and skipped in line for line in lines)

    kernels = {(r["op"], r["provider"]) for r in read_rows(out / "kernels.csv")}
    ops = ("contrastive", "sigmoid", "structure")
    assert kernels == {(op, p) for op in ops for p in ("ours", "torch")}
    assert {r["outcome"] for r in read_rows(out / "correctness.csv")} == {"passed"}
    assert {r["captions"] for r in read_rows(out / "llama.csv")} == {"synthetic"}
    assert all(r["status"] == "ok" for r in read_rows(out / "stage2.csv"))
