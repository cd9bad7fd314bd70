"""
What the stage scripts share: the torchrun set-up, the learning-rate schedule, the global batch of a
step, checkpoints (safetensors + optimizer state + JSON, swapped in whole) and the step log line.
"""

import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import model as M

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
    """Wait for every rank (rank 0 may still be writing the outputs), then leave the process group: a rank
    that tears down its gloo connections while a peer still holds them can abort at exit."""
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
    """splitmix64's finaliser on a uint64 array (a bijective, well-mixing 64-bit hash; wraps mod 2^64)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))

def permute(positions, n, key, rounds=6):
    """A keyed bijection of [0, n) applied to `positions` (an int array): the image at each position of a
    shuffled order, in O(len(positions)) time and memory whatever n is.

    A balanced Feistel network on 2h-bit integers (2^2h >= n, the smallest such h): each round maps
    (L, R) -> (R, L xor F_k(R)) with F_k = splitmix64(R xor k) cut to h bits, which is invertible whatever F
    is, so the network permutes [0, 2^2h). Cycle walking makes it a permutation of [0, n): a value >= n
    is sent through the network again until it lands below n (it must: it lies on a cycle through the
    starting position, which is < n). 2^2h < 4n, so under 4 passes on average. Round keys come from
    `key` (e.g. (seed, epoch)) through numpy's SeedSequence."""
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
    """(epoch, image indices (G,) int64, a generator for caption choices) of one global batch of G images:
    a function of (seed, step) only, so a resumed run and any number of ranks see the same samples.
    Epoch e visits the images in the order of permute(., n_images, (seed, e)), G at a time; its last
    n_images % G positions wait for a later epoch (they are other images in each epoch's order).
    O(G) per step, whatever n_images is. fixed: step 0's batch forever."""
    if fixed:
        step = 0
    if n_images < G:
        raise ValueError(f"{n_images} images, fewer than one global batch ({G})")
    n_full = n_images - n_images % G
    epoch, offset = divmod(step * G, n_full)
    images = permute(np.arange(offset, offset + G), n_images, (seed, epoch))
    return epoch, images, np.random.default_rng([seed, step])

def save_checkpoint(path, tensors, opt, step, config):
    """tensors (name -> tensor) to weights.safetensors, the optimizer to optimizer.pt, {step, config} to
    state.json; written beside `path` and swapped in whole (model.atomic_write)."""
    def write(tmp):
        os.makedirs(tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.path.join(tmp, "weights.safetensors"))
        torch.save(opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, "config": config}, f, indent=2)
    M.atomic_write(path, write)

def load_checkpoint(path, tensors, opt, config, must_match):
    """Load a save_checkpoint folder into `tensors` and `opt`; return its step. The settings named in
    must_match (those that decide the data order and the schedule) must equal the run's `config`."""
    sd = load_file(os.path.join(path, "weights.safetensors"))
    if set(sd) != set(tensors):
        raise KeyError(f"{path}: checkpoint tensors do not match the model's "
                       f"(e.g. {sorted(set(sd) ^ set(tensors))[:3]})")
    with torch.no_grad():
        for k, v in tensors.items():
            v.copy_(sd[k])
    opt.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True))
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    changed = [k for k in must_match if state["config"].get(k) != config[k]]
    if changed:
        raise ValueError(f"{path}: made with other {', '.join(changed)}; resuming would change the run "
                         f"(use another out_dir)")
    return state["step"]

class StepLog:
    """One log line per call: step, the losses averaged over ranks, the other values, ms per step (since
    the previous line, after a CUDA synchronize; none on the first), samples/s and ETA. Rank 0 prints it
    (through `write`) and appends it as JSON to `path`. Every rank must call it (the average is an
    all-reduce)."""

    def __init__(self, path, max_steps, batch, master, write=print):
        self.file = open(path, "a") if master else None
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
        rec = {"step": step, **dict(zip(losses, vals.tolist())), **{k: float(torch.as_tensor(v).detach()) for k, v in values.items()}}
        self.write(f"step {step}/{self.max_steps} | " + " | ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in list(rec.items())[1:]) +
                   f" | {ms:.0f} ms/step | {self.batch * 1000 / ms:.1f} samples/s | ETA {(self.max_steps - step) * ms / 1000:.0f}s")
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
