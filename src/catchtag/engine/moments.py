"""The K x K algebra of the fast path, in plain torch (no Triton needed to import it): VE, R^2 and every threshold
of a sweep from the sink pass's moments, for all layers of a forward pass at once (kernels/sinkpass.py makes the
moments; engine.attention.Capture.finish calls finish_moments)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

MAX_SINKS = 64  # more candidate sinks per head than this (eps near 0) go to the torch path


@dataclass
class SinkMoments:
    """What the K x K algebra of one layer needs (on the layer's device), kept so that Capture.finish can run it
    for every layer of a forward pass in one batch (finish_moments): the kernel's per-block sums ``blocks``
    (B,H,NB, [sum y (KP), sum a (KP), sum o (Dv), |o - block mean|^2, rows]), the float64 product ``products``
    (B,H,2KP,2KP) of the per-row [y, a] and their float64 sums ``sums`` (B,H,2KP), the sink values (B,H,K,Dv)
    and the candidates' column scores (B,H,K).
    n_candidates (0-d): the most columns of any head above the lowest threshold, checked there against the cap."""

    blocks: torch.Tensor
    products: torch.Tensor
    sums: torch.Tensor
    values: torch.Tensor
    top_scores: torch.Tensor
    rtol: float
    n_candidates: torch.Tensor | None = None


def finish_moments(items, settings, budget: int = 1 << 23, k_used: int | None = None) -> None:
    """Fill VE, R^2, uncentred VE and the sweep columns of each (HeadStats, SinkMoments), on their device.

    Layers of one shape are stacked (about ``budget`` float64 elements at a time) and every threshold of every
    layer comes out of one pass: with the candidates ordered by descending column score, each threshold's sink set
    S is a prefix, so one Gram-Schmidt pass over the sink values (float64, the span cut of stats.span_rtol) gives
    an orthonormal basis whose first vectors span each prefix, and
      VE  = sum over the prefix's basis vectors q of |Y_c q|^2 / |o_c|^2 (Y_c q from Y_c^T Y_c and the basis)
      R^2 = 1 - (|o_c|^2 - 2 sum_S diag(A_c^T Y_c) + sum_{S x S} (A_c^T A_c) * (v_s v_s^T)) / |o_c|^2
      VE uncentred: the same projection of the uncentred Y^T Y over the uncentred |o|^2.
    No pseudo-inverse and no eigendecomposition: nothing waits for the host, and the cost is K small steps.
    k_used: no head has more candidates than this (Capture.finish knows it): the rest are skipped."""
    if not items:
        return
    all_eps = settings.all_eps
    main_e = all_eps.index(float(settings.eps))
    groups: dict = {}
    for st, m in items:
        groups.setdefault((tuple(m.values.shape), tuple(m.blocks.shape), m.rtol, m.values.device), []).append((st, m))
    for (shape, bshape, rtol, dev), group in groups.items():
        per_item = max(torch.Size(shape).numel(), torch.Size(bshape).numel())
        step = max(1, budget // max(1, per_item))
        eps = _thresholds(tuple(all_eps), dev)
        for g0 in range(0, len(group), step):
            part = group[g0:g0 + step]
            got = _finish_stacked([m for _, m in part], eps, main_e, rtol, k_used)
            for i, (st, _) in enumerate(part):
                n_sinks, ve, r2, ve_raw = (x[i] for x in got)
                st.sweep_n_sinks, st.sweep_ve, st.sweep_r2, st.sweep_ve_uncentred = n_sinks, ve, r2, ve_raw
                st.ve, st.r2 = ve[..., main_e].clone(), r2[..., main_e].clone()
                st.ve_uncentred = ve_raw[..., main_e].clone()


@functools.lru_cache(maxsize=16)
def _thresholds(all_eps: tuple, device: torch.device) -> torch.Tensor:
    """The thresholds on the device, made once: a copy from pageable host memory would wait for the GPU's queue,
    which is exactly what finish_moments must not do."""
    return torch.tensor(all_eps, dtype=torch.float64, device=device)


def _finish_stacked(ms, eps, main_e, rtol, k_used=None):
    """(n_sinks, ve, r2, ve_uncentred) (N,B,H,E) for N layers' moments of one shape."""
    stack = lambda name: torch.stack([getattr(m, name) for m in ms])  # noqa: E731
    K, Dv = ms[0].values.shape[-2:]
    KP = ms[0].products.shape[-1] // 2
    # the kernel's blocks of rows merged exactly (Chan): |o_c|^2 = sum of within-block sums + between-block part
    blocks = stack("blocks").double()  # (N,B,H,NB,W)
    nb = blocks[..., -1]
    n = nb.sum(dim=-1).clamp_min(1)  # (N,B,H)
    sums = blocks.sum(dim=-2)
    mean_o = sums[..., 2 * KP:2 * KP + Dv] / n[..., None]
    dev_o = torch.where(nb[..., None] > 0, blocks[..., 2 * KP:2 * KP + Dv] / nb.clamp_min(1)[..., None]
                        - mean_o[..., None, :], 0.0)
    c_oo = sums[..., 2 * KP + Dv] + (nb * dev_o.pow(2).sum(dim=-1)).sum(dim=-1)
    raw_oo = c_oo + n * mean_o.pow(2).sum(dim=-1)  # uncentred sum |o|^2
    mean_ya = stack("sums") / n[..., None]
    products = stack("products")
    centred = products - n[..., None, None] * mean_ya[..., :, None] * mean_ya[..., None, :]

    top = stack("top_scores").double()
    order = score_order(top)  # each threshold's sinks: a prefix of this order
    if k_used is not None and k_used < K:  # columns past the most candidates of any head are never sinks
        order = order[..., :max(1, k_used)]
    top = top.gather(-1, order)

    k = order.shape[-1]

    def perm(x):  # (..., K, K) -> rows and columns in score order (the first k)
        x = x.gather(-1, order[..., None, :].expand(*x.shape[:-1], k))
        return x.gather(-2, order[..., :, None].expand(*x.shape[:-2], k, k))

    c_yy, c_aa = perm(centred[..., :K, :K]), perm(centred[..., KP:KP + K, KP:KP + K])
    c_ay, raw_yy = perm(centred[..., KP:KP + K, :K]), perm(products[..., :K, :K])
    values = stack("values").double()
    values = values.gather(-2, order[..., None].expand(*values.shape[:-2], k, values.shape[-1]))
    basis = _gram_schmidt(values, rtol)  # (...,K,K): q_j = sum_k basis[k, j] v_k
    n_e = (top[..., None, :] > eps[:, None]).sum(dim=-1)  # (N,B,H,E): prefix length per threshold

    def at_prefix(per_k):  # (...,K) cumulative sums -> (...,E) value at each threshold's prefix (0 if empty)
        padded = torch.cat([torch.zeros_like(per_k[..., :1]), per_k.cumsum(dim=-1)], dim=-1)
        return padded.gather(-1, n_e)

    def projected(moment):  # per basis vector q_j: q_j^T M q_j in sink-value coordinates
        return (basis * torch.matmul(moment, basis)).sum(dim=-2)

    total = c_oo[..., None]
    safe = total.clamp_min(1e-30)
    proj = at_prefix(projected(c_yy))
    gram_aa = c_aa * torch.matmul(values, values.transpose(-1, -2))
    block = gram_aa.cumsum(dim=-1).cumsum(dim=-2).diagonal(dim1=-2, dim2=-1)  # sum over the leading k x k block
    block = torch.cat([torch.zeros_like(block[..., :1]), block], dim=-1).gather(-1, n_e)
    resid = total - 2 * at_prefix(c_ay.diagonal(dim1=-2, dim2=-1)) + block
    has = (n_e > 0) & (total > 0)
    zero = torch.zeros_like(proj)
    ve = torch.where(has, proj / safe, zero).float()
    r2 = torch.where(has, 1 - resid / safe, zero).float()
    proj_raw = at_prefix(projected(raw_yy))
    ve_raw = torch.where(has, proj_raw / raw_oo[..., None].clamp_min(1e-30), zero).float()
    return n_e, ve, r2, ve_raw


def score_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices of the candidates in descending column score (ties: lower position first), the order in which the
    span rule takes sink values (every path uses this one order)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def _gram_schmidt(values: torch.Tensor, rtol: float) -> torch.Tensor:
    """For values (..., K, D) float64, the (..., K, K) upper-triangular W with q_j = sum_k W[k, j] v_k orthonormal
    and span{q_0..q_j} = span{v_0..v_j}: classical Gram-Schmidt with one re-orthogonalisation. A value whose distance
    to the span of the earlier ones is below rtol x the largest norm so far adds no direction (column of zeros),
    (span_rtol: the same token seen at two positions). This is the span rule of every path (stats._span_basis uses
    it too, and engine.reference writes it out one value at a time)."""
    K = values.shape[-2]
    q = torch.zeros_like(values)
    w = torch.zeros(*values.shape[:-1], K, dtype=values.dtype, device=values.device)
    eye = torch.eye(K, dtype=values.dtype, device=values.device)
    scale = values.norm(dim=-1).cummax(dim=-1).values
    for k in range(K):
        r = values[..., k, :]
        c = eye[k].expand(w.shape[:-1])
        for _ in range(2):
            p = torch.matmul(q, r[..., None])  # (..., K, 1): coefficients on the basis so far (zero rows beyond)
            r = r - (p * q).sum(dim=-2)
            c = c - torch.matmul(w, p)[..., 0]
        norm = r.norm(dim=-1, keepdim=True)
        keep = norm > rtol * scale[..., k:k + 1]
        inv = torch.where(keep, 1.0 / norm.clamp_min(1e-300), torch.zeros_like(norm))
        q[..., k, :] = r * inv
        w[..., :, k] = c * inv
    return w
