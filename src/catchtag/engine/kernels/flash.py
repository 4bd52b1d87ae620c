"""Attention with softcapped logits (Gemma-2), fused: the output and each row's log-sum-exp in one pass.

PyTorch's fused kernels (cuDNN, flash, memory-efficient) cannot apply softcap * tanh(logit / softcap), and the
unfused softmax writes every layer's T x T scores, which made Gemma-2 slower under catchtag than under eager
attention. This is the flash-attention forward (online softmax over tiles of key columns, as in the Triton
tutorial) with the softcap applied to each tile of logits in registers. One program owns a block of query rows
of one head; GQA (head h reads key head h // (H // KV)), padding (columns whose token is not valid never count;
rows with no visible column get out 0 and lse 0), causality and one sliding window (row i sees columns j with
0 <= i - j < window). Tiles that every row of the block sees in full run without a mask; tiles no row sees are
never visited.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from catchtag.engine.kernels.colsum import INTERPRET, softcapped

_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
            for m, n, w, st in ((64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 3),
                                (128, 64, 8, 3), (64, 128, 8, 2))]


@triton.jit
def _tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, valid_ptrs, rows, cols, T, WINDOW, scale_log2e, cap,
          D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr,
          PADDED: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr):
    """One tile of key columns folded into the running (acc, row max m_i, row sum l_i), in log2 units."""
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    col_in = cols < T
    k = tl.load(k_ptrs, mask=col_in[:, None] & (dims[None, :] < D), other=0.0)
    if IEEE:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale_log2e
    if SOFTCAP:
        s = softcapped(s, cap)
    if MASKED:
        diff = rows[:, None] - cols[None, :]
        s = tl.where((diff >= 0) & (diff < WINDOW) & col_in[None, :], s, float("-inf"))
    if PADDED:
        col_ok = tl.load(valid_ptrs, mask=col_in, other=0) != 0
        s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no column yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    v = tl.load(v_ptrs, mask=col_in[:, None] & (dims_v[None, :] < DV), other=0.0)
    if IEEE:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return acc, m_new, l_i


@triton.jit
def _flash_kernel(Q, K, V, VALID, O, LSE,
                  sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sab, sat, sob, soh, sot, sod,
                  slb, slh, slt, T, H, N_REP, WINDOW, scale_log2e, cap, T_BUCKET,
                  D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PADDED: tl.constexpr, IEEE: tl.constexpr,
                  SOFTCAP: tl.constexpr):
    n_blocks = tl.cdiv(T, BLOCK_M)
    pid_m = n_blocks - 1 - tl.program_id(0)  # the longest rows first: the last programs are the short ones
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // N_REP
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    row_in = rows < T
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :] * sqd,
                mask=row_in[:, None] & (dims[None, :] < D), other=0.0)
    k_base = K + b * skb + kvh * skh + dims[None, :] * skd
    v_base = V + b * svb + kvh * svh + dims_v[None, :] * svd
    a_base = VALID + b * sab
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    # column tiles: [lo, full_lo) cross the window's far edge, [full_lo, full_hi) are seen in full by every row
    # of the block, [full_hi, hi) cross the diagonal; columns before the window and after the diagonal never
    lo = (tl.maximum(m0 - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
    hi = tl.cdiv(tl.minimum(T, m0 + BLOCK_M), BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.cdiv(tl.maximum(m0 + BLOCK_M - WINDOW, 0), BLOCK_N) * BLOCK_N, hi)
    full_lo = tl.maximum(full_lo, lo)
    full_hi = tl.minimum(tl.maximum(((m0 + 1) // BLOCK_N) * BLOCK_N, full_lo), hi)
    for n0 in range(lo, full_lo, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_base + cols[:, None] * skt, v_base + cols[:, None] * svt,
                              a_base + cols * sat, rows, cols, T, WINDOW, scale_log2e, cap, D, DV, BLOCK_D,
                              BLOCK_DV, True, PADDED, IEEE, SOFTCAP)
    for n0 in range(full_lo, full_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_base + cols[:, None] * skt, v_base + cols[:, None] * svt,
                              a_base + cols * sat, rows, cols, T, WINDOW, scale_log2e, cap, D, DV, BLOCK_D,
                              BLOCK_DV, False, PADDED, IEEE, SOFTCAP)
    for n0 in range(full_hi, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_base + cols[:, None] * skt, v_base + cols[:, None] * svt,
                              a_base + cols * sat, rows, cols, T, WINDOW, scale_log2e, cap, D, DV, BLOCK_D,
                              BLOCK_DV, True, PADDED, IEEE, SOFTCAP)
    seen = l_i > 0.0
    row_ok = seen
    if PADDED:
        row_ok = row_ok & (tl.load(a_base + rows * sat, mask=row_in, other=0) != 0)
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    out = tl.where(row_ok[:, None], out, 0.0)
    lse = tl.where(row_ok, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, 0.0)
    tl.store(O + b * sob + h * soh + rows[:, None] * sot + dims_v[None, :] * sod, out.to(O.dtype.element_ty),
             mask=row_in[:, None] & (dims_v[None, :] < DV))
    tl.store(LSE + b * slb + h * slh + rows * slt, lse, mask=row_in)


_tuned = triton.autotune(configs=_CONFIGS, key=["D", "DV", "IEEE", "T_BUCKET", "PADDED", "SOFTCAP"])(_flash_kernel) \
    if not INTERPRET else None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, token_valid: torch.Tensor,
                    window: int | None = None, softcap: float | None = None, padded: bool = True,
                    block: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B,H,T,Dv) in q's dtype, lse (B,H,T) float32, natural log) of causal attention with softcapped logits.

    q (B,H,T,D), k (B,KV,T,D), v (B,KV,T,Dv), H a multiple of KV, any strides; token_valid (B,T) bool; window
    as in colsum.column_sums; softcap None: plain logits. padded=False: every token is valid (the padding test
    is skipped). Rows that are padding or see no column: out 0, lse 0. block=(BLOCK_M, BLOCK_N) fixes the tile
    (else autotuned on the GPU in bf16/fp16, 32x32 in float32, 16x16 interpreted).
    """
    B, H, T, D = q.shape
    KV, Dv = k.shape[1], v.shape[-1]
    if H % KV:
        raise ValueError(f"{H} query heads are not a multiple of {KV} key heads")
    out = torch.empty(B, H, T, Dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    if T == 0:
        return out, lse
    valid = token_valid.to(torch.int8)
    win = int(window) if window is not None else T + 1
    ieee = q.dtype == torch.float32 or INTERPRET or not q.is_cuda
    args = (q, k, v, valid, out, lse, *q.stride(), *k.stride(), *v.stride(), *valid.stride(), *out.stride(),
            *lse.stride(), T, H, H // KV, win, float(scaling) * 1.4426950408889634, float(softcap or 1.0),
            min(triton.next_power_of_2(T), 16384))
    consts = {"D": D, "DV": Dv, "BLOCK_D": max(16, triton.next_power_of_2(D)),
              "BLOCK_DV": max(16, triton.next_power_of_2(Dv)), "PADDED": bool(padded), "IEEE": ieee,
              "SOFTCAP": softcap is not None}
    if block is None and not INTERPRET and q.is_cuda and not ieee:
        _tuned[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](*args, **consts)
    else:  # float32 (checks, not speed): one small tile that fits any head size, no autotuning
        bm, bn = block or ((16, 16) if INTERPRET or not q.is_cuda else (32, 32))
        _flash_kernel[(triton.cdiv(T, bm), B * H)](*args, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=1,
                                                   **consts)
    return out, lse


@triton.jit
def _fold_sink_kernel(O, LSE, SINK, VALID, PART, sob, soh, sot, sod, slb, slh, slt, ssb, ssh, sst, sab, sat,
                      T, H, N_BLOCKS, DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, BLOCK_DV)
    row_in = rows < T
    lse = tl.load(LSE + b * slb + h * slh + rows * slt, mask=row_in, other=0.0)
    s = tl.load(SINK + b * ssb + h * ssh + rows * sst, mask=row_in, other=0.0).to(tl.float32)
    keep = tl.sigmoid(lse - s)  # exp(lse - logaddexp(lse, s)): what the real columns keep of each row
    top = tl.maximum(lse, s)
    with_sink = top + tl.log(tl.exp(lse - top) + tl.exp(s - top))
    tl.store(LSE + b * slb + h * slh + rows * slt, with_sink, mask=row_in)
    o_ptrs = O + b * sob + h * soh + rows[:, None] * sot + dims[None, :] * sod
    o_mask = row_in[:, None] & (dims[None, :] < DV)
    o = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, (o.to(tl.float32) * keep[:, None]).to(O.dtype.element_ty), mask=o_mask)
    valid = tl.load(VALID + b * sab + rows * sat, mask=row_in, other=0) != 0
    tl.store(PART + pid_bh * N_BLOCKS + pid_t, tl.sum(tl.where(valid, tl.sigmoid(s - lse), 0.0), axis=0))


def fold_learned_sink(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor,
                      token_valid: torch.Tensor) -> torch.Tensor:
    """Fold learned sink logits (gpt-oss: one more softmax column with no value) into an attention pass made
    without them, in place and in one kernel: lse becomes logaddexp(lse, sink), out is scaled by what the real
    columns keep, sigmoid(lse - sink). Returns each head's learned sink share (B,H) float32: the mean over real rows
    of the attention the sink column takes (engine.stats.learned_sink_share, which the torch path computes).

    out (B,H,T,Dv), lse (B,H,T) float32, sinks broadcastable to (B,H,T), token_valid (B,T) bool."""
    B, H, T, Dv = out.shape
    n_blocks = triton.cdiv(T, 64) if T else 0
    part = torch.zeros(B, H, max(n_blocks, 1), device=out.device, dtype=torch.float32)
    if T:
        s = sinks.expand(B, H, T)
        valid = token_valid.to(torch.int8)
        _fold_sink_kernel[(n_blocks, B * H)](out, lse, s, valid, part, *out.stride(), *lse.stride(), *s.stride(),
                                             *valid.stride(), T, H, n_blocks, DV=Dv, BLOCK_T=64,
                                             BLOCK_DV=max(16, triton.next_power_of_2(Dv)))
    return part.sum(dim=-1) / token_valid.sum(dim=-1).clamp_min(1)[:, None]
