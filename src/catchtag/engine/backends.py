"""Chooses how one layer's statistics are computed: the torch path everywhere, fused kernels on CUDA.

Every backend returns what ``stats.attention_with_stats`` returns, (out, tag, HeadStats, maps); the tests
hold each one to the eager reference. The "triton" backend:
  1. output and each row's log-sum-exp from the fused attention kernel PyTorch already has (flash
     attention without a mask, memory-efficient attention with one; on the CPU the flash-for-CPU kernel),
  2. column sums of the softmax in one Triton pass over (q, k) tiles (kernels/colsum.py),
  3. the sink pass from a few K x K moments (kernels/sinkpass.py).
It returns out and tag in the input dtype (the torch path returns float32). It needs no T x T tensor
beyond the model's own mask, which it reads only to find padding and the sliding window.
"""

from __future__ import annotations

import torch

from catchtag.engine.stats import _bool_mask, attention_with_stats

BACKENDS = ("auto", "torch", "triton")


def layer_statistics(query, key, value, mask, scaling, softcap, settings, keep_maps=(), backend="auto"):
    if backend not in BACKENDS:
        raise ValueError(f"unknown engine backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        backend = "triton" if (query.is_cuda and softcap is None and not keep_maps and _triton_available()) else "torch"
    if backend == "triton":
        if softcap is not None or keep_maps:
            raise ValueError("the triton backend handles neither softcapped logits nor kept attention maps; "
                             "use backend='torch' (or 'auto', which falls back by itself)")
        structure = mask_structure(mask, query.shape[0], query.shape[2], query.device)
        if structure is not None:
            return triton_statistics(query, key, value, mask, scaling, settings, *structure)
    return attention_with_stats(query, key, value, mask, scaling, softcap, settings, keep_maps=keep_maps)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def mask_structure(mask, B, T, device):
    """(token_valid (B,T), window or None) when the mask is padding & causal & one sliding window, else None.

    Reads the mask's diagonal (valid tokens), each prompt's last valid row (window) and the per-row counts of
    visible columns (a check that the mask is exactly that structure); never expands it to (B,H,T,T).
    """
    bm = _bool_mask(mask)
    if bm is None:
        return torch.ones(B, T, dtype=torch.bool, device=device), None
    bm = bm.expand(B, T, T)
    valid = bm.diagonal(dim1=-2, dim2=-1).clone()
    n_valid = valid.sum(dim=-1)
    if not bool((n_valid > 0).all()):
        return None
    last = T - 1 - valid.flip(-1).to(torch.int8).argmax(dim=-1)
    seen_by_last = bm[torch.arange(B, device=device), last].sum(dim=-1)
    narrow = seen_by_last < n_valid
    window = int(seen_by_last[narrow].min()) if bool(narrow.any()) else None
    if window is not None and not bool((seen_by_last[narrow] == window).all()):
        return None
    cum = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=device), valid.long().cumsum(-1)], dim=-1)
    i = torch.arange(T, device=device)
    lo = (i - window + 1).clamp_min(0) if window is not None else torch.zeros_like(i)
    expected = (cum[:, i + 1] - cum[:, lo]) * valid  # valid columns j in [lo, i] seen by valid row i
    if not torch.equal(bm.sum(dim=-1) * valid, expected):
        return None
    return valid, window


def row_counts(token_valid: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B,T): how many valid rows see each valid column (0 for padding columns)."""
    B, T = token_valid.shape
    cum = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=token_valid.device),
                     token_valid.long().cumsum(-1)], dim=-1)
    j = torch.arange(T, device=token_valid.device)
    hi = (j + window).clamp_max(T) if window is not None else torch.full_like(j, T)
    return (cum[:, hi] - cum[:, j]) * token_valid


def attention_and_lse(query, key, value, mask, scaling, token_valid):
    """(out (B,H,T,Dv) in the input dtype, lse (B,H,T) float32) from PyTorch's fused attention kernels.

    Padding rows (no visible column) get out = 0 and lse = 0.
    """
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
                t_pad = -(-T // 16) * 16  # the kernel wants the bias rows 16-aligned
                bias = torch.zeros(bm.shape[0], 1, T, t_pad, dtype=query.dtype, device=query.device)[..., :T]
                bias.masked_fill_(~bm[:, None], float("-inf"))
                bias = bias.expand(B, H, T, T)
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


def triton_statistics(query, key, value, mask, scaling, settings, token_valid, window):
    """The triton backend (see the module docstring); same return as stats.attention_with_stats."""
    from catchtag.engine.kernels.colsum import column_sums
    from catchtag.engine.kernels.sinkpass import sink_pass

    out, lse = attention_and_lse(query, key, value, mask, scaling, token_valid)
    col_sum = column_sums(query, key, lse, token_valid, scaling, window)
    counts = row_counts(token_valid, window)
    eligible = token_valid & (counts >= settings.min_rows)
    col_scores = (col_sum / counts.clamp_min(1)[:, None, :]).masked_fill(~eligible[:, None, :], float("nan"))
    done = sink_pass(query, key, value, out, lse, token_valid, col_scores, counts, scaling, settings, window)
    if done is None:  # very many candidate sinks (eps near 0): the torch path's sink pass, with float32 copies
        from catchtag.engine.stats import _sink_pass

        n_rep = query.shape[1] // key.shape[1]
        kf, vf = (x.float().repeat_interleave(n_rep, dim=1) for x in (key, value))
        tag, stats = _sink_pass(query.float(), kf, vf, out.float(), lse, _bool_mask(mask), token_valid, col_scores,
                                counts, scaling, None, settings)
        return out, tag.to(out.dtype), stats, {}
    tag, stats = done
    return out, tag, stats, {}
