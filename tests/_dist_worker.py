"""One rank of test_contrastive.py's two-process test (gloo, CPU). Usage: _dist_worker.py OUT_DIR
with MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE set. Rank k takes its rows of one global batch,
runs the public contrastive_loss and the reference through the default group, and saves its loss and
gradients to OUT_DIR/rank{k}.pt (rank 0 also saves the global inputs)."""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels.contrastive import contrastive_loss, contrastive_loss_reference

out_dir = sys.argv[1]
dist.init_process_group("gloo", timeout=timedelta(seconds=120))
rank, world = dist.get_rank(), dist.get_world_size()
n, D = 33, 40  # ragged against the interpreter's 32-wide tiles
g = torch.Generator().manual_seed(0)
a = F.normalize(torch.randn(world * n, D, generator=g), dim=-1)
b = F.normalize(torch.randn(world * n, D, generator=g), dim=-1)
s = torch.tensor(14.3)
rows = slice(rank * n, (rank + 1) * n)
result = {"n": n}
for name, fn in (("triton", contrastive_loss), ("reference", contrastive_loss_reference)):
    a_k, b_k, s_k = (t.clone().requires_grad_() for t in (a[rows], b[rows], s))
    loss = fn(a_k, b_k, s_k)  # group=None: the default group, initialised above
    loss.backward()
    result[name] = [loss.detach(), a_k.grad, b_k.grad, s_k.grad]
torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
if rank == 0:
    torch.save((a, b, s), os.path.join(out_dir, "inputs.pt"))
dist.barrier()
dist.destroy_process_group()
