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
CHUNK_ROWS = 64  # rows per chunk at most: smaller chunks skip more of the causal triangle, larger ones loop less


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
    learned_sink (B,H): for models with learned sink logits (gpt-oss), the mean over real rows of the attention the
    virtual sink column takes (catch without a tag); None for models without.
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
    learned_sink: torch.Tensor | None = None  # (B,H) mean share of a row's attention on the learned sink (None: none)


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


def _row_sinks(sinks, B, H, T):
    """Learned sink logits (broadcastable to (B,H,T)) as (B,H,T) float32, or None."""
    return None if sinks is None else sinks.float().expand(B, H, T)


def learned_sink_share(sinks, lse, token_valid) -> torch.Tensor | None:
    """(B,H) mean over real rows of exp(sink - lse): the attention the learned sink column takes (None: no sinks)."""
    if sinks is None:
        return None
    B, H, T = lse.shape
    share = torch.exp(_row_sinks(sinks, B, H, T) - lse) * token_valid[:, None, :]
    return share.sum(dim=-1) / token_valid.sum(dim=-1).clamp_min(1)[:, None]


def softmax_attention(q, k, v, mask, scaling, softcap=None, sinks=None) -> torch.Tensor:
    """The attention output (B,H,T,Dv) in q's dtype, computed as the model's own eager attention computes it (float32
    softmax, softcapped logits, learned sink logits as one more column with no value): differentiable, for the
    layers whose output catchtag does not take from the statistics pass."""
    B, H, T, _ = q.shape
    n_rep = H // k.shape[1]
    kf = k.repeat_interleave(n_rep, dim=1) if n_rep > 1 else k
    vf = v.repeat_interleave(n_rep, dim=1) if n_rep > 1 else v
    s = _scores(q.float(), kf.float(), scaling, softcap)
    bm = _bool_mask(mask)
    see = _chunk_mask(bm, B, 0, T, T, q.device)[:, None]
    s = s.masked_fill(~see, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, _row_sinks(sinks, B, H, T)[..., None]], dim=-1)
    mx = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)))
    a = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.matmul(a[..., :T].to(vf.dtype), vf)


def attention_with_stats(q, k, v, mask, scaling, softcap, settings: SinkSettings, keep_maps=(), sinks=None):
    """Attention output and catch/tag statistics for one layer.

    q (B,H,T,D); k, v (B,KV,T,D) with H a multiple of KV (GQA); mask: the model's mask (bool or additive,
    (B,1,T,T)) or None for plain causal. sinks: learned sink logits broadcastable to (B,H,T) (gpt-oss), or None:
    they join each row's softmax as a column with no value. Returns (out (B,H,T,Dv) float32, tag (B,H,T,Dv) at the
    main eps, HeadStats, maps {head: (B,T,T)} for the heads in keep_maps).

    Pass 1 takes the output and each row's log-sum-exp from PyTorch's fused attention kernel and then only sums
    exp(q k^T scale - lse) over the rows, chunk by chunk, skipping the key tiles no row of the chunk sees; with
    softcapped logits, which no fused kernel takes, the chunks compute the softmax and the output themselves.
    """
    qf, kf, vf, out, lse, col_sum, row_counts, token_valid, bool_mask, maps = attention_and_column_sums(
        q, k, v, mask, scaling, softcap, settings, keep_maps, sinks)
    eligible = token_valid & (row_counts >= settings.min_rows)
    col_scores = col_sum / row_counts.clamp_min(1)[:, None, :]
    col_scores = col_scores.masked_fill(~eligible[:, None, :], float("nan"))
    tag, stats = _sink_pass(qf, kf, vf, out, lse, bool_mask, token_valid, col_scores, row_counts, scaling, softcap,
                            settings, v.dtype)
    stats.learned_sink = learned_sink_share(sinks, lse, token_valid)
    return out, tag, stats, maps


def attention_and_column_sums(q, k, v, mask, scaling, softcap, settings: SinkSettings, keep_maps=(), sinks=None):
    """Pass 1 of ``attention_with_stats``: (qf, kf, vf float32 with the KV heads repeated, out (B,H,T,Dv) float32,
    lse (B,H,T), col_sum (B,H,T): each column's attention summed over the rows, row_counts (B,T): how many rows see
    each column, token_valid (B,T), the bool mask or None, maps). A decoding step (engine.decode) continues these
    sums one row at a time."""
    B, H, T, D = q.shape
    n_rep = H // k.shape[1]
    qf = q.float().contiguous()  # one copy, not one per chunk (the model hands a transposed view)
    kf = k.float().repeat_interleave(n_rep, dim=1) if n_rep > 1 else k.float().contiguous()
    vf = v.float().repeat_interleave(n_rep, dim=1) if n_rep > 1 else v.float().contiguous()
    dev = q.device
    bool_mask = _bool_mask(mask)
    token_valid = bool_mask.diagonal(dim1=-2, dim2=-1).clone() if bool_mask is not None else \
        torch.ones(B, T, dtype=torch.bool, device=dev)
    row_sinks = _row_sinks(sinks, B, H, T)
    fused = softcap is None
    if fused:
        out, lse = attention_and_lse(qf, kf, vf, mask, scaling, token_valid)
        if row_sinks is not None:  # the learned sink column: folded into lse, and the output scaled to match
            with_sink = torch.logaddexp(lse, row_sinks)
            out = out * torch.exp(lse - with_sink)[..., None]
            lse = with_sink
    else:
        out = torch.zeros(B, H, T, vf.shape[-1], dtype=torch.float32, device=dev)
        lse = torch.full((B, H, T), float("-inf"), device=dev)
    col_sum = torch.zeros(B, H, T, device=dev)
    row_counts = torch.zeros(B, T, dtype=torch.long, device=dev)
    maps = {h: torch.zeros(B, T, T, device=dev) for h in keep_maps}
    chunk = settings.chunk_rows or max(1, min(T, CHUNK_ROWS, SCORE_BUDGET // max(1, B * H * T)))

    for r0 in range(0, T, chunk):
        r1 = min(T, r0 + chunk)
        m = _chunk_mask(bool_mask, B, r0, r1, T, dev) & token_valid[:, r0:r1, None]  # rows that may see each column
        seen = m.any(dim=0).any(dim=0).nonzero()
        if seen.numel() == 0:
            continue
        lo, hi = int(seen[0]), int(seen[-1]) + 1  # causal tiles beyond the chunk are skipped
        mm = m[:, None, :, lo:hi]
        if fused:  # exp(q k^T scale - lse) with the scale and the subtraction inside one batched matmul
            a = torch.baddbmm(-lse[:, :, r0:r1, None].reshape(B * H, r1 - r0, 1),
                              qf[:, :, r0:r1].reshape(B * H, r1 - r0, D),
                              kf[:, :, lo:hi].transpose(-1, -2).reshape(B * H, D, hi - lo),
                              alpha=scaling).exp_().view(B, H, r1 - r0, hi - lo)
            if bool_mask is None:  # plain causal: only the chunk's own diagonal block has columns a row cannot see
                a[..., r0 - lo:].tril_()
            else:
                a.masked_fill_(~mm, 0.0)
        else:
            s = _scores(qf[:, :, r0:r1], kf[:, :, lo:hi], scaling, softcap).masked_fill(~mm, float("-inf"))
            mx = s.amax(dim=-1, keepdim=True)
            if row_sinks is not None:
                lam = row_sinks[:, :, r0:r1, None]
                mx = torch.maximum(mx, lam)
            mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
            p = torch.exp(s - mx)
            z = p.sum(dim=-1, keepdim=True)
            if row_sinks is not None:
                z = z + torch.exp(lam - mx)
            a = p / z.clamp_min(torch.finfo(torch.float32).tiny)  # fully masked (padding) rows stay 0
            lse[:, :, r0:r1] = (mx + torch.log(z)).squeeze(-1)
            out[:, :, r0:r1] = torch.matmul(a, vf[:, :, lo:hi])
        col_sum[:, :, lo:hi] += a.sum(dim=-2)
        row_counts[:, lo:hi] += m[:, :, lo:hi].sum(dim=1)
        for h in maps:
            maps[h][:, r0:r1, lo:hi] = a[:, h]
    return qf, kf, vf, out, lse, col_sum, row_counts, token_valid, bool_mask, maps


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
                          zeros.clone(), torch.zeros(B, H, E, dtype=torch.long, device=dev),
                          torch.zeros(B, H, E, device=dev), torch.zeros(B, H, E, device=dev),
                          torch.zeros(B, H, E, device=dev), torch.zeros(B, H, T, 0, device=dev))
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

    # In float64 from here: sink values are often nearly parallel (the same token at two positions), and heads whose
    # output barely varies around a large mean would lose their centred variance to cancellation in float32. Every
    # threshold's VE and R^2 come from K-space quantities (projections on the sink values, and the centred
    # attention to them), as on the triton path: no (T x Dv) tensor per threshold.
    rows = token_valid[:, None, :, None].double()  # (B,1,T,1)
    n_rows = rows.sum(dim=2, keepdim=True).clamp_min(1)
    raw = out.double() * rows
    mean = raw.sum(dim=2, keepdim=True) / n_rows  # (B,H,1,Dv)
    total_raw = raw.pow(2).sum(dim=(-1, -2))  # (B,H): |o|^2
    total = total_raw - n_rows[..., 0, 0] * mean.pow(2).sum(dim=(-1, -2))  # |o - mean|^2
    v_s64 = v_s.double()
    x_raw = torch.matmul(raw, v_s64.transpose(-1, -2))  # (B,H,T,K): projections on the sink values
    x = (x_raw - torch.matmul(mean, v_s64.transpose(-1, -2))) * rows  # the same of the centred outputs
    a64 = a_s.double()
    a_c = (a64 - a64.sum(dim=2, keepdim=True) / n_rows) * rows  # centred attention to the sinks
    cross = torch.matmul(a_c.transpose(-1, -2), x).diagonal(dim1=-2, dim2=-1)  # (B,H,K): <o_c, A_c[:, k] v_k>
    tag_tag = torch.matmul(a_c.transpose(-1, -2), a_c) * torch.matmul(v_s64, v_s64.transpose(-1, -2))  # (B,H,K,K)

    n_sinks = torch.zeros(B, H, E, dtype=torch.long, device=dev)
    ve = torch.zeros(B, H, E, device=dev)
    r2 = torch.zeros(B, H, E, device=dev)
    ve_raw = torch.zeros(B, H, E, device=dev)
    safe = total.clamp_min(1e-30)
    for e_i, e in enumerate(all_eps):
        ok = top_scores > e  # (B,H,K)
        okf = ok.double()
        to_basis = _span_basis(v_s64 * okf[..., None], top_scores, span_rtol(v_dtype))  # (B,H,K,K)
        proj = torch.matmul(x * okf[..., None, :], to_basis).pow(2).sum(dim=(-1, -2))
        # |o_c - tag_c|^2 = |o_c|^2 - 2 <o_c, tag_c> + |tag_c|^2, tag_c = sum over the sinks S of A_c[:, k] v_k
        resid = total - 2 * (cross * okf).sum(dim=-1) + (tag_tag * okf[..., :, None] * okf[..., None, :]).sum(
            dim=(-1, -2))
        has = ok.any(dim=-1) & (total > 0)
        n_sinks[..., e_i] = ok.sum(dim=-1)
        ve[..., e_i] = torch.where(has, proj / safe, torch.zeros_like(proj)).float()
        r2[..., e_i] = torch.where(has, 1 - resid / safe, torch.zeros_like(proj)).float()
        proj_raw = torch.matmul(x_raw * okf[..., None, :], to_basis).pow(2).sum(dim=(-1, -2))
        ve_raw[..., e_i] = torch.where(has, proj_raw / total_raw.clamp_min(1e-30), torch.zeros_like(proj_raw)).float()
    main_ok = top_scores > float(settings.eps)
    main_tag = torch.matmul(a_s * main_ok[:, :, None, :], v_s)  # (B,H,T,Dv)
    stats = HeadStats(col_scores, row_counts, token_valid, idx, main_ok, ve[..., main_e].clone(),
                      r2[..., main_e].clone(), ve_raw[..., main_e].clone(), n_sinks, ve, r2, ve_raw,
                      a_s * main_ok[:, :, None, :])
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


def attention_and_lse(query, key, value, mask, scaling, token_valid, cache: dict | None = None, softcap=None,
                      window=None):
    """(out (B,H,T,Dv) in the input dtype, lse (B,H,T) float32) from PyTorch's fused attention kernels.

    Padding rows (no visible column) get out = 0 and lse = 0. cache: a dict kept over one forward pass, where the
    additive bias made from a mask is kept for the next layer with the same mask. softcap: logits through
    softcap * tanh(logit / softcap), which PyTorch's kernels cannot apply: catchtag's own Triton kernel serves it
    (``softcap_attention_and_lse``; CUDA, or the CPU under TRITON_INTERPRET=1; the mask must then be padding +
    causal + ``window``)."""
    if softcap is not None:
        return softcap_attention_and_lse(query, key, value, scaling, softcap, token_valid, window,
                                         padded=mask is not None)
    D, Dv = query.shape[-1], value.shape[-1]
    if D != Dv:  # multi-head latent attention: the fused kernels want one head size; zeros change no dot product
        width = max(D, Dv)
        pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[-1]))  # noqa: E731
        out, lse = attention_and_lse(pad(query), pad(key), pad(value), mask, scaling, token_valid, cache)
        return out[..., :Dv], lse
    B, H, T, _ = query.shape
    n_rep = H // key.shape[1]
    bm = _bool_mask(mask)
    out = lse = None
    if query.is_cuda:
        if bm is None and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 128:
            out, lse = _causal_attention_and_lse(query, key, value, scaling)
        else:
            k = key.repeat_interleave(n_rep, 1) if n_rep > 1 else key
            v = value.repeat_interleave(n_rep, 1) if n_rep > 1 else value
            bias = None
            if bm is not None:
                key_ = (id(mask), H, query.dtype)
                if cache is None or key_ not in cache:
                    t_pad = -(-T // 16) * 16  # the kernel wants the bias rows 16-aligned
                    bias = torch.zeros(bm.shape[0], 1, T, t_pad, dtype=query.dtype, device=query.device)[..., :T]
                    bias.masked_fill_(~bm[:, None], float("-inf"))
                    bias = bias.expand(B, H, T, T)
                    if cache is not None:
                        cache[key_] = (mask, bias)
                else:
                    bias = cache[key_][1]
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                query, k, v, bias, True, 0.0, bm is None, scale=scaling)[:2]
            lse = lse[..., :T]
    else:
        k = key.repeat_interleave(n_rep, 1) if n_rep > 1 else key
        v = value.repeat_interleave(n_rep, 1) if n_rep > 1 else value
        attn_mask = None
        if bm is not None:  # this kernel takes an additive mask of the query's dtype
            attn_mask = torch.zeros(bm.shape[0], 1, T, T, dtype=query.dtype).masked_fill_(~bm[:, None], float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, k, v, 0.0, bm is None, attn_mask=attn_mask, scale=scaling)
    if bm is None:
        return out, lse.float()
    row_ok = token_valid[:, None, :]
    out = torch.where(row_ok[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    lse = torch.where(row_ok, lse.float(), torch.zeros((), device=lse.device))
    return out, lse


_CAUSAL_KERNELS = ["cudnn", "cudnn_repeat_kv", "flash", "flash_repeat_kv"]  # first that works is kept


def _causal_attention_and_lse(query, key, value, scaling):
    """Causal attention without a mask: cuDNN's fused kernel (what SDPA picks on Hopper), else flash."""
    B, H, T, _ = query.shape
    n_rep = H // key.shape[1]
    errors = []
    for name in list(_CAUSAL_KERNELS):
        repeat = "repeat" in name and n_rep > 1
        k, v = (key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)) if repeat else (key, value)
        try:
            if name.startswith("cudnn"):
                res = torch.ops.aten._scaled_dot_product_cudnn_attention(query, k, v, None, True, 0.0, True, False,
                                                                         scale=scaling)
            else:
                res = torch.ops.aten._scaled_dot_product_flash_attention(query, k, v, 0.0, True, False, scale=scaling)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # this build lacks the kernel or its GQA support: never try it again
            errors.append(f"{name}: {exc}")
            _CAUSAL_KERNELS.remove(name)
            continue
        return res[0], res[1].reshape(B, H, -1)[..., :T]
    raise RuntimeError("no fused attention kernel with log-sum-exp ran: " + "; ".join(errors))


def softcap_attention_and_lse(query, key, value, scaling, softcap, token_valid, window=None, padded=True):
    """Attention with softcapped logits (Gemma-2) and each row's log-sum-exp, for a padding + causal (+ sliding
    window) mask, from catchtag's fused Triton kernel (kernels/flash.py: PyTorch's fused kernels cannot apply the
    softcap). padded=False: every token is valid. Same return as attention_and_lse."""
    from catchtag.engine.kernels.flash import flash_attention

    return flash_attention(query, key, value, scaling, token_valid, window, softcap, padded=padded)
