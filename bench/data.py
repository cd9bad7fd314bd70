"""
The data path at scale: synthetic manifests (and tar shards) of 10^4 to 10^7 images through the real
training command, and image decoding throughput per DataLoader worker.

    python -m bench.data                                  # the table (1e7 takes a while: an 8 GB manifest)
    python -m bench.data --sizes=2e4,2e6 --shard_sizes=   # the two sizes of the issue's probe
    python -m bench.data --sizes= --shard_sizes= --decode=True   # decoding throughput only

Each size N: a manifest of N records (3 short + 2 long captions each, a label) pointing at 8 real PNGs
(and, for `shard_sizes`, N JPEGs in img2dataset-style tar shards through data/webdataset/prepare.py), then
the command the issue's probe runs, twice: with no index (the first run builds it) and with the index:

    python train_stage2.py --method=clip --clip= --manifest=<m> --batch_size=64 --num_workers=2 --max_steps=40
        --vision_width=32 --vision_layers=1 --text_width=32 --text_layers=1 --image_size=32 --patch_size=8
        --tokenizer=data/smollm2/hf

measured from the outside: seconds from launch to the first step's log line, peak memory summed over
the training process and its DataLoader workers as PSS (/proc/<pid>/smaps_rollup, sampled every 50 ms:
memory maps shared by the processes count once), and ms/step (the last log line: steps 30-40; wall
clock, so on a shared machine it measures the load as much as the code). Index build time is what the
first run reports. Then the data path alone, in CPU time in one thread (data_path_cpu): what a step of 64
images costs the workers and the main process, insensitive to other load.
Decoding: CPU seconds per image in one thread (what one DataLoader worker spends; insensitive to other
load on the machine), train and eval transforms, 500x375 JPEGs (COCO/CC3M size) and larger ones, to 224
and 336, with and without JPEG draft decoding; the mean and max difference draft makes.
Out: out/bench_data/results.json and results.md (the tables, with the CPU's name).
"""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import torch
from PIL import Image

from images import CLIP_STD, ImageDataset, eval_transform, train_transform
from manifest import Manifest

# -----------------------------------------------------------------------------
sizes = "1e4,1e5,1e6,1e7"      # manifest sizes (images)
shard_sizes = "1e4,1e5"         # sizes also run from tar shards
steps = 40
batch_size = 64
num_workers = 2
tokenizer = "data/smollm2/hf"
work = "out/bench_data"         # synthetic data and runs (large: ~0.8 KB per manifest line)
decode = True                   # the decoding throughput table
decode_seconds = 2.0            # CPU seconds per decoding measurement
keep = False                    # keep the synthetic data afterwards
# -----------------------------------------------------------------------------
WORDS = ("a the red blue green black white small large shirt dress sneaker bag coat boot on left right top bottom of "
         "and with striped leather wool cotton long short sleeve collar pocket button zip heel strap pattern").split()


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    return f"{os.cpu_count()} cores"


def write_images(folder):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(8):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(os.path.join(folder, f"{k}.png"))


def caption_pool(rng, n, lo, hi):
    return [json.dumps(" ".join(rng.choice(WORDS, rng.integers(lo, hi)))) for _ in range(n)]


def write_manifest(path, n, image=lambda i: f"img/{i % 8}.png"):
    """n records of 3 short (4-12 words) + 2 long (40-80 words) captions, drawn from pools, and a label."""
    if os.path.isfile(path):
        return
    rng = np.random.default_rng(1)
    short, long = caption_pool(rng, 997, 4, 12), caption_pool(rng, 991, 40, 80)
    t = time.time()
    with open(path + ".tmp", "w") as f:
        block = []
        for i in range(n):
            block.append(f'{{"image": "{image(i)}", "captions": {{"short": [{short[i % 997]}, {short[(i * 7 + 1) % 997]}, '
                         f'{short[(i * 13 + 2) % 997]}], "long": [{long[i % 991]}, {long[(i * 3 + 5) % 991]}]}}, '
                         f'"label": {i % 1000}}}\n')
            if len(block) == 100000:
                f.writelines(block)
                block = []
        f.writelines(block)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}: {n} lines, {os.path.getsize(path) / 1e9:.2f} GB in {time.time() - t:.0f}s", flush=True)


def write_shards(folder, n, per_shard=10000):
    """n 32x32 JPEGs in img2dataset's layout (KEY.jpg, KEY.txt, KEY.json), 10,000 per shard."""
    if os.path.isdir(folder):
        return
    os.makedirs(folder + ".tmp", exist_ok=True)
    rng = np.random.default_rng(2)
    jpegs = []
    for k in range(16):
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(b, "JPEG", quality=90)
        jpegs.append(b.getvalue())
    short = [" ".join(rng.choice(WORDS, rng.integers(4, 12))).encode() for _ in range(997)]
    for s in range(0, n, per_shard):
        with tarfile.open(os.path.join(folder + ".tmp", f"{s // per_shard:05d}.tar"), "w") as tf:
            for i in range(s, min(n, s + per_shard)):
                key = f"{i:09d}"
                meta = json.dumps({"url": f"https://example.com/{key}.jpg", "key": key, "status": "success"}).encode()
                for name, data in ((f"{key}.jpg", jpegs[i % 16]), (f"{key}.txt", short[i % 997]), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    os.replace(folder + ".tmp", folder)


def descendants(pid):
    kids, found = {}, [pid]
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p))
    for p in found:
        found += kids.get(p, [])
    return found


def pss_kb(pid):
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def train_run(manifest, out_dir, extra=()):
    """One probe run: (seconds to the first step, peak summed PSS in GB, max process count, ms/step of the
    last log line, the index build seconds it reported or None)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "train_stage2.py", "--method=clip", "--clip=", f"--manifest={manifest}", f"--out_dir={out_dir}",
           f"--batch_size={batch_size}", f"--num_workers={num_workers}", f"--max_steps={steps}", "--vision_width=32",
           "--vision_layers=1", "--text_width=32", "--text_layers=1", "--image_size=32", "--patch_size=8",
           f"--tokenizer={tokenizer}", "--log_interval=10", *extra]
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first, lines, errs = [None], [], []

    def read_out():
        for line in p.stdout:
            lines.append(line)
            if first[0] is None and line.startswith("step 1/"):
                first[0] = time.time() - t0

    def read_err():
        errs.extend(p.stderr)
    threads = [threading.Thread(target=read_out), threading.Thread(target=read_err)]
    for t in threads:
        t.start()
    peak, procs = 0, 0
    while p.poll() is None:
        pids = descendants(p.pid)
        procs = max(procs, len(pids))
        peak = max(peak, sum(pss_kb(q) for q in pids))
        time.sleep(0.05)
    for t in threads:
        t.join()
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{''.join(errs)[-3000:]}")
    ms = [float(m.group(1)) for line in lines if (m := re.search(r"\| ([\d.]+) ms/step", line))]
    built = [float(m.group(1)) for line in errs if (m := re.search(r"indexed \d+ lines in ([\d.]+)s", line))]
    return dict(first_step_s=round(first[0], 1), pss_gb=round(peak / 1e6, 3), processes=procs, ms_per_step=ms[-1],
                index_s=built[0] if built else None)


def data_path_cpu(manifest, fields, n_steps=40):
    """CPU ms per step of the data path in one thread, in this process (what a step asks of the workers
    and the main process together: sampling, index lookups, reading and parsing lines, decoding and
    transforming 64 images, picking a caption): the same work the probe's run does, without the model,
    and insensitive to other load on the machine. The index exists (the runs built it)."""
    from train_common import global_batch
    torch.set_num_threads(1)
    man = Manifest(manifest).check(fields=fields)
    ds = ImageDataset(man, size=32, train=True, seed=1)
    t = time.process_time()
    for step in range(n_steps):
        epoch, images, rng = global_batch(1337, step, len(man), batch_size)
        for i in images.tolist():
            ds[(i, epoch)]
        for i, (a, b) in zip(images.tolist(), rng.random((batch_size, 2))):
            f = fields[int(a * len(fields))]
            lo, hi = man.row_range(f, i)
            man.captions(i, f)[int(b * (hi - lo))]
    return round((time.process_time() - t) / n_steps * 1000, 1)


def bench_size(n, shards):
    tag = f"{n:.0e}".replace("+0", "").replace("+", "") + ("_shards" if shards else "")
    folder = os.path.abspath(os.path.join(work, tag))
    os.makedirs(folder, exist_ok=True)
    manifest = os.path.join(folder, "m.jsonl")
    if shards:
        write_shards(os.path.join(folder, "shards"), n)
        if not os.path.isfile(manifest):
            r = subprocess.run([sys.executable, "data/webdataset/prepare.py", f"--shards={folder}/shards",
                                f"--out={manifest}", "--index=False"], capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(r.stderr[-3000:])
    else:
        write_images(os.path.join(folder, "img"))
        write_manifest(manifest, n)
    shutil.rmtree(manifest + ".index", ignore_errors=True)  # the first run builds it
    extra = ["--fields=short"] if shards else []  # alt-text only: shards have no long captions here
    first = train_run(manifest, os.path.join(folder, "run1"), extra)
    second = train_run(manifest, os.path.join(folder, "run2"), extra)
    cpu_ms = data_path_cpu(manifest, ["short"] if shards else ["short", "long"])
    row = dict(images=n, source="tar shards" if shards else "files", manifest_gb=round(os.path.getsize(manifest) / 1e9, 3),
               index_s=first["index_s"], index_gb=round(sum(os.path.getsize(os.path.join(manifest + ".index", f))
                                                             for f in os.listdir(manifest + ".index")) / 1e9, 3),
               first_run=first, second_run=second, data_path_cpu_ms=cpu_ms)
    print(json.dumps(row), flush=True)
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return row

# -----------------------------------------------------------------------------
# decoding

def natural_jpeg(w, h, seed):
    """A photo-like JPEG: smooth colour fields, sensor-like noise and a few hard edges (quality 90)."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (h // 24 + 2, w // 24 + 2, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    a = np.asarray(base).astype(np.int16) + rng.integers(-12, 13, (h, w, 3))
    a[h // 3:h // 3 + 4] = 250
    a[:, w // 2:w // 2 + 3, 1] = 10
    b = io.BytesIO()
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(b, "JPEG", quality=90)
    return b.getvalue()


def per_image_cpu(datas, fn):
    """CPU seconds per image of fn(jpeg bytes, k), repeated for decode_seconds of CPU time."""
    t, n = time.process_time(), 0
    while time.process_time() - t < decode_seconds:
        fn(datas[n % len(datas)], n)
        n += 1
    return (time.process_time() - t) / n


def bench_decode():
    torch.set_num_threads(1)  # one DataLoader worker: one thread
    rows = []
    for w, h in ((500, 375), (1000, 750), (2000, 1500)):
        datas = [natural_jpeg(w, h, s) for s in range(8)]
        for size in (224, 336):
            def run(mode, draft):
                def fn(data, k):
                    img = Image.open(io.BytesIO(data))
                    if mode == "train":
                        return train_transform(img, size, torch.Generator().manual_seed(k), draft=draft)
                    return eval_transform(img, size, draft=draft)
                return fn
            for mode in ("train", "eval"):
                plain, draft = run(mode, False), run(mode, True)
                t_plain, t_draft = [], []
                for _ in range(3):  # interleaved, best of 3: the least disturbed measurement of each
                    t_plain.append(per_image_cpu(datas, plain))
                    t_draft.append(per_image_cpu(datas, draft))
                diffs = [(plain(d, k) - draft(d, k)).abs() * torch.tensor(CLIP_STD).view(3, 1, 1) * 255
                         for k, d in enumerate(datas)]  # in 8-bit levels
                rows.append(dict(source=f"{w}x{h}", size=size, transform=mode, plain_img_s=round(1 / min(t_plain), 1),
                                 draft_img_s=round(1 / min(t_draft), 1), speedup=round(min(t_plain) / min(t_draft), 2),
                                 mean_abs_levels=round(float(torch.stack(diffs).mean()), 3),
                                 max_abs_levels=round(float(torch.stack(diffs).max()), 1)))
                print(json.dumps(rows[-1]), flush=True)
    return rows

# -----------------------------------------------------------------------------

def table(rows):
    out = ["| images | source | manifest GB | index build s | index GB | 1st run: first step s | 1st run: peak PSS GB | "
           "2nd run: first step s | 2nd run: peak PSS GB | processes | ms/step (wall) | data path ms/step (CPU) |",
           "|" + "---|" * 12]
    for r in rows:
        a, b = r["first_run"], r["second_run"]
        out.append(f"| {r['images']:,} | {r['source']} | {r['manifest_gb']} | {r['index_s']} | {r['index_gb']} | "
                   f"{a['first_step_s']} | {a['pss_gb']} | {b['first_step_s']} | {b['pss_gb']} | {b['processes']} | "
                   f"{b['ms_per_step']:.0f} | {r.get('data_path_cpu_ms', '-')} |")
    return "\n".join(out)


def decode_table(rows):
    out = ["| JPEG | to | transform | img/s per worker | with draft | speed-up | draft: mean / max abs diff (8-bit levels) |",
           "|" + "---|" * 7]
    out += [f"| {r['source']} | {r['size']} | {r['transform']} | {r['plain_img_s']} | {r['draft_img_s']} | {r['speedup']}x | "
            f"{r['mean_abs_levels']} / {r['max_abs_levels']} |" for r in rows]
    return "\n".join(out)


def main():
    os.makedirs(work, exist_ok=True)
    res_path = os.path.join(work, "results.json")
    results = json.load(open(res_path)) if os.path.isfile(res_path) else {}
    results.update(cpu=cpu_name(), torch=torch.__version__)
    runs = [(float(s), False) for s in sizes.split(",") if s] + [(float(s), True) for s in shard_sizes.split(",") if s]
    if runs and not os.path.isdir(tokenizer):
        sys.exit(f"{tokenizer}: no tokenizer; build it with: python data/smollm2/prepare.py")
    rows = {(r["images"], r["source"]): r for r in results.get("rows", [])}
    for n, shards in runs:
        r = bench_size(int(n), shards)
        rows[(r["images"], r["source"])] = r
        results["rows"] = sorted(rows.values(), key=lambda r: (r["source"], r["images"]))
        json.dump(results, open(res_path, "w"), indent=1)
    if decode:
        results["decode"] = bench_decode()
        json.dump(results, open(res_path, "w"), indent=1)
    md = [f"CPU: {results['cpu']}, torch {results['torch']}"]
    if results.get("rows"):
        md += ["", table(results["rows"])]
    if results.get("decode"):
        md += ["", decode_table(results["decode"])]
    open(os.path.join(work, "results.md"), "w").write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    from configurator import check, configure
    configure(globals())
    check(globals(), positive=("steps", "batch_size", "decode_seconds"), nonnegative=("num_workers",), folders=("work",))
    main()
