"""
ProCLIP's embedding-structure alignment in Triton, over the upper triangle, never N x N in memory.

Math. Student S (N x Ds) and teacher T (N x Dt), rows i = 1..N; d^S_ij = ||s_i - s_j||,
d^T_ij = ||t_i - t_j|| (Euclidean, not squared); h = SmoothL1 with threshold beta:
    h(x) = x^2 / (2 beta) if |x| < beta else |x| - beta / 2          (beta = 0: plain |x|)
    L    = sum_{i<j} h(d^S_ij - d^T_ij)
         = F.smooth_l1_loss(F.pdist(S), F.pdist(T), beta=beta, reduction="sum")
Distances come from the Gram form d^2_ij = ||a_i||^2 + ||a_j||^2 - 2 a_i . a_j, so the N^2 D work is a
tensor-core product. Gradient, with e_ij = h'(d^S_ij - d^T_ij) (x / beta inside, sign(x) outside):
    dL/ds_i = sum_{j != i} W_ij (s_i - s_j),   W = e / d^S      (0 where d^S = 0, as pdist's backward)
    dL/dt_i = sum_{j != i} V_ij (t_i - t_j),   V = -e / d^T
and in matrix form dS = diag(W 1) S - W S, dT = diag(V 1) T - V T.
Every factor of a pair's gradient is known as soon as the pair is, so the gradient is computed in the
same sweep as the loss (as Liger-Kernel does for cross-entropy) and backward only scales it by the
upstream gradient: no recomputation, 6 N^2 D FLOPs in all instead of 8.

Kernel: rows in chunks of C; for chunk [r0, r1) one kernel covers the tiles of rows [r0, r1) x columns
[r0, N) on or above the diagonal (tiles below it only write zeros), adds the loss of pairs i < j and
writes M = -W and -V for the chunk (C x (N - r0), fp16, or fp32 for fp32 inputs; |W| <= 1/d, and
entries past fp16's range, pairs closer than 1.5e-5, are saturated rather than turned into inf). A Triton GEMM (contrastive.py's) then
adds M S[r0:] - rowsum(M) S[r0:r1] to the chunk's rows and M^T S[r0:r1] - rowsum(M^T) S[r0:] to
rows r0.. N: the two triangles of the symmetric W. Row sums come from the same rounded M the product
uses, so identical rows (s_i = s_j) cancel exactly in fp32 whatever M is.

Accuracy, candidly: the Gram form has an absolute error in d^2 of about eps * ||a||^2 where pdist's
direct differences have eps * d^2, so close pairs lose relative accuracy ~eps / d^2. Half inputs
accumulate in fp32 (eps = 6e-8: fine next to half-precision gradients unless pairs are closer than
about 1e-2); fp32 inputs compute their distance tiles in fp64 for that reason.

Also here: the squared-similarity variant ||S S^T - T T^T||_F^2 without any N^2 work (see
gram_structure_loss).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fused_losses.contrastive import D_MAX, _interpreting, _mm, _work_dtype, use_triton


# -----------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _dist_tile(x_ptr, rows, cols, row_ok, col_ok, D, stride,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               UPCAST: tl.constexpr, F64: tl.constexpr):
    """Euclidean distances ||x_i - x_j|| for a (BLOCK_M, BLOCK_N) tile, Gram form, returned in fp32.

    Half inputs: exact products, fp32 sums, on tensor cores. fp32 inputs: the tile is done in fp64
    (F64), because ||a||^2 + ||b||^2 - 2 a.b in fp32 loses ~eps32 / d^2 relative accuracy and fp32
    inputs promise pdist's accuracy; fp32 is not the fast path anyway."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    nr = tl.zeros([BLOCK_M], dtype=ACC)  # squared norms, accumulated from the same loads
    nc = tl.zeros([BLOCK_N], dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < D
        a = tl.load(x_ptr + rows[:, None] * stride + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(x_ptr + cols[:, None] * stride + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        af = a.to(ACC)
        bf = b.to(ACC)
        nr += tl.sum(af * af, 1)
        nc += tl.sum(bf * bf, 1)
        if UPCAST or F64:  # UPCAST: the interpreter, see _dot_tile in contrastive.py
            a = af
            b = bf
        acc = tl.dot(a, tl.trans(b), acc)
    return tl.sqrt(tl.maximum(nr[:, None] + nc[None, :] - 2.0 * acc, 0.0)).to(tl.float32)


@triton.jit
def _structure_kernel(s_ptr, t_ptr, loss_ptr, ms_ptr, mt_ptr, row_lo, row_hi, n, Ds, Dt,
                      stride_s, stride_t, stride_m, beta, inv_beta,
                      WRITE_GRAD: tl.constexpr, CLAMP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, F64: tl.constexpr):
    # Tile (pid_m, pid_n) of rows [row_lo, row_hi) x columns [row_lo, n). Writes the tile's loss
    # (pairs i < j only) and, with WRITE_GRAD, M = -W and -V at m[i - row_lo, j - row_lo].
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = row_lo + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = row_lo + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_hi
    col_ok = cols < n
    ok = row_ok[:, None] & col_ok[None, :]
    m_off = (rows - row_lo)[:, None] * stride_m + (cols - row_lo)[None, :]
    if row_lo + pid_n * BLOCK_N + BLOCK_N <= row_lo + pid_m * BLOCK_M + 1:
        # every j <= i: nothing to compute, but the GEMMs read this part of M, so zero it
        if WRITE_GRAD:
            zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=ms_ptr.dtype.element_ty)
            tl.store(ms_ptr + m_off, zero, mask=ok)
            tl.store(mt_ptr + m_off, zero, mask=ok)
        tl.store(loss_ptr + pid_m * tl.num_programs(1) + pid_n, 0.0)
    else:
        d_s = _dist_tile(s_ptr, rows, cols, row_ok, col_ok, Ds, stride_s, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, F64)
        d_t = _dist_tile(t_ptr, rows, cols, row_ok, col_ok, Dt, stride_t, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, F64)
        pair = ok & (cols[None, :] > rows[:, None])
        x = d_s - d_t
        ax = tl.abs(x)
        inside = ax < beta
        h = tl.where(inside, 0.5 * x * x * inv_beta, ax - 0.5 * beta)
        tl.store(loss_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(tl.where(pair, h, 0.0), 1), 0))
        if WRITE_GRAD:
            sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
            e = tl.where(inside, x * inv_beta, sign)
            m_s = tl.where(pair & (d_s > 0), -e / tl.where(d_s > 0, d_s, 1.0), 0.0)
            m_t = tl.where(pair & (d_t > 0), e / tl.where(d_t > 0, d_t, 1.0), 0.0)
            if CLAMP:  # fp16 storage: saturate instead of overflowing for (degenerate) pairs closer than 1.5e-5
                m_s = tl.minimum(tl.maximum(m_s, -65504.0), 65504.0)
                m_t = tl.minimum(tl.maximum(m_t, -65504.0), 65504.0)
            tl.store(ms_ptr + m_off, m_s.to(ms_ptr.dtype.element_ty), mask=ok)
            tl.store(mt_ptr + m_off, m_t.to(mt_ptr.dtype.element_ty), mask=ok)


# -----------------------------------------------------------------------------
# launcher


def _config(dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); untuned H100 starting point, small when interpreting."""
    if _interpreting():
        return 32, 32, 32, 1, 1
    if dtype == torch.float32:  # fp64 tiles: twice the registers
        return 32, 32, 32, 4, 2
    return 128, 64, 32, 8, 3  # spill-free on sm_90 when compiled ahead of time; not yet measured


def _structure_forward(s, t, beta, need_grad, chunk=None):
    """Loss (0-dim fp32) and, if need_grad, dL/dS and dL/dT (fp32)."""
    n = s.shape[0]
    BM, BN, BK, warps, stages = _config(s.dtype)
    if chunk is None:  # M and -V for one chunk take at most 2 x 128 MB (a couple of blocks when interpreting)
        chunk = 2 * BM if _interpreting() else max(BM, (64 * 2**20 // max(n, 1)) // BM * BM)
    ds = torch.zeros(n, s.shape[1], device=s.device, dtype=torch.float32) if need_grad else None
    dt = torch.zeros(n, t.shape[1], device=s.device, dtype=torch.float32) if need_grad else None
    if need_grad:
        width = n
        ms = torch.empty(min(chunk, n), width, device=s.device, dtype=_work_dtype(s.dtype))
        mt = torch.empty(min(chunk, n), width, device=s.device, dtype=_work_dtype(s.dtype))
    else:
        ms = mt = torch.empty(1, 1, device=s.device, dtype=s.dtype)
    inv_beta = 1.0 / beta if beta > 0 else 0.0
    s_mm, t_mm = s.to(ms.dtype), t.to(mt.dtype)  # GEMM operands in M's dtype (a copy only for bf16)
    losses = []
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        grid = (triton.cdiv(r1 - r0, BM), triton.cdiv(n - r0, BN))
        part = torch.empty(grid[0] * grid[1], device=s.device, dtype=torch.float32)
        # the chunk's M lives in the first (r1 - r0) rows and (n - r0) columns of the buffer
        _structure_kernel[grid](s, t, part, ms, mt, r0, r1, n, s.shape[1], t.shape[1],
                                s.stride(0), t.stride(0), ms.stride(0), float(beta), inv_beta,
                                WRITE_GRAD=need_grad, CLAMP=ms.dtype == torch.float16, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                                UPCAST=_interpreting(), F64=s.dtype == torch.float32,
                                num_warps=warps, num_stages=stages)
        losses.append(part)
        if need_grad:
            for x, m, dx in ((s_mm, ms, ds), (t_mm, mt, dt)):
                mc = m[: r1 - r0, : n - r0]  # (c, n - r0)
                # rows of the chunk: sum over j > i;  then rows r0.. n: sum over the chunk's i < j
                _mm(mc, x[r0:], dx[r0:r1], accumulate=True, diag_e=x[r0:r1])
                _mm(mc.t(), x[r0:r1], dx[r0:], accumulate=True, diag_e=x[r0:])
    return torch.cat(losses).sum(), ds, dt


class _StructureLoss(torch.autograd.Function):

    @staticmethod
    def forward(ctx, s, t, beta):
        s, t = s.contiguous(), t.contiguous()
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, ds, dt = _structure_forward(s, t, beta, need_grad)
        ctx.save_for_backward(ds, dt)
        ctx.dtypes = (s.dtype, t.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        ds, dt = ctx.saved_tensors
        g = grad.float()
        return (g * ds).to(ctx.dtypes[0]), (g * dt).to(ctx.dtypes[1]), None


# -----------------------------------------------------------------------------
# public functions


def _check(s, t, beta=0.0):
    if s.ndim != 2 or t.ndim != 2 or s.shape[0] != t.shape[0]:
        raise ValueError(f"student and teacher must be 2-d with the same N; got {tuple(s.shape)} and {tuple(t.shape)}")
    for name, x in (("student", s), ("teacher", t)):
        D = x.shape[1]
        if D % 8 != 0 or D < 8 or D > D_MAX:
            raise ValueError(f"{name} D must be a multiple of 8 in [8, {D_MAX}]; got D={D}")
    if s.dtype != t.dtype or s.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"student and teacher must share one dtype among float32, bfloat16, float16; got {s.dtype} and {t.dtype}")
    if s.device != t.device:
        raise ValueError(f"student and teacher must be on one device; got {s.device} and {t.device}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0; got {beta}")


def structure_loss(student, teacher, beta=1.0):
    """sum_{i<j} SmoothL1_beta(||s_i - s_j|| - ||t_i - t_j||), fp32 0-dim; gradients to both inputs.

    student (N, Ds), teacher (N, Dt), one dtype (fp32, bf16, fp16), Ds and Dt multiples of 8.
    On CUDA (or with TRITON_INTERPRET=1) the Triton kernel runs, elsewhere the reference.
    """
    _check(student, teacher, beta)
    if use_triton(student):
        return _StructureLoss.apply(student, teacher, float(beta))
    return structure_loss_reference(student, teacher, beta)


def gram_structure_loss(student, teacher):
    """||S S^T - T T^T||_F^2 in O(N D^2), no N x N anywhere.

    Zero-pad the narrower input (S S^T does not change), U = S - T, V = S + T; then
    S S^T - T T^T = (U V^T + V U^T) / 2 and
        ||S S^T - T T^T||^2 = 1/2 ( <U^T U, V^T V> + sum_ab K_ab K_ba ),  K = U^T V   (D x D).
    This is the Gram identity ||S^T S||^2 + ||T^T T||^2 - 2 ||S^T T||^2 regrouped so that every term
    is proportional to U: the loss of a student close to its teacher is not a difference of two
    large numbers. Its rounding error is still ~eps |U|^2 |V|^2 rather than relative to the loss, so
    it runs in fp64: O(N D^2) work, cheap even at fp64 speed. Returns fp32.
    """
    _check(student, teacher)
    s, t = student.double(), teacher.double()
    width = max(s.shape[1], t.shape[1])
    s = F.pad(s, (0, width - s.shape[1]))
    t = F.pad(t, (0, width - t.shape[1]))
    u, v = s - t, s + t
    k = u.t() @ v  # (D, D)
    return (0.5 * ((u.t() @ u) * (v.t() @ v)).sum() + 0.5 * (k * k.t()).sum()).float()


# -----------------------------------------------------------------------------
# references (tests, benchmark, CPU fallback)


def structure_loss_reference(student, teacher, beta=1.0):
    """F.smooth_l1_loss(F.pdist(S), F.pdist(T), beta, sum). pdist has no half kernels, so half
    inputs are computed in fp32 (which is then PyTorch's own way of computing this loss in them)."""
    s, t = student, teacher
    if s.dtype in (torch.float16, torch.bfloat16):
        s, t = s.float(), t.float()
    return F.smooth_l1_loss(F.pdist(s), F.pdist(t), beta=beta, reduction="sum")


def gram_structure_loss_reference(student, teacher):
    """The N x N definition, for tests: ||S S^T - T T^T||_F^2."""
    return ((student @ student.t() - teacher @ teacher.t()) ** 2).sum()
