"""Pass 2 of the fast path: attention to the few sink columns, the tag, and the variance explained.

Once the sinks are known (at most K columns per head), the tag and the variance explained follow from
a handful of K x K centred moments over rows, so nothing of size T x T, and no float32 copy of q, k or v,
is ever made: one Triton pass over blocks of rows recomputes a_is = exp(q_i . k_s * scale - lse_i) in
float32 for the K sink keys only (O(T K D) work), writes the tag, and sums per block (then in float64)

  |o_c|^2, Y_c^T Y_c, A_c^T A_c, A_c^T Y_c  with Y = o . v_s (T,K), A = a (T,K), _c = minus the mean over rows

(|o_c|^2 centred per block of rows and merged exactly; the K x K products summed in float64 from per-row
float32 y and a, so nearly constant outputs do not cancel and pinv(G) does not magnify rounding).
With G = v_s v_s^T and a sink subset S (one per threshold):
  VE  = tr(pinv(G_S) (Y_c^T Y_c)_S) / |o_c|^2
  R^2 = 1 - |o_c - tag_c|^2 / |o_c|^2, |o_c - tag_c|^2 = |o_c|^2 - 2 sum_S diag(A_c^T Y_c) + <A_c^T A_c, G_S>
  VE uncentred = tr(pinv(G_S) (Y^T Y)_S) / |o|^2 (Y^T Y = Y_c^T Y_c + n mean(Y) mean(Y)^T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from catchtag.engine.stats import HeadStats, span_rtol

MAX_SINKS = 64  # more candidate sinks per head than this (eps near 0) go to the torch path


def _gather_heads(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B,KV,T,D), idx (B,H,K) positions per query head -> (B,H,K,D) float32, head h reading x[:, h // n_rep]."""
    B, KV, _, D = x.shape
    H, K = idx.shape[1], idx.shape[2]
    flat = idx.reshape(B, KV, (H // KV) * K)
    got = x.gather(2, flat[..., None].expand(B, KV, flat.shape[-1], D))
    return got.reshape(B, H, K, D).float()


@dataclass
class SinkMoments:
    """What the K x K algebra of one layer needs (float64, on the layer's device), kept so that Capture.finish
    can run it for every layer of a forward pass in one batch (finish_moments). n_candidates (0-d): the most
    columns of any head above the lowest threshold, checked there against the cap the pass ran with."""

    c_oo: torch.Tensor
    c_yy: torch.Tensor
    c_aa: torch.Tensor
    c_ay: torch.Tensor
    raw_oo: torch.Tensor
    raw_yy: torch.Tensor
    gram: torch.Tensor
    top_scores: torch.Tensor
    rtol: float
    n_candidates: torch.Tensor | None = None


def sink_pass(q, k, v, out, lse, token_valid, col_scores, row_counts, scaling, settings, window=None, k_cap=None,
              sink_attention=True, defer=False):
    """(tag at the main eps (B,H,T,Dv, in out's dtype), HeadStats, pending SinkMoments or None), from sinks picked
    on col_scores; None when a head has more than MAX_SINKS candidates (the caller falls back to the torch path).

    q (B,H,T,D), k/v (B,KV,T,D), out (B,H,T,Dv) the attention output (zero on padding rows), lse (B,H,T),
    token_valid (B,T) bool, col_scores (B,H,T) with nan where a column cannot be a sink, row_counts (B,T);
    window as in colsum.column_sums. k_cap: take exactly this many top columns per head (those at or below every
    threshold are padding with sink_ok False), so nothing waits for the GPU; the caller must check the returned
    moments' n_candidates against it (Capture.finish does). None: count the candidates first (one host sync).
    defer: return the moments for finish_moments instead of finishing VE and R^2 here.
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
                          sink_attn=torch.zeros(B, H, T, 0, device=dev) if sink_attention else None)
        return torch.zeros_like(out), stats, None

    if K > MAX_SINKS:
        return None  # the caller falls back to the torch path
    top_scores, idx = scores0.topk(K, dim=-1)
    idx, order = idx.sort(dim=-1)
    top_scores = top_scores.gather(-1, order)
    k_s = _gather_heads(k, idx)  # (B,H,K,D)
    v_s = _gather_heads(v, idx)  # (B,H,K,Dv)
    main_ok = top_scores > float(settings.eps)
    v_main = v_s * main_ok[..., None]
    win = int(window) if window is not None else T + 1

    c_oo, c_yy, c_aa, c_ay, raw_oo, raw_yy, tag, a_rows = sink_moments(q, k_s, v_s, v_main, idx, out, lse,
                                                                       token_valid, scaling, win)
    v64 = v_s.double()
    moments = SinkMoments(c_oo, c_yy, c_aa, c_ay, raw_oo, raw_yy, torch.matmul(v64, v64.transpose(-1, -2)),
                          top_scores.double(), span_rtol(v.dtype), n_candidates)
    nothing = torch.zeros(B, H, device=dev)
    stats = HeadStats(col_scores=col_scores, row_counts=row_counts, token_valid=token_valid, sink_idx=idx,
                      sink_ok=main_ok, ve=nothing, r2=nothing, ve_uncentred=nothing,
                      sweep_n_sinks=torch.zeros(B, H, E, dtype=torch.long, device=dev), sweep_ve=nothing,
                      sweep_r2=nothing,
                      sink_attn=a_rows * main_ok[:, :, None, :] if sink_attention else None)
    if defer:
        return tag, stats, moments
    finish_moments([(stats, moments)], settings)
    return tag, stats, None


def finish_moments(items, settings, budget: int = 1 << 24) -> None:
    """Fill VE, R^2, uncentred VE and the sweep columns of each (HeadStats, SinkMoments), on their device.

    Layers of one shape are stacked and every threshold of every layer goes through one batched pseudo-inverse
    (float64; at most ``budget`` matrix elements at a time): with G = v_s v_s^T and the sink subset S of a threshold,
      VE  = tr(pinv(G_S) (Y_c^T Y_c)_S) / |o_c|^2
      R^2 = 1 - (|o_c|^2 - 2 sum_S diag(A_c^T Y_c) + <A_c^T A_c, G_S>) / |o_c|^2
      VE uncentred = tr(pinv(G_S) (Y^T Y)_S) / |o|^2 at the main threshold."""
    if not items:
        return
    all_eps = settings.all_eps
    main_e = all_eps.index(float(settings.eps))
    groups: dict = {}
    for st, m in items:
        groups.setdefault((tuple(m.c_yy.shape), m.rtol, m.c_yy.device), []).append((st, m))
    for (shape, rtol, dev), group in groups.items():
        per_item = len(all_eps) * shape[0] * shape[1] * shape[2] * shape[3]
        step = max(1, budget // max(1, per_item))
        for g0 in range(0, len(group), step):
            part = group[g0:g0 + step]
            got = _finish_stacked([m for _, m in part], torch.tensor(all_eps, dtype=torch.float64, device=dev),
                                  main_e, rtol)
            for i, (st, _) in enumerate(part):
                n_sinks, ve, r2, ve_raw = (x[i] for x in got)
                st.sweep_n_sinks, st.sweep_ve, st.sweep_r2 = n_sinks, ve, r2
                st.ve, st.r2, st.ve_uncentred = ve[..., main_e].clone(), r2[..., main_e].clone(), ve_raw


def _finish_stacked(ms, eps, main_e, rtol):
    """(n_sinks, ve, r2) (N,B,H,E) and ve_uncentred (N,B,H) for N layers' moments of one shape."""
    stack = lambda name: torch.stack([getattr(m, name) for m in ms])  # noqa: E731
    c_oo, c_yy, c_aa, c_ay = stack("c_oo"), stack("c_yy"), stack("c_aa"), stack("c_ay")
    raw_oo, raw_yy, gram, top = stack("raw_oo"), stack("raw_yy"), stack("gram"), stack("top_scores")
    ok = top[..., None, :] > eps[:, None]  # (N,B,H,E,K)
    okf = ok.double()
    sel = okf[..., :, None] * okf[..., None, :]  # (N,B,H,E,K,K)
    g = gram[..., None, :, :] * sel
    g_inv = torch.linalg.pinv(g, hermitian=True, rtol=rtol ** 2)  # G's eigenvalues are s^2
    total = c_oo[..., None]  # (N,B,H,1) |centred o|^2
    safe = total.clamp_min(1e-30)
    proj = (g_inv * (c_yy[..., None, :, :] * sel)).sum(dim=(-1, -2))
    diag_ay = c_ay.diagonal(dim1=-2, dim2=-1)[..., None, :]  # sum_i (a_ik - mean a_k)(o_i - mean o) . v_k
    resid = total - 2 * (diag_ay * okf).sum(dim=-1) + (c_aa[..., None, :, :] * g).sum(dim=(-1, -2))
    has = ok.any(dim=-1) & (total > 0)
    zero = torch.zeros_like(proj)
    ve = torch.where(has, proj / safe, zero).float()
    r2 = torch.where(has, 1 - resid / safe, zero).float()
    proj_raw = (g_inv[..., main_e, :, :] * (raw_yy * sel[..., main_e, :, :])).sum(dim=(-1, -2))
    ve_raw = torch.where(has[..., main_e], proj_raw / raw_oo.clamp_min(1e-30), torch.zeros_like(proj_raw)).float()
    return ok.sum(dim=-1), ve, r2, ve_raw


def sink_moments(q, k_s, v_s, v_main, idx, out, lse, token_valid, scaling, window):
    """The centred moments of the module docstring (|o_c|^2, Y_c^T Y_c, A_c^T A_c, A_c^T Y_c; float64), the
    uncentred |o|^2 and Y^T Y (for ve_uncentred), the tag, and each row's attention to each sink (B,H,T,K). One Triton program per block of rows writes y and a per row (their products are summed here in
    float64) and |o_c|^2 per block (merged here exactly), plus the tag at the main eps
    (B,H,T,Dv) in out's dtype. k_s, v_s, v_main (B,H,K,*) float32.
    For bf16/fp16 inputs on the GPU, q.k_s, o.v_s and a.v_s run on the tensor cores with float32 sums."""
    from catchtag.engine.kernels.colsum import INTERPRET

    B, H, T, D = q.shape
    K, Dv = k_s.shape[2], v_s.shape[-1]
    KP = max(16, triton.next_power_of_2(K))
    pad = (0, 0, 0, KP - K)
    ieee = q.dtype == torch.float32 or INTERPRET or not q.is_cuda
    lo = torch.float32 if ieee else q.dtype  # the sinks' keys and values in the model's dtype are exact
    k_p, v_p, vm_p = (torch.nn.functional.pad(x, pad).to(lo).contiguous() for x in (k_s, v_s, v_main))
    idx_p = torch.nn.functional.pad(idx, (0, KP - K), value=T + 1 + window).to(torch.int32).contiguous()
    log2e = 1.4426950408889634
    lse2 = torch.where(token_valid[:, None, :], lse.float() * log2e, float("inf"))
    valid = token_valid.to(torch.int8)
    tag = torch.empty(B, H, T, Dv, dtype=out.dtype, device=out.device)
    BM = 64 if not INTERPRET else 32
    NB = triton.cdiv(T, BM)
    vec = torch.empty(B, H, NB, 2 * KP + Dv + 2, dtype=torch.float32, device=q.device)
    ya = torch.empty(B, H, NB * BM, 2, KP, dtype=torch.float32, device=q.device)
    _sink_kernel[(NB, B * H)](
        q, k_p, v_p, vm_p, idx_p, lse2, valid, out, tag, vec, ya,
        *q.stride(), *out.stride(), *tag.stride(), *lse2.stride(), *valid.stride(),
        T, H, window, float(scaling) * log2e,
        D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), DV=Dv, BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
        KP=KP, BM=BM, IEEE=ieee, num_warps=4)
    vec = vec.double()
    nb = vec[..., -1]  # (B,H,NB) valid rows per block
    n = nb.sum(dim=2).clamp_min(1)  # (B,H)
    mean_y = vec[..., :K].sum(dim=2) / n[..., None]
    mean_a = vec[..., KP:KP + K].sum(dim=2) / n[..., None]
    mean_o = vec[..., 2 * KP:2 * KP + Dv].sum(dim=2) / n[..., None]
    do = torch.where(nb[..., None] > 0, vec[..., 2 * KP:2 * KP + Dv] / nb.clamp_min(1)[..., None] - mean_o[:, :, None],
                     0.0)
    c_oo = vec[..., 2 * KP + Dv].sum(dim=2) + (nb * do.pow(2).sum(dim=-1)).sum(dim=2)  # blocks merged exactly
    f64 = dict(dtype=torch.float64, device=q.device)
    c_yy, c_aa, c_ay = (torch.zeros(B, H, K, K, **f64) for _ in range(3))
    chunk = max(1, (1 << 24) // max(1, B * H * K))
    for r0 in range(0, T, chunk):
        r1 = min(T, r0 + chunk)
        rows_ok = token_valid[:, None, r0:r1, None]
        yc = torch.where(rows_ok, ya[:, :, r0:r1, 0, :K].double() - mean_y[:, :, None], 0.0)
        ac = torch.where(rows_ok, ya[:, :, r0:r1, 1, :K].double() - mean_a[:, :, None], 0.0)
        c_yy += yc.transpose(-1, -2) @ yc
        c_aa += ac.transpose(-1, -2) @ ac
        c_ay += ac.transpose(-1, -2) @ yc
    n2 = n[..., None, None]
    raw_yy = c_yy + n2 * mean_y[..., :, None] * mean_y[..., None, :]  # uncentred Y^T Y
    raw_oo = c_oo + n * mean_o.pow(2).sum(dim=-1)  # uncentred sum |o|^2
    return c_oo, c_yy, c_aa, c_ay, raw_oo, raw_yy, tag, ya[:, :, :T, 1, :K]


@triton.jit
def _sink_kernel(Q, KS, VS, VM, IDX, LSE2, VALID, OUT, TAG, VEC, YA,
                 sqb, sqh, sqt, sqd, sob, soh, sot, sod, stb, sth, stt, std, slb, slh, slt, svb, svt,
                 T, H, WINDOW, scale_log2e,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                 KP: tl.constexpr, BM: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    NB = tl.num_programs(0)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BM + tl.arange(0, BM)
    row_in = rows < T
    dd = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    kk = tl.arange(0, KP)
    ks = tl.load(KS + (pid_bh * KP + kk[:, None]) * D + dd[None, :], mask=dd[None, :] < D, other=0.0)
    vs = tl.load(VS + (pid_bh * KP + kk[:, None]) * DV + dv[None, :], mask=dv[None, :] < DV, other=0.0)
    vm = tl.load(VM + (pid_bh * KP + kk[:, None]) * DV + dv[None, :], mask=dv[None, :] < DV, other=0.0)
    sink_pos = tl.load(IDX + pid_bh * KP + kk)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + dd[None, :] * sqd,
                mask=row_in[:, None] & (dd[None, :] < D), other=0.0)
    lse2 = tl.load(LSE2 + b * slb + h * slh + rows * slt, mask=row_in, other=float("inf"))
    row_ok = (tl.load(VALID + b * svb + rows * svt, mask=row_in, other=0) != 0) & row_in
    if IEEE:  # float32 inputs, or the interpreter (whose bf16 dot is wrong)
        s = tl.dot(q.to(tl.float32), tl.trans(ks.to(tl.float32)), input_precision="ieee")
    else:  # bf16 q and the sinks' own bf16 keys: exact products, float32 sums (as in the attention kernel)
        s = tl.dot(q, tl.trans(ks))
    s = s * scale_log2e - lse2[:, None]
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
    # moments centred on this block's own means (merged exactly in float64 by the caller): sums of raw
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
    # err in every direction, and pinv(G) magnifies that along nearly dependent sink values)
    ya = YA + ((pid_bh * NB * BM + rows[:, None]) * 2) * KP + kk[None, :]
    tl.store(ya, y)
    tl.store(ya + KP, a)
