"""Pass 1 of the fast path: column sums of the softmax for every head, flash-attention style.

Given q (B,H,T,D), k (B,KV,T,D) and each row's log-sum-exp (from the attention kernel that made the
output), one program owns a block of key columns of one head and walks down the query rows that can see
them: p = exp(q.k * scale - lse) is built tile by tile in registers and summed over rows, so no T x T map
exists and the causal (and sliding-window) tiles that no row sees are never visited. GQA: head h reads
key head h // (H // KV). Padding: rows and columns whose token is not valid never count.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

FIXED_BLOCK: tuple[int, int] | None = None  # set to skip autotuning (checks that compile for many shapes)
_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
            for m, n, w, st in ((64, 64, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3),
                                (128, 64, 8, 3), (64, 64, 4, 2))]


@triton.jit
def softcapped(s, cap):
    """Logits (log2 units, scale applied) through cap * tanh(logit / cap) in natural units (Gemma-2's softcap):
    tanh(x) = 2 sigmoid(2x) - 1, exact to float32's absolute rounding."""
    x = s * (0.6931471805599453 / cap)
    return (2.0 * tl.sigmoid(2.0 * x) - 1.0) * (cap * 1.4426950408889634)


@triton.jit
def _tile(acc, q_ptrs, lse_ptrs, valid_ptrs, rows, cols, k, T, WINDOW, scale_log2e, cap, D: tl.constexpr,
          BLOCK_D: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) += exp2(q.k * scale*log2e - lse2) over one tile of rows (summed over rows once,
    at the end: a reduction across warps per tile costs more than the tile's exponentials); lse2 = lse * log2(e),
    +inf on rows that are padding or past T, so they add 0 without a mask; MASKED tiles also apply causality and
    the window."""
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptrs, mask=(rows[:, None] < T) & (dims[None, :] < D), other=0.0)
    row_ok = tl.load(valid_ptrs, mask=rows < T, other=0) != 0
    lse2 = tl.where(row_ok, tl.load(lse_ptrs, mask=row_ok, other=0.0) * 1.4426950408889634, float("inf"))
    if IEEE:  # float32 inputs (and any input under the interpreter, whose bf16 dot is wrong)
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale_log2e
    if SOFTCAP:
        s = softcapped(s, cap)
    s = s - lse2[:, None]
    if MASKED:
        diff = rows[:, None] - cols[None, :]
        s = tl.where((diff >= 0) & (diff < WINDOW), s, float("-inf"))
    return acc + tl.exp2(s)


@triton.jit
def _colsum_kernel(Q, K, LSE, VALID, FACTOR, OUT,
                   sqb, sqh, sqt, sqd, skb, skh, skt, skd, slb, slh, slt, svb, svt, sfb, sft, sob, soh, sot,
                   T, H, N_REP, WINDOW, scale_log2e, cap, T_BUCKET,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   IEEE: tl.constexpr, SCORES: tl.constexpr, SOFTCAP: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // N_REP
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_in = cols < T
    k = tl.load(K + b * skb + kvh * skh + cols[:, None] * skt + dims[None, :] * skd,
                mask=col_in[:, None] & (dims[None, :] < D), other=0.0)
    q_base = Q + b * sqb + h * sqh + dims[None, :] * sqd
    l_base = LSE + b * slb + h * slh
    v_base = VALID + b * svb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_ceil = tl.cdiv(T, BLOCK_M) * BLOCK_M
    # three row ranges: tiles crossing the diagonal (masked), tiles every row of which sees every column of
    # the block (unmasked), tiles crossing the window's far edge (masked); rows above the diagonal and
    # beyond the window are never visited
    lo = (n0 // BLOCK_M) * BLOCK_M
    full_lo = tl.minimum(tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M, t_ceil)
    full_hi = tl.maximum(full_lo, tl.minimum(t_ceil, ((n0 + WINDOW) // BLOCK_M) * BLOCK_M))
    hi = tl.minimum(t_ceil, tl.cdiv(n0 + BLOCK_N - 1 + WINDOW, BLOCK_M) * BLOCK_M)
    for m0 in range(lo, full_lo, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        acc = _tile(acc, q_base + rows[:, None] * sqt, l_base + rows * slt, v_base + rows * svt, rows, cols, k, T,
                    WINDOW, scale_log2e, cap, D, BLOCK_D, True, IEEE, SOFTCAP)
    for m0 in range(full_lo, full_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        acc = _tile(acc, q_base + rows[:, None] * sqt, l_base + rows * slt, v_base + rows * svt, rows, cols, k, T,
                    WINDOW, scale_log2e, cap, D, BLOCK_D, False, IEEE, SOFTCAP)
    for m0 in range(full_hi, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        acc = _tile(acc, q_base + rows[:, None] * sqt, l_base + rows * slt, v_base + rows * svt, rows, cols, k, T,
                    WINDOW, scale_log2e, cap, D, BLOCK_D, True, IEEE, SOFTCAP)
    total = tl.sum(acc, axis=0)
    if SCORES:  # column score = sum x FACTOR (1 / rows that see the column; nan where it cannot be a sink)
        total = total * tl.load(FACTOR + b * sfb + cols * sft, mask=col_in, other=0.0)
    else:  # padding columns: 0
        total = tl.where(tl.load(VALID + b * svb + cols * svt, mask=col_in, other=0) != 0, total, 0.0)
    tl.store(OUT + b * sob + h * soh + cols * sot, total, mask=col_in)


_tuned = triton.autotune(configs=_CONFIGS, key=["D", "IEEE", "T_BUCKET", "SCORES", "SOFTCAP"])(_colsum_kernel) \
    if not INTERPRET else None


def column_sums(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, token_valid: torch.Tensor,
                scaling: float, window: int | None = None, block: tuple[int, int] | None = None,
                factor: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """Sum over the rows i that see column j of softmax(q k^T * scaling)_ij, for every head: (B,H,T) float32.

    q (B,H,T,D); k (B,KV,T,D), H a multiple of KV; lse (B,H,T) each row's log-sum-exp (natural log) of the
    same logits; token_valid (B,T) bool; window: a row i sees columns j with 0 <= i - j < window (None: all
    earlier columns). block=(BLOCK_M, BLOCK_N) fixes the tile (else autotuned on the GPU, 32x32 interpreted).
    factor (B,T) float32: return each column's sum times factor instead (the column scores, with nan where a
    column cannot be a sink), in the same pass. softcap: the logits pass through softcap * tanh(logit / softcap)
    (Gemma-2), as they did for lse.
    """
    B, H, T, D = q.shape
    KV = k.shape[1]
    if H % KV:
        raise ValueError(f"{H} query heads are not a multiple of {KV} key heads")
    out = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    if T == 0:
        return out
    valid = token_valid.to(torch.int8)
    fac = factor if factor is not None else out  # unread without factor
    win = int(window) if window is not None else T + 1
    ieee = q.dtype == torch.float32 or INTERPRET or not q.is_cuda
    args = (q, k, lse, valid, fac, out, *q.stride(), *k.stride(), *lse.stride(), *valid.stride(),
            fac.stride(0), fac.stride(-1), *out.stride(),
            T, H, H // KV, win, float(scaling) * 1.4426950408889634, float(softcap or 1.0),
            min(triton.next_power_of_2(T), 16384))
    block_d = max(16, triton.next_power_of_2(D))
    block = block or FIXED_BLOCK
    if block is None and not INTERPRET and q.is_cuda:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H)  # noqa: E731
        _tuned[grid](*args, D=D, BLOCK_D=block_d, IEEE=ieee, SCORES=factor is not None, SOFTCAP=softcap is not None)
    else:
        bm, bn = block or (32, 32)
        _colsum_kernel[(triton.cdiv(T, bn), B * H)](*args, D=D, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, IEEE=ieee,
                                                    SCORES=factor is not None, SOFTCAP=softcap is not None)
    return out
