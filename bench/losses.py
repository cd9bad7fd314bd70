"""
Benchmark the fused losses against their PyTorch references on one GPU.

    python -m bench.losses                      # full sweep: N 4096..131072, D 512/768/1024, bf16
    python -m bench.losses --ns=4096,8192 --ds=512 --ops=contrastive,sigmoid   # a slice of it
    python -m bench.losses --device=cpu --ns=64 --ds=32 --providers=ours,torch  # tests the script

Writes bench/results/losses.csv (op,provider,N,D,dtype,fwd_ms,bwd_ms,total_ms,peak_mem_mb,tflops,gpu; a case
that ran out of memory or failed is a row saying so in fwd_ms; each row is appended as it is
measured, so a sweep cut short keeps its rows), bench/results/losses.md (the table with the
GPU, library versions and commit) and bench/results/losses.png (needs matplotlib; skipped with a message
if it is missing). Without a GPU it says so and exits cleanly. --device=cpu runs the kernels in
Triton's interpreter and times them by the wall clock (no memory column): toy sizes only, to test
the script.

Providers. contrastive: ours, torch (the reference in bf16, eager), torch-compile (the same under
torch.compile), inf-cl (PyPI inf-cl's cal_inf_loss run in both directions and averaged, when
installed). sigmoid (SigLIP): ours, torch (open_clip's SigLipLoss written out, eager), torch-compile.
structure: ours, torch, torch-compile.
FLOP counts used for TFLOP/s and the floor: contrastive 8 N^2 D (2 forward, 6 backward: the minimum
for a forward logits product plus recomputation and two gradient products), sigmoid 6 N^2 D (the
logits product, 2 N^2 D, and the two gradient products, 4 N^2 D: its per-pair gradient needs no row
statistics, so ours forms it in the forward sweep and nothing is recomputed; its "fwd" column
therefore holds nearly all the work and "bwd" only a rescale), structure 6 N^2 D (two
Grams over the upper triangle, 2 N^2 D, and four half-size gradient products, 4 N^2 D). TFLOP/s is
that count over the measured time for every provider, so providers compare by time; "floor" is the
fraction of the dense bf16 peak (PEAK_TFLOPS) that time reaches.
"""

import importlib.metadata
import os
import statistics
import subprocess
import sys
import time

import torch

from bench.csvlog import append_row

# -----------------------------------------------------------------------------
# settings, overridable as --key=value
ns = "4096,8192,16384,32768,65536,131072"  # batch sizes N
ds = "512,768,1024"  # feature widths D
ops = "contrastive,sigmoid,structure"
providers = "ours,torch,torch-compile,inf-cl"
dtype = "bfloat16"
scale = 100.0  # logit multiplier s for the contrastive and sigmoid losses
bias = -10.0  # logit bias t for the sigmoid loss (SigLIP's initial value)
out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # losses.{csv,md,png}
device = "cuda"  # or "cpu": Triton's interpreter, toy sizes (a test of this script)
PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0}  # dense bf16, about (docs/design.md, Kernels)
# -----------------------------------------------------------------------------

COLUMNS = ["op", "provider", "N", "D", "dtype", "fwd_ms", "bwd_ms", "total_ms", "peak_mem_mb", "tflops", "gpu"]
FLOPS_PER_N2D = {"contrastive": 8, "sigmoid": 6, "structure": 6}


def _override(argv):
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if key not in globals() or key.startswith("_") or key.isupper() or not _:
            raise SystemExit(f"unknown or malformed setting {arg!r}")
        default = globals()[key]
        globals()[key] = type(default)(value)


def _loss_fn(op, provider):
    """fn(a, b, s) -> loss for one provider, or None when it is not available."""
    from fused_losses.contrastive import contrastive_loss, contrastive_loss_reference
    from fused_losses.sigmoid import sigmoid_loss, sigmoid_loss_reference
    from fused_losses.structure import structure_loss, structure_loss_reference
    if op == "contrastive":
        if provider == "ours":
            return contrastive_loss
        if provider == "torch":
            return contrastive_loss_reference
        if provider == "torch-compile":
            return torch.compile(contrastive_loss_reference)
        if provider == "inf-cl":
            try:
                from inf_cl import cal_inf_loss
            except ImportError:
                return None
            return lambda a, b, s: (cal_inf_loss(a, b, scale=s) + cal_inf_loss(b, a, scale=s)) / 2
    if op == "sigmoid":
        t = torch.tensor(bias, device=device, requires_grad=True)  # learnable: its grad is timed
        if provider == "ours":
            return lambda a, b, s: sigmoid_loss(a, b, s, t)
        if provider == "torch":
            return lambda a, b, s: sigmoid_loss_reference(a, b, s, t)
        if provider == "torch-compile":
            compiled = torch.compile(sigmoid_loss_reference)
            return lambda a, b, s: compiled(a, b, s, t)
    if op == "structure":
        if provider == "ours":
            return lambda a, b, s: structure_loss(a, b)
        if provider == "torch":
            return lambda a, b, s: structure_loss_reference(a, b)
        if provider == "torch-compile":
            compiled = torch.compile(structure_loss_reference)
            return lambda a, b, s: compiled(a, b)
    return None


def _wall_ms(fn, reps=3):
    """Median wall-clock ms of fn over reps calls: the CPU's stand-in for do_bench."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _measure(fn, N, D, dt):
    """(fwd_ms, bwd_ms, total_ms, peak_mb): median times by do_bench, peak memory above the inputs
    (on the CPU: wall-clock medians and no memory, "")."""
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.nn.functional.normalize(torch.randn(N, D, device=device, generator=g), dim=-1)
            .to(dt).requires_grad_() for _ in range(2))
    s = torch.tensor(scale, device=device, requires_grad=True)

    def fwd():
        return fn(a, b, s)

    def both():
        a.grad = b.grad = s.grad = None
        fn(a, b, s).backward()

    both()  # compile / warm up; also fails early on OOM
    if device == "cpu":
        loss = fwd()
        bwd_ms = _wall_ms(lambda: loss.backward(retain_graph=True))
        return _wall_ms(fwd), bwd_ms, _wall_ms(both), ""
    from triton.testing import do_bench
    torch.cuda.synchronize()
    a.grad = b.grad = s.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    both()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    fwd_ms = do_bench(fwd)
    loss = fwd()
    bwd_ms = do_bench(lambda: loss.backward(retain_graph=True), grad_to_none=[a, b, s])
    del loss
    total_ms = do_bench(both)
    return fwd_ms, bwd_ms, total_ms, peak


def _versions():
    out = {"torch": torch.__version__}
    for pkg in ("triton", "inf-cl", "matplotlib"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "absent"
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, cwd=here, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["commit"] = "unknown"
    return out


def _peak(gpu):
    return next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)


def _write_markdown(rows, gpu, versions, path):
    peak = _peak(gpu)
    lines = [f"# Kernel benchmark on {gpu}", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", "",
             f"Median ms by triton.testing.do_bench; memory is the peak above the inputs; TFLOP/s counts "
             f"8 N^2 D (contrastive) or 6 N^2 D (sigmoid, structure) for every provider; "
             + (f"floor = that / {peak} TFLOP/s." if peak else "floor: no peak rate known here."),
             "", "| op | provider | N | D | fwd ms | bwd ms | total ms | peak MB | TFLOP/s | floor |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        frac = f"{r['tflops'] / peak:.2f}" if peak and isinstance(r["tflops"], float) else ""
        cells = [r["op"], r["provider"], r["N"], r["D"]] + [
            f"{r[k]:.2f}" if isinstance(r[k], float) else r[k] for k in ("fwd_ms", "bwd_ms", "total_ms", "peak_mem_mb")]
        cells += [f"{r['tflops']:.0f}" if isinstance(r["tflops"], float) else "", frac]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _plot(rows, gpu, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    ops_ = sorted({r["op"] for r in rows})
    dims = sorted({r["D"] for r in rows})
    fig, axes = plt.subplots(len(ops_), len(dims), figsize=(5 * len(dims), 4 * len(ops_)), squeeze=False)
    for i, op in enumerate(ops_):
        for j, D in enumerate(dims):
            ax = axes[i][j]
            for prov in sorted({r["provider"] for r in rows if r["op"] == op}):
                pts = [(r["N"], r["total_ms"]) for r in rows
                       if r["op"] == op and r["D"] == D and r["provider"] == prov and isinstance(r["total_ms"], float)]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=prov)
            ax.set(xscale="log", yscale="log", xlabel="N", ylabel="fwd+bwd ms", title=f"{op}, D={D}")
            ax.legend()
    fig.suptitle(gpu)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _device_name():
    """The GPU's name, or None (after saying why) when this run cannot go on."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fused_losses is imported (_loss_fn)
        return f"cpu ({os.cpu_count()} cores, Triton interpreter)"
    if not torch.cuda.is_available():
        print("bench/losses.py: no CUDA GPU on this machine, nothing to benchmark.")
        return None
    return torch.cuda.get_device_name()


def main(argv):
    _override(argv)
    gpu = _device_name()
    if gpu is None:
        return
    dt = getattr(torch, dtype)
    versions = _versions()
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "losses.csv")
    if os.path.exists(csv_path):
        os.remove(csv_path)  # this run's rows only, each appended as it is measured
    rows = []
    for op in ops.split(","):
        for D in [int(x) for x in ds.split(",")]:
            for N in [int(x) for x in ns.split(",")]:
                for prov in providers.split(","):
                    fn = _loss_fn(op, prov)
                    if fn is None:
                        continue
                    row = dict(op=op, provider=prov, N=N, D=D, dtype=dtype, gpu=gpu,
                               fwd_ms="", bwd_ms="", total_ms="", peak_mem_mb="", tflops="")
                    try:
                        fwd_ms, bwd_ms, total_ms, peak = _measure(fn, N, D, dt)
                        row.update(fwd_ms=fwd_ms, bwd_ms=bwd_ms, total_ms=total_ms, peak_mem_mb=peak,
                                   tflops=FLOPS_PER_N2D[op] * N * N * D / total_ms / 1e9)
                    except torch.cuda.OutOfMemoryError:
                        row["fwd_ms"] = "out of memory"
                    except Exception as e:  # a provider that fails is a row, not the end of the sweep
                        row["fwd_ms"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    rows.append(row)
                    append_row(csv_path, {k: row[k] for k in COLUMNS})
                    print(", ".join(f"{k}={row[k]:.3f}" if isinstance(row[k], float) else f"{k}={row[k]}"
                                    for k in COLUMNS[:-1]), flush=True)
    _write_markdown(rows, gpu, versions, os.path.join(out_dir, "losses.md"))
    _plot(rows, gpu, os.path.join(out_dir, "losses.png"))
    print(f"wrote {csv_path} and losses.md ({gpu}; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ")")


if __name__ == "__main__":
    main(sys.argv[1:])
