"""Release pictures (the paper's Fig. 2): one head's outputs per token, coloured by their top
three principal components as R, G, B; the head's attention map with its sinks; and the residual stream
several layers deeper, projected the same way, with each token labelled by the sink that tagged it.

Tokens tagged by different sinks should separate by colour in the head's output, and stay apart deeper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from catchtag.analysis.common import head_row
from catchtag.engine.request import ActivationRequest
from catchtag.errors import CatchtagError

UNTAGGED = -1


@dataclass
class PcaPicture:
    """Everything the Figure-2 picture shows, for one prompt and one head.

    tokens (T strings); sinks (prompt positions) with their column scores; ve of the head on this prompt;
    head_rgb / deeper_rgb (T, 3) in [0, 1]: top-3 principal components of the head output (head space) and of
    the residual stream after layer ``deeper``; head_pcs / deeper_pcs (T, 3) the raw PC coordinates and
    *_explained (3,) their variance ratios; attention (T, T); sink_attention (T, n_sinks); tagged_by (T,)
    index into ``sinks`` of the sink a token pays most attention to (-1: less than ``tag_level`` to every
    sink); separation: silhouette score of the deeper PCs grouped by tagged_by (higher = tokens that share a
    sink cluster together; nan with fewer than two groups of >= 5 tokens).
    """

    model: str
    layer: int
    head: int
    deeper: int
    tokens: list[str]
    sinks: list[int]
    sink_scores: list[float]
    ve: float
    head_pcs: np.ndarray
    head_rgb: np.ndarray
    head_explained: np.ndarray
    deeper_pcs: np.ndarray
    deeper_rgb: np.ndarray
    deeper_explained: np.ndarray
    attention: np.ndarray
    sink_attention: np.ndarray
    tagged_by: np.ndarray
    tag_level: float
    separation_head: float = float("nan")
    separation_deeper: float = float("nan")
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        groups = {int(g): int((self.tagged_by == g).sum()) for g in np.unique(self.tagged_by)}
        return {"model": self.model, "layer": self.layer, "head": self.head, "deeper": self.deeper,
                "n_tokens": len(self.tokens), "sinks": self.sinks,
                "sink_tokens": [self.tokens[s] for s in self.sinks],
                "sink_scores": [round(float(s), 4) for s in self.sink_scores], "ve": round(float(self.ve), 4),
                "tokens_per_tagging_sink": {("none" if g < 0 else f"{self.sinks[g]}:{self.tokens[self.sinks[g]]!r}"): n
                                            for g, n in groups.items()},
                "head_pc_explained": [round(float(x), 4) for x in self.head_explained],
                "deeper_pc_explained": [round(float(x), 4) for x in self.deeper_explained],
                "silhouette_head": round(float(self.separation_head), 4),
                "silhouette_deeper": round(float(self.separation_deeper), 4)}


def top_components(x: np.ndarray, k: int = 3, fit_rows: np.ndarray | None = None):
    """PCA of the rows of x (fitted on ``fit_rows`` if given): (T, k) coordinates and (k,) variance ratios."""
    x = np.asarray(x, dtype=np.float64)
    fit = x[fit_rows] if fit_rows is not None else x
    mean = fit.mean(axis=0)
    _, s, vt = np.linalg.svd(fit - mean, full_matrices=False)
    k = min(k, vt.shape[0])
    pcs = (x - mean) @ vt[:k].T
    explained = (s[:k] ** 2) / max((s ** 2).sum(), 1e-30)
    if k < 3:  # pad to three colour channels
        pcs = np.pad(pcs, ((0, 0), (0, 3 - k)))
        explained = np.pad(explained, (0, 3 - k))
    return pcs, explained


def to_rgb(pcs: np.ndarray, fit_rows: np.ndarray | None = None, clip: float = 1.0) -> np.ndarray:
    """Each component rescaled to [0, 1] between its ``clip`` and 100-``clip`` percentiles (outliers clipped)."""
    fit = pcs[fit_rows] if fit_rows is not None else pcs
    lo = np.percentile(fit, clip, axis=0)
    hi = np.percentile(fit, 100 - clip, axis=0)
    return np.clip((pcs - lo) / np.where(hi - lo > 1e-12, hi - lo, 1.0), 0, 1)


def _silhouette(points: np.ndarray, labels: np.ndarray, min_group: int = 5) -> float:
    """Silhouette of the tokens grouped by tagging sink; untagged tokens and groups of fewer than ``min_group``
    tokens are left out (a stray token tagged by a late sink would otherwise dominate the score)."""
    values, counts = np.unique(labels, return_counts=True)
    big = set(values[(counts >= min_group) & (values >= 0)].tolist())
    keep = np.isin(labels, list(big))
    if len(np.unique(labels[keep])) < 2 or keep.sum() < 4:
        return float("nan")
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(points[keep], labels[keep]))


def choose_head(result, min_position: int = 1) -> tuple[int, int]:
    """The head with the highest VE that has a sink at a position >= ``min_position`` (beyond the first token);
    the highest-VE head with any sink if none has."""
    h = result.heads
    beyond = h[h["sink_positions"].apply(lambda p: any(int(x) >= min_position for x in p))]
    pool = beyond if len(beyond) else h[h["n_sinks"] > 0]
    if pool.empty:
        raise CatchtagError("no head has a sink on this prompt. Fix: a longer prompt, a lower --eps, or "
                            "--min-rows below the prompt length")
    best = pool.sort_values("ve", ascending=False).iloc[0]
    return int(best["layer"]), int(best["head"])


def pca_request(layer: int, head: int, deeper: int) -> ActivationRequest:
    """What the picture needs from one pass over its prompt: the head's output at every position (head space), its
    attention map and each token's attention to its sinks, and the residual stream after layer ``deeper``."""
    return ActivationRequest(layers=[layer], heads=[head], positions="all", space="head",
                             attention_maps=[(layer, head)], hidden_states=[deeper + 1], sink_attention=True)


def pca_layers(n_layers: int, layer: int, deeper: int | None) -> int:
    """The residual stream the picture shows (default ``layer`` + 4, capped at the last layer), after checking
    that ``layer`` and ``deeper`` are layers of the model and ``deeper`` is not above ``layer``."""
    if not 0 <= layer < n_layers:
        raise CatchtagError(f"--layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    deeper = min(n_layers - 1, layer + 4) if deeper is None else deeper
    if not layer <= deeper < n_layers:
        raise CatchtagError(f"--deeper {deeper} must lie between --layer {layer} and the last layer ({n_layers - 1})")
    return deeper


def pca_from_result(result, layer: int, head: int, deeper: int, *, tag_level: float = 0.1,
                    exclude_first: bool = True, model: str = "") -> PcaPicture:
    """The Figure-2 picture of head (layer, head) on the first prompt of ``result``, a scan made with
    ``pca_request(layer, head, deeper)``.

    tag_level: a token counts as tagged by its strongest sink when it pays it at least this much attention.
    exclude_first: fit the PCA without position 0 (its output is the first value vector itself, an outlier
    that would take a whole component); position 0 is still projected and drawn.
    """
    row = head_row(result, layer, head)
    T = int(row["n_tokens"])
    tokens = list(result.prompts["tokens"].iloc[0])
    head_out = result.cache["z", layer][0, 0, :T]
    hidden = result.cache["resid_pre", deeper + 1][0, :T]
    fit = np.arange(1 if exclude_first and T > 4 else 0, T)
    head_pcs, head_var = top_components(head_out, fit_rows=fit)
    deep_pcs, deep_var = top_components(hidden, fit_rows=fit)
    sink_attn = result.cache.get("sink_attention", layer=layer, head=head, prompt=int(row["prompt_id"]))
    sinks = [int(s) for s in row["sink_positions"]]
    if sinks:
        tagged = np.where(sink_attn.max(axis=1) >= tag_level, sink_attn.argmax(axis=1), UNTAGGED)
    else:
        tagged = np.full(T, UNTAGGED)
    return PcaPicture(
        model=model or result.settings.get("model", ""), layer=layer, head=head, deeper=deeper, tokens=tokens,
        sinks=sinks, sink_scores=[float(s) for s in row["sink_scores"]], ve=float(row["ve"]),
        head_pcs=head_pcs, head_rgb=to_rgb(head_pcs, fit), head_explained=head_var,
        deeper_pcs=deep_pcs, deeper_rgb=to_rgb(deep_pcs, fit), deeper_explained=deep_var,
        attention=result.cache.get("pattern", layer=layer, head=head, prompt=int(row["prompt_id"])),
        sink_attention=sink_attn,
        tagged_by=tagged, tag_level=tag_level,
        separation_head=_silhouette(head_pcs[fit], tagged[fit]),
        separation_deeper=_silhouette(deep_pcs[fit], tagged[fit]),
        settings={"eps": result.settings.get("eps"), "min_rows": result.settings.get("min_rows"),
                  "tag_level": tag_level, "exclude_first": exclude_first})
