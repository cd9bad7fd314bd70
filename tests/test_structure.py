"""Structure losses against fp64 references, on the CPU through Triton's interpreter (or
natively on a GPU with TEST_DEVICE=cuda: conftest.py).

Tolerance principle as in test_contrastive.py: max abs error against fp64 at most twice PyTorch's own
(the reference run on the same low-precision inputs) plus 2^-20 times the largest reference value.
For half inputs PyTorch's own computation is fp32 pdist (pdist has no half kernels), a strict bar.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from tolerance import assert_close_to_fp64

from fused_losses.structure import (gram_structure_loss, gram_structure_loss_reference, structure_loss,
                               structure_loss_reference)


def make(N, D, kind, seed, dtype):
    """Unit rows rounded to dtype, on the test device: random; clustered (three directions, each row
    one of them plus a perturbation of relative size 0.1); collapsed (every row identical)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.randn(N, D, generator=g)
    elif kind == "clustered":
        centres = torch.randn(3, D, generator=g)
        x = centres[torch.arange(N) % 3] + 0.1 * torch.randn(N, D, generator=g)
    else:
        x = torch.randn(1, D, generator=g).expand(N, D)
    return F.normalize(x.double(), dim=-1).to(DEVICE, dtype)


def loss_and_grads(fn, s, t, **kw):
    s, t = (x.detach().clone().requires_grad_() for x in (s, t))
    loss = fn(s, t, **kw)
    loss.backward()
    return [loss.detach(), s.grad, t.grad]


CASES = [  # N, D_student, D_teacher, beta, dtype, student kind, teacher kind
    (1, 8, 8, 1.0, torch.float32, "random", "random"),
    (2, 40, 40, 1.0, torch.bfloat16, "random", "random"),
    (7, 96, 64, 0.5, torch.float16, "random", "clustered"),
    (63, 64, 64, 1.0, torch.bfloat16, "clustered", "random"),
    (64, 264, 264, 0.0, torch.float32, "random", "random"),
    (65, 40, 96, 1.0, torch.float16, "random", "random"),
    (65, 8, 8, 1.0, torch.float32, "collapsed", "random"),
    (257, 64, 64, 1.0, torch.float32, "clustered", "clustered"),
    (257, 40, 40, 0.1, torch.bfloat16, "random", "random"),
    (257, 8, 8, 1.0, torch.float16, "random", "random"),
]
if DEVICE.type == "cuda":  # real widths, batches over many tiles and SMs (slow interpreted)
    CASES += [
        (1031, 1280, 1024, 1.0, torch.float16, "random", "clustered"),
        (2053, 768, 768, 0.5, torch.float32, "random", "random"),
        (4099, 768, 768, 1.0, torch.bfloat16, "random", "random"),
    ]


@pytest.mark.parametrize("N,Ds,Dt,beta,dtype,kind_s,kind_t", CASES)
def test_matches_fp64(N, Ds, Dt, beta, dtype, kind_s, kind_t):
    s, t = make(N, Ds, kind_s, 0, dtype), make(N, Dt, kind_t, 1, dtype)
    ours = loss_and_grads(structure_loss, s, t, beta=beta)
    lowp = loss_and_grads(structure_loss_reference, s, t, beta=beta)
    ref = loss_and_grads(structure_loss_reference, s.double(), t.double(), beta=beta)
    assert ours[1].dtype == dtype and ours[2].dtype == dtype
    assert_close_to_fp64(ours, lowp, ref, ["loss", "d_student", "d_teacher"])


def test_collapsed_pairs_have_no_gradient():
    # identical rows: every distance is 0 and pdist's gradient there is 0; the Gram form must not turn
    # its rounding noise into a gradient (its row sums come from the same rounded weights)
    s = make(65, 40, "collapsed", 2, torch.bfloat16)
    t = make(65, 40, "collapsed", 3, torch.bfloat16)
    loss, ds, dt = loss_and_grads(structure_loss, s, t)
    assert loss.abs() < 1e-6 and ds.abs().max() < 1e-5 and dt.abs().max() < 1e-5


@pytest.mark.slow
def test_deterministic():
    s, t = make(257, 40, "random", 4, torch.bfloat16), make(257, 40, "random", 5, torch.bfloat16)
    first = loss_and_grads(structure_loss, s, t)
    second = loss_and_grads(structure_loss, s, t)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_no_grad_forward_matches():
    s, t = make(65, 40, "random", 6, torch.float32), make(65, 40, "random", 7, torch.float32)
    with torch.no_grad():
        plain = structure_loss(s, t)
    assert torch.equal(plain, loss_and_grads(structure_loss, s, t)[0])


@pytest.mark.parametrize("s_shape,t_shape,beta,match", [
    ((4, 12), (4, 16), 1.0, "student D must be a multiple of 8 in \\[8, 4096\\]; got D=12"),
    ((4, 16), (4, 8200), 1.0, "teacher D must be .*got D=8200"),
    ((4, 16), (5, 16), 1.0, "same N; got \\(4, 16\\) and \\(5, 16\\)"),
    ((4,), (4,), 1.0, "must be 2-d"),
    ((4, 16), (4, 16), -1.0, "beta must be >= 0; got -1.0"),
])
def test_bad_input(s_shape, t_shape, beta, match):
    with pytest.raises(ValueError, match=match):
        structure_loss(torch.zeros(s_shape), torch.zeros(t_shape), beta=beta)


# -----------------------------------------------------------------------------
# squared-similarity variant


@pytest.mark.parametrize("N,Ds,Dt,dtype,close", [
    (1, 8, 8, torch.float32, False),
    (65, 40, 96, torch.float32, False),
    (257, 64, 64, torch.float32, True),
    (63, 264, 264, torch.bfloat16, True),
])
def test_gram_matches_naive(N, Ds, Dt, dtype, close):
    t = make(N, Dt, "random", 8, dtype)
    if close:  # a student near its teacher: the regime where the three-term identity would cancel
        s = F.normalize(t.double() + 1e-3 * torch.randn(N, Dt, dtype=torch.float64, device=DEVICE),
                        dim=-1).to(dtype)
    else:
        s = make(N, Ds, "random", 9, dtype)
    ours = loss_and_grads(gram_structure_loss, s, t)
    # PyTorch's own: the naive N x N form, in fp32 for half inputs as ours computes
    lowp = loss_and_grads(lambda a, b: gram_structure_loss_reference(a.float(), b.float()), s, t)
    ref = loss_and_grads(gram_structure_loss_reference, s.double(), t.double())
    assert_close_to_fp64(ours, lowp, ref, ["loss", "d_student", "d_teacher"])


@pytest.mark.xfail(strict=DEVICE.type == "cpu",  # a GPU sums in another order: a pass is noted
                   reason="known limit, see structure.py: half inputs get fp32 Gram-form distances, "
                   "whose absolute error (~eps32 |a|^2) loses to fp32 pdist for pairs closer than ~0.1")
def test_tight_clusters_in_half_precision():
    g = torch.Generator().manual_seed(10)
    centres = torch.randn(3, 64, generator=g)
    s, t = (F.normalize((centres[torch.arange(65) % 3] + 0.01 * torch.randn(65, 64, generator=g)).double(), dim=-1)
            .to(DEVICE, torch.float16) for _ in range(2))
    ours = loss_and_grads(structure_loss, s, t)
    lowp = loss_and_grads(structure_loss_reference, s, t)
    ref = loss_and_grads(structure_loss_reference, s.double(), t.double())
    assert_close_to_fp64(ours, lowp, ref, ["loss", "d_student", "d_teacher"])
