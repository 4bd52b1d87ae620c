"""The torch path of the engine: attention output plus catch/tag statistics, one query chunk at a time.

Pass 1 (chunks of query rows): softmax, the head output o_i, each row's log-sum-exp, and the column
sums of the attention over rows that may see each column. Then the sinks are known. Pass 2: attention of
every row to the few sink columns, recomputed from q, k and the saved log-sum-exp (O(T * K) work), gives
the tag and the variance explained. No T x T map outlives a chunk unless the request keeps one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from catchtag.engine.request import SinkSettings

SCORE_BUDGET = 1 << 25  # float32 elements of one chunk of scores (128 MiB)


def span_rtol(dtype: torch.dtype) -> float:
    """Relative singular-value cut for the span of sink values: values that agree to within the rounding of the
    model's dtype (the same token at two positions, seen through layers that round differently) span one direction."""
    return max(1e-5, 2 * torch.finfo(dtype).eps)


@dataclass
class HeadStats:
    """Per-layer statistics; shapes use B prompts, H heads, T positions, K kept sinks, E thresholds.

    col_scores (B,H,T): mean attention each column gets from the rows that can see it (nan where the
    column is padding or seen by fewer than min_rows rows). row_counts (B,T): how many rows see each
    column. token_valid (B,T). sink_idx / sink_ok (B,H,K): sink columns at the main eps (padded with ok=False).
    ve / r2 (B,H): variance explained by the tag (projection and R^2 forms). ve_uncentred (B,H): the
    projection form without centring the outputs (the shared mean direction counts). sweep_n_sinks, sweep_ve,
    sweep_r2, sweep_ve_uncentred (B,H,E): the same for each threshold in settings.all_eps. sink_attn (B,H,T,K):
    A[:, sink_idx] at the main eps (O(T*K), already computed for the tag; backends may leave it None).
    """

    col_scores: torch.Tensor
    row_counts: torch.Tensor
    token_valid: torch.Tensor
    sink_idx: torch.Tensor
    sink_ok: torch.Tensor
    ve: torch.Tensor
    r2: torch.Tensor
    ve_uncentred: torch.Tensor
    sweep_n_sinks: torch.Tensor
    sweep_ve: torch.Tensor
    sweep_r2: torch.Tensor
    sweep_ve_uncentred: torch.Tensor
    sink_attn: torch.Tensor | None = None  # (B,H,T,K) attention of each row to each sink column (0 where not ok)


def _bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A (B,T,T) bool 'may attend' mask from what the model passed (bool, additive float, or None)."""
    if mask is None:
        return None
    if mask.dim() == 4:
        mask = mask[:, 0]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask


def _chunk_mask(mask, B, r0, r1, T, device):
    if mask is not None:
        return mask[:, r0:r1, :].expand(B, r1 - r0, T)
    rows = torch.arange(r0, r1, device=device)[:, None]
    cols = torch.arange(T, device=device)[None, :]
    return (rows >= cols).expand(B, r1 - r0, T)


def _scores(q, k, scaling, softcap):
    s = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    return s


def attention_with_stats(q, k, v, mask, scaling, softcap, settings: SinkSettings, keep_maps=()):
    """Attention output and catch/tag statistics for one layer.

    q (B,H,T,D); k, v (B,KV,T,D) with H a multiple of KV (GQA); mask: the model's mask (bool or additive,
    (B,1,T,T)) or None for plain causal. Returns (out (B,H,T,Dv) float32, tag (B,H,T,Dv) at the main
    eps, HeadStats, maps {head: (B,T,T)} for the heads in keep_maps).
    """
    B, H, T, D = q.shape
    n_rep = H // k.shape[1]
    qf = q.float()
    kf = k.float().repeat_interleave(n_rep, dim=1) if n_rep > 1 else k.float()
    vf = v.float().repeat_interleave(n_rep, dim=1) if n_rep > 1 else v.float()
    dev = q.device
    mask = _bool_mask(mask)
    token_valid = mask.diagonal(dim1=-2, dim2=-1).clone() if mask is not None else torch.ones(B, T, dtype=torch.bool, device=dev)

    out = torch.zeros(B, H, T, vf.shape[-1], dtype=torch.float32, device=dev)
    lse = torch.full((B, H, T), float("-inf"), device=dev)
    col_sum = torch.zeros(B, H, T, device=dev)
    row_counts = torch.zeros(B, T, dtype=torch.long, device=dev)
    maps = {h: torch.zeros(B, T, T, device=dev) for h in keep_maps}
    chunk = settings.chunk_rows or max(1, min(T, SCORE_BUDGET // max(1, B * H * T)))

    for r0 in range(0, T, chunk):
        r1 = min(T, r0 + chunk)
        m = _chunk_mask(mask, B, r0, r1, T, dev) & token_valid[:, r0:r1, None]  # rows that may see each column
        seen = m.any(dim=0).any(dim=0).nonzero()
        if seen.numel() == 0:
            continue
        lo, hi = int(seen[0]), int(seen[-1]) + 1  # causal tiles beyond the chunk are skipped
        mm = m[:, None, :, lo:hi]
        s = _scores(qf[:, :, r0:r1], kf[:, :, lo:hi], scaling, softcap).masked_fill(~mm, float("-inf"))
        mx = s.amax(dim=-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        p = torch.exp(s - mx)
        z = p.sum(dim=-1, keepdim=True)
        a = p / z.clamp_min(torch.finfo(torch.float32).tiny)  # fully masked (padding) rows stay 0
        lse[:, :, r0:r1] = (mx + torch.log(z)).squeeze(-1)
        out[:, :, r0:r1] = torch.matmul(a, vf[:, :, lo:hi])
        col_sum[:, :, lo:hi] += a.sum(dim=-2)
        row_counts[:, lo:hi] += m[:, :, lo:hi].sum(dim=1)
        for h in maps:
            maps[h][:, r0:r1, lo:hi] = a[:, h]

    eligible = token_valid & (row_counts >= settings.min_rows)
    col_scores = col_sum / row_counts.clamp_min(1)[:, None, :]
    col_scores = col_scores.masked_fill(~eligible[:, None, :], float("nan"))
    tag, stats = _sink_pass(qf, kf, vf, out, lse, mask, token_valid, col_scores, row_counts, scaling, softcap, settings,
                            v.dtype)
    return out, tag, stats, maps


def _sink_pass(qf, kf, vf, out, lse, mask, token_valid, col_scores, row_counts, scaling, softcap, settings,
               v_dtype=torch.float32):
    B, H, T, _ = qf.shape
    dev = qf.device
    all_eps = settings.all_eps
    scores0 = torch.nan_to_num(col_scores, nan=-1.0)
    is_sink_lowest = scores0 > all_eps[0]
    K = int(is_sink_lowest.sum(dim=-1).max()) if T else 0
    E = len(all_eps)
    main_e = all_eps.index(float(settings.eps))

    if K == 0:
        zeros = torch.zeros(B, H, device=dev)
        empty_idx = torch.zeros(B, H, 0, dtype=torch.long, device=dev)
        stats = HeadStats(col_scores, row_counts, token_valid, empty_idx, empty_idx.bool(), zeros, zeros.clone(),
                          zeros.clone(), torch.zeros(B, H, E, dtype=torch.long, device=dev), torch.zeros(B, H, E, device=dev),
                          torch.zeros(B, H, E, device=dev), torch.zeros(B, H, E, device=dev),
                          torch.zeros(B, H, T, 0, device=dev))
        return torch.zeros_like(out), stats

    # The K highest-scoring columns per head hold every sink at the lowest eps (sink sets are nested).
    top_scores, idx = scores0.topk(K, dim=-1)
    idx, order = idx.sort(dim=-1)
    top_scores = top_scores.gather(-1, order)
    gidx = idx[..., None].expand(B, H, K, qf.shape[-1])
    k_s = kf.gather(2, gidx)
    v_s = vf.gather(2, idx[..., None].expand(B, H, K, vf.shape[-1]))
    logits = _scores(qf, k_s, scaling, softcap)  # (B,H,T,K)
    a_s = torch.exp(logits - lse[..., None])
    if mask is not None:
        vis = mask[:, None].expand(B, H, T, T).gather(-1, idx[:, :, None, :].expand(B, H, T, K))
    else:
        vis = torch.arange(T, device=dev)[None, None, :, None] >= idx[:, :, None, :]
    vis = vis & token_valid[:, None, :, None]
    a_s = torch.where(vis, a_s, torch.zeros_like(a_s))

    rows = token_valid[:, None, :, None].float()  # (B,1,T,1)
    n_rows = rows.sum(dim=2, keepdim=True).clamp_min(1)
    centred = (out - (out * rows).sum(dim=2, keepdim=True) / n_rows) * rows
    total = centred.pow(2).sum(dim=(-1, -2)).double()  # (B,H)
    # The span projection goes through an SVD of the sink values, in float64: sink values are often nearly
    # parallel (the same token at two positions), and a Gram-matrix inverse would square their condition number.
    v_s64 = v_s.double()
    x = torch.matmul(centred.double(), v_s64.transpose(-1, -2))  # (B,H,T,K): projections on sink values
    raw = out.double() * rows
    x_raw = torch.matmul(raw, v_s64.transpose(-1, -2))
    total_raw = raw.pow(2).sum(dim=(-1, -2))

    n_sinks = torch.zeros(B, H, E, dtype=torch.long, device=dev)
    ve = torch.zeros(B, H, E, device=dev)
    r2 = torch.zeros(B, H, E, device=dev)
    ve_raw = torch.zeros(B, H, E, device=dev)
    main_tag = None
    for e_i, e in enumerate(all_eps):
        ok = top_scores > e  # (B,H,K)
        okf = ok.double()
        to_basis = _span_basis(v_s64 * okf[..., None], top_scores, span_rtol(v_dtype))  # (B,H,K,K)
        proj = torch.matmul(x * okf[..., None, :], to_basis).pow(2).sum(dim=(-1, -2))
        tag = torch.matmul(a_s * ok[:, :, None, :], v_s)  # (B,H,T,Dv)
        nontag = (out - tag)
        nontag_c = (nontag - (nontag * rows).sum(dim=2, keepdim=True) / n_rows) * rows
        safe = total.clamp_min(1e-30)
        has = ok.any(dim=-1) & (total > 0)
        n_sinks[..., e_i] = ok.sum(dim=-1)
        ve[..., e_i] = torch.where(has, proj / safe, torch.zeros_like(proj)).float()
        r2[..., e_i] = torch.where(has, 1 - nontag_c.pow(2).sum(dim=(-1, -2)).double() / safe, torch.zeros_like(proj)).float()
        proj_raw = torch.matmul(x_raw * okf[..., None, :], to_basis).pow(2).sum(dim=(-1, -2))
        ve_raw[..., e_i] = torch.where(has, proj_raw / total_raw.clamp_min(1e-30), torch.zeros_like(proj_raw)).float()
        if e_i == main_e:
            main_tag = tag
    main_ok = top_scores > float(settings.eps)
    stats = HeadStats(col_scores, row_counts, token_valid, idx, main_ok, ve[..., main_e].clone(), r2[..., main_e].clone(),
                      ve_raw[..., main_e].clone(), n_sinks, ve, r2, ve_raw, a_s * main_ok[:, :, None, :])
    return main_tag, stats


def _span_basis(v: torch.Tensor, scores: torch.Tensor, rtol: float) -> torch.Tensor:
    """For sink values v (..., K, D) and their column scores (..., K), the (..., K, K) matrix W with
    (o @ v^T) @ W = o @ Q, Q an orthonormal basis of the sinks' value span: the span rule of docs/method.md (values
    taken in descending score order, each adding a direction only if its distance to the span of those before it
    exceeds rtol x the largest norm so far; the triton path and the float64 reference use the same rule), so
    repeated or masked (zero) sink values add no direction."""
    from catchtag.engine.moments import _gram_schmidt, score_order

    order = score_order(scores)
    w = _gram_schmidt(v.gather(-2, order[..., None].expand(*v.shape)), rtol)  # rows in score order
    back = torch.empty_like(w)  # rows back in v's order
    return back.scatter_(-2, order[..., None].expand(*w.shape), w)
