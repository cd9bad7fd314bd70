"""
Fused SigLIP sigmoid loss in Triton, never materialising the N x N logits.

Math. A (images) and B (texts) are N x D, rows L2-normalised; s > 0 is the logit multiplier
(`log_s.exp()`), t the logit bias; S = A B^T are the cosines and X = s S + t the logits.
y_ij = +1 on the diagonal (the matching pair), -1 elsewhere, and with softplus(z) = log(1 + e^z):
    L = -(1/N) sum_ij log sigmoid(y_ij X_ij) = (1/N) sum_ij softplus(-y_ij X_ij)
Normalisation checked against the sources: open_clip's SigLipLoss._loss (commit 89fb801) is
`-F.logsigmoid(labels * logits).sum() / image_features.shape[0]`, labels = 2 I - 1, and big_vision's
SigLIP trainer sums -log_sigmoid over each row and takes the mean over rows: both divide the sum over
all N^2 pairs by N (not N^2), as here.
Backward: no row or column statistics are involved; each pair's gradient depends on its own logit,
    G_ij  = dL/dX_ij = -(1/N) y_ij sigmoid(-y_ij X_ij)
          = (1/N) sigmoid(X_ij) off the diagonal,  -(1/N) sigmoid(-X_ii) on it    (|N G| <= 1)
    dA    = s G B,      dB = s G^T A
    dL/ds = sum_ij G_ij S_ij   (= <dA, A> / s = <dB, B> / s: the free self-check the tests use)
    dL/dt = sum_ij G_ij

Kernels (written for an H100; tile sizes untuned until a GPU is at hand, see _config):
  * one sweep does the loss and the gradients together. Since G_ij needs nothing but X_ij (unlike the
    softmax loss, whose G needs the finished row and column logsumexps), the tile that computes a loss
    term can also compute its gradient term: for a chunk of C rows, one kernel (a program per tile)
    computes the C x N tiles of S, the loss terms, G' = N G (in [-1, 1], stored fp16, or fp32 for fp32
    inputs) and the tile sums of the loss, G' and G' S (d/dt, d/ds; summed per chunk in a fixed order,
    no atomics: bitwise deterministic); contrastive.py's Triton GEMM then finishes
    dA = (s/N) G' B and dB += (s/N) G'^T A in fp32. The forward keeps dA, dB (fp32, O(N D)) and the
    two scalars; the backward only multiplies them by the upstream gradient. FLOPs: 2 N^2 D for S plus
    4 N^2 D for the two gradient products, 6 N^2 D in all, nothing recomputed (structure.py does the
    same; contrastive.py's recompute-in-backward needs 8 N^2 D). Without autograd (torch.no_grad, or
    no input requiring a gradient) the forward runs the tiles alone: 2 N^2 D.
    Why not a fully fused tile kernel (G never leaving registers, flash-attention style): a program
    owning a block of rows would have to accumulate dA for them, BLOCK_M x D fp32, which does not fit
    in registers or shared memory at D = 512..1024 (flash attention can because its head dim is
    <= 256); splitting D means recomputing S once per slice, and accumulating dB across row blocks
    needs atomics (not deterministic) or a second sweep (8 N^2 D). The G' chunk (C x N, at most
    256 MB) costs memory traffic of 6 bytes per pair against 6 D FLOPs, negligible at D >= 512.
  * the elementwise math is written out in fp32 arithmetic. On sm_90 (Triton 3.9's PTX, checked)
    tl.exp is ex2.approx.f32 of x log2(e), whose rounding costs |x| log2(e) 2^-24 relative (14 ulps at
    |x| = 10); there is no tl.log1p, and log(1 + e) loses e below fp32's ulp of 1 (6e-8 a pair, which
    adds up over N^2 pairs when it is systematic, as for near-duplicate features); libdevice's exp
    and log1p are accurate but do not run in Triton's interpreter, so the tests could not check what
    the GPU computes. Here exp(-|x|) is a Cody-Waite reduction x = k ln2 - r with a degree-7
    polynomial and 2^-k built from its exponent bits, and log1p(e) = 2 atanh(e / (2 + e)) as an odd
    series in w = e / (2 + e) <= 1/3: measured in the interpreter within 0.8 and 2.1 fp32 ulps over
    the whole range, and the GPU runs the same operations (up to FMA contraction, and div.full.f32,
    within 2 ulps, for the divisions). Then
        softplus(z) = max(z, 0) + log1p(exp(-|z|)),
        sigmoid(z) = 1 / (1 + e) for z >= 0, e / (1 + e) for z < 0,   e = exp(-|z|),
    neither of which overflows or cancels for any finite z. Cost: about 30 fp32 operations per pair.
  * distributed (a process group, or the default group once initialised): each rank owns n rows of A
    and B, all-gathers B (n -> W n rows) and computes its n rows against all W n columns, the positives
    at columns rank * n + i. Its loss is open_clip's rank loss,
        L_k = (1/n) sum_{i in k, all j} softplus(-y_ij X_ij),     mean over ranks = the global loss,
    the value open_clip's SigLipLoss returns on rank k with any of its dist_impl (its own block with
    positives plus every other rank's block as negatives, each divided by the local n). Backward: dA_k
    is complete on rank k; s G^T A_k, B's gradient from rank k's rows for all W n rows, is scaled by the
    rank's upstream gradient and summed over ranks by a reduce-scatter (the gather's backward), so
    every rank's features receive sum_k' dL_k'/dF = W dL/dF, and DDP's 1/W averaging gives the
    single-process gradient of the global batch. d/ds and d/dt: rank k returns dL_k/ds and dL_k/dt,
    whose mean over ranks (DDP's average) is the global gradient. Why all-gather rather than
    open_clip's neighbour exchange (W - 1 ring steps, one block of B at a time): the sigmoid loss is a
    plain sum over column blocks, so either works and moves the same bytes; the gather does it in one
    collective and one kernel launch over all W n columns (better occupancy than W launches on n x n
    blocks at small per-rank n), its backward is one reduce-scatter, and it reuses contrastive.py's
    tested gather helpers and contract. What it costs: B gathered (W n x D) and B's fp32 gradient
    partial (W n x D) per rank, O(N D) for the global N instead of O(n D): 256 MB and 512 MB at a
    global batch of 131072 x 1024 in bf16. The ring pays off only at SigLIP's million-sample batches,
    where it can be added by running the same sweep per received block (the loss decomposes over
    column blocks).
    Requires equal local batch sizes on every rank (as open_clip does).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fused_losses.contrastive import (_AllGather, _all_gather, _check, _chunk_rows, _default_group, _dot_tile, _flags,
                                 _interpreting, _mm, _reduce_scatter, _tile_config, _work_dtype, _world, use_triton)

# -----------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _exp_neg(x):
    """exp(-x) for x >= 0, fp32, within about an ulp; exactly 0 from x = 87 on (the true value is
    below 1.7e-38 there). x = k ln2 - r, |r| <= ln2 / 2, exp(-x) = 2^-k exp(r)."""
    x = tl.minimum(x, 87.0)
    k = tl.floor(x * 1.4426950408889634 + 0.5)  # 0 <= k <= 126: 2^-k stays a normal float
    # ln2 = 0.693145751953125 (exact in 16 bits, so k * it is exact) + 1.4286068203094173e-06
    r = (k * 0.693145751953125 - x) + k * 1.4286068203094173e-06
    p = 1.984126984126984e-04  # Taylor to r^7: truncation (ln2/2)^8 / 8! = 5e-9 relative
    p = p * r + 1.388888888888889e-03
    p = p * r + 8.333333333333333e-03
    p = p * r + 4.1666666666666664e-02
    p = p * r + 1.6666666666666666e-01
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    two_k = ((127 - k.to(tl.int32)) << 23).to(tl.float32, bitcast=True)  # 2^-k from its exponent bits
    return tl.where(x < 87.0, p * two_k, 0.0)


@triton.jit
def _log1p_unit(e):
    """log(1 + e) for 0 <= e <= 1, fp32, within a few ulps: 2 atanh(w), w = e / (2 + e) <= 1/3,
    as 2 w (1 + w^2/3 + ... + w^14/15); truncation w^16 / 17 <= 1.3e-9 relative."""
    w = e / (2.0 + e)
    w2 = w * w
    p = 6.666666666666667e-02
    p = p * w2 + 7.692307692307693e-02
    p = p * w2 + 9.090909090909091e-02
    p = p * w2 + 1.111111111111111e-01
    p = p * w2 + 1.4285714285714285e-01
    p = p * w2 + 0.2
    p = p * w2 + 3.333333333333333e-01
    p = p * w2 + 1.0
    return 2.0 * w * p


@triton.jit
def _sigmoid_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, g_ptr, part_ptr,
                    row_lo, row_hi, n_cols, D, label_offset, stride_a, stride_b, stride_g,
                    GRAD: tl.constexpr, WRITE_G: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # One (BLOCK_M, BLOCK_N) tile of rows [row_lo, row_hi) x columns [0, n_cols). Writes the tile's
    # sum of loss terms, and with GRAD its sums of G' and G' S, to part[0 | 1 | 2, tile]; with WRITE_G
    # also G'_ij = N G_ij at g[i - row_lo, j] in g's dtype. One tile per program, no loop over column
    # blocks: with that loop the per-pair math spilled registers on sm_90 (compiled ahead of time).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = row_lo + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_hi
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    s = _dot_tile(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_a, stride_b,
                  BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, IEEE)
    x = tl.load(scale_ptr).to(tl.float32) * s + tl.load(bias_ptr).to(tl.float32)
    pos = cols[None, :] == rows[:, None] + label_offset  # the matching pair: y = +1
    z = tl.where(pos, -x, x)  # loss term softplus(z), z = -y x
    e = _exp_neg(tl.abs(x))  # exp(-|z|), |z| = |x|
    n_parts = tl.num_programs(0) * tl.num_programs(1)
    idx = pid_m * tl.num_programs(1) + pid_n
    tl.store(part_ptr + idx, tl.sum(tl.sum(tl.where(ok, tl.maximum(z, 0.0) + _log1p_unit(e), 0.0), 1), 0))
    if GRAD:
        q = 1.0 / (1.0 + e)
        sig = tl.where(z >= 0, q, e * q)  # sigmoid(z)
        g = tl.where(ok, tl.where(pos, -sig, sig), 0.0)  # G' = d softplus(-y x) / dx = -y sigmoid(z)
        tl.store(part_ptr + n_parts + idx, tl.sum(tl.sum(g, 1), 0))
        tl.store(part_ptr + 2 * n_parts + idx, tl.sum(tl.sum(g * s, 1), 0))
        if WRITE_G:
            tl.store(g_ptr + (rows - row_lo)[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=ok)


# -----------------------------------------------------------------------------
# launcher


def _config(dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the tile kernel. Not yet measured: the
    largest tiles that compiled for sm_90 (Triton 3.9, ahead of time, no GPU) without register spills:
    half inputs 181 registers a thread at 128 x 64 (contrastive.py's 128 x 128 spilled 160 bytes with this
    kernel's per-pair math), fp32 146 at 64 x 64 with 8 warps."""
    if _interpreting():
        return _tile_config(dtype, 0)  # contrastive.py's small tiles: several ragged tiles at small N
    if dtype == torch.float32:
        return 64, 64, 32, 8, 3
    return 128, 64, 32, 8, 3


def _sigmoid_sweep(a, b_all, scale, bias, label_offset=0, need_a=False, need_b=False, need_st=False, chunk=None):
    """Rows of `a` against all rows of `b_all`, positives at columns i + label_offset. Returns, in fp32:
    sum_ij softplus(-y X) (0-dim), G' B (n, D) if need_a, G'^T A (N, D) if need_b, sum G' and
    sum G' S (0-dim, when any gradient is asked for; else None), with G' = N G in [-1, 1]."""
    n, D = a.shape
    N = b_all.shape[0]
    BM, BN, BK, warps, stages = _config(a.dtype)
    write_g = need_a or need_b
    grad = write_g or need_st
    wdt = _work_dtype(a.dtype)
    dev = a.device
    # rows per launch: bounds G' (C x N, at most 256 MB) and the per-tile partials (3 C N / (BM BN))
    C = chunk or _chunk_rows(n, N, BM, torch.finfo(wdt).bits // 8)
    g = torch.empty(min(C, n), N, device=dev, dtype=wdt) if write_g else torch.empty(1, device=dev, dtype=wdt)
    da = torch.empty(n, D, device=dev, dtype=torch.float32) if need_a else None
    db = torch.empty(N, D, device=dev, dtype=torch.float32) if need_b else None
    a_mm = a.to(wdt) if need_b else None  # GEMM operands in G's dtype (a copy only for bf16)
    b_mm = b_all.to(wdt) if need_a else None
    sums = torch.zeros(3, device=dev, dtype=torch.float32)  # loss terms, G', G' S
    for r0 in range(0, n, C):
        r1 = min(r0 + C, n)
        grid = (triton.cdiv(r1 - r0, BM), triton.cdiv(N, BN))
        part = torch.empty(3 if grad else 1, grid[0] * grid[1], device=dev, dtype=torch.float32)
        _sigmoid_kernel[grid](a, b_all, scale, bias, g, part, r0, r1, N, D, label_offset,
                              a.stride(0), b_all.stride(0), g.stride(0) if write_g else 0,
                              GRAD=grad, WRITE_G=write_g, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                              num_warps=warps, num_stages=stages, **_flags(a, D, BK))
        if need_a:
            _mm(g[: r1 - r0], b_mm, da[r0:r1])  # (c, N) @ (N, D)
        if need_b:
            _mm(g[: r1 - r0].t(), a_mm[r0:r1], db, accumulate=r0 > 0)  # (N, c) @ (c, D)
        sums[: part.shape[0]] += part.sum(1)  # per chunk, in a fixed order: deterministic
    return sums[0], da, db, (sums[1] if grad else None), (sums[2] if grad else None)


# -----------------------------------------------------------------------------
# autograd


class _SigmoidLoss(torch.autograd.Function):

    @staticmethod
    def forward(ctx, a, b, scale, bias, group, grad_enabled):
        world, rank = _world(group)
        n = a.shape[0]
        a, b = a.contiguous(), b.contiguous()
        b_all = _all_gather(b, group) if world > 1 else b  # (W n, D)
        s32, t32 = scale.detach().float(), bias.detach().float()
        # ctx.needs_input_grad says True under torch.no_grad as well: ask the caller's grad mode too
        need = [grad_enabled and x for x in ctx.needs_input_grad[:4]]
        total, da, db, g_sum, gs_sum = _sigmoid_sweep(a, b_all, s32, t32, rank * n,
                                                      need[0], need[1], need[2] or need[3])
        # the 1/n (and s) factors, applied once in fp32 (scalars stay on the device)
        if da is not None:
            da.mul_(s32 / n)
        if db is not None:
            db.mul_(s32 / n)
        ds = gs_sum / n if need[2] else None
        dt = g_sum / n if need[3] else None
        ctx.save_for_backward(da, db, ds, dt)
        ctx.group, ctx.dtypes = group, (a.dtype, b.dtype, scale.dtype, bias.dtype)
        return total / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        g = grad.float()
        grads = [None if x is None else g * x for x in ctx.saved_tensors]  # dA, dB (all W n rows), ds, dt
        world, _ = _world(ctx.group)
        if grads[1] is not None and world > 1:
            grads[1] = _reduce_scatter(grads[1], ctx.group)  # the gather's backward
        return (*(None if x is None else x.to(d) for x, d in zip(grads, ctx.dtypes)), None, None)


# -----------------------------------------------------------------------------
# public function


def _check_bias(bias, a):
    if not torch.is_tensor(bias) or bias.ndim != 0 or not bias.is_floating_point():
        shape = tuple(bias.shape) if torch.is_tensor(bias) else type(bias).__name__
        raise ValueError(f"logit_bias must be a 0-dim floating tensor (e.g. model.logit_bias); got {shape}")
    if bias.device != a.device:
        raise ValueError(f"all inputs must be on one device; got {a.device} and logit_bias on {bias.device}")


def sigmoid_loss(image_features, text_features, logit_scale, logit_bias, group=None):
    """SigLIP's sigmoid loss, (1/N) sum_ij softplus(-y_ij (s <a_i, b_j> + t)) (open_clip's SigLipLoss),
    0-dim; fp32 on the Triton path whatever the features' dtype (the CPU fallback: the reference's dtype).

    image_features, text_features: (N, D), L2-normalised, one dtype (fp32, bf16 or fp16), D % 8 == 0.
    logit_scale: 0-dim tensor, the multiplier s (e.g. model.logit_scale.exp()); logit_bias: 0-dim
    tensor t. Both receive gradients. group: process group; None means the default group once
    torch.distributed is initialised. With a group, the features are this rank's local batch, the
    result is open_clip's rank loss and the gradients follow the contract in the module docstring;
    every rank must pass the same N.
    On CUDA (or with TRITON_INTERPRET=1) the fused Triton kernels run; elsewhere the reference below.
    """
    _check(image_features, text_features, logit_scale)
    _check_bias(logit_bias, image_features)
    group = _default_group(group)
    if use_triton(image_features):
        return _SigmoidLoss.apply(image_features, text_features, logit_scale, logit_bias, group,
                                  torch.is_grad_enabled())
    return sigmoid_loss_reference(image_features, text_features, logit_scale, logit_bias, group)


# -----------------------------------------------------------------------------
# reference (tests, benchmark, CPU fallback)


def sigmoid_loss_reference(image_features, text_features, logit_scale, logit_bias, group=None):
    """Plain PyTorch, open_clip's SigLipLoss (dist_impl="gather" under a group), in the input dtype."""
    group = _default_group(group)
    world, rank = _world(group)
    a, b = image_features, text_features
    n = a.shape[0]
    b_all = _AllGather.apply(b, group) if world > 1 else b
    # written as open_clip writes it, so its rounding is PyTorch's own in the input dtype
    logits = logit_scale * a @ b_all.t() + logit_bias  # (n, W n)
    pos = torch.arange(b_all.shape[0], device=a.device)[None, :] == torch.arange(n, device=a.device)[:, None] + rank * n
    labels = 2 * pos.to(logits.dtype) - 1  # +1 on this rank's diagonal, -1 elsewhere
    return -F.logsigmoid(labels * logits).sum() / n
