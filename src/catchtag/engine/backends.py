"""Statistics backends: each declares what it serves, and ``auto`` picks the fastest that serves a layer's call.

Like transformers' attention registry, every backend is a named entry; here each also states the devices it
runs on, the request kinds it serves and the masks it understands (``Backend``), so a caller learns before a
forward pass why a backend cannot serve it, and ``auto`` never picks one that would fail. Every backend
returns what ``stats.attention_with_stats`` returns, (out, tag, HeadStats, maps); the tests hold each one to
the eager reference for every request kind. The "triton" backend:
  1. output and each row's log-sum-exp from the fused attention kernel PyTorch already has (flash
     attention without a mask, memory-efficient attention with one; on the CPU the flash-for-CPU kernel;
     catchtag's own Triton flash kernel with softcapped logits, kernels/flash.py),
  2. column sums of the softmax in one Triton pass over (q, k) tiles (kernels/colsum.py),
  3. the sink pass from a few K x K moments (kernels/sinkpass.py), which also gives each row's attention
     to the sinks; full maps of the few heads a request names are rebuilt from q, k and the log-sum-exp.
It returns out and tag in the input dtype (the torch path returns float32). It needs no T x T tensor
beyond the model's own mask (and the maps asked for), and reads the mask only to find padding and the
sliding window.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from catchtag.engine.stats import _bool_mask, _scores, attention_and_lse, attention_with_stats
from catchtag.engine.positions import last_real
from catchtag.errors import CatchtagError

# What a layer's call can ask for. "statistics" (sinks, VE, R^2), "sweep" (extra thresholds), "activations"
# (per-token out / tag) and "steering" are read from out and tag, which every backend returns.
REQUEST_KINDS = ("statistics", "sweep", "activations", "steering", "sink_attention", "attention_maps", "softcap")
MASK_KINDS = ("causal", "padding+window", "other")  # causal: no mask tensor; padding+window: see mask_structure


class BackendError(CatchtagError, ValueError):
    """No backend (or not the one asked for) can serve a layer's call; the message says why."""


@dataclass(frozen=True)
class Needs:
    """What one layer's call asks of a backend."""

    device: str
    kinds: frozenset = frozenset({"statistics"})
    mask: str = "causal"


@dataclass(frozen=True)
class Backend:
    """A statistics backend and what it can do (fastest first in BACKEND_ORDER)."""

    name: str
    devices: frozenset
    serves: frozenset
    masks: frozenset
    summary: str

    def unavailable(self) -> str | None:
        """Why this backend cannot run in this process at all (None: it can)."""
        if self.name == "triton" and not _triton_available():
            return "triton is not installed"
        return None

    def unmet(self, needs: Needs, named: bool = False) -> list[str]:
        """What of ``needs`` this backend does not serve (empty: it serves all of it). named: asked for by name
        (the triton backend runs on the CPU under TRITON_INTERPRET=1 for tests, never picked there by auto)."""
        devices = self.devices | ({"cpu"} if self.name == "triton" and named and _interpreted() else set())
        missing = [] if needs.device in devices else [f"device {needs.device}"]
        missing += sorted(k.replace("_", " ") for k in needs.kinds - self.serves)
        if needs.mask not in self.masks:
            missing.append(f"{needs.mask} masks")
        why = self.unavailable()
        return missing + ([why] if why else [])


BACKEND_REGISTRY = {
    "triton": Backend("triton", frozenset({"cuda"}), frozenset(REQUEST_KINDS),
                      frozenset({"causal", "padding+window"}),
                      "fused kernels, no T x T tensor; CUDA (the CPU only under TRITON_INTERPRET=1)"),
    "torch": Backend("torch", frozenset({"cpu", "cuda", "mps"}), frozenset(REQUEST_KINDS), frozenset(MASK_KINDS),
                     "plain PyTorch in query chunks; any device, any mask, softcapped logits"),
}
BACKEND_ORDER = ("triton", "torch")  # what auto tries, fastest first
BACKENDS = ("auto", *BACKEND_ORDER)


def choose_backend(backend: str, needs: Needs) -> Backend:
    """The backend that serves ``needs``: the named one, or for "auto" the fastest that serves it; else say why."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown engine backend {backend!r}; choose from {BACKENDS}")
    if backend != "auto":
        chosen = BACKEND_REGISTRY[backend]
        missing = chosen.unmet(needs, named=True)
        if missing:
            able = [n for n in BACKEND_ORDER if not BACKEND_REGISTRY[n].unmet(needs)]
            raise BackendError(f"the {backend} backend does not serve {', '.join(missing)}; "
                               f"use backend={(able or ['auto'])[0]!r} (or 'auto', which picks one that does)")
        return chosen
    reasons = []
    for name in BACKEND_ORDER:
        missing = BACKEND_REGISTRY[name].unmet(needs)
        if not missing:
            return BACKEND_REGISTRY[name]
        reasons.append(f"{name}: no {', '.join(missing)}")
    raise BackendError("no engine backend serves this call (" + "; ".join(reasons) + ")")


def layer_needs(query, mask_kind: str, softcap, keep_maps, sink_attention: bool, sweep: bool) -> Needs:
    kinds = {"statistics", "activations", "steering"}
    if softcap is not None:
        kinds.add("softcap")
    if keep_maps:
        kinds.add("attention_maps")
    if sink_attention:
        kinds.add("sink_attention")
    if sweep:
        kinds.add("sweep")
    return Needs(device=query.device.type, kinds=frozenset(kinds), mask=mask_kind)


def layer_statistics(query, key, value, mask, scaling, softcap, settings, keep_maps=(), backend="auto",
                     sink_attention=True, capture=None, sinks=None):
    """(out, tag, HeadStats, maps) of one layer from the backend that serves the call (see choose_backend).

    capture: the running engine.attention.Capture, if any: it caches each mask's structure for the forward pass,
    bounds the number of sink columns so the pass never waits for the GPU, and collects the triton backend's
    K x K moments to finish them for all layers at once (Capture.finish)."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown engine backend {backend!r}; choose from {BACKENDS}")
    structure = None
    if mask is None:
        mask_kind = "causal"
    elif backend == "torch" or (backend == "auto" and "triton" in _cannot(query, softcap, keep_maps, sink_attention,
                                                                          settings)):
        mask_kind = "other"  # the triton backend is out anyway: never read the mask's structure
    else:
        structure = _cached_structure(mask, query, capture)
        mask_kind = "padding+window" if structure is not None else "other"
    chosen = choose_backend(backend, layer_needs(query, mask_kind, softcap, keep_maps, sink_attention,
                                                 bool(settings.sweep_eps)))
    if capture is not None:
        capture.backends_used.add(chosen.name)
    if chosen.name == "triton":
        info = _cached_mask_info(mask, structure, query, settings.min_rows, capture)
        # Triton launches on the current device: under a device map a layer's tensors may live on another GPU
        with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
            return triton_statistics(query, key, value, mask, scaling, settings, info, keep_maps=keep_maps,
                                     sink_attention=sink_attention, capture=capture, sinks=sinks, softcap=softcap)
    return attention_with_stats(query, key, value, mask, scaling, softcap, settings, keep_maps=keep_maps, sinks=sinks)


@dataclass
class MaskInfo:
    """What the triton backend reads off a layer's mask, once per mask in a forward pass: which tokens are real
    (B,T), the sliding window (None: none), how many rows see each column (B,T), and each column's score factor
    (B,T): 1 / that count, nan where the column cannot be a sink (padding, or seen by fewer than min_rows rows)."""

    token_valid: torch.Tensor
    window: int | None
    counts: torch.Tensor
    score_factor: torch.Tensor


def _cached_mask_info(mask, structure, query, min_rows, capture) -> MaskInfo:
    B, T = query.shape[0], query.shape[2]
    key = (id(mask), mask.data_ptr(), tuple(mask.shape)) if mask is not None else ("causal", B, T, query.device)
    key = key + (int(min_rows),)
    cache = capture.mask_infos if capture is not None else {}
    if key not in cache:
        token_valid, window = structure if structure is not None else (
            torch.ones(B, T, dtype=torch.bool, device=query.device), None)
        counts = row_counts(token_valid, window)
        eligible = token_valid & (counts >= min_rows)
        factor = torch.where(eligible, 1.0 / counts.clamp_min(1).float(), float("nan"))
        cache[key] = (mask, MaskInfo(token_valid, window, counts, factor))  # the mask kept: its id stays unique
    return cache[key][1]


def _cannot(query, softcap, keep_maps, sink_attention, settings) -> set[str]:
    """Backends that cannot serve this call whatever its mask."""
    needs = layer_needs(query, "causal", softcap, keep_maps, sink_attention, bool(settings.sweep_eps))
    return {n for n in BACKEND_ORDER if BACKEND_REGISTRY[n].unmet(needs)}


def _cached_structure(mask, query, capture):
    """mask_structure, read once per mask tensor in a forward pass (every layer of a kind shares one mask)."""
    if capture is None:
        return mask_structure(mask, query.shape[0], query.shape[2], query.device)
    key = (id(mask), mask.data_ptr(), tuple(mask.shape))
    if key not in capture.mask_structures:
        capture.mask_structures[key] = (mask, mask_structure(mask, query.shape[0], query.shape[2], query.device))
    return capture.mask_structures[key][1]


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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
    last = last_real(valid)
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


def triton_statistics(query, key, value, mask, scaling, settings, info: MaskInfo, keep_maps=(), sink_attention=True,
                      capture=None, sinks=None, softcap=None):
    """The triton backend (see the module docstring); same return as stats.attention_with_stats.

    Inside a capture the sink pass takes at most capture.sink_cap columns per head (no host synchronisation) and
    its K x K moments are finished with every other layer's in Capture.finish."""
    from catchtag.engine.kernels.colsum import column_sums
    from catchtag.engine.kernels.sinkpass import sink_pass

    token_valid, window, counts = info.token_valid, info.window, info.counts
    out, lse = attention_and_lse(query, key, value, mask, scaling, token_valid,
                                 capture.mask_infos if capture is not None else None, softcap=softcap, window=window)
    sink_share = None
    if sinks is not None:  # learned sink logits: one more softmax column with no value, folded into lse and out
        from catchtag.engine.kernels.flash import fold_learned_sink

        sink_share = fold_learned_sink(out, lse, sinks, token_valid)  # in place: one pass over out
    col_scores = column_sums(query, key, lse, token_valid, scaling, window, factor=info.score_factor,
                             softcap=softcap)
    maps = {h: attention_map(query, key, lse, mask, token_valid, window, scaling, h, softcap) for h in keep_maps}
    k_cap = capture.sink_cap if capture is not None else None
    done = sink_pass(query, key, value, out, lse, token_valid, col_scores, counts, scaling, settings, window,
                     k_cap=k_cap, sink_attention=sink_attention, defer=capture is not None, softcap=softcap)
    if done is None:  # very many candidate sinks (eps near 0): the torch path's sink pass, with float32 copies
        from catchtag.engine.stats import _sink_pass

        n_rep = query.shape[1] // key.shape[1]
        kf, vf = (x.float().repeat_interleave(n_rep, dim=1) for x in (key, value))
        tag, stats = _sink_pass(query.float(), kf, vf, out.float(), lse, _bool_mask(mask), token_valid, col_scores,
                                counts, scaling, softcap, settings)
        stats.learned_sink = sink_share
        return out, tag.to(out.dtype), stats, maps
    tag, stats, pending = done
    stats.learned_sink = sink_share
    if pending is not None:
        capture.pending.append((stats, pending))
    return out, tag, stats, maps


def attention_map(query, key, lse, mask, token_valid, window, scaling, head, softcap=None) -> torch.Tensor:
    """One head's full attention (B,T,T) float32, rebuilt from q, k and each row's log-sum-exp (padding rows 0)."""
    B, H, T, _ = query.shape
    kv = head // (H // key.shape[1])
    logits = _scores(query[:, head].float(), key[:, kv].float(), scaling, softcap)
    bm = _bool_mask(mask)
    if bm is None:
        i = torch.arange(T, device=query.device)
        diff = i[:, None] - i[None, :]
        bm = ((diff >= 0) & (diff < window if window is not None else True))[None]
    vis = bm.expand(B, T, T) & token_valid[:, :, None]
    return torch.where(vis, torch.exp(logits - lse[:, head, :, None]), torch.zeros((), device=query.device))
