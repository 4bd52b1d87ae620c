"""Catch and tag while a model writes: the engine's statistics kept beside the KV cache, one row per step.

A scan sees a whole text in one forward pass. During generation every pass after the first adds one query row per
sequence, and everything the sink rule needs is a running sum over rows: each column's summed attention and the
number of rows that see it (so the sinks after any step are the sinks a scan of the text so far finds), and the sum
and Gram matrix of each head's outputs (so the variance the sinks' values explain can be read at the end for any
sink set, without a T x T map or the past queries). A step costs O(T) per head; the state is O(layers x heads x T)
beside the cache, plus the values of sinks a sliding window has dropped (only where one drops columns), plus
O(layers x heads x Dv^2) for the Gram matrices when the VE is to come from the tracker (``ve=True``; a scan of the
finished text gives it otherwise).

``SinkTracker`` is that state (one per batch of sequences); inside ``tracking(tracker)`` catchtag's attention function
(engine.attention) hands every attention call to it while ``model.generate`` runs.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from catchtag.engine.request import SinkSettings
from catchtag.errors import CatchtagError

EVICTED_SLOTS = 64  # room for values of sink candidates a sliding window has dropped, per head (grows)
GRAM_BLOCK = 32  # rows whose outputs join the Gram matrix together


@dataclass
class LayerState:
    """One layer's running sums (B sequences, H heads, C = capacity, positions in the batch's padded frame)."""

    col_sum: torch.Tensor  # (B,H,C) attention each column got, summed over the rows so far
    row_counts: torch.Tensor  # (B,C) rows that saw each column
    token_valid: torch.Tensor  # (B,C) real tokens (not padding, not past a sequence's end)
    gram: torch.Tensor | None  # (B,H,Dv,Dv) float64: sum over rows of o o^T (None: the tracker keeps no VE)
    out_sum: torch.Tensor | None  # (B,H,Dv) float64: sum over rows of o
    n_rows: torch.Tensor  # (B,) float64
    rows: int  # rows seen (the next row's frame position)
    values: torch.Tensor  # the last call's value tensor (B,KV,klen,Dv): the cache's values
    first_key: int  # frame position of values[:, :, 0]
    tail: torch.Tensor  # values the next call may find dropped, from position tail_first on
    tail_first: int
    evicted_v: torch.Tensor | None = None  # (B,H,M+1,Dv) values of sink candidates a sliding window dropped (last
    # slot: discarded); made when a window first drops a column
    evicted_pos: torch.Tensor | None = None  # (B,H,M+1) their positions (-1: empty)
    evicted_n: torch.Tensor | None = None  # (B,H) slots used
    evicted_bound: int = 0  # columns dropped so far: a bound on evicted_n known without asking the device
    records: list = field(default_factory=list)  # one dict of device tensors per row added (see SinkTracker)
    pending: list = field(default_factory=list)  # outputs (B,H,Dv) not yet in gram / out_sum (see _flush)
    chunks: list = field(default_factory=list)  # records already moved to the host, stacked (SinkTracker.offload)


def _flush(st: LayerState) -> None:
    """Add the pending rows' outputs to the Gram matrix and the sum in one product (a block of rows at a time is a
    matrix product; one row at a time would be an outer product per step)."""
    if st.pending and st.gram is not None:
        o = torch.stack(st.pending, dim=2).double()  # (B,H,n,Dv)
        st.gram += o.transpose(-1, -2) @ o
        st.out_sum += o.sum(dim=2)
        st.pending = []


class SinkTracker:
    """Catch/tag statistics of a batch of sequences while they are generated (see the module docstring).

    Every attention call of an enabled model inside ``tracking(self)`` lands in ``attend``: the first (the prompt,
    query length = key length) fills the running sums in one pass (engine.stats), each later one must add one
    token per sequence. Each row added leaves a record: the sinks at that moment (their number and the ``keep``
    highest-scoring columns), and for the new token the attention it puts on them (caught), its tag (attention to
    the sinks times their values) and its output's energy. ``active`` (set by the caller between steps) says which
    sequences' new rows count: a sequence that has ended adds nothing. ``ve``: keep each head's output sum and Gram
    matrix, so ``final_stats`` gives the VE (O(layers x heads x Dv^2) float64 more memory); without it the VE of
    ``final_stats`` is NaN and comes from a scan of the finished text."""

    def __init__(self, settings: SinkSettings, capacity: int, keep: int = 8, backend: str = "auto",
                 ve: bool = True):
        if backend not in ("auto", "torch", "triton"):
            raise CatchtagError(f"backend must be auto, torch or triton, got {backend!r}")
        self.backend = backend  # a decoding step's statistics: the fused Triton kernel ("auto": on a GPU) or torch
        self.host_devices = ("cpu",)  # records made here are on the host already: offload leaves them
        self.settings = settings
        self.capacity = int(capacity)
        self.keep = int(keep)
        self.ve = bool(ve)
        self.layers: dict[int, LayerState] = {}
        self.active: torch.Tensor | None = None  # (B,) bool; None: every sequence
        self._order: dict[int, int] = {}

    def layer_index(self, module) -> int:
        idx = getattr(module, "layer_idx", None)
        if idx is None:
            idx = self._order.setdefault(id(module), len(self._order))
        return int(idx)

    def set_active(self, active: torch.Tensor | None) -> None:
        """Which sequences' next rows count ((B,) bool); None, or all True: every sequence (the cheaper path)."""
        self.active = None if active is None or bool(active.all()) else active.bool()

    def attend(self, module, query, key, value, mask, scaling, softcap=None, sinks=None) -> torch.Tensor:
        """The attention output (B,H,n,Dv) float32 of one call, the running sums updated."""
        layer = self.layer_index(module)
        n, klen = query.shape[2], key.shape[2]
        st = self.layers.get(layer)
        if st is None and klen > n and (mask is None or not bool(_visible_beyond(mask, n))):
            # a static cache hands its whole preallocated length to the prompt's pass: slots past it are empty
            key, value, mask = _first_keys(key, value, mask, n)
            klen = n
        if st is None:
            if n != klen:
                raise CatchtagError(f"{type(module).__name__}: the first pass catchtag follows must be the whole "
                                    f"prompt (its {n} queries attend to {klen} keys: a cache filled before). Fix: "
                                    f"start generation from an empty cache")
            return self._prefill(layer, query, key, value, mask, scaling, softcap, sinks)
        if n != 1:
            raise CatchtagError(f"{type(module).__name__}: catchtag follows generation one token per step, this pass "
                                f"adds {n} (assisted or chunked decoding). Fix: plain generate() options")
        return self._step(st, query, key, value, mask, scaling, softcap, sinks)

    def _prefill(self, layer, q, k, v, mask, scaling, softcap, sinks) -> torch.Tensor:
        from catchtag.engine.stats import attention_and_column_sums

        B, H, T, _ = q.shape
        if T >= self.capacity:
            raise CatchtagError(f"the prompt has {T} tokens, the tracker room for {self.capacity}")
        _, _, _, out, _, col_sum, row_counts, token_valid, _, _ = attention_and_column_sums(
            q, k, v, mask, scaling, softcap, self.settings, sinks=sinks)
        dev, C = q.device, self.capacity
        st = LayerState(col_sum=torch.zeros(B, H, C, device=dev), row_counts=torch.zeros(B, C, dtype=torch.long,
                                                                                         device=dev),
                        token_valid=torch.zeros(B, C, dtype=torch.bool, device=dev),
                        gram=None, out_sum=None, n_rows=token_valid.sum(dim=-1).double(), rows=T, values=v,
                        first_key=0, tail=v, tail_first=0)
        st.col_sum[..., :T] = col_sum
        st.row_counts[:, :T] = row_counts
        st.token_valid[:, :T] = token_valid
        if self.ve:
            o = out.double() * token_valid[:, None, :, None]
            st.gram = torch.matmul(o.transpose(-1, -2), o)
            st.out_sum = o.sum(dim=2)
        self.layers[layer] = st
        # the record of the prompt's last row (left padding: the last frame position is every sequence's last token)
        a = _row_attention(q[:, :, -1:], k, _last_row(mask), scaling, softcap, sinks)
        act = token_valid[:, -1] if self.active is None else token_valid[:, -1] & self.active.to(dev)
        self._record(st, a, v, 0, T - 1, None if bool(act.all()) else act)
        return out

    def _step(self, st: LayerState, q, k, v, mask, scaling, softcap, sinks) -> torch.Tensor:
        t, klen = st.rows, k.shape[2]
        if t >= self.capacity:
            raise CatchtagError(f"generation went past the {self.capacity} positions the tracker was made for")
        if klen > t + 1:  # a static cache: slots past the new token are empty (and masked)
            k, v, mask = _first_keys(k, v, mask, t + 1)
            klen = t + 1
        p0 = t + 1 - klen  # the keys are the last klen positions (a sliding window keeps the tail)
        if p0 > st.first_key:
            self._evict(st, st.first_key, p0)
        visible = _last_row(mask)
        act = None if self.active is None else self.active.to(q.device)
        st.row_counts[:, p0:t + 1] += (1 if act is None else act[:, None]) if visible is None else \
            (visible if act is None else visible & act[:, None])
        st.token_valid[:, t] = True if act is None else act
        st.rows = t + 1
        if self._fused(q, sinks):
            o = self._fused_step(st, q, k, v, visible, scaling, softcap, sinks, act, p0, t)
        else:
            a = _row_attention(q, k, visible, scaling, softcap, sinks)
            st.col_sum[..., p0:t + 1] += a[:, :, 0] if act is None else a[:, :, 0] * act[:, None, None]
            o = self._record(st, a, v, p0, t, act)
        if self.ve:
            st.pending.append(o if act is None else o * act[:, None, None])
            if len(st.pending) == GRAM_BLOCK:
                _flush(st)
        st.n_rows += 1 if act is None else act.double()
        st.tail, st.tail_first = v[:, :, :1].clone(), p0  # a sliding window may drop this column next step
        st.values, st.first_key = v, p0
        return o[:, :, None]

    def _fused(self, q, sinks) -> bool:
        """Whether the step runs the fused Triton kernel (kernels/decode.py): backend "triton", or "auto" on a GPU;
        learned sink logits per row (not per head) take the PyTorch ops."""
        per_head = sinks is None or sinks.numel() == q.shape[1]
        return per_head and (self.backend == "triton" or (self.backend == "auto" and q.is_cuda))

    def _sinks_now(self, st: LayerState, width: int):
        """(is_sink (B,H,width), n_sinks (B,H), top_scores and top_idx (B,H,<=keep)): the sink rule on the column
        scores of the rows so far."""
        s = self.settings
        rc = st.row_counts[:, :width]
        ineligible = ~st.token_valid[:, :width] | (rc < s.min_rows)
        scores = (st.col_sum[..., :width] / rc.clamp_min(1)[:, None]).masked_fill_(ineligible[:, None], -1.0)
        is_sink = scores > float(s.eps)
        top_scores, top_idx = scores.topk(min(self.keep, width), dim=-1)
        return is_sink, is_sink.sum(dim=-1), top_scores, top_idx

    def _fused_step(self, st: LayerState, q, k, v, visible, scaling, softcap, sinks, act, p0: int, t: int):
        from catchtag.engine.kernels.decode import decode_step

        s = self.settings
        o, _, stats = decode_step(q, k, v, visible, sinks, act, st.col_sum, st.row_counts, st.token_valid, p0,
                                  scaling, softcap, float(s.eps), int(s.min_rows))
        _, n_sinks, top_scores, top_idx = self._sinks_now(st, t + 1)
        st.records.append({"row": t, "active": act, "n_sinks": n_sinks, "top_idx": top_idx, "top_scores": top_scores,
                           "caught": stats[..., 0], "strongest": stats[..., 1], "which": stats[..., 2].long(),
                           "norms": stats[..., 3:5], "cross": stats[..., 5]})
        return o

    def _record(self, st: LayerState, a, v, p0: int, t: int, act) -> torch.Tensor:
        """The record of the row at frame position t (attention a (B,H,1,klen) to keys p0..t): the sinks now (the
        prefix's column scores) and the new token's catch and tag. Returns its output o (B,H,Dv)."""
        is_sink, n_sinks, top_scores, top_idx = self._sinks_now(st, t + 1)
        a0 = a[:, :, 0]
        a_s = a0 * is_sink[..., p0:t + 1]
        both = _matmul_values(torch.stack([a0, a_s], dim=2), v)  # (B,H,2,Dv): output and tag in one pass
        o = both[:, :, 0]
        strongest, which = a_s.max(dim=-1)
        st.records.append({"row": t, "active": act, "n_sinks": n_sinks, "top_idx": top_idx,
                           "top_scores": top_scores, "caught": a_s.sum(dim=-1), "which": which + p0,
                           "strongest": strongest, "norms": both.pow(2).sum(dim=-1),
                           "cross": (o * both[:, :, 1]).sum(dim=-1)})
        return o

    def _evict(self, st: LayerState, lo: int, hi: int) -> None:
        """Columns lo..hi-1 left the window: their scores are final; keep the values of those that are sinks at the
        lowest threshold (every threshold's sink set lies inside that one)."""
        if lo < st.tail_first or hi > st.tail_first + st.tail.shape[2]:
            raise CatchtagError("the KV cache dropped more than one token in a step; catchtag cannot follow it")
        s = self.settings
        B, H = st.col_sum.shape[:2]
        _make_room(st, hi - lo, st.tail.shape[-1])
        slots = st.evicted_v.shape[2] - 1  # the last slot takes what is not kept
        rc = st.row_counts[:, lo:hi]
        score = st.col_sum[..., lo:hi] / rc.clamp_min(1)[:, None]
        cand = (st.token_valid[:, lo:hi] & (rc >= s.min_rows))[:, None] & (score > s.all_eps[0])  # (B,H,n)
        slot = torch.where(cand, st.evicted_n[..., None] + cand.long().cumsum(dim=-1) - 1,
                           torch.full_like(cand, slots, dtype=torch.long))
        vals = _repeat_heads(st.tail[:, :, lo - st.tail_first:hi - st.tail_first].float(), H)  # (B,H,n,Dv)
        st.evicted_v.scatter_(2, slot[..., None].expand(*slot.shape, vals.shape[-1]), vals)
        pos = torch.arange(lo, hi, device=slot.device).expand(B, H, hi - lo)
        st.evicted_pos.scatter_(2, slot, torch.where(cand, pos, torch.full_like(pos, -1)))
        st.evicted_n += cand.sum(dim=-1)

    def offload(self) -> None:
        """Move every layer's records so far to the host as one block per field (between steps: on a GPU they would
        otherwise stay on the device until the batch ends)."""
        for st in self.layers.values():
            if st.records and st.col_sum.device.type not in self.host_devices:
                st.chunks.append(self._stack(st.records))
                st.records = []

    def records(self, layer: int) -> dict:
        """The layer's records stacked over rows, on the CPU: row (S,), active (S,B) and (S,B,H[,keep]): n_sinks, the
        ``keep`` highest column scores and their positions (top_scores -1: no column), caught, tagging_sink (the
        sink that takes most of the row's attention, -1: none), out_sq, tag_sq and resid_sq (|o|^2, |tag|^2,
        |o - tag|^2)."""
        st = self.layers[layer]
        blocks = st.chunks + ([self._stack(st.records)] if st.records else [])
        got = {name: torch.cat([b[name] for b in blocks]) for name in blocks[0]}
        norms, cross = got.pop("norms").double(), got.pop("cross").double()
        got["out_sq"], got["tag_sq"] = norms[..., 0], norms[..., 1]
        got["resid_sq"] = (norms[..., 0] - 2 * cross + norms[..., 1]).clamp_min(0)
        got["tagging_sink"] = torch.where(got.pop("strongest") > 0, got.pop("which"), torch.full((), -1))
        return got

    def _stack(self, recs: list) -> dict:
        """Records of rows (dicts of device tensors) as one dict of host tensors stacked over the rows."""
        B = recs[0]["caught"].shape[0]
        got = {"row": torch.tensor([r["row"] for r in recs])}
        for name in ("n_sinks", "caught", "which", "strongest", "norms", "cross"):
            got[name] = torch.stack([r[name] for r in recs]).cpu()
        got["active"] = torch.stack([torch.ones(B, dtype=torch.bool, device=r["caught"].device) if r["active"] is None
                                     else r["active"] for r in recs]).cpu()
        for name, fill in (("top_idx", -1), ("top_scores", -1.0)):
            got[name] = torch.stack([torch.nn.functional.pad(r[name], (0, self.keep - r[name].shape[-1]), value=fill)
                                     for r in recs]).cpu()
        return got

    def final_stats(self, layer: int) -> dict:
        """What a scan of the sequences so far gives for this layer, from the running sums alone, on the CPU:
        col_scores (B,H,T), row_counts and token_valid (B,T), and per threshold of settings.all_eps (last axis):
        n_sinks, ve and ve_uncentred (the projection forms of docs/method.md; NaN where the tracker keeps no Gram
        matrices: ve=False), plus sink_idx / sink_ok (B,H,K) at
        the main eps. (R^2 needs every past row's attention to the final sinks: a scan of the text gives it.)"""
        from catchtag.engine.stats import _span_basis, span_rtol

        st, s = self.layers[layer], self.settings
        _flush(st)
        T = st.rows
        rc, tv = st.row_counts[:, :T], st.token_valid[:, :T]
        eligible = tv & (rc >= s.min_rows)
        col_scores = (st.col_sum[..., :T] / rc.clamp_min(1)[:, None]).masked_fill(~eligible[:, None], float("nan"))
        scores0 = torch.nan_to_num(col_scores, nan=-1.0)
        B, H = scores0.shape[:2]
        E = len(s.all_eps)
        K = int((scores0 > s.all_eps[0]).sum(dim=-1).max()) if T else 0
        n_sinks = torch.zeros(B, H, E, dtype=torch.long)
        ve, ve_raw = (torch.full((B, H, E), 0.0 if st.gram is not None else float("nan"), dtype=torch.float64)
                      for _ in range(2))
        result = {"col_scores": col_scores.cpu(), "row_counts": rc.cpu(), "token_valid": tv.cpu(), "n_sinks": n_sinks,
                  "ve": ve, "ve_uncentred": ve_raw, "sink_idx": torch.zeros(B, H, 0, dtype=torch.long),
                  "sink_ok": torch.zeros(B, H, 0, dtype=torch.bool)}
        if K == 0:
            return result
        top, idx = scores0.topk(K, dim=-1)
        idx, order = idx.sort(dim=-1)
        top = top.gather(-1, order)
        main_ok = top > float(s.eps)
        result.update(sink_idx=idx.cpu(), sink_ok=main_ok.cpu())
        if st.gram is None:  # no Gram matrices kept: the sinks only, the VE from a scan of the text
            for e_i, e in enumerate(s.all_eps):
                n_sinks[..., e_i] = (top > e).sum(dim=-1).cpu()
            return result
        v_s = self._sink_values(st, idx, top > s.all_eps[0])
        gram = st.gram
        n = st.n_rows.clamp_min(1)[:, None, None, None]
        mean = st.out_sum[..., None] / n  # (B,H,Dv,1)
        centred = gram - n * (mean @ mean.transpose(-1, -2))
        total_raw = gram.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
        total = centred.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
        x_raw = v_s @ gram @ v_s.transpose(-1, -2)  # (B,H,K,K): sum over rows of the projections' products
        x_c = v_s @ centred @ v_s.transpose(-1, -2)
        for e_i, e in enumerate(s.all_eps):
            ok = top > e
            okf = ok.double()
            w = _span_basis(v_s * okf[..., None], top, span_rtol(st.values.dtype))
            keep = okf[..., :, None] * okf[..., None, :]
            proj = (w.transpose(-1, -2) @ (x_c * keep) @ w).diagonal(dim1=-2, dim2=-1).sum(dim=-1)
            proj_raw = (w.transpose(-1, -2) @ (x_raw * keep) @ w).diagonal(dim1=-2, dim2=-1).sum(dim=-1)
            has = ok.any(dim=-1) & (total > 0)
            n_sinks[..., e_i] = ok.sum(dim=-1).cpu()
            ve[..., e_i] = torch.where(has, proj / total.clamp_min(1e-30), torch.zeros_like(proj)).cpu()
            ve_raw[..., e_i] = torch.where(has, proj_raw / total_raw.clamp_min(1e-30), torch.zeros_like(proj)).cpu()
        return result

    @staticmethod
    def _sink_values(st: LayerState, idx, wanted) -> torch.Tensor:
        """(B,H,K,Dv) float64 values of the columns idx: from the cache, or where a window dropped them, from the
        values kept when they left."""
        H = idx.shape[1]
        vals = _repeat_heads(st.values.float(), H)  # (B,H,klen,Dv)
        klen = vals.shape[2]
        in_cache = idx >= st.first_key
        from_cache = vals.gather(2, (idx - st.first_key).clamp(0, klen - 1)[..., None].expand(*idx.shape,
                                                                                          vals.shape[-1]))
        if st.evicted_v is None:  # no window has dropped a column
            match = torch.zeros_like(idx, dtype=torch.bool)[..., None]
            from_kept = torch.zeros_like(from_cache, dtype=torch.float64)
        else:
            match = st.evicted_pos[:, :, None, :] == idx[..., None]  # (B,H,K,M+1)
            match[..., -1] = False
            from_kept = match.double() @ st.evicted_v.double()
        if bool((wanted & ~in_cache & ~match.any(dim=-1)).any()):
            raise CatchtagError("a sink's value left the sliding window unrecorded (a bug: please report it)")
        return torch.where(in_cache[..., None], from_cache.double(), from_kept)


def _make_room(st: LayerState, n: int, Dv: int) -> None:
    """Room for n more kept values in every head's slots (made at the first column a window drops: a model without
    a sliding window never pays for them). The count of columns dropped so far bounds the slots used without asking
    the device; only when that bound would overflow is the true count read (one synchronisation), and the slots
    doubled if it is needed."""
    if st.evicted_v is None:
        B, H, dev = st.col_sum.shape[0], st.col_sum.shape[1], st.col_sum.device
        st.evicted_v = torch.zeros(B, H, EVICTED_SLOTS + 1, Dv, device=dev)
        st.evicted_pos = torch.full((B, H, EVICTED_SLOTS + 1), -1, dtype=torch.long, device=dev)
        st.evicted_n = torch.zeros(B, H, dtype=torch.long, device=dev)
    slots = st.evicted_v.shape[2] - 1
    if st.evicted_bound + n <= slots:
        st.evicted_bound += n
        return
    used = int(st.evicted_n.max())
    if used + n > slots:
        grow = max(2 * slots, used + n + slots) - slots
        B, H = st.evicted_v.shape[:2]
        st.evicted_v = torch.cat([st.evicted_v[:, :, :slots], st.evicted_v.new_zeros(B, H, grow + 1, Dv)], dim=2)
        st.evicted_pos = torch.cat([st.evicted_pos[:, :, :slots], st.evicted_pos.new_full((B, H, grow + 1), -1)],
                                   dim=2)
    st.evicted_bound = used + n


def _last_row(mask):
    """The mask row of the newest query: (B, klen) bool, or None (every key visible)."""
    if mask is None:
        return None
    if mask.dim() == 4:
        mask = mask[:, 0]
    row = mask[:, -1]
    return row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2


def _first_keys(k, v, mask, n: int):
    """Keys, values and mask cut to the first n positions (a static cache's filled slots)."""
    return k[:, :, :n], v[:, :, :n], None if mask is None else mask[..., :n]


def _visible_beyond(mask, n: int) -> torch.Tensor:
    """Whether any query may see a key at or past position n (a static cache's empty slots must be masked)."""
    m = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return m[..., n:].any()


def _repeat_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """(B,KV,...) -> (B,H,...): each key/value head repeated for its group of query heads."""
    return x.repeat_interleave(H // x.shape[1], dim=1) if x.shape[1] != H else x


def _row_attention(q, k, visible, scaling, softcap=None, sinks=None):
    """One query row per sequence: its attention a (B,H,1,klen) float32 to the keys visible to it ((B,klen) bool,
    None: all), as the model's own softmax computes it (softcapped logits; learned sink logits as one more column
    with no value)."""
    B, H, _, D = q.shape
    KV, klen = k.shape[1], k.shape[2]
    s = torch.matmul(q.float().reshape(B, KV, H // KV, D) * scaling, k.float().transpose(-1, -2))
    s = s.reshape(B, H, 1, klen)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if visible is not None:
        s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
    if sinks is None:
        return torch.softmax(s, dim=-1)
    lam = sinks.float()[..., -1:].expand(B, H, 1)[..., None]  # (1,H,1) or per row (B,H,n): the newest row's
    return torch.softmax(torch.cat([s, lam], dim=-1), dim=-1)[..., :klen]


def _matmul_values(a, v):
    """a (B,H,R,klen) @ v (B,KV,klen,Dv) -> (B,H,R,Dv) float32, the key/value heads shared by their query groups."""
    B, H, R, klen = a.shape
    KV = v.shape[1]
    got = torch.matmul(a.reshape(B, KV, (H // KV) * R, klen), v.float())
    return got.reshape(B, H, R, -1)


_TRACKER: contextvars.ContextVar[SinkTracker | None] = contextvars.ContextVar("catchtag_tracker", default=None)


def active_tracker() -> SinkTracker | None:
    return _TRACKER.get()


@contextmanager
def tracking(tracker: SinkTracker):
    """Within this block, attention calls of an enabled model update ``tracker`` (generation with a KV cache)."""
    token = _TRACKER.set(tracker)
    try:
        yield tracker
    finally:
        _TRACKER.reset(token)
