"""One decoding step of the tracker (engine.decode), fused: the new row's attention, output, catch and tag.

As PyTorch ops a step costs about 40 small kernels per layer and float32 copies of the cache's keys and values;
on a GPU the step then waits for the host. Here one program owns one (sequence, head): pass 1 walks the key
columns once (online softmax, the output, the row's log-sum-exp; the logits are kept for pass 2), pass 2 turns the
logits into the row's attention, adds it to the running column sums, tests every column it sees against the sink
rule (score over the rows so far > eps, seen by at least min_rows rows, a real token) and sums the tag (attention
to the sinks times their values), the caught share and the sink that takes most. GQA: head h reads key head
h // (H // KV). Softcapped logits and a learned sink logit per head are applied as the model applies them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _step_kernel(Q, K, V, VIS, SINK, ACT, COLSUM, RC, TV, S, OUT, TAG, STATS,
                 sqb, sqh, sqd, skb, skh, skn, skd, svb, svh, svn, svd, svisb, svisn,
                 scb, sch, scn, srb, srn, stb, stn, ssb, ssh, ssn, sob, soh, sod, sgb, sgh, sgd, sab, sah,
                 H, GROUP, KLEN, P0, scale, cap, eps, MIN_ROWS,
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, HAS_VIS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINK: tl.constexpr,
                 HAS_ACT: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    kvh = h // GROUP
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h * sqh + dims * sqd, mask=dims < D, other=0.0).to(tl.float32)
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for start in range(0, KLEN, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        inb = cols < KLEN
        k = tl.load(K + b * skb + kvh * skh + cols[:, None] * skn + dims[None, :] * skd,
                    mask=inb[:, None] & (dims[None, :] < D), other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * scale
        if SOFTCAP:
            s = (2.0 * tl.sigmoid(2.0 * s / cap) - 1.0) * cap
        see = inb
        if HAS_VIS:
            see = see & (tl.load(VIS + b * svisb + cols * svisn, mask=inb, other=0) != 0)
        s = tl.where(see, s, float("-inf"))
        tl.store(S + b * ssb + h * ssh + cols * ssn, s, mask=inb)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe)
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(V + b * svb + kvh * svh + cols[:, None] * svn + dims_v[None, :] * svd,
                    mask=inb[:, None] & (dims_v[None, :] < DV), other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    if HAS_SINK:  # one more column with the learned logit and no value
        lam = tl.load(SINK + h).to(tl.float32)
        m_new = tl.maximum(m_i, lam)
        alpha = tl.exp(m_i - m_new)
        acc = acc * alpha
        l_i = l_i * alpha + tl.exp(lam - m_new)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    out = acc / l_i
    act = 1.0
    if HAS_ACT:
        act = tl.load(ACT + b).to(tl.float32)
    tag = tl.zeros([BLOCK_DV], dtype=tl.float32)
    caught = 0.0
    best = 0.0
    best_at = -1
    for start in range(0, KLEN, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        inb = cols < KLEN
        s = tl.load(S + b * ssb + h * ssh + cols * ssn, mask=inb, other=float("-inf"))
        a = tl.exp(s - lse)
        pos = P0 + cols
        cs_ptrs = COLSUM + b * scb + h * sch + pos * scn
        cs = tl.load(cs_ptrs, mask=inb, other=0.0) + a * act
        tl.store(cs_ptrs, cs, mask=inb)
        rc = tl.load(RC + b * srb + pos * srn, mask=inb, other=0)
        tv = tl.load(TV + b * stb + pos * stn, mask=inb, other=0) != 0
        score = cs / tl.maximum(rc, 1).to(tl.float32)
        sink = inb & tv & (rc >= MIN_ROWS) & (score > eps)
        a_s = tl.where(sink, a, 0.0)
        v = tl.load(V + b * svb + kvh * svh + cols[:, None] * svn + dims_v[None, :] * svd,
                    mask=inb[:, None] & (dims_v[None, :] < DV), other=0.0).to(tl.float32)
        tag += tl.sum(a_s[:, None] * v, axis=0)
        caught += tl.sum(a_s, axis=0)
        block_best = tl.max(a_s, axis=0)
        block_at = tl.argmax(a_s, axis=0) + start + P0
        better = block_best > best
        best_at = tl.where(better, block_at, best_at)
        best = tl.where(better, block_best, best)
    tl.store(OUT + b * sob + h * soh + dims_v * sod, out, mask=dims_v < DV)
    tl.store(TAG + b * sgb + h * sgh + dims_v * sgd, tag, mask=dims_v < DV)
    base = STATS + b * sab + h * sah
    tl.store(base, caught)
    tl.store(base + 1, best)
    tl.store(base + 2, best_at.to(tl.float32))
    tl.store(base + 3, tl.sum(out * out, axis=0))
    tl.store(base + 4, tl.sum(tag * tag, axis=0))
    tl.store(base + 5, tl.sum(out * tag, axis=0))


def decode_step(q, k, v, visible, sinks, active, col_sum, row_counts, token_valid, p0: int, scaling: float,
                softcap, eps: float, min_rows: int):
    """One row per sequence: q (B,H,1,D); k, v (B,KV,klen,D) (any strides: the cache's own tensors); visible
    (B,klen) bool or None; sinks: learned sink logits (H,) or None; active (B,) bool or None. Adds the row's
    attention to col_sum[..., p0:p0+klen] in place; row_counts and token_valid must already count the row.
    Returns (out (B,H,Dv) float32, tag (B,H,Dv) float32, stats (B,H,6): caught, the largest attention on one sink,
    its position (float), |out|^2, |tag|^2, <out, tag>)."""
    B, H, _, D = q.shape
    KV, klen, Dv = k.shape[1], k.shape[2], v.shape[-1]
    dev = q.device
    out = torch.empty(B, H, Dv, device=dev, dtype=torch.float32)
    tag = torch.empty_like(out)
    stats = torch.empty(B, H, 6, device=dev, dtype=torch.float32)
    scratch = torch.empty(B, H, klen, device=dev, dtype=torch.float32)
    q2 = q[:, :, 0]
    vis = visible.to(torch.int8) if visible is not None else scratch  # any tensor when unused
    tv = token_valid.to(torch.int8)
    act = active.to(torch.float32) if active is not None else stats
    sink = sinks.float().reshape(-1)[:H].contiguous() if sinks is not None else stats
    block_n = 16 if not q.is_cuda else 64
    _step_kernel[(B * H,)](
        q2, k, v, vis, sink, act, col_sum, row_counts, tv, scratch, out, tag, stats,
        *q2.stride(), *k.stride(), *v.stride(), *(vis.stride()[:2] if visible is not None else (0, 0)),
        *col_sum.stride(), *row_counts.stride(), *tv.stride(), *scratch.stride(), *out.stride(), *tag.stride(),
        stats.stride(0), stats.stride(1),
        H, H // KV, klen, p0, float(scaling), float(softcap or 1.0), float(eps), int(min_rows),
        D=D, DV=Dv, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_DV=max(16, triton.next_power_of_2(Dv)), HAS_VIS=visible is not None, SOFTCAP=softcap is not None,
        HAS_SINK=sinks is not None, HAS_ACT=active is not None, num_warps=4)
    return out, tag, stats
