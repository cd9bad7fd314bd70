"""
Stage 2 at the recipes' shapes on one GPU, random weights: a CLIP ViT-L/14 (model.py's ViT) and
LLM2CLIP's adaptor over synthetic cached LLM embeddings (D = 4096, Llama-3-8B's width, as in
config/stage2_llm2clip_vitl14_*.py), trained as train_stage2.py trains them: activation
checkpointing, bf16 autocast, fused AdamW, gradient clipping, the fused contrastive loss (or its
PyTorch reference).

    python -m bench.stage2                      # 224 and 336 px: the recipes' batch, then the
                                                # largest that fits (about 2 minutes on an H100)
    python -m bench.stage2 --image_sizes=336 --search=False
    python -m bench.stage2 --check=precision    # a small tower: a bf16 autocast step vs fp32
    python -m bench.stage2 --tiny=True          # toy tower and batches on the CPU (a test)

speed: per image size and loss, samples/s over `steps` steps after a warm-up step, and the peak
GPU memory (weights, gradients, AdamW's moments, activations: torch.cuda.max_memory_allocated);
then the batch doubled from the recipe's until a step runs out of memory. One GPU: the loss sees
the local batch, where the recipes' 8 GPUs gather 4096 columns (a few ms and MiB of the step).
precision: the same step on the same batch and weights in fp32 (TF32 off) and in bf16 autocast,
for each loss: the relative difference of the loss, the gradient norm and the whole gradient.
Rows are appended to out_csv as they are measured.
"""

import gc
import math
import os
import runpy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M
from bench.csvlog import append_row

# -----------------------------------------------------------------------------
check = "speed"            # speed | precision
image_sizes = "224,336"    # each reads the batch of config/stage2_llm2clip_vitl14_<size>.py
batch_size = 0             # images per step; 0 = the recipe's batch_size
losses = "ours,torch"      # the fused contrastive_loss, its PyTorch reference
steps = 3                  # timed steps, after one warm-up step
search = True              # double the batch from the recipe's until a step runs out of memory
max_doublings = 4          # at most this many doublings
tiny = False               # a toy tower and batches (CPU): a test of this script, not a measurement
out_csv = "out/bench_stage2.csv"
seed = 0
# -----------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,  # as OpenAI's
               num_attention_heads=16, patch_size=14, hidden_act="quick_gelu")  # CLIP ViT-L/14
EMBED_DIM = 1280   # LLM2CLIP's fresh projection (the recipes' embed_dim)
LLM_DIM = 4096     # Llama-3-8B's hidden size: the cache's width
TOY_VIT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               patch_size=14, hidden_act="quick_gelu")
SMALL_VIT = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,  # the precision
                 num_attention_heads=4, patch_size=14, hidden_act="quick_gelu")  # check's tower
TOLERANCE = {"loss": 1e-2, "grad norm": 5e-2, "gradient": 0.15}  # bf16 autocast against fp32


class Net(nn.Module):
    """train_stage2.Stage2 without its options: image tower, adaptor, log of the logit scale."""

    def __init__(self, vit, adaptor):
        super().__init__()
        self.vit, self.text = vit, adaptor
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial 1/0.07

    def forward(self, pixels, cached):
        img = F.normalize(self.vit(pixels).float(), dim=-1)
        return img, F.normalize(self.text(cached).float(), dim=-1)


def device():
    return torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")


def loss_fn(name):
    from fused_losses import contrastive_loss, contrastive_loss_reference
    return {"ours": contrastive_loss, "torch": contrastive_loss_reference}[name]


def build(vit_shape, image_size, embed_dim, llm_dim, dev):
    """Net (random weights, train mode, activation checkpointing as the recipes) and its AdamW."""
    torch.manual_seed(seed)
    with torch.device(dev):
        vit = M.ViT(M.ViTConfig(image_size=image_size, projection_dim=embed_dim, **vit_shape))
        net = Net(vit, M.Adaptor.for_method("llm2clip", llm_dim, embed_dim))
    for m in net.modules():  # as train_stage2.py does
        if hasattr(m, "grad_checkpointing"):
            m.grad_checkpointing = True
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6,
                            weight_decay=0.05, fused=True)
    return net.train(), opt


def synthetic_batch(n, image_size, llm_dim, dev):
    g = torch.Generator(device=dev).manual_seed(seed + n)
    pixels = torch.randn(n, 3, image_size, image_size, device=dev, generator=g)
    return pixels, torch.randn(n, llm_dim, device=dev, generator=g)


def autocast(dev, enabled=True):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=enabled)


def train_step(net, opt, pixels, cached, loss, amp):
    """train_stage2.py's step: forward and loss under autocast, backward, clip at 5, AdamW."""
    with amp:
        img, txt = net(pixels, cached)
        value = loss(img, txt, net.logit_scale.exp())
    opt.zero_grad(set_to_none=True)
    value.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
    opt.step()
    return value.detach()


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def free(opt, dev):
    """Drop the gradients and cached blocks left by a step (after an out-of-memory error too)."""
    opt.zero_grad(set_to_none=True)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def run_steps(net, opt, n, image_size, llm_dim, loss, n_steps, warm_up):
    """(seconds per step, peak GiB) over n_steps, after one untimed step when warm_up."""
    dev = device()
    pixels, cached = synthetic_batch(n, image_size, llm_dim, dev)
    if warm_up:  # (and the kernels' compilation)
        train_step(net, opt, pixels, cached, loss, autocast(dev))
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        train_step(net, opt, pixels, cached, loss, autocast(dev))
    sync(dev)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else ""
    return (time.perf_counter() - t0) / n_steps, peak


def out_of_memory(e):
    """The caching allocator's error, or a library's failed allocation (cuBLAS, cuDNN)."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or "ALLOC_FAILED" in str(e)


def timed(net, opt, n, image_size, llm_dim, loss, n_steps, warm_up=True):
    """run_steps, or ("out of memory", "") when a step runs out of GPU memory."""
    try:
        result = run_steps(net, opt, n, image_size, llm_dim, loss, n_steps, warm_up)
    except RuntimeError as e:  # OutOfMemoryError is one
        if not out_of_memory(e):
            raise
        result = ("out of memory", "")
    free(opt, device())  # after the except block: its traceback (and the activations) are gone
    return result


def recipe_batch(image_size):
    path = os.path.join(ROOT, "config", f"stage2_llm2clip_vitl14_{image_size}.py")
    return runpy.run_path(path)["batch_size"] if os.path.exists(path) else 512


def speed_row(image_size, loss_name, n, what, result):
    seconds, peak = result
    ok = isinstance(seconds, float)
    dev = device()
    return dict(image_size=image_size, loss=loss_name, batch=n, what=what,
                status="ok" if ok else seconds, step_s=seconds if ok else "",
                samples_per_s=n / seconds if ok else "", peak_gib=peak,
                device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu")


def record(row):
    print(", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
          flush=True)
    append_row(out_csv, row)


def speed(image_size):
    """The recipe's batch with each loss, then the doubling search with each loss."""
    shape, embed, llm = (TOY_VIT, 64, 128) if tiny else (VIT_L14, EMBED_DIM, LLM_DIM)
    n0 = batch_size or (4 if tiny else recipe_batch(image_size))
    net, opt = build(shape, image_size, embed, llm, device())
    names = losses.split(",")
    for name in names:
        result = timed(net, opt, n0, image_size, llm, loss_fn(name), steps)
        record(speed_row(image_size, name, n0, "recipe batch", result))
    if not search:
        return
    for name in names:
        n = n0
        for _ in range(max_doublings):
            n *= 2
            result = timed(net, opt, n, image_size, llm, loss_fn(name), 1, warm_up=False)
            record(speed_row(image_size, name, n, "largest-batch search", result))
            if not isinstance(result[0], float):
                break


def gradients(net, pixels, cached, loss, amp):
    """(loss, flat fp32 gradient) of one forward and backward, without an update."""
    net.zero_grad(set_to_none=True)
    with amp:
        img, txt = net(pixels, cached)
        value = loss(img, txt, net.logit_scale.exp())
    value.backward()
    flat = torch.cat([p.grad.float().flatten() for p in net.parameters() if p.grad is not None])
    return value.detach().double(), flat.double()


def rel(x, y):
    return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()


def precision_rows(a, b, what, tolerance):
    """Rows comparing (loss, gradient) a against b; each passes within its tolerance."""
    (la, ga), (lb, gb) = a, b
    values = {"loss": rel(la, lb), "grad norm": rel(ga.norm(), gb.norm()), "gradient": rel(ga, gb)}
    return [dict(check=what, case=f"{k} rel diff", value=v, note=f"tolerance {tolerance[k]:g}",
                 outcome="passed" if v <= tolerance[k] else "failed") for k, v in values.items()]


def precision():
    """One step's loss and gradients in fp32 and in bf16 autocast: same weights, same batch."""
    dev = device()
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 side is fp32
    torch.backends.cudnn.allow_tf32 = False
    n, image_size = (16, 28) if tiny else (256, 56)
    net, _ = build(SMALL_VIT, image_size, 128, 512, dev)
    for m in net.modules():  # nothing to save here; the plain path
        if hasattr(m, "grad_checkpointing"):
            m.grad_checkpointing = False
    pixels, cached = synthetic_batch(n, image_size, 512, dev)
    fp32 = {}
    for name in losses.split(","):
        fp32[name] = gradients(net, pixels, cached, loss_fn(name), autocast(dev, enabled=False))
        bf16 = gradients(net, pixels, cached, loss_fn(name), autocast(dev))
        what = f"stage-2 step, bf16 autocast vs fp32 ({name} loss)"
        for row in precision_rows(bf16, fp32[name], what, TOLERANCE):
            record(row)
    if {"ours", "torch"} <= set(fp32):
        tight = {k: 1e-4 for k in TOLERANCE}
        what = "stage-2 step fp32, ours vs torch loss"
        for row in precision_rows(fp32["ours"], fp32["torch"], what, tight):
            record(row)


def main():
    from configurator import check as check_settings
    from configurator import configure
    configure(globals())
    check_settings(globals(), positive=("max_doublings", "steps"), nonnegative=("batch_size",),
                   choices={"check": ("speed", "precision")})
    if check == "precision":
        precision()
        return
    for size in image_sizes.split(","):
        speed(int(size))


if __name__ == "__main__":
    main()
