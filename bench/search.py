"""
search.py's speed on this machine: images indexed per second and query latency (1 and 100 text
queries, the text model and the scan) over the demo's 500 test grids, then the scan alone over
synthetic indexes of 100k and 1M rows, with the memory the scan adds (flat in the index size).

    python -m bench.search --demo=out/demo_seed5    # a finished demo's models; or demo="" to skip

Indexing runs search.open_index into a fresh folder, twice (the better rate is reported: the
files in the page cache; model load not counted; the grids are 64 px PNGs). A query is
encode_texts + search.top_k; the LLM is loaded by a warm-up query first. Times
are medians over `repeats` runs; the synthetic index is read from the page cache (written just
before: "warm"). Memory: what one scan adds to the resident set of a fresh process at its peak
(Linux's VmHWM minus VmRSS before the scan). Prints a Markdown table and writes it to
bench/results/search.md.
"""

import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import search as S
from encoder import load_encoder
from manifest import Manifest

# -----------------------------------------------------------------------------
demo = "out/demo"                # a finished demo's output folder ("" = synthetic part only)
data = "data/fashion/out"        # its data (test.jsonl, the images)
models = "base_clip,llm2clip"    # the demo's models to time
workers = "0,1"                  # search.py's num_workers to index with (DataLoader processes)
sizes = "100000,1000000"         # rows of the synthetic indexes
dim = 256                        # their width (the demo's joint space)
block = 65536                    # rows per step of the scan (search.py's default)
repeats = 5
threads = 0                      # torch's threads (0 = its default: every core)
work = "out/bench_search"        # scratch folder (indexes; removed at the end)
out_md = "bench/results/search.md"
# -----------------------------------------------------------------------------

def median_ms(fn, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)

PEAK = """
import sys, torch
import search
def kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
torch.set_num_threads(int(sys.argv[4]))
q = torch.nn.functional.normalize(torch.randn(int(sys.argv[2]), int(sys.argv[3])), dim=-1)
before = kb("VmRSS")
search.top_k(sys.argv[1], q, 5, int(sys.argv[5]))
print((kb("VmHWM") - before) / 1024)
"""

def peak_added_mb(npy, q):
    """MB the scan of `npy` with q queries adds to a fresh process's resident set at its peak
    (Linux's /proc; None elsewhere)."""
    if not os.path.exists("/proc/self/status"):
        return None
    r = subprocess.run([sys.executable, "-c", PEAK, npy, str(q), str(dim),
                        str(torch.get_num_threads()), str(block)], capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return float(r.stdout.split()[-1])

def demo_rows():
    man = Manifest(os.path.join(data, "test.jsonl"))
    captions = [man[i]["captions"]["long"][0] for i in range(100)]
    folder = os.path.join(data, "images", "test")
    rows = []
    for name in models.split(","):
        enc = load_encoder(os.path.join(demo, name, "model"))
        index = os.path.join(work, f"demo_{name}")
        for w in map(int, workers.split(",")):
            S.num_workers, rates = w, []
            for _ in range(2):  # the better of two: the files in the page cache
                shutil.rmtree(index, ignore_errors=True)
                t0 = time.perf_counter()
                meta = S.open_index(enc, index, folder)
                rates.append(meta["count"] / (time.perf_counter() - t0))
            rows.append((f"index the {meta['count']} test grids, {name}, num_workers={w}",
                         f"{max(rates):.0f} images/s"))
        npy = os.path.join(index, "embeddings.npy")
        enc.encode_texts(captions[:1])  # warm-up: the LLM loads on first use
        for n in (1, 100):
            ms = median_ms(lambda: S.top_k(npy, enc.encode_texts(captions[:n]), 5, block),
                           repeats if n == 1 else max(1, repeats // 2))
            scan = median_ms(lambda: S.top_k(npy, torch.randn(n, meta["dim"]), 5, block),
                             repeats)
            rows.append((f"{n} long caption{'s' if n > 1 else ''} -> top 5 of "
                         f"{meta['count']}, {name}", f"{ms:.1f} ms (scan {scan:.2f} ms)"))
    return rows

def synthetic_rows():
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in map(int, sizes.split(",")):
        npy = os.path.join(work, f"synthetic_{n}.npy")
        m = np.lib.format.open_memmap(npy, "w+", np.float16, (n, dim))
        for s in range(0, n, 1 << 16):
            x = torch.randn(min(1 << 16, n - s), dim, generator=g)
            m[s:s + len(x)] = torch.nn.functional.normalize(x, dim=-1).numpy()
        m.flush()
        del m
        gb = os.path.getsize(npy) / 1e9
        for q in (1, 100):
            queries = torch.nn.functional.normalize(torch.randn(q, dim, generator=g), dim=-1)
            ms = median_ms(lambda: S.top_k(npy, queries, 5, block), repeats)
            added = peak_added_mb(npy, q)
            rows.append((f"{q} quer{'ies' if q > 1 else 'y'} -> top 5 of {n:,} rows x {dim} "
                         f"(fp16, {gb:.2f} GB)", f"{ms:.0f} ms, {n / ms / 1e3:.1f} M rows/s, "
                         f"+{added:.0f} MB peak" if added is not None else f"{ms:.0f} ms"))
        os.remove(npy)
    return rows

def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")

def main():
    if threads:
        torch.set_num_threads(threads)
    os.makedirs(work, exist_ok=True)
    rows = demo_rows() if demo else []
    rows += synthetic_rows()
    shutil.rmtree(work, ignore_errors=True)
    load = ", load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    lines = [f"search.py on {machine()}{load}; block {block}, medians of {repeats}", "",
             "| measurement | result |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    print("\n".join(lines))
    os.makedirs(os.path.dirname(out_md) or ".", exist_ok=True)
    with open(out_md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out_md}", file=sys.stderr)

if __name__ == "__main__":
    from configurator import configure
    configure(globals())
    main()
