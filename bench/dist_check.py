"""
The fused losses' distributed path on one GPU over NCCL (world size 1), for bench/gpu_check.py:

    python -m torch.distributed.run --standalone --nproc_per_node=1 -m bench.dist_check \
        --out_csv=rows.csv

Checks, each a CSV row (check, case, outcome, value, note):
  - contrastive_loss and sigmoid_loss with the default process group (group=None once it is
    initialised) give bitwise what they gave before the group existed, and meet
    tests/tolerance.py's rule against fp64 (error at most twice the PyTorch reference's own in the
    input dtype, plus 2^-20 of the largest value);
  - the gather helpers' collectives run over NCCL (all_gather_into_tensor, reduce_scatter_tensor)
    and, at world size 1, are the identity, forward and backward.
At world size 1 the losses skip their collectives (world > 1 in fused_losses): hence the second.
Without a GPU: gloo on the CPU, the kernels in Triton's interpreter (a test of this script).
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench.csvlog import append_row

# -----------------------------------------------------------------------------
rows = 4096             # the batch (names that torchrun's own options do not abbreviate)
width = 512             # feature width
dtype = "bfloat16"      # float32 | bfloat16 | float16 (float32 on the CPU)
out_csv = "out/dist_check.csv"
# -----------------------------------------------------------------------------


def features(dev, dt):
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(rows, width, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(rows, width, generator=g, dtype=torch.float64), dim=-1)
    return a.to(dev, dt), b.to(dev, dt)


def loss_and_grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def fp64_rule(ours, lowp, ref):
    """Largest err / (2 x PyTorch's err + floor) over the loss and the gradients: <= 1 passes."""
    worst = 0.0
    for o, t, r in zip(ours, lowp, ref):
        err = (o.double() - r).abs().max().item()
        base = (t.double() - r).abs().max().item()
        worst = max(worst, err / (2 * base + 2**-20 * r.abs().max().item() + 1e-300))
    return worst


def record(check, case, ok, value, note):
    out = dict(check=check, case=case, outcome="passed" if ok else "failed", value=value, note=note)
    print(", ".join(f"{k}={v}" for k, v in out.items()), flush=True)
    append_row(out_csv, out)


def loss_cases(dev, dt):
    from fused_losses import (contrastive_loss, contrastive_loss_reference, sigmoid_loss,
                              sigmoid_loss_reference)
    a, b = features(dev, dt)
    s = torch.tensor(14.3, device=dev)
    t = torch.tensor(-10.0, device=dev)
    return {"contrastive": (contrastive_loss, contrastive_loss_reference, (a, b, s)),
            "sigmoid": (sigmoid_loss, sigmoid_loss_reference, (a, b, s.new_tensor(10.0), t))}


def before_group(dev, dt):
    """Each loss's (loss, gradients) before init_process_group: no group at all."""
    return {name: loss_and_grads(fn, x) for name, (fn, _, x) in loss_cases(dev, dt).items()}


def check_losses(dev, dt, alone, backend):
    for name, (fn, ref_fn, x) in loss_cases(dev, dt).items():
        ours = loss_and_grads(fn, x)  # group=None: the default group now
        same = all(torch.equal(p, q) for p, q in zip(ours, alone[name]))
        record(f"{backend} world 1", f"{name}_loss, default group = no group", same, int(same),
               "bitwise")
        lowp = loss_and_grads(ref_fn, x)
        ref = loss_and_grads(ref_fn, [v.double() for v in x])
        worst = fp64_rule(ours, lowp, ref)
        case = f"{name}_loss vs fp64 ({dt}, N={rows}, D={width})"
        record(f"{backend} world 1", case, worst <= 1, worst,
               "err / (2 x reference's err + floor), <= 1 passes")


def check_collectives(dev, dt, backend):
    from fused_losses import contrastive as C
    group = dist.group.WORLD
    x = torch.randn(rows, width, device=dev).to(dt)
    same = torch.equal(C._all_gather(x, group), x)
    record(f"{backend} world 1", "all_gather_into_tensor = identity", same, int(same), "bitwise")
    same = torch.equal(C._reduce_scatter(x.float(), group), x.float())
    record(f"{backend} world 1", "reduce_scatter_tensor = identity", same, int(same),
           "bitwise (gloo: all_reduce)")
    leaf = x.float().requires_grad_()
    y = C._AllGather.apply(leaf, group)
    y.backward(torch.ones_like(y))
    same = torch.equal(y, leaf) and torch.equal(leaf.grad, torch.ones_like(leaf))
    record(f"{backend} world 1", "gather with grad: forward and backward", same, int(same),
           "bitwise")


def main():
    from configurator import configure
    configure(globals())
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fused_losses is imported
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    dt = getattr(torch, dtype) if cuda else torch.float32
    if cuda:
        torch.cuda.set_device(dev)
    alone = before_group(dev, dt)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=60), device_id=dev if cuda else None)
    try:
        check_losses(dev, dt, alone, backend)
        check_collectives(dev, dt, backend)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
