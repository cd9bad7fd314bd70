"""
Fused CLIP contrastive loss (symmetric InfoNCE) in Triton, never materialising the N x N logits.

Math. A (images) and B (texts) are N x D, rows L2-normalised; s > 0 is the logit multiplier
(`model.logit_scale.exp()`); S = A B^T are the cosines and X = s S the logits.
    r_i = logsumexp_j X_ij            (row statistics: image -> text)
    c_j = logsumexp_i X_ij            (column statistics: text -> image)
    L   = 1/(2N) [ sum_i (r_i - X_ii) + sum_j (c_j - X_jj) ]
which is open_clip's ClipLoss: (CE(X, arange) + CE(X^T, arange)) / 2 with mean reduction.
Backward, with P = softmax over rows (P_ij = exp(X_ij - r_i)) and Q = softmax over columns
(Q_ij = exp(X_ij - c_j)):
    G    = dL/dX = 1/(2N) (P + Q - 2 I)
    dA   = s G B,      dB = s G^T A
    dL/ds = sum_ij G_ij S_ij  (= <dA, A> / s = <dB, B> / s: the same number three ways;
                               d L / d log s = <dA, A>, the identity the tests check)
Only r (N), c (N) and the inputs are kept for the backward.

Kernels (written for an H100; tile sizes untuned until a GPU is at hand):
  * forward, one sweep: program (g, c) takes row blocks g, g+R, g+2R, ... against the column blocks of
    split c. Row statistics are online (max, sum of exp2) per split; column statistics are per-row-group
    partials updated in place by their owning program. Both sets of partials are merged exactly
    (max then rescaled sums) by a small kernel, in a fixed order: no atomics, bitwise deterministic.
    Logits are kept in base 2 (log2(e) folded into s) so every exponential is an exp2.
  * backward: for a chunk of C rows, one kernel recomputes the C x N tiles of S and forms
    G' = wr P + wc Q - (wr + wc) I (weights explained below) in fp16 (fp32 for fp32 inputs); a plain
    Triton GEMM finishes dA = s g G' B and dB += s g G'^T A with fp32 accumulation. FLOPs: 2 N^2 D forward,
    6 N^2 D backward, all on tensor cores: 8 N^2 D in total. G' lies in [-2, 2] whatever N is; the tiny
    1/(2N) factor is applied at the end in fp32, so fp16 does not underflow.
  * distributed (a process group, or the default group once initialised): each rank owns n rows of A
    and B. It gathers B (n -> W n rows), computes its own n rows of X against all W n columns (the
    image -> text terms of its rows), and merges the column statistics of all ranks by all-gathering
    the per-rank partial column logsumexps (W x Wn floats) and combining them in rank order. Its loss
    is the open_clip local loss L_k = 1/(2n)[sum_{i in k}(r_i - X_ii) + sum_{j in k}(c_j - X_jj)],
    whose mean over ranks is the global loss. Why this design and not open_clip's second product
    B_k A_all^T: it needs half the FLOPs (one n x Wn product instead of two) and A is never gathered.
    Backward: rank k's rows of dL_k'/dX for every k' (rows i of X hold the text-direction terms of
    every column j, owned by rank own(j), whose upstream gradient g_own(j) we all-gather: W scalars):
        G_ij = g_k/(2n) (P_ij - d_ij) + g_own(j)/(2n) (Q_ij - d_ij)
    gives dA_k = s G B_all complete, and s G^T A_k, B's gradient from rank k's rows, is summed over
    ranks by a reduce-scatter (the gather's backward). Each rank's features therefore receive
    sum_k' dL_k'/dF = W dL/dF, exactly what open_clip's local_loss=True, gather_with_grad=True gives,
    and DDP's 1/W averaging turns it into the single-process gradient of the global batch.
    d/ds: rank k returns the contribution of its rows, sum_{i in k, j} G_ij S_ij. That is not
    dL_k/ds, but the sum over ranks is the same, so DDP's average is again the global gradient.
    Requires equal local batch sizes on every rank (as open_clip does).
"""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): the kernels spell it out, a plain global is no constexpr
LN2 = 0.6931471805599453
D_MAX = 4096  # widest feature dimension tested; nothing breaks above it, it is just unmeasured
NEG = -1.0e30  # a finite "minus infinity": masked logits stay finite, so no inf - inf = NaN anywhere


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# -----------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _dot_tile(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_a, stride_b,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              EVEN_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """S tile = A[rows] @ B[cols]^T in fp32, looping over D in BLOCK_K slices. (BLOCK_M, BLOCK_N)"""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            a = tl.load(a_ptr + rows[:, None] * stride_a + kk[None, :], mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptr + cols[:, None] * stride_b + kk[None, :], mask=col_ok[:, None], other=0.0)
        else:
            k_ok = kk < D
            a = tl.load(a_ptr + rows[:, None] * stride_a + kk[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptr + cols[:, None] * stride_b + kk[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            # Triton's interpreter multiplies the raw bits of bf16 operands in tl.dot (3.9.0), so on
            # the CPU we hand it fp32 copies: bf16 x bf16 products are exact in fp32 either way.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")  # fp32 inputs: no silent TF32
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _fwd_kernel(a_ptr, b_ptr, scale_ptr, row_m_ptr, row_l_ptr, col_m_ptr, col_l_ptr, diag_ptr,
                n_rows, n_cols, D, label_offset, stride_a, stride_b,
                n_row_blocks, row_groups, blocks_per_split,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # Program (g, c): row blocks g, g + R, ... against the column blocks of split c.
    # Writes row partials row_m/row_l[c, rows] (base-2 running max and sum of exp2), and updates its
    # own column partials col_m/col_l[g, cols] in place (it is their only writer).
    pid_g = tl.program_id(0)
    pid_c = tl.program_id(1)
    scale2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634  # s * log2(e)
    cb_lo = pid_c * blocks_per_split
    cb_hi = tl.minimum(cb_lo + blocks_per_split, tl.cdiv(n_cols, BLOCK_N))
    for rb in range(pid_g, n_row_blocks, row_groups):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for cb in range(cb_lo, cb_hi):
            cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < n_cols
            s = _dot_tile(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_a, stride_b,
                          BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, IEEE)
            z = tl.where(row_ok[:, None] & col_ok[None, :], s * scale2, -1.0e30)  # base-2 logits
            # rows: online logsumexp
            m_new = tl.maximum(m_i, tl.max(z, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), 1)
            m_i = m_new
            # columns: this tile's (max, sum) merged into the row group's running partial
            cm = tl.max(z, 0)
            cl = tl.sum(tl.exp2(z - cm[None, :]), 0)
            cptr = pid_g * n_cols + cols
            m_old = tl.load(col_m_ptr + cptr, mask=col_ok, other=-1.0e30)
            l_old = tl.load(col_l_ptr + cptr, mask=col_ok, other=0.0)
            m_mrg = tl.maximum(m_old, cm)
            l_mrg = l_old * tl.exp2(m_old - m_mrg) + cl * tl.exp2(cm - m_mrg)
            tl.store(col_m_ptr + cptr, m_mrg, mask=col_ok)
            tl.store(col_l_ptr + cptr, l_mrg, mask=col_ok)
            # the label column of row i is i + label_offset; pick its logit out if it is in this tile
            # (the base-2 logit itself, so that N = 1 gives r_i - X_ii = 0 exactly)
            lo = rb * BLOCK_M + label_offset
            if (cb * BLOCK_N < lo + BLOCK_M) & (lo < cb * BLOCK_N + BLOCK_N):
                hit = cols[None, :] == rows[:, None] + label_offset
                d = tl.sum(tl.where(hit, z, 0.0), 1)
                lab = rows + label_offset
                tl.store(diag_ptr + rows, d, mask=row_ok & (lab >= cb * BLOCK_N) & (lab < cb * BLOCK_N + BLOCK_N))
        tl.store(row_m_ptr + pid_c * n_rows + rows, m_i, mask=row_ok)
        tl.store(row_l_ptr + pid_c * n_rows + rows, l_i, mask=row_ok)


@triton.jit
def _merge_kernel(m_ptr, l_ptr, out_ptr, n_parts, n, BLOCK: tl.constexpr):
    """out[j] = log2(sum_p l[p, j] 2^m[p, j]): exact merge of base-2 partials, parts in fixed order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    m = tl.full([BLOCK], -1.0e30, dtype=tl.float32)
    l = tl.zeros([BLOCK], dtype=tl.float32)
    for p in range(0, n_parts):
        mp = tl.load(m_ptr + p * n + offs, mask=ok, other=-1.0e30)
        lp = tl.load(l_ptr + p * n + offs, mask=ok, other=0.0)
        m_new = tl.maximum(m, mp)
        l = l * tl.exp2(m - m_new) + lp * tl.exp2(mp - m_new)
        m = m_new
    tl.store(out_ptr + offs, m + tl.log2(tl.where(ok, l, 1.0)), mask=ok)


@triton.jit
def _grad_logits_kernel(a_ptr, b_ptr, scale_ptr, row_lse_ptr, col_lse_ptr, row_w_ptr, col_w_ptr,
                        g_ptr, ds_ptr, row_lo, row_hi, n_cols, D, label_offset,
                        stride_a, stride_b, stride_g,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EVEN_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # One (BLOCK_M, BLOCK_N) tile of G' for rows [row_lo, row_hi) of the chunk:
    #   G'_ij = wr P_ij + wc_j Q_ij - (wr + wc_j) [j == i + label_offset]
    # stored in the input dtype at g[i - row_lo, j]; also this tile's sum of G'_ij S_ij in fp32.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = row_lo + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_hi
    col_ok = cols < n_cols
    s = _dot_tile(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_a, stride_b,
                  BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, IEEE)
    z = s * (tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634)
    r = tl.load(row_lse_ptr + rows, mask=row_ok, other=0.0)
    c = tl.load(col_lse_ptr + cols, mask=col_ok, other=0.0)
    wr = tl.load(row_w_ptr)
    wc = tl.load(col_w_ptr + cols, mask=col_ok, other=0.0)
    p = tl.exp2(z - r[:, None])  # row softmax, recomputed from the saved row logsumexp
    q = tl.exp2(z - c[None, :])  # column softmax
    g = wr * p + wc[None, :] * q
    g = tl.where(cols[None, :] == rows[:, None] + label_offset, g - (wr + wc[None, :]), g)
    ok = row_ok[:, None] & col_ok[None, :]
    g = tl.where(ok, g, 0.0)
    tl.store(g_ptr + (rows - row_lo)[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=ok)
    tl.store(ds_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(g * s, 1), 0))


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, e_ptr, M, N, K,
               stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_cs, stride_em,
               k_per_split,
               ACCUMULATE: tl.constexpr, HAS_DIAG: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
               UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """C[split] (+)= A[:, ks] @ B[ks, :] in fp32 (K split across axis 1 of the grid, each split its own
    slice of C: summed later, in order). With HAS_DIAG also C -= rowsum(A) * E (the structure loss)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row tiles share their B columns while they are hot in L2
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    rsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_hi
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_DIAG:
            rsum += tl.sum(a.to(tl.float32), 1)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_DIAG:
        e = tl.load(e_ptr + rm[:, None] * stride_em + rn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        acc -= rsum[:, None] * e.to(tl.float32)
    c_ptrs = c_ptr + split * stride_cs + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    ok = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=ok, other=0.0)
    tl.store(c_ptrs, acc, mask=ok)


# -----------------------------------------------------------------------------
# launchers


def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a small "machine", so that the tests see splits and multi-block programs


def _tile_config(dtype, D):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the S-tile kernels.

    A fixed table rather than @triton.autotune: autotuning may pick a different tile (and so a
    different summation order) in another process, which would break bitwise determinism across runs.
    The GPU numbers are not measured yet: they are the largest tiles that compiled for sm_90 (Triton
    3.9, ahead of time, no GPU) without register spills; 128 x 128 x 64 spilled.
    """
    if _interpreting():
        # small tiles so the tests' small N still cover several ragged tiles; BLOCK_K=32 makes D=40
        # and D=264 exercise the masked K tail
        return 32, 32, 32, 1, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    return 128, 128, 32, 8, 3


def _mm_config(dtype):
    """As _tile_config: spill-free on sm_90 when compiled ahead of time, not yet measured."""
    if _interpreting():
        return 32, 32, 32, 1, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    return 128, 64, 64, 8, 3


def _work_dtype(dtype):
    """Storage of G' (and the structure loss's M) between the tile kernel and the GEMMs.

    fp16 for both half dtypes: G' lies in [-2, 2], where fp16 carries 3 more mantissa bits than bf16
    and runs the GEMM at the same tensor-core speed. bf16 features are copied to fp16 for the GEMMs
    (O(N D), once; unit-norm features lose nothing but subnormal digits below 6e-5); converting
    them inside the GEMM's loop instead cost registers and spilled."""
    return torch.float32 if dtype == torch.float32 else torch.float16


def _flags(x, D, block_k):
    return dict(EVEN_K=D % block_k == 0, UPCAST=_interpreting(), IEEE=x.dtype == torch.float32)


def _merge(m, l):
    """Merge (P, n) base-2 partials into (n,) base-2 logsumexps."""
    P, n = m.shape
    out = torch.empty(n, device=m.device, dtype=torch.float32)
    BLOCK = 1024 if not _interpreting() else 256
    _merge_kernel[(triton.cdiv(n, BLOCK),)](m, l, out, P, n, BLOCK=BLOCK)
    return out


def _forward_stats(a, b_all, scale, label_offset=0):
    """Rows of `a` against all rows of `b_all`. Returns base-2 row logsumexps (n,), this caller's
    base-2 column logsumexps over its rows (N,) and the base-2 label logits Z_i,i+offset (n,), fp32."""
    n, D = a.shape
    N = b_all.shape[0]
    BM, BN, BK, warps, stages = _tile_config(a.dtype, D)
    n_rb, n_cb = triton.cdiv(n, BM), triton.cdiv(N, BN)
    target = 2 * _num_sms(a.device)
    R = min(n_rb, 256 if not _interpreting() else 2)  # row groups: bounds the column partials to R x N
    per_split = triton.cdiv(n_cb, max(1, triton.cdiv(target, R)))
    C = triton.cdiv(n_cb, per_split)  # column splits: enough programs to fill the GPU at small N
    dev = a.device
    row_m = torch.empty(C, n, device=dev, dtype=torch.float32)
    row_l = torch.empty(C, n, device=dev, dtype=torch.float32)
    col_m = torch.full((R, N), NEG, device=dev, dtype=torch.float32)
    col_l = torch.zeros(R, N, device=dev, dtype=torch.float32)
    diag = torch.empty(n, device=dev, dtype=torch.float32)
    _fwd_kernel[(R, C)](a, b_all, scale, row_m, row_l, col_m, col_l, diag,
                        n, N, D, label_offset, a.stride(0), b_all.stride(0), n_rb, R, per_split,
                        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps, num_stages=stages,
                        **_flags(a, D, BK))
    return _merge(row_m, row_l), _merge(col_m, col_l), diag


def _chunk_rows(n, N, block, elem_bytes):
    """Rows per backward chunk: the C x N block of G' takes at most 256 MB (a few rows when interpreting)."""
    if _interpreting():
        return 2 * block
    rows = (256 * 2**20 // elem_bytes) // max(N, 1)
    return max(block, min(triton.cdiv(n, block) * block, rows // block * block))


def _mm(a, b, out, accumulate=False, diag_e=None):
    """out (+)= a @ b in fp32 (a (M, K), b (K, N), any strides; out (M, N) fp32, contiguous rows).
    Splits K when the output has too few tiles to fill the GPU; the splits are summed in order.
    With diag_e (M, N): out (+)= a @ b - rowsum(a)[:, None] * diag_e."""
    M, K = a.shape
    N = b.shape[1]
    BM, BN, BK, warps, stages = _mm_config(a.dtype)
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    splits = max(1, min(8, triton.cdiv(2 * _num_sms(a.device), tiles), triton.cdiv(K, 4 * BK)))
    k_per = triton.cdiv(triton.cdiv(K, splits), BK) * BK
    splits = triton.cdiv(K, k_per)
    flags = dict(UPCAST=_interpreting(), IEEE=a.dtype == torch.float32, GROUP_M=8,
                 BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps, num_stages=stages,
                 HAS_DIAG=diag_e is not None)
    e, se = (diag_e, diag_e.stride(0)) if diag_e is not None else (out, 0)
    if splits == 1:
        _mm_kernel[(tiles, 1)](a, b, out, e, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                               out.stride(0), out.stride(1), 0, se, k_per, ACCUMULATE=accumulate, **flags)
        return out
    # each split subtracts the row sums of its own K slice, so the diagonal term also adds up
    part = torch.empty(splits, M, N, device=out.device, dtype=torch.float32)
    _mm_kernel[(tiles, splits)](a, b, part, e, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                part.stride(1), part.stride(2), part.stride(0), se, k_per, ACCUMULATE=False,
                                **flags)
    if accumulate:
        out += part.sum(0)
    else:
        torch.sum(part, 0, out=out)
    return out


def _backward_grads(a, b_all, scale, row_lse2, col_lse2, row_w, col_w, label_offset=0, chunk=None):
    """Unscaled gradients for rows of `a` against all of `b_all`, with
        G'_ij = wr P_ij + wc_j Q_ij - (wr + wc_j) [j == i + label_offset]:
    returns G' B (n, D), G'^T A (N, D) and sum G'_ij S_ij (0-dim), all fp32."""
    n, D = a.shape
    N = b_all.shape[0]
    BM, BN, BK, warps, stages = _tile_config(a.dtype, D)
    C = chunk or _chunk_rows(n, N, BM, a.element_size())
    g = torch.empty(min(C, n), N, device=a.device, dtype=_work_dtype(a.dtype))  # G' for one chunk of rows
    da = torch.empty(n, D, device=a.device, dtype=torch.float32)
    db = torch.empty(N, D, device=a.device, dtype=torch.float32)
    ds_parts = []
    a_mm, b_mm = a.to(g.dtype), b_all.to(g.dtype)  # GEMM operands in G's dtype (no-op unless bf16)
    for r0 in range(0, n, C):
        r1 = min(r0 + C, n)
        grid = (triton.cdiv(r1 - r0, BM), triton.cdiv(N, BN))
        ds = torch.empty(grid[0] * grid[1], device=a.device, dtype=torch.float32)
        _grad_logits_kernel[grid](a, b_all, scale, row_lse2, col_lse2, row_w, col_w, g, ds,
                                  r0, r1, N, D, label_offset, a.stride(0), b_all.stride(0), g.stride(0),
                                  BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps, num_stages=stages,
                                  **_flags(a, D, BK))
        gc = g[: r1 - r0]
        _mm(gc, b_mm, da[r0:r1])                           # (c, N) @ (N, D)
        _mm(gc.t(), a_mm[r0:r1], db, accumulate=r0 > 0)     # (N, c) @ (c, D)
        ds_parts.append(ds)
    return da, db, torch.cat(ds_parts).sum()


# -----------------------------------------------------------------------------
# distributed helpers (the gather's backward is a reduce-scatter, as in open_clip's gather_with_grad)


def _all_gather(x, group):
    world = dist.get_world_size(group)
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), device=x.device, dtype=x.dtype)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x, group):
    """Sum x (W n, ...) over ranks and return this rank's n rows."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = x.shape[0] // world
    if dist.get_backend(group) == "gloo":  # gloo has no reduce_scatter: all-reduce and slice
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x[rank * n:(rank + 1) * n]
    out = torch.empty((n,) + tuple(x.shape[1:]), device=x.device, dtype=x.dtype)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums the gradient over ranks and hands each rank its rows."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group), None


def all_gather_with_grad(x, group=None):
    """Every rank's x, concatenated in rank order (W n, ...), with a backward that sums the gradient over
    ranks and hands each rank its own rows (open_clip's gather_with_grad). x itself without a group."""
    group = _default_group(group)
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllGather.apply(x, group)


def _world(group):
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


# -----------------------------------------------------------------------------
# autograd


def _rank_loss(row_lse2, col_lse2, zdiag, rank):
    """Open_clip's local loss of one rank from its statistics (all base 2; the result in nats):
    1/(2n) [sum_{i in rank} (r_i - X_ii) + sum_{j in rank} (c_j - X_jj)]."""
    n = row_lse2.shape[0]
    own = col_lse2[rank * n:(rank + 1) * n]
    return LN2 * ((row_lse2 - zdiag).sum() + (own - zdiag).sum()) / (2 * n)


def _rank_backward(a, b_all, s32, row_lse2, col_lse2, g_all, rank):
    """One rank's gradients given every rank's upstream gradient g_all (W,): dA for its rows (fp32),
    B's gradient from its rows for all W n rows (fp32; the caller sums it over ranks) and its rows'
    share of dL/ds. See the module docstring for G."""
    n = a.shape[0]
    # a common factor out of G keeps G' O(1) (fp16-safe); the weights are then exactly 1 in the
    # usual case of equal upstream gradients
    gf = g_all.abs().max() / (2 * n)
    gf = torch.where(gf > 0, gf, torch.ones_like(gf))
    row_w = (g_all[rank] / (2 * n) / gf).reshape(())
    col_w = (g_all / (2 * n) / gf).repeat_interleave(n)  # (W n,) column j carries its owner's weight
    da, db, ds = _backward_grads(a, b_all, s32, row_lse2, col_lse2, row_w, col_w, label_offset=rank * n)
    alpha = s32 * gf
    return alpha * da, alpha * db, gf * ds


class _ContrastiveLoss(torch.autograd.Function):

    @staticmethod
    def forward(ctx, a, b, scale, group):
        world, rank = _world(group)
        n = a.shape[0]
        a, b = a.contiguous(), b.contiguous()
        b_all = _all_gather(b, group) if world > 1 else b  # (W n, D)
        s32 = scale.detach().float()
        row_lse2, col_lse2, zdiag = _forward_stats(a, b_all, s32, label_offset=rank * n)
        if world > 1:
            parts = _all_gather(col_lse2[None], group)  # (W, W n): every rank's column partials
            col_lse2 = _merge(parts, torch.ones_like(parts))  # merged in rank order on every rank
        ctx.save_for_backward(a, b, b_all if world > 1 else None, s32, row_lse2, col_lse2)
        ctx.group, ctx.scale_dtype = group, scale.dtype
        return _rank_loss(row_lse2, col_lse2, zdiag, rank)

    @staticmethod
    def backward(ctx, grad):
        a, b, b_all, s32, row_lse2, col_lse2 = ctx.saved_tensors
        world, rank = _world(ctx.group)
        g = grad.detach().float().reshape(1)
        g_all = _all_gather(g, ctx.group) if world > 1 else g  # (W,)
        da, db, ds = _rank_backward(a, b if b_all is None else b_all, s32, row_lse2, col_lse2, g_all, rank)
        if world > 1:
            db = _reduce_scatter(db, ctx.group)  # the gather's backward
        return da.to(a.dtype), db.to(b.dtype), ds.to(ctx.scale_dtype), None


# -----------------------------------------------------------------------------
# public function


def _check(a, b, scale):
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"features must be 2-d (N, D); got image {tuple(a.shape)} and text {tuple(b.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"image and text features must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    D = a.shape[1]
    if a.shape[0] < 1 or D % 8 != 0 or D < 8 or D > D_MAX:
        raise ValueError(f"need N >= 1 and D a multiple of 8 in [8, {D_MAX}]; got N={a.shape[0]}, D={D}")
    if a.dtype != b.dtype or a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"features must share one dtype among float32, bfloat16, float16; got {a.dtype} and {b.dtype}")
    if not torch.is_tensor(scale) or scale.ndim != 0 or not scale.is_floating_point():
        shape = tuple(scale.shape) if torch.is_tensor(scale) else type(scale).__name__
        raise ValueError(f"logit_scale must be a 0-dim floating tensor (e.g. model.logit_scale.exp()); got {shape}")
    if a.device != b.device or scale.device != a.device:
        raise ValueError(f"all inputs must be on one device; got {a.device}, {b.device} and {scale.device}")


def _default_group(group):
    if group is None and dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return group


def use_triton(x):
    """The Triton path runs on CUDA tensors, or on the CPU under TRITON_INTERPRET=1 (tests)."""
    return x.is_cuda or _interpreting()


def contrastive_loss(image_features, text_features, logit_scale, group=None):
    """Symmetric CLIP InfoNCE, mean over the batch (open_clip's ClipLoss).

    image_features, text_features: (N, D), L2-normalised, one dtype (fp32, bf16 or fp16), D % 8 == 0.
    logit_scale: 0-dim tensor, the multiplier s (e.g. model.logit_scale.exp()); receives a gradient.
    group: process group; None means the default group once torch.distributed is initialised. With a
    group, the features are this rank's local batch and the result is open_clip's local loss with
    gather_with_grad (see the module docstring); every rank must pass the same N.
    On CUDA (or with TRITON_INTERPRET=1) the fused Triton kernels run; elsewhere the reference below.
    """
    _check(image_features, text_features, logit_scale)
    group = _default_group(group)
    if use_triton(image_features):
        return _ContrastiveLoss.apply(image_features, text_features, logit_scale, group)
    return contrastive_loss_reference(image_features, text_features, logit_scale, group)


# -----------------------------------------------------------------------------
# reference (tests, benchmark, CPU fallback)


def contrastive_loss_reference(image_features, text_features, logit_scale, group=None):
    """Plain PyTorch, open_clip's ClipLoss(local_loss=True, gather_with_grad=True), in the input dtype."""
    group = _default_group(group)
    world, rank = _world(group)
    a, b = image_features, text_features
    n = a.shape[0]
    if world > 1:
        a_all, b_all = _AllGather.apply(a, group), _AllGather.apply(b, group)
    else:
        a_all, b_all = a, b
    labels = torch.arange(n, device=a.device) + rank * n
    # written as open_clip writes it, so its rounding is PyTorch's own in the input dtype
    logits_per_image = logit_scale * a @ b_all.t()  # (n, W n)
    logits_per_text = logit_scale * b @ a_all.t() if world > 1 else logits_per_image.t()
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
