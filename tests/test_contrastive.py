"""Fused contrastive loss against an fp64 reference, on the CPU through Triton's interpreter (or
natively on a GPU with TEST_DEVICE=cuda: conftest.py).

Tolerance principle (flash-attention's): for the loss and every gradient, the max abs error of ours
against fp64 (the same formula in float64 on the same rounded inputs) must be at most twice the max
abs error of PyTorch's own computation in the input dtype, plus a floor of 2^-20 (16 fp32 ulps) times
the largest reference value. The floor exists because both sides accumulate in fp32 in different
orders: where PyTorch's fp32 result happens to be nearly exact, "twice its error" would ask for more
than fp32 can promise. It is invisible next to the half-precision errors.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from tolerance import assert_close_to_fp64

from fused_losses import contrastive as C
from fused_losses.contrastive import contrastive_loss, contrastive_loss_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_features(N, D, kind, seed, dtype, device=DEVICE):
    """Unit rows, rounded to dtype, on the test device: random; near-duplicate (every row a
    1e-2 perturbation of one direction, so all logits are nearly equal); collapsed (every row
    identical)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.randn(N, D, generator=g)
    elif kind == "near_dup":
        x = torch.randn(1, D, generator=g) + 1e-2 * torch.randn(N, D, generator=g)
    else:
        x = torch.randn(1, D, generator=g).expand(N, D)
    return F.normalize(x.double(), dim=-1).to(device, dtype)


def loss_and_grads(fn, a, b, s, **kw):
    a, b, s = (t.detach().clone().requires_grad_() for t in (a, b, s))
    loss = fn(a, b, s, **kw)
    loss.backward()
    return [loss.detach(), a.grad, b.grad, s.grad]


# Every N, D, s, dtype and kind of input is covered, not their full product (the interpreter is slow).
CASES = [  # N, D, s, dtype, kind
    (1, 8, 14.3, torch.float32, "random"),
    (2, 40, 100.0, torch.bfloat16, "random"),
    (2, 8, 14.3, torch.float16, "random"),
    (7, 96, 1.0, torch.float16, "random"),
    (7, 64, 14.3, torch.bfloat16, "collapsed"),
    (63, 64, 100.0, torch.float32, "near_dup"),
    (63, 264, 100.0, torch.float16, "near_dup"),
    (64, 264, 14.3, torch.bfloat16, "random"),
    (64, 40, 1.0, torch.float32, "collapsed"),
    (65, 40, 100.0, torch.float16, "collapsed"),
    (65, 8, 1.0, torch.bfloat16, "near_dup"),
    (257, 64, 14.3, torch.bfloat16, "random"),
    (257, 96, 100.0, torch.float32, "random"),
    (257, 40, 100.0, torch.float16, "near_dup"),
]
if DEVICE.type == "cuda":  # real widths, batches over many tiles and SMs (slow interpreted)
    CASES += [
        (1031, 1280, 100.0, torch.bfloat16, "random"),
        (2053, 768, 14.3, torch.float32, "near_dup"),
        (4099, 1024, 100.0, torch.float16, "random"),
    ]


@pytest.mark.parametrize("N,D,s,dtype,kind", CASES)
def test_matches_fp64(N, D, s, dtype, kind):
    a = make_features(N, D, kind, 0, dtype)
    b = make_features(N, D, kind, 1, dtype) if kind != "collapsed" else a.clone()
    scale = torch.tensor(s, device=DEVICE)
    ours = loss_and_grads(contrastive_loss, a, b, scale)
    lowp = loss_and_grads(contrastive_loss_reference, a, b, scale)
    ref = loss_and_grads(contrastive_loss_reference, a.double(), b.double(), scale.double())
    assert all(o.dtype == t.dtype for o, t in zip(ours[1:], (a, b, scale)))
    assert_close_to_fp64(ours, lowp, ref, ["loss", "d_image", "d_text", "d_scale"])


def test_scale_gradient_identity():
    # d L / d log s = s dL/ds = <dA, A> = <dB, B>: three routes to one number
    a, b = make_features(65, 64, "random", 2, torch.float32), make_features(65, 64, "random", 3, torch.float32)
    s = torch.tensor(14.3, device=DEVICE)
    _, da, db, ds = loss_and_grads(contrastive_loss, a, b, s)
    via_a = (da.double() * a.double()).sum()
    via_b = (db.double() * b.double()).sum()
    via_s = 14.3 * ds.double()
    assert torch.allclose(via_a, via_s, rtol=1e-5, atol=1e-7), (via_a, via_s)
    assert torch.allclose(via_b, via_s, rtol=1e-5, atol=1e-7), (via_b, via_s)


@pytest.mark.slow
def test_deterministic():
    a, b = make_features(257, 40, "random", 4, torch.bfloat16), make_features(257, 40, "random", 5, torch.bfloat16)
    s = torch.tensor(100.0, device=DEVICE)
    first = loss_and_grads(contrastive_loss, a, b, s)
    second = loss_and_grads(contrastive_loss, a, b, s)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_cpu_without_interpreter_runs_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a, b = (make_features(7, 8, "random", seed, torch.float32, device="cpu") for seed in (6, 7))
    s = torch.tensor(14.3)
    assert torch.equal(contrastive_loss(a, b, s), contrastive_loss_reference(a, b, s))


@pytest.mark.parametrize("a_shape,b_shape,scale,match", [
    ((4, 12), (4, 12), 1.0, "D a multiple of 8 in \\[8, 4096\\]; got N=4, D=12"),
    ((4, 4104), (4, 4104), 1.0, "got N=4, D=4104"),
    ((4, 16), (5, 16), 1.0, "same shape; got \\(4, 16\\) and \\(5, 16\\)"),
    ((4, 16, 1), (4, 16, 1), 1.0, "must be 2-d"),
    ((4, 16), (4, 16), [1.0], "0-dim floating tensor .*got \\(1,\\)"),
])
def test_bad_input(a_shape, b_shape, scale, match):
    with pytest.raises(ValueError, match=match):
        contrastive_loss(torch.zeros(a_shape), torch.zeros(b_shape), torch.tensor(scale))


def test_bad_dtype():
    with pytest.raises(ValueError, match="torch.float32 and torch.bfloat16"):
        contrastive_loss(torch.zeros(4, 16), torch.zeros(4, 16, dtype=torch.bfloat16), torch.tensor(1.0))


# -----------------------------------------------------------------------------
# distributed


def open_clip_rank_losses(a, b, s, world):
    """fp64 autograd ground truth of the contract: rank k's local loss with gathered A and B."""
    n = a.shape[0] // world
    losses = []
    for k in range(world):
        rows = slice(k * n, (k + 1) * n)
        labels = torch.arange(n, device=a.device) + k * n
        per_image = s * a[rows] @ b.t()
        per_text = s * b[rows] @ a.t()
        losses.append((F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2)
    return losses


def test_distributed_emulated():
    # W ranks in one process: each rank's forward statistics, the column merge (the all-gather), each
    # rank's backward with its own upstream gradient, B's gradients summed over ranks (the
    # reduce-scatter); against the gradient of sum_k g_k L_k, which is what open_clip's
    # gather_with_grad hands to rank k's features. Unequal g_k check the column weights.
    world, n, D = 3, 7, 40
    a = make_features(world * n, D, "random", 8, torch.float32)
    b = make_features(world * n, D, "random", 9, torch.float32)
    s = torch.tensor(14.3, device=DEVICE)
    g_all = torch.tensor([1.0, 0.5, 2.0], device=DEVICE)
    s32 = s.float()
    stats = [C._forward_stats(a[k * n:(k + 1) * n], b, s32, label_offset=k * n) for k in range(world)]
    parts = torch.stack([st[1] for st in stats])
    col_lse2 = C._merge(parts, torch.ones_like(parts))
    losses = torch.stack([C._rank_loss(st[0], col_lse2, st[2], k) for k, st in enumerate(stats)])
    da, db, ds = [], torch.zeros(world * n, D, dtype=torch.float64, device=DEVICE), []
    for k, st in enumerate(stats):
        dak, dbk, dsk = C._rank_backward(a[k * n:(k + 1) * n], b, s32, st[0], col_lse2, g_all, k)
        da.append(dak)
        db += dbk.double()
        ds.append(dsk)
    da = torch.cat(da)

    a64, b64, s64 = (t.double().requires_grad_() for t in (a, b, s))
    ref = open_clip_rank_losses(a64, b64, s64, world)
    sum(g * l for g, l in zip(g_all.double(), ref)).backward()
    assert torch.allclose(losses.double(), torch.stack(ref).detach(), rtol=0, atol=1e-5)
    # the global loss is the mean of the rank losses
    global_loss = contrastive_loss_reference(a.double(), b.double(), s.double())
    assert torch.allclose(losses.double().mean(), global_loss, rtol=0, atol=1e-5)
    # fp32 all the way: the decomposition must hold to fp32 rounding (gradients here are O(1))
    assert (da.double() - a64.grad).abs().max() < 1e-5
    assert (db - b64.grad).abs().max() < 1e-5
    assert abs(sum(ds).double() - s64.grad) < 1e-5


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_distributed_two_processes(tmp_path):
    # two real gloo processes run the public function (Triton path) and the reference; each rank's
    # feature gradients, averaged as DDP averages them, equal the single-process global gradients
    world, port = 2, _free_port()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TRITON_INTERPRET="1")
    worker = os.path.join(ROOT, "tests", "_dist_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, str(tmp_path)], env=dict(env, RANK=str(r)))
             for r in range(world)]
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0]
    a, b, s = torch.load(tmp_path / "inputs.pt", weights_only=True)
    ref = loss_and_grads(contrastive_loss_reference, a.double(), b.double(), s.double())
    n = a.shape[0] // world
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for path in ("triton", "reference"):
        loss = sum(res[path][0] for res in results) / world
        da = torch.cat([res[path][1] for res in results]) / world  # DDP divides by the world size
        db = torch.cat([res[path][2] for res in results]) / world
        ds = sum(res[path][3] for res in results) / world
        assert abs(loss.double() - ref[0]) < 1e-5, path
        assert (da.double() - ref[1]).abs().max() < 1e-6, path
        assert (db.double() - ref[2]).abs().max() < 1e-6, path
        assert abs(ds.double() - ref[3]) < 1e-6, path
    assert all(r["n"] == n for r in results)
