"""Pass 2 of the fast path: attention to the few sink columns, the tag, and the variance explained.

Once the sinks are known (at most K columns per head), the tag and the variance explained follow from
a handful of K x K centred moments over rows, so nothing of size T x T, and no float32 copy of q, k or v,
is ever made: one Triton pass over blocks of rows recomputes a_is = exp(q_i . k_s * scale - lse_i) in
float32 for the K sink keys only (O(T K D) work), writes the tag, and sums per block (then in float64)

  |o_c|^2, Y_c^T Y_c, A_c^T A_c, A_c^T Y_c  with Y = o . v_s (T,K), A = a (T,K), _c = minus the mean over rows

(|o_c|^2 centred per block of rows and merged exactly; the K x K products of per-row float32 y and a summed
exactly in float64 and centred there, so nearly constant outputs do not cancel and the projection onto
nearly dependent sink values does not magnify rounding).
With G = v_s v_s^T and a sink subset S (one per threshold):
  VE  = tr(pinv(G_S) (Y_c^T Y_c)_S) / |o_c|^2
  R^2 = 1 - |o_c - tag_c|^2 / |o_c|^2, |o_c - tag_c|^2 = |o_c|^2 - 2 sum_S diag(A_c^T Y_c) + <A_c^T A_c, G_S>
  VE uncentred = tr(pinv(G_S) (Y^T Y)_S) / |o|^2 (Y^T Y = Y_c^T Y_c + n mean(Y) mean(Y)^T).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from catchtag.engine.kernels.colsum import softcapped
from catchtag.engine.moments import MAX_SINKS, SinkMoments, finish_moments
from catchtag.engine.stats import HeadStats, span_rtol

LOG2E = 1.4426950408889634


def sink_pass(q, k, v, out, lse, token_valid, col_scores, row_counts, scaling, settings, window=None, k_cap=None,
              sink_attention=True, defer=False, softcap=None):
    """(tag at the main eps (B,H,T,Dv, in out's dtype), HeadStats, pending SinkMoments or None), from sinks picked
    on col_scores; None when a head has more than MAX_SINKS candidates (the caller falls back to the torch path).

    q (B,H,T,D), k/v (B,KV,T,D), out (B,H,T,Dv) the attention output (zero on padding rows), lse (B,H,T),
    token_valid (B,T) bool, col_scores (B,H,T) with nan where a column cannot be a sink, row_counts (B,T);
    window as in colsum.column_sums. k_cap: take exactly this many top columns per head (those at or below every
    threshold are padding with sink_ok False), so nothing waits for the GPU; the caller must check the returned
    moments' n_candidates against it (Capture.finish does). None: count the candidates first (one host sync).
    defer: return the moments for finish_moments instead of finishing VE and R^2 here. softcap: the logits pass
    through softcap * tanh(logit / softcap) (Gemma-2).
    """
    B, H, T, D = q.shape
    dev = q.device
    all_eps = settings.all_eps
    E = len(all_eps)
    scores0 = torch.nan_to_num(col_scores, nan=-1.0)
    n_candidates = None
    if k_cap is None:
        K = int((scores0 > all_eps[0]).sum(dim=-1).max()) if T else 0
    else:
        K = min(int(k_cap), T)
        n_candidates = (scores0 > all_eps[0]).sum(dim=-1).amax()
    if K == 0:
        zeros = torch.zeros(B, H, device=dev)
        empty = torch.zeros(B, H, 0, dtype=torch.long, device=dev)
        stats = HeadStats(col_scores=col_scores, row_counts=row_counts, token_valid=token_valid, sink_idx=empty,
                          sink_ok=empty.bool(), ve=zeros, r2=zeros.clone(), ve_uncentred=zeros.clone(),
                          sweep_n_sinks=torch.zeros(B, H, E, dtype=torch.long, device=dev),
                          sweep_ve=torch.zeros(B, H, E, device=dev), sweep_r2=torch.zeros(B, H, E, device=dev),
                          sweep_ve_uncentred=torch.zeros(B, H, E, device=dev),
                          sink_attn=torch.zeros(B, H, T, 0, device=dev) if sink_attention else None)
        return torch.zeros_like(out), stats, None

    if K > MAX_SINKS:
        return None  # the caller falls back to the torch path
    top_scores, idx = scores0.topk(K, dim=-1)
    idx, order = idx.sort(dim=-1)
    top_scores = top_scores.gather(-1, order)
    main_ok = top_scores > float(settings.eps)
    tag, blocks, ya, values = _run_sink_kernel(q, k, v, idx, top_scores, float(settings.eps), out, lse, token_valid,
                                               scaling, int(window) if window is not None else T + 1, softcap)
    KP = ya.shape[-1]
    # Y^T Y, A^T A and A^T Y in one float64 product of the per-row [y, a] (exact products of float32 numbers;
    # padding rows and rows past T are 0 there); centred in finish_moments: X_c^T X_c = X^T X - n mean mean^T
    # (the column sums too, in float64: the kernel's float32 block sums are not exact enough for the mean here)
    products = torch.zeros(B, H, 2 * KP, 2 * KP, dtype=torch.float64, device=dev)
    sums = torch.zeros(B, H, 2 * KP, dtype=torch.float64, device=dev)
    chunk = max(1, (1 << 24) // max(1, B * H * 2 * KP))
    for r0 in range(0, ya.shape[2], chunk):
        x = ya[:, :, r0:r0 + chunk].reshape(B, H, -1, 2 * KP).double()
        products += x.transpose(-1, -2) @ x
        sums += x.sum(dim=2)
    moments = SinkMoments(blocks, products, sums, values[:, :, :K], top_scores, span_rtol(v.dtype), n_candidates)
    nothing = torch.zeros(B, H, device=dev)
    stats = HeadStats(col_scores=col_scores, row_counts=row_counts, token_valid=token_valid, sink_idx=idx,
                      sink_ok=main_ok, ve=nothing, r2=nothing, ve_uncentred=nothing,
                      sweep_n_sinks=torch.zeros(B, H, E, dtype=torch.long, device=dev), sweep_ve=nothing,
                      sweep_r2=nothing, sweep_ve_uncentred=nothing,
                      sink_attn=ya[:, :, :T, 1, :K] * main_ok[:, :, None, :] if sink_attention else None)
    if defer:
        return tag, stats, moments
    finish_moments([(stats, moments)], settings)
    return tag, stats, None


def _run_sink_kernel(q, k, v, idx, top_scores, eps, out, lse, token_valid, scaling, window, softcap=None):
    """The tag at the main eps (B,H,T,Dv, out's dtype), the per-block sums (B,H,NB,2KP+Dv+2) float32, the per-row
    [y, a] (B,H,NB*BM,2,KP) float32 and the sink values (B,H,KP,Dv) float32, from one Triton pass over blocks of
    rows. The kernel reads the sinks' keys and values itself (head h reads key/value head h // (H // KV)), so no
    copy of them is made; for bf16/fp16 inputs on the GPU, q.k_s, o.v_s and a.v_s run on the tensor cores with
    float32 sums (the sinks' keys and values in the model's dtype are exact)."""
    from catchtag.engine.kernels.colsum import INTERPRET

    B, H, T, D = q.shape
    KV, Dv = k.shape[1], v.shape[-1]
    K = idx.shape[-1]
    KP = max(16, triton.next_power_of_2(K))
    ieee = q.dtype == torch.float32 or INTERPRET or not q.is_cuda
    idx32 = idx.to(torch.int32)
    top = top_scores.float().contiguous()
    valid = token_valid.to(torch.int8)
    tag = torch.empty(B, H, T, Dv, dtype=out.dtype, device=out.device)
    BM = 64 if not INTERPRET else 32
    NB = triton.cdiv(T, BM)
    blocks = torch.empty(B, H, NB, 2 * KP + Dv + 2, dtype=torch.float32, device=q.device)
    ya = torch.empty(B, H, NB * BM, 2, KP, dtype=torch.float32, device=q.device)
    values = torch.empty(B, H, KP, Dv, dtype=torch.float32, device=q.device)
    _sink_kernel[(NB, B * H)](
        q, k, v, idx32, top, lse, valid, out, tag, blocks, ya, values,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *tag.stride(), *lse.stride(), *valid.stride(),
        T, H, H // KV, K, window, float(scaling) * LOG2E, eps, float(softcap or 1.0),
        D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), DV=Dv, BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
        KP=KP, BM=BM, IEEE=ieee, SOFTCAP=softcap is not None, num_warps=4)
    return tag, blocks, ya, values


@triton.jit
def _sink_kernel(Q, K, V, IDX, TOP, LSE, VALID, OUT, TAG, VEC, YA, VS_OUT,
                 sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb_, svh_, svt_, svd_,
                 sob, soh, sot, sod, stb, sth, stt, std, slb, slh, slt, svb, svt,
                 T, H, N_REP, K_REAL, WINDOW, scale_log2e, eps_main, cap,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                 KP: tl.constexpr, BM: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    NB = tl.num_programs(0)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // N_REP
    rows = pid_m * BM + tl.arange(0, BM)
    row_in = rows < T
    dd = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    kk = tl.arange(0, KP)
    k_in = kk < K_REAL
    pos = tl.load(IDX + pid_bh * K_REAL + kk, mask=k_in, other=0)
    top = tl.load(TOP + pid_bh * K_REAL + kk, mask=k_in, other=-1.0)
    ks = tl.load(K + b * skb + kvh * skh + pos[:, None] * skt + dd[None, :] * skd,
                 mask=k_in[:, None] & (dd[None, :] < D), other=0.0)
    vs = tl.load(V + b * svb_ + kvh * svh_ + pos[:, None] * svt_ + dv[None, :] * svd_,
                 mask=k_in[:, None] & (dv[None, :] < DV), other=0.0)
    vm = tl.where((top > eps_main)[:, None], vs, 0.0).to(vs.dtype)  # the tag: sinks at the main eps only
    if pid_m == 0:
        tl.store(VS_OUT + (pid_bh * KP + kk[:, None]) * DV + dv[None, :], vs.to(tl.float32), mask=dv[None, :] < DV)
    sink_pos = tl.where(k_in, pos, T + 1 + WINDOW)  # padding columns: seen by no row
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + dd[None, :] * sqd,
                mask=row_in[:, None] & (dd[None, :] < D), other=0.0)
    row_ok = (tl.load(VALID + b * svb + rows * svt, mask=row_in, other=0) != 0) & row_in
    lse2 = tl.load(LSE + b * slb + h * slh + rows * slt, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    lse2 = tl.where(row_ok, lse2, float("inf"))
    if IEEE:  # float32 inputs, or the interpreter (whose bf16 dot is wrong)
        s = tl.dot(q.to(tl.float32), tl.trans(ks.to(tl.float32)), input_precision="ieee")
    else:  # bf16 q and the sinks' own bf16 keys: exact products, float32 sums (as in the attention kernel)
        s = tl.dot(q, tl.trans(ks))
    s = s * scale_log2e
    if SOFTCAP:
        s = softcapped(s, cap)
    s = s - lse2[:, None]
    diff = rows[:, None] - sink_pos[None, :]
    a = tl.where((diff >= 0) & (diff < WINDOW) & row_ok[:, None], tl.exp2(s), 0.0)  # (BM, KP)
    o = tl.load(OUT + b * sob + h * soh + rows[:, None] * sot + dv[None, :] * sod,
                mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
    if IEEE:
        y = tl.dot(o.to(tl.float32), tl.trans(vs.to(tl.float32)), input_precision="ieee")  # (BM, KP): o_i . v_k
        tag = tl.dot(a, vm.to(tl.float32), input_precision="ieee")  # (BM, DV)
    else:
        y = tl.dot(o, tl.trans(vs))
        tag = tl.dot(a.to(vm.dtype), vm)  # rounded like the stored tag (bf16)
    tl.store(TAG + b * stb + h * sth + rows[:, None] * stt + dv[None, :] * std, tag.to(TAG.dtype.element_ty),
             mask=row_in[:, None] & (dv[None, :] < DV))
    o = o.to(tl.float32)
    # moments centred on this block's own means (merged exactly in float64 by finish_moments): sums of raw
    # products would cancel catastrophically for heads whose output barely varies around a large mean
    ok2 = row_ok[:, None]
    nb = tl.sum(row_ok.to(tl.float32), axis=0)
    inv = 1.0 / tl.maximum(nb, 1.0)
    sy, sa, so = tl.sum(y, axis=0), tl.sum(a, axis=0), tl.sum(o, axis=0)
    oc = tl.where(ok2 & (dv[None, :] < DV), o - (so * inv)[None, :], 0.0)
    base = VEC + (pid_bh * NB + pid_m) * (2 * KP + DV + 2)
    tl.store(base + kk, sy)
    tl.store(base + KP + kk, sa)
    tl.store(base + 2 * KP + dv, so, mask=dv < DV)
    tl.store(base + 2 * KP + DV, tl.sum(tl.sum(oc * oc, axis=1), axis=0))
    tl.store(base + 2 * KP + DV + 1, nb)
    # per-row y and a: their K x K products are summed in float64 by the caller (float32 sums of products
    # err in every direction, and the projection magnifies that along nearly dependent sink values)
    ya = YA + ((pid_bh * NB * BM + rows[:, None]) * 2) * KP + kk[None, :]
    tl.store(ya, y)
    tl.store(ya + KP, a)
