"""One rank of the two-process tests (gloo, CPU). Usage: _dist_worker.py OUT_DIR [contrastive|sigmoid]
with MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE set. Rank k takes its rows of one global batch,
runs the public loss (contrastive_loss by default, or sigmoid_loss) and its reference through the
default group, and saves its loss and gradients (features, then the scalars) to OUT_DIR/rank{k}.pt
(rank 0 also saves the global inputs)."""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fused_losses.contrastive import contrastive_loss, contrastive_loss_reference
from fused_losses.sigmoid import sigmoid_loss, sigmoid_loss_reference

out_dir = sys.argv[1]
loss_name = sys.argv[2] if len(sys.argv) > 2 else "contrastive"
dist.init_process_group("gloo", timeout=timedelta(seconds=120))
rank, world = dist.get_rank(), dist.get_world_size()
n, D = 33, 40  # ragged against the interpreter's 32-wide tiles
g = torch.Generator().manual_seed(0)
a = F.normalize(torch.randn(world * n, D, generator=g), dim=-1)
b = F.normalize(torch.randn(world * n, D, generator=g), dim=-1)
if loss_name == "contrastive":
    fns, scalars = (contrastive_loss, contrastive_loss_reference), (torch.tensor(14.3),)
else:  # sigmoid: scale s and bias t
    fns, scalars = (sigmoid_loss, sigmoid_loss_reference), (torch.tensor(10.0), torch.tensor(-3.0))
rows = slice(rank * n, (rank + 1) * n)
result = {"n": n}
for name, fn in zip(("triton", "reference"), fns):
    a_k, b_k, *sc = (t.clone().requires_grad_() for t in (a[rows], b[rows], *scalars))
    loss = fn(a_k, b_k, *sc)  # group=None: the default group, initialised above
    loss.backward()
    result[name] = [loss.detach(), a_k.grad, b_k.grad] + [x.grad for x in sc]
torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
if rank == 0:
    torch.save((a, b, *scalars), os.path.join(out_dir, "inputs.pt"))
dist.barrier()
dist.destroy_process_group()
# Leave without running interpreter teardown: gloo's helper threads can still be joinable when
# Python's finalisers run, and then libstdc++ aborts the process ("terminate called without an
# active exception", exit -6) after all the work above has been saved. CI saw that once in ~10 runs.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
