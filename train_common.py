"""
What the stage scripts share: the torchrun set-up, the learning-rate schedule, the global batch of
a step, files swapped in whole (atomic_write), checkpoints (safetensors + optimizer state + JSON)
with the identity of the run they belong to (settings and input fingerprints, checked on resume),
and the step log line. Of the project it imports embedder.py only (model.py imports this one).
"""

import functools
import hashlib
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from embedder import read_spec

def setup_distributed(backend=None):
    """(ddp, rank, world, device) from torchrun's environment; one process when RANK is unset.
    backend: None = nccl on GPUs, gloo on CPUs."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, "cuda" if cuda else "cpu"
    dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device

def teardown_distributed():
    """Wait for every rank (rank 0 may still be writing the outputs), then leave the process group:
    a rank that tears down its gloo connections while a peer still holds them can abort at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

def cosine_lr(step, lr, min_lr, warmup_steps, max_steps):
    """Linear warm-up over warmup_steps, then cosine from lr down to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(t, 1.0))) * (lr - min_lr)

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)

def _mix(x):
    """splitmix64's finaliser on a uint64 array (a bijective, well-mixing 64-bit hash; wraps mod
    2^64)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))

def permute(positions, n, key, rounds=6):
    """A keyed bijection of [0, n) applied to `positions` (an int array): the image at each position
    of a shuffled order, in O(len(positions)) time and memory whatever n is.

    A balanced Feistel network on 2h-bit integers (2^2h >= n, the smallest such h): each round maps
    (L, R) -> (R, L xor F_k(R)) with F_k = splitmix64(R xor k) cut to h bits, which is invertible
    whatever F is, so the network permutes [0, 2^2h). Cycle walking makes it a permutation of
    [0, n): a value >= n is sent through the network again until it lands below n (it must: it lies
    on a cycle through the starting position, which is < n). 2^2h < 4n, so under 4 passes on
    average. Round keys come from `key` (e.g. (seed, epoch)) through numpy's SeedSequence."""
    x = np.asarray(positions, dtype=np.uint64)
    if n < 1 or (x.size and int(x.max()) >= n):
        raise ValueError(f"permute: positions must lie in [0, {n})")
    h = max(1, ((n - 1).bit_length() + 1) // 2)
    shift, mask = np.uint64(h), np.uint64((1 << h) - 1)
    keys = np.random.SeedSequence(list(key)).generate_state(rounds, np.uint64)

    def network(v):
        left, right = v >> shift, v & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << shift) | right

    y = network(x)
    out = y >= np.uint64(n)
    while out.any():
        y[out] = network(y[out])
        out = y >= np.uint64(n)
    return y.astype(np.int64)

def global_batch(seed, step, n_images, G, fixed=False):
    """(epoch, image indices (G,) int64, a generator for caption choices) of one global batch of G
    images: a function of (seed, step) only, so a resumed run and any number of ranks see the same
    samples. Epoch e visits the images in the order of permute(., n_images, (seed, e)), G at a time;
    its last n_images % G positions wait for a later epoch (they are other images in each epoch's
    order). O(G) per step, whatever n_images is. fixed: step 0's batch forever."""
    if fixed:
        step = 0
    if n_images < G:
        raise ValueError(f"{n_images} images, fewer than one global batch ({G})")
    n_full = n_images - n_images % G
    epoch, offset = divmod(step * G, n_full)
    images = permute(np.arange(offset, offset + G), n_images, (seed, epoch))
    return epoch, images, np.random.default_rng([seed, step])

# -----------------------------------------------------------------------------
# files swapped in whole

def atomic_write(path, write):
    """write(tmp) into a temporary name, then swap it in: a kill never leaves a half-written file
    or folder at `path`. A folder being replaced is first renamed to `path.old` (removed after the
    swap); `recover(path)` brings it back if a kill fell between the two renames."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)

def write_json(path, obj):
    """A JSON file written through atomic_write."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)

def recover(path):
    """After a kill inside atomic_write: the previous complete folder is at `path.old`."""
    if not os.path.exists(path) and os.path.isdir(path + ".old"):
        os.replace(path + ".old", path)
    return path

# -----------------------------------------------------------------------------
# checkpoints, and what they were made from: resuming with anything else is refused

FINGERPRINTS = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                            "nano-llm2clip", "fingerprints.json")

def sha256_files(paths):
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()

def files_fingerprint(files):
    """sha256 of the files' bytes (in the given order), remembered per (real path, size, mtime,
    inode) of each in FINGERPRINTS: an unchanged 16 GB model or 1 GB adaptor is not rehashed at
    every start; a changed file changes the key and is hashed again. Best effort: a read-only home
    only costs the rehash."""
    key = json.dumps([[os.path.realpath(p), s.st_size, s.st_mtime_ns, s.st_ino]
                      for p, s in zip(files, map(os.stat, files))])
    try:
        with open(FINGERPRINTS) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    sha = sha256_files(files)
    try:
        os.makedirs(os.path.dirname(FINGERPRINTS), exist_ok=True)
        tmp = f"{FINGERPRINTS}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({**known, key: sha}, f)
        os.replace(tmp, FINGERPRINTS)
    except OSError:
        pass
    return sha

@functools.lru_cache(maxsize=None)
def model_fingerprint(path):
    """sha256 of an HF model folder's config.json and every safetensors file: any change of weights
    gives another fingerprint (what caches and text.json record of their LLM). Remembered as
    files_fingerprint does, so an unchanged 8B model (16 GB) is not rehashed at every start."""
    names = ["config.json"] + sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    return files_fingerprint([os.path.join(path, n) for n in names])

def _sha(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()

# what tokenizing a text reads: a tokenizer's fingerprint, and what an exported LLM folder copies
# (with the chat template and generation config, which change no token of a caption)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")

def input_fingerprint(name, path, manifest=None, fields=()):
    """What an input of a run holds, as a sha256, by the setting's name:
    manifest   its index's record count, size, content sample and the caption fingerprints of
               `fields` (`manifest`: the run's manifest.Manifest);
    cache      its meta.json: the model's fingerprint, the embedding settings, each of `fields`'
               count and caption fingerprint (the rows are those of that model on those captions);
    tokenizer  the tokenizer files of the folder;
    otherwise  a folder: config.json + weights of an HF model (model_fingerprint, what caches and
               text.json record), or the .json + .safetensors files of another folder (an
               adaptor)."""
    if name == "manifest":
        m = manifest.meta
        return _sha(dict(lines=m["lines"], size=m["size"], sample=m["sample_sha256"],
                         fields={f: manifest.fingerprint(f) for f in fields}))
    if name == "cache":  # (older caches read with the defaults of the fields they lack: read_spec)
        _, meta = read_spec(os.path.join(path, "meta.json"))
        return _sha({**{k: v for k, v in meta.items()
                        if k not in ("model", "manifest", "complete", "over_length", "fields",
                                     "files")},
                     "fields": {f: meta["fields"].get(f) for f in fields}})
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{name}={path!r}: no such folder")
    if name == "tokenizer":
        return files_fingerprint([os.path.join(path, n) for n in TOKENIZER_FILES
                                  if os.path.isfile(os.path.join(path, n))])
    if os.path.isfile(os.path.join(path, "config.json")):
        return model_fingerprint(path)
    return files_fingerprint(sorted(os.path.join(path, n) for n in os.listdir(path)
                                    if n.endswith((".json", ".safetensors"))))

def run_identity(config, settings, inputs, manifest=None, fields=()):
    """What a run is made from, saved with its checkpoints and compared on resume (load_checkpoint):
    settings: names of config values that decide the model's sizes, the data and its order, or the
              run's length; compared by value;
    inputs:   names of config values that are paths to what the run reads (manifest, models, cache,
              adaptor, tokenizer); recorded with their path and compared by content
              (input_fingerprint), so a moved copy resumes and another file at the same path does
              not. An empty path is recorded as such.
    manifest, fields: the run's manifest.Manifest and the caption fields it reads (for manifest and
              cache)."""
    return {"settings": {k: config[k] for k in settings},
            "inputs": {k: {"path": config[k],
                           "fingerprint": input_fingerprint(k, config[k], manifest, fields)
                           if config[k] else ""}
                       for k in inputs}}

def save_checkpoint(path, tensors, opt, step, config, identity):
    """tensors (name -> tensor) to weights.safetensors, the optimizer to optimizer.pt, {step,
    config, identity (run_identity)} to state.json; written beside `path`, swapped in whole
    (atomic_write)."""
    def write(tmp):
        os.makedirs(tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  os.path.join(tmp, "weights.safetensors"))
        torch.save(opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, "config": config, "identity": identity}, f, indent=2)
    atomic_write(path, write)

def _short(x):
    return (x[:12] + "...") if isinstance(x, str) and len(x) == 64 else repr(x)

def resume_faults(state, path, tensors, identity):
    """What keeps the checkpoint at `path` (its state.json: `state`) from resuming this run, from
    the state and the header of its weights (no tensor read): (names for a summary, one line per
    difference: 'what: checkpoint -> this run', every tensor included)."""
    old, names, lines = state["identity"], [], []
    for k, v in identity["settings"].items():
        if k not in old["settings"] or old["settings"][k] != v:
            names.append(k)
            lines.append(f"  {k}: {old['settings'].get(k, '(not recorded)')!r} -> {v!r}")
    for k, v in identity["inputs"].items():
        o = old["inputs"].get(k)
        if o is None or o["fingerprint"] != v["fingerprint"]:
            names.append(k)
            was = f"{o['path']!r} (content {_short(o['fingerprint'])})" if o else "(not recorded)"
            lines.append(f"  {k}: {was} -> {v['path']!r} (content {_short(v['fingerprint'])})")
    with safe_open(os.path.join(path, "weights.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    bad = []  # tensors missing on either side or of another shape
    for k in sorted(set(shapes) | set(tensors)):
        want = tuple(tensors[k].shape) if k in tensors else None
        if shapes.get(k) != want:
            bad.append(f"{k} {shapes.get(k, '(missing)')} -> {want or '(missing)'}")
            lines.append(f"  tensor {k}: " + ("missing" if k not in shapes else str(shapes[k]))
                         + " in the checkpoint, "
                         + ("not in this run" if want is None else f"{want} in this run"))
    if bad:
        names.append(f"{len(bad)} tensor(s) (e.g. {bad[0]})" if len(bad) > 1 else
                     f"tensor {bad[0]}")
    return names, lines

def load_checkpoint(path, tensors, opt, identity):
    """Load a save_checkpoint folder into `tensors` and `opt`; return its step. Refused before any
    tensor is read if the checkpoint was made from other settings or inputs (identity: run_identity
    of this run), or holds other tensors or shapes: one error naming each (checkpoint -> this
    run)."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    if "identity" not in state:
        raise ValueError(f"{path}: made by an older version that recorded neither its inputs' "
                         f"fingerprints nor its sizes, so resuming it cannot be checked; delete it "
                         f"or use another out_dir")
    names, lines = resume_faults(state, path, tensors, identity)
    if names:
        raise ValueError(f"{path}: cannot resume: this run differs in {', '.join(names)}; resume "
                         f"with what it was made with, or use another out_dir\n" + "\n".join(lines))
    for k, now in identity["inputs"].items():
        was = state["identity"]["inputs"][k]["path"]
        if was != now["path"] and int(os.environ.get("RANK", 0)) == 0:
            print(f"{path}: {k} moved: {was} -> {now['path']} (same content)")
    sd = load_file(os.path.join(path, "weights.safetensors"))
    with torch.no_grad():
        for k, v in tensors.items():
            v.copy_(sd[k])
    # weights_only=True: tensors and plain containers only, never pickled code
    opt_file = os.path.join(path, "optimizer.pt")
    opt.load_state_dict(torch.load(opt_file, weights_only=True, map_location="cpu"))
    return state["step"]

def nonfinite_error(step, loss, gnorm, rank, ckpt, manifest, images, more=""):
    """The FloatingPointError of a step whose loss or gradient norm is not finite, raised before the
    update: the step, both values, the batch's sources on this rank (the manifest lines of its
    images, and `more`: e.g. the cache rows of its captions) and the last good checkpoint."""
    lines = [int(i) + 1 for i in images]
    shown = ", ".join(map(str, lines[:8])) + (f" and {len(lines) - 8} more" if len(lines) > 8
                                              else "")
    last = "none yet"
    if os.path.isfile(os.path.join(ckpt, "state.json")):
        with open(os.path.join(ckpt, "state.json")) as f:
            last = f"step {json.load(f)['step']}"
    return FloatingPointError(
        f"step {step}: loss {float(loss):.4g} and gradient norm {float(gnorm):.4g} on rank {rank}; "
        f"stopped before the update. This rank's batch: {manifest} lines {shown}{more}. The last "
        f"good checkpoint is {ckpt} ({last})")

def _log_lines_upto(path, start):
    """The lines of the JSONL log at `path` whose step is at most `start` (none when start is 0)."""
    keep = []
    if start and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by the kill
                if step <= start:
                    keep.append(line if line.endswith("\n") else line + "\n")
    return keep

class StepLog:
    """One log line per call: step, the losses averaged over ranks, the other values, ms per step
    (since the previous line, after a CUDA synchronize; none on the first), samples/s and ETA.
    Rank 0 prints it (through `write`) and appends it as JSON to `path`. Every rank must call it
    (the average is an all-reduce). The log matches the model: a fresh run (start 0) starts a new
    log, and a resumed one keeps the lines up to its checkpoint's step (`start`) and drops those of
    the steps after it, which the killed run logged and this one redoes."""
    def __init__(self, path, max_steps, batch, master, write=print, start=0):
        self.file = None
        if master:
            lines = _log_lines_upto(path, start)
            def keep(tmp):
                with open(tmp, "w") as f:
                    f.writelines(lines)
            atomic_write(path, keep)
            self.file = open(path, "a")
        self.max_steps, self.batch, self.write = max_steps, batch, write
        self.t_last, self.step_last = None, 0

    def __call__(self, step, losses, **values):
        vals = torch.stack([v.detach().float() for v in losses.values()])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(vals)
            vals /= dist.get_world_size()
        if vals.is_cuda:
            torch.cuda.synchronize()
        now = time.time()
        ms = (now - self.t_last) * 1000 / (step - self.step_last) if self.t_last else float("nan")
        self.t_last, self.step_last = now, step
        if self.file is None:
            return
        rec = {"step": step, **dict(zip(losses, vals.tolist())),
               **{k: float(torch.as_tensor(v).detach()) for k, v in values.items()}}
        self.write(f"step {step}/{self.max_steps} | " +
                   " | ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in list(rec.items())[1:]) +
                   f" | {ms:.0f} ms/step | {self.batch * 1000 / ms:.1f} samples/s | "
                   f"ETA {(self.max_steps - step) * ms / 1000:.0f}s")
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
