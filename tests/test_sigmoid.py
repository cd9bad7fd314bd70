"""Fused SigLIP sigmoid loss against an fp64 reference, on the CPU through Triton's interpreter (or
natively on a GPU with TEST_DEVICE=cuda: conftest.py).

Accuracy rule: tests/tolerance.py (ours against fp64 at most twice PyTorch's own error in the input
dtype, plus 2^-20 of the largest reference value), for the loss and all four gradients.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from conftest import DEVICE
from tolerance import assert_close_to_fp64

from fused_losses import sigmoid as S
from fused_losses.sigmoid import sigmoid_loss, sigmoid_loss_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["loss", "d_image", "d_text", "d_scale", "d_bias"]


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


def loss_and_grads(fn, a, b, s, t, upstream=1.0, **kw):
    a, b, s, t = (x.detach().clone().requires_grad_() for x in (a, b, s, t))
    loss = fn(a, b, s, t, **kw)
    (upstream * loss).backward()
    return [loss.detach(), a.grad, b.grad, s.grad, t.grad]


def inputs(N, D, s, t, dtype, kind, seed=0, device=DEVICE):
    a = make_features(N, D, kind, seed, dtype, device)
    b = make_features(N, D, kind, seed + 1, dtype, device) if kind != "collapsed" else a.clone()
    return a, b, torch.tensor(s, device=device), torch.tensor(t, device=device)


def fp64(a, b, s, t):
    return a.double(), b.double(), s.double(), t.double()


# Every N, D, s, t, dtype and kind of input is covered, not their full product (the interpreter is slow).
CASES = [  # N, D, s, t, dtype, kind
    (1, 8, 10.0, -10.0, torch.float32, "random"),
    (1, 40, 100.0, 3.0, torch.bfloat16, "collapsed"),
    (2, 40, 100.0, 0.0, torch.bfloat16, "random"),
    (2, 8, 1.0, 3.0, torch.float16, "random"),
    (7, 96, 1.0, -10.0, torch.float16, "random"),
    (7, 64, 10.0, 0.0, torch.bfloat16, "collapsed"),
    (63, 64, 100.0, -10.0, torch.float32, "near_dup"),
    (63, 264, 100.0, 3.0, torch.float16, "near_dup"),
    (64, 264, 10.0, -10.0, torch.bfloat16, "random"),
    (64, 40, 1.0, 0.0, torch.float32, "collapsed"),
    (65, 40, 100.0, 3.0, torch.float16, "collapsed"),
    (65, 8, 1.0, -10.0, torch.bfloat16, "near_dup"),
    (65, 96, 10.0, 3.0, torch.float32, "random"),
    (257, 64, 10.0, -10.0, torch.bfloat16, "random"),
    (257, 96, 100.0, 0.0, torch.float32, "random"),
    (257, 40, 100.0, 3.0, torch.float16, "near_dup"),
    (257, 40, 10.0, 3.0, torch.float32, "collapsed"),
]
if DEVICE.type == "cuda":  # real widths, batches over many tiles and SMs (slow interpreted)
    CASES += [
        (1031, 1280, 10.0, -10.0, torch.bfloat16, "random"),
        (2053, 768, 100.0, 3.0, torch.float32, "near_dup"),
        (4099, 1024, 10.0, -10.0, torch.float16, "random"),
    ]


@pytest.mark.parametrize("N,D,s,t,dtype,kind", CASES)
def test_matches_fp64(N, D, s, t, dtype, kind):
    x = inputs(N, D, s, t, dtype, kind)
    ours = loss_and_grads(sigmoid_loss, *x)
    lowp = loss_and_grads(sigmoid_loss_reference, *x)
    ref = loss_and_grads(sigmoid_loss_reference, *fp64(*x))
    assert all(o.dtype == i.dtype for o, i in zip(ours[1:], x))
    # PyTorch's own fp16 loss overflows when N^2 terms of ~100 are summed (65 x 65 x 103 > 65504), so
    # "twice its error" is no bound there; ours accumulates in fp32 and must stay finite
    assert all(torch.isfinite(o).all() for o in ours)
    assert_close_to_fp64(ours, lowp, ref, NAMES)
    if dtype != torch.float32:
        # the loss and the scalar gradients accumulate in fp32 whatever the features' dtype and come
        # out in fp32: hold them to PyTorch's fp32 error on the same rounded inputs, a far tighter
        # bound than its half-precision error (and a finite one where that overflows). Values below
        # fp32's smallest normal are left out: the kernel's exp(-x) is exactly 0 from x = 87 on, so
        # at N = 1, X = 103 it returns d_bias = 0 for -sigmoid(-103) = -1.4e-45.
        f32 = loss_and_grads(sigmoid_loss_reference, x[0].float(), x[1].float(), x[2], x[3])
        keep = [i for i in (0, 3, 4) if ref[i].abs().max() >= torch.finfo(torch.float32).tiny]
        assert_close_to_fp64([ours[i] for i in keep], [f32[i] for i in keep], [ref[i] for i in keep],
                             [NAMES[i] + " (fp32 rule)" for i in keep])


def test_gradient_identities():
    # d L / d log s = s dL/ds = <dA, A> = <dB, B>: three routes to one number. And with collapsed
    # features every cosine is 1, so X = s + t and dL/ds = dL/dt.
    x = inputs(65, 64, 10.0, -3.0, torch.float32, "random", seed=2)
    _, da, db, ds, _ = loss_and_grads(sigmoid_loss, *x)
    via_a = (da.double() * x[0].double()).sum()
    via_b = (db.double() * x[1].double()).sum()
    via_s = 10.0 * ds.double()
    assert torch.allclose(via_a, via_s, rtol=1e-5, atol=1e-7), (via_a, via_s)
    assert torch.allclose(via_b, via_s, rtol=1e-5, atol=1e-7), (via_b, via_s)
    _, _, _, ds, dt = loss_and_grads(sigmoid_loss, *inputs(65, 64, 10.0, -3.0, torch.float32, "collapsed", seed=3))
    assert torch.allclose(ds, dt, rtol=1e-6, atol=0), (ds, dt)


def test_upstream_gradient_and_partial_grads():
    # backward scales the forward's gradients by the upstream gradient; features that need no
    # gradient get none (and their GEMM is skipped); under no_grad only the loss is computed
    x = inputs(65, 40, 10.0, -3.0, torch.float32, "random", seed=4)
    base = loss_and_grads(sigmoid_loss, *x)
    scaled = loss_and_grads(sigmoid_loss, *x, upstream=2.5)
    for p, q in zip(base[1:], scaled[1:]):
        assert torch.allclose(2.5 * p, q, rtol=1e-6, atol=0)
    a, b, s, t = (v.clone() for v in x)
    b.requires_grad_()
    sigmoid_loss(a, b, s, t).backward()
    assert a.grad is None and s.grad is None and torch.allclose(b.grad, base[2], rtol=1e-6, atol=1e-9)
    a, b, s, t = (v.clone() for v in x)  # frozen features, learnable s and t: sums only, no G' written
    s.requires_grad_(), t.requires_grad_()
    sigmoid_loss(a, b, s, t).backward()
    assert torch.allclose(s.grad, base[3], rtol=1e-6, atol=0) and torch.allclose(t.grad, base[4], rtol=1e-6, atol=0)
    with torch.no_grad():
        loss = sigmoid_loss(*(v.clone().requires_grad_() for v in x))
    assert not loss.requires_grad
    assert torch.allclose(loss, base[0], rtol=1e-6, atol=0)


@pytest.mark.slow
def test_deterministic():
    x = inputs(129, 40, 100.0, -10.0, torch.bfloat16, "random", seed=5)
    first = loss_and_grads(sigmoid_loss, *x)
    second = loss_and_grads(sigmoid_loss, *x)
    assert all(torch.equal(p, q) for p, q in zip(first, second))


def test_cpu_without_interpreter_runs_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = inputs(7, 8, 10.0, -10.0, torch.float32, "random", seed=6, device="cpu")
    assert torch.equal(sigmoid_loss(*x), sigmoid_loss_reference(*x))


@pytest.mark.parametrize("a_shape,scale,bias,match", [
    ((4, 12), 1.0, 0.0, "D a multiple of 8 in \\[8, 4096\\]; got N=4, D=12"),
    ((4, 16), [1.0], 0.0, "logit_scale must be a 0-dim floating tensor .*got \\(1,\\)"),
    ((4, 16), 1.0, [0.0], "logit_bias must be a 0-dim floating tensor .*got \\(1,\\)"),
    ((4, 16), 1.0, None, "logit_bias must be a 0-dim floating tensor .*got float"),
])
def test_bad_input(a_shape, scale, bias, match):
    t = -10.0 if bias is None else torch.tensor(bias)
    with pytest.raises(ValueError, match=match):
        sigmoid_loss(torch.zeros(a_shape), torch.zeros(a_shape), torch.tensor(scale), t)


# -----------------------------------------------------------------------------
# the kernel's own exp and log1p


@triton.jit
def _math_kernel(x_ptr, exp_ptr, log1p_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    e = S._exp_neg(x)
    tl.store(exp_ptr + offs, e, mask=ok)
    tl.store(log1p_ptr + offs, S._log1p_unit(e), mask=ok)


def test_elementwise_math_within_ulps():
    # exp(-x) over [0, 90] and log1p(exp(-x)) against fp64, relative error in fp32 ulps (2^-23);
    # a naive log(1 + e) in fp32 is wrong by ~100% once e < 6e-8 (x > 16.6), so this can fail
    x = torch.cat([torch.linspace(0, 1, 1001), torch.linspace(1, 90, 4001), torch.tensor([86.999, 87.0, 1e-30])])
    x = x.to(DEVICE)
    e, l1p = torch.empty_like(x), torch.empty_like(x)
    _math_kernel[(triton.cdiv(x.numel(), 1024),)](x, e, l1p, x.numel(), BLOCK=1024)
    xd = x.double()
    want_e = torch.exp(-xd)
    want_l = torch.log1p(want_e)
    live = xd < 87  # beyond it the kernel returns exactly 0 (the true value is below 1.7e-38)
    ulp = 2.0**-23
    rel_e = ((e.double() - want_e).abs() / want_e)[live].max().item()
    rel_l = ((l1p.double() - want_l).abs() / want_l)[live].max().item()
    assert rel_e <= 2 * ulp, f"exp(-x): {rel_e / ulp:.2f} ulp"
    assert rel_l <= 4 * ulp, f"log1p(exp(-x)): {rel_l / ulp:.2f} ulp"
    assert torch.all(e[~live] == 0) and torch.all(l1p[~live] == 0)


# -----------------------------------------------------------------------------
# distributed


def open_clip_rank_losses(a, b, s, t, world):
    """fp64 autograd ground truth of the contract, in open_clip's neighbour-exchange form: rank k's own
    block with its positives, every other rank's text block as negatives only, each summed over pairs
    and divided by the local n."""
    n = a.shape[0] // world
    losses = []
    for k in range(world):
        a_k = a[k * n:(k + 1) * n]
        own = s * a_k @ b[k * n:(k + 1) * n].t() + t
        labels = 2 * torch.eye(n, dtype=a.dtype, device=a.device) - 1
        loss = -F.logsigmoid(labels * own).sum()
        for j in range(world):
            if j != k:
                loss = loss - F.logsigmoid(-(s * a_k @ b[j * n:(j + 1) * n].t() + t)).sum()
        losses.append(loss / n)
    return losses


def test_distributed_emulated():
    # W ranks in one process through the sweep the autograd function runs: rank k's rows against all
    # columns with its label offset, its gradients scaled by its own upstream gradient g_k, B's
    # gradient summed over ranks (the reduce-scatter); against the fp64 gradient of sum_k g_k L_k,
    # which is what open_clip's SigLipLoss hands to rank k's features. Unequal g_k check the scaling.
    world, n, D = 3, 7, 40
    a = make_features(world * n, D, "random", 8, torch.float32)
    b = make_features(world * n, D, "random", 9, torch.float32)
    s, t = torch.tensor(10.0, device=DEVICE), torch.tensor(-3.0, device=DEVICE)
    g_all = [1.0, 0.5, 2.0]
    db = torch.zeros(world * n, D, dtype=torch.float64, device=DEVICE)
    losses, da, ds, dt = [], [], 0.0, 0.0
    for k in range(world):
        total, dak, dbk, g_sum, gs_sum = S._sigmoid_sweep(a[k * n:(k + 1) * n], b, s, t, k * n, True, True, True)
        losses.append(total / n)
        da.append(g_all[k] * s / n * dak)
        db += (g_all[k] * s / n * dbk).double()
        ds += g_all[k] * gs_sum.double() / n
        dt += g_all[k] * g_sum.double() / n
    a64, b64, s64, t64 = (v.double().requires_grad_() for v in (a, b, s, t))
    ref = open_clip_rank_losses(a64, b64, s64, t64, world)
    sum(g * l for g, l in zip(g_all, ref)).backward()
    assert torch.allclose(torch.stack(losses).double(), torch.stack(ref).detach(), rtol=1e-6, atol=0)
    # the global loss is the mean of the rank losses
    global_loss = sigmoid_loss_reference(a.double(), b.double(), s.double(), t.double())
    assert torch.allclose(torch.stack(ref).detach().mean(), global_loss, rtol=1e-12, atol=0)
    assert (torch.cat(da).double() - a64.grad).abs().max() < 1e-6
    assert (db - b64.grad).abs().max() < 1e-6
    assert abs(ds - s64.grad) < 1e-6 and abs(dt - t64.grad) < 1e-6


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_distributed_two_processes(tmp_path):
    # two real gloo processes run the public function (Triton path) and the reference; each rank's
    # gradients, averaged as DDP averages them, equal the single-process global gradients
    world, port = 2, _free_port()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TRITON_INTERPRET="1")
    worker = os.path.join(ROOT, "tests", "_dist_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, str(tmp_path), "sigmoid"], env=dict(env, RANK=str(r)))
             for r in range(world)]
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0]
    a, b, s, t = torch.load(tmp_path / "inputs.pt", weights_only=True)
    ref = loss_and_grads(sigmoid_loss_reference, *fp64(a, b, s, t))
    n = a.shape[0] // world
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    assert all(r["n"] == n for r in results)
    for path in ("triton", "reference"):
        loss = sum(res[path][0] for res in results) / world
        da = torch.cat([res[path][1] for res in results]) / world  # DDP divides by the world size
        db = torch.cat([res[path][2] for res in results]) / world
        ds = sum(res[path][3] for res in results) / world
        dt = sum(res[path][4] for res in results) / world
        assert abs(loss.double() - ref[0]) < 1e-5, path
        assert (da.double() - ref[1]).abs().max() < 1e-6, path
        assert (db.double() - ref[2]).abs().max() < 1e-6, path
        assert abs(ds.double() - ref[3]) < 1e-6, path
        assert abs(dt.double() - ref[4]) < 1e-6, path
