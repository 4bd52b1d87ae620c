"""Tag geometry (docs/analyses.md): are tags near-orthogonal to each other and to the tokens they are added to?

A tag is a head's output through its slice of W_O restricted to its sinks (W_O^h tag_i, in the residual
stream). We take every head's tag at a bounded sample of token positions, then
- cosine between distinct tags, one direction per (layer, head, sink): W_O^h v_s (the tag a sink adds, up to
  the attention weight), paired across layers, across heads of one layer, and across sinks of one head;
- cosine between a head's tag at token i and the residual stream entering that layer at token i
  (hidden_states[layer]), the representation the tag is added to.
Published: distinct tags mostly within +-0.05; tag vs token between -0.17 and +0.02.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from catchtag.engine.request import ActivationRequest
from catchtag.errors import CatchtagError

PAIR_KINDS = ("different layers", "same layer, different heads", "same head, different sinks")


@dataclass
class TagGeometry:
    """pairs: kind, cosine, a, b (one row per sampled pair of distinct per-sink tags, a/b = (layer, head, sink
    position)); n_tags: how many per-sink tag directions were recovered; tag_vs_token: layer, head, position,
    cosine, tag_norm, token_norm (one row per tag with a nonzero norm); hidden: model width (a random pair of
    directions has cosine ~ N(0, 1/hidden))."""

    model: str
    hidden: int
    positions: list[int]
    pairs: pd.DataFrame
    tag_vs_token: pd.DataFrame
    n_tags: int = 0
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        out = {"model": self.model, "hidden": self.hidden, "n_positions": len(self.positions), "n_tags": self.n_tags,
               "random_direction_std": round(float(1 / np.sqrt(self.hidden)), 4)}
        for kind in PAIR_KINDS:
            c = self.pairs.loc[self.pairs["kind"] == kind, "cosine"].to_numpy()
            if len(c):
                out[kind] = {"n_pairs": len(c), "mean": round(float(c.mean()), 4),
                             "mean_abs": round(float(np.abs(c).mean()), 4),
                             "share_within_0.05": round(float((np.abs(c) <= 0.05).mean()), 4),
                             "p5": round(float(np.percentile(c, 5)), 4), "p95": round(float(np.percentile(c, 95)), 4)}
        c = self.tag_vs_token["cosine"].to_numpy()
        if len(c):
            out["tag_vs_token"] = {"n": len(c), "mean": round(float(c.mean()), 4),
                                   "p5": round(float(np.percentile(c, 5)), 4),
                                   "p95": round(float(np.percentile(c, 95)), 4),
                                   "share_within_0.05": round(float((np.abs(c) <= 0.05).mean()), 4),
                                   "layer_means_range": [round(float(x), 4) for x in
                                                         self.tag_vs_token.groupby("layer")["cosine"].mean()
                                                         .agg(["min", "max"])]}
        return out


def _unit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norm = np.linalg.norm(x, axis=-1)
    return x / np.where(norm > 0, norm, 1)[..., None], norm


def sample_positions(n_tokens: int, n_positions: int, start: int = 1) -> list[int]:
    """Evenly spaced positions in [start, n_tokens) (the first token is its own sink: its tag is itself)."""
    if n_tokens <= start:
        raise CatchtagError(f"the prompt has {n_tokens} token(s); tag geometry needs at least {start + 1}")
    return sorted(set(np.linspace(start, n_tokens - 1,
                                  min(n_positions, n_tokens - start)).round().astype(int).tolist()))


def geometry_request(n_layers: int, n_tokens: int, *, layers=None, n_positions: int = 64):
    """(what the geometry needs from one pass over its prompt, the sampled positions): every chosen layer's
    residual-stream tags and the residual stream entering it at ``n_positions`` tokens sampled evenly from position
    1 on (memory O(layers x heads x n_positions x hidden)), and each token's attention to each sink."""
    layers = list(range(n_layers)) if layers is None else sorted(int(x) for x in layers)
    if not layers or min(layers) < 0 or max(layers) >= n_layers:
        raise CatchtagError(f"layers must lie in 0..{n_layers - 1}, got {layers}")
    positions = sample_positions(n_tokens, n_positions)
    return ActivationRequest(layers=layers, positions=positions, space="residual", hidden_states=layers,
                             sink_attention=True), positions


def geometry_from_result(result, positions: list[int], *, max_pairs: int = 20000, min_norm_ratio: float = 1e-3,
                         max_condition: float = 1e3, seed: int = 0, model: str = "",
                         n_positions: int | None = None) -> TagGeometry:
    """Cosines between distinct residual-stream tags, and between each tag and the token it is added to, on the
    first prompt of ``result`` (a scan made with ``geometry_request``; ``positions`` are its sampled tokens).

    max_pairs: pairs sampled per kind; tags with a norm below ``min_norm_ratio`` x the median tag norm (tokens that
    barely look at a sink) are left out of tag-vs-token. Distinct tags are per-sink directions W_O^h v_s, recovered
    exactly from the sampled tags and the attention to each sink by least squares (heads whose sink attentions are
    collinear, condition > max_condition, and sinks no sampled token sees are skipped).
    """
    eps, min_rows = result.settings.get("eps"), result.settings.get("min_rows")
    T = int(result.prompts["n_tokens"].iloc[0])
    pid = int(result.prompts["prompt_id"].iloc[0])
    tags = np.stack([result.cache["result_tag", layer][0] for layer in result.cache.layers])  # (L, H, P, hidden)
    L, H, P, D = tags.shape
    pos = np.asarray(positions)
    heads = result.heads.set_index(["layer", "head"])
    unit, norm = _unit(tags.astype(np.float64))
    alive = norm > min_norm_ratio * np.median(norm[norm > 0]) if (norm > 0).any() else norm > 0
    # per-sink tag directions: tag_i = sum_k A_ik (W_O v_k), so the sampled tags (P x hidden) = A (P x K) @ U
    # (K x hidden); least squares gives U, one residual-stream direction per (layer, head, sink).
    directions, labels = [], []
    for li, layer in enumerate(result.cache.layers):
        for h in range(H):
            sinks = list(heads.loc[(layer, h), "sink_positions"])
            if not sinks:
                continue
            A = result.cache.get("sink_attention", layer=layer, head=h, prompt=pid)[pos].astype(np.float64)  # (P, K)
            seen = A.max(axis=0) > 0
            if not seen.any():
                continue
            A = A[:, seen]
            sv = np.linalg.svd(A, compute_uv=False)
            if sv[-1] <= max_condition ** -1 * sv[0]:
                continue  # sinks whose attention moves together cannot be told apart here
            U, *_ = np.linalg.lstsq(A, tags[li, h].astype(np.float64), rcond=None)
            for k, s_pos in enumerate(np.asarray(sinks)[seen]):
                directions.append(U[k])
                labels.append((layer, h, int(s_pos)))
    rng = np.random.default_rng(seed)
    rows = []
    if len(directions) >= 2:
        d_unit, _ = _unit(np.asarray(directions))
        lab = np.asarray(labels)
        a, b = np.triu_indices(len(lab), k=1)
        same_layer = lab[a, 0] == lab[b, 0]
        same_head = same_layer & (lab[a, 1] == lab[b, 1])
        for kind, sel in (("different layers", ~same_layer), ("same layer, different heads", same_layer & ~same_head),
                          ("same head, different sinks", same_head)):
            ia, ib = a[sel], b[sel]
            if len(ia) > max_pairs:
                keep = rng.choice(len(ia), max_pairs, replace=False)
                ia, ib = ia[keep], ib[keep]
            if len(ia):
                rows.append(pd.DataFrame({"kind": kind, "cosine": (d_unit[ia] * d_unit[ib]).sum(-1),
                                          "a": [tuple(x) for x in lab[ia]], "b": [tuple(x) for x in lab[ib]]}))
    pairs = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["kind", "cosine", "a", "b"])
    # tag vs the residual stream entering its layer, at the same token
    tv = []
    for li, layer in enumerate(result.cache.layers):
        token_unit, token_norm = _unit(result.cache["resid_pre", layer][0].astype(np.float64))  # (P, hidden)
        for h in range(H):
            ok = alive[li, h]
            if not ok.any():
                continue
            cos = (unit[li, h] * token_unit).sum(-1)
            tv.append(pd.DataFrame({"layer": layer, "head": h, "position": pos[ok], "cosine": cos[ok],
                                    "tag_norm": norm[li, h][ok], "token_norm": token_norm[ok]}))
    if not tv:
        raise CatchtagError(f"no head has a tag at the sampled tokens of this {T}-token prompt (no sink at eps {eps} "
                            f"with min_rows {min_rows}), so there is no geometry to measure. Fix: a longer prompt, or "
                            f"a lower --eps / --min-rows")
    tag_vs_token = pd.concat(tv, ignore_index=True)
    return TagGeometry(model=model or result.settings.get("model", ""), hidden=D, positions=positions, pairs=pairs,
                       tag_vs_token=tag_vs_token, n_tags=len(directions),
                       settings={"eps": eps, "min_rows": min_rows, "n_positions": n_positions or len(positions),
                                 "max_pairs": max_pairs, "min_norm_ratio": min_norm_ratio, "seed": seed})
