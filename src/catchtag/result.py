"""ScanResult: the one object analyses read engine output from.

Tables use the same names everywhere: prompt_id, layer, head, position. Per-token arrays are kept only
for what the scan's ActivationRequest named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from catchtag.cache import ActivationCache

HEAD_COLUMNS = ["prompt_id", "layer", "head", "n_tokens", "n_sinks", "sink_positions", "sink_tokens",
                "sink_scores", "ve", "r2", "ve_uncentred", "learned_sink"]


@dataclass
class ScanResult:
    """Output of ``catchtag.scan``.

    heads: one row per (prompt, layer, head): n_tokens, n_sinks, sink_positions (0-based in the prompt),
      sink_tokens, sink_scores (column scores), ve (variance of the head output in the sinks' value span,
      0 when there is no sink), r2 (1 - non-tag variance / output variance), ve_uncentred (the same share
      of the uncentred outputs' energy, in which the mean direction counts), learned_sink (for models with a learned
      sink logit per head, gpt-oss: the mean share of a row's attention it takes; nan for heads without one).
    sweep: one row per (prompt, layer, head, eps) when extra thresholds were asked for.
    prompts: prompt_id, n_tokens, tokens (decoded strings).
    cache: the per-token arrays the scan's ActivationRequest asked for, under the field's names (z, z_tag,
      z_nontag, result, result_tag, result_nontag, resid_pre, pattern, sink_attention): see catchtag.cache.
      ``result.cache["result_tag", 20]`` or ``result.cache.get("z", layer=3, head=1, pos=-1)``. Saved with the
      run and loaded back by ``ScanResult.load``.
    """

    heads: pd.DataFrame
    prompts: pd.DataFrame
    settings: dict
    sweep: pd.DataFrame | None = None
    cache: ActivationCache = field(default_factory=ActivationCache)

    # ---- helpers every analysis uses -------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.heads["layer"].max()) + 1

    @property
    def n_heads(self) -> int:
        return int(self.heads["head"].max()) + 1

    def head_means(self, column: str) -> pd.DataFrame:
        """Layer x head table of the mean of ``column`` over prompts."""
        numeric = [c for c in self.heads.columns if c not in ("prompt_id", "layer", "head")
                   and pd.api.types.is_numeric_dtype(self.heads[c])]
        if column not in numeric:
            from catchtag.errors import CatchtagError

            raise CatchtagError(f"no numeric column {column!r} in the heads table. Fix: one of {', '.join(numeric)}")
        return self.heads.pivot_table(index="layer", columns="head", values=column, aggfunc="mean")

    def sink_token_counts(self, skip_first: bool = False) -> pd.DataFrame:
        """How often each token string is a sink (over prompts, layers and heads), and its mean VE."""
        rows = self.heads[self.heads["n_sinks"] > 0].explode(["sink_positions", "sink_tokens", "sink_scores"])
        if skip_first:
            rows = rows[rows["sink_positions"] != 0]
        if rows.empty:
            return pd.DataFrame(columns=["token", "count", "n_heads", "mean_ve"])
        rows = rows.assign(layer_head=rows["layer"].astype(str) + "." + rows["head"].astype(str))
        grouped = rows.groupby("sink_tokens").agg(count=("ve", "size"), n_heads=("layer_head", "nunique"),
                                                  mean_ve=("ve", "mean"))
        return grouped.sort_values("count", ascending=False).reset_index().rename(columns={"sink_tokens": "token"})

    def summary(self) -> dict:
        h = self.heads
        with_sinks = h[h["n_sinks"] > 0]
        top = self.sink_token_counts().head(10)
        return {
            "n_prompts": int(h["prompt_id"].nunique()),
            "n_tokens_mean": float(self.prompts["n_tokens"].mean()) if len(self.prompts) else 0.0,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "mean_sinks_per_head": float(h["n_sinks"].mean()),
            "share_heads_with_sink": float((h["n_sinks"] > 0).mean()),
            "mean_ve": float(h["ve"].mean()),
            "mean_ve_heads_with_sink": float(with_sinks["ve"].mean()) if len(with_sinks) else 0.0,
            "mean_r2_heads_with_sink": float(with_sinks["r2"].mean()) if len(with_sinks) else 0.0,
            "mean_ve_uncentred": float(h["ve_uncentred"].mean()) if "ve_uncentred" in h else 0.0,
            "mean_ve_uncentred_heads_with_sink": float(with_sinks["ve_uncentred"].mean())
            if len(with_sinks) and "ve_uncentred" in with_sinks else 0.0,
            "share_heads_ve_above_0.3": float((h["ve"] > 0.3).mean()),
            "top_sink_tokens": [[t, int(c)] for t, c in zip(top["token"], top["count"])],
        }

    def _repr_html_(self) -> str:
        """In a notebook: the summary and the layer x head map of mean VE, inline."""
        import base64
        import html
        import io

        from catchtag.report.figures import ve_heatmap_figure

        summary = self.summary()
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_short(v))}</td></tr>"
                       for k, v in summary.items())
        buf = io.BytesIO()
        ve_heatmap_figure(self).savefig(buf, format="png", dpi=80)
        img = base64.b64encode(buf.getvalue()).decode()
        name = html.escape(str(self.settings.get("model", "")))
        return (f"<div><b>catchtag ScanResult</b> {name}: {len(self.prompts)} prompts x {self.n_layers} layers x "
                f"{self.n_heads} heads<table>{rows}</table><img src='data:image/png;base64,{img}'/></div>")

    # ---- saving and loading (catchtag.runs owns the folder) ----------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the tables (and per-token arrays) into ``folder`` (see catchtag.runs)."""
        from catchtag.runs import save_result

        return save_result(self, folder)

    @classmethod
    def load(cls, folder: str | Path) -> "ScanResult":
        """Everything a run folder written by ``catchtag scan`` holds: tables, settings, per-token arrays."""
        from catchtag.runs import read_run

        return cls(**read_run(folder))


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(str(v[0]) if isinstance(v, (list, tuple)) else str(v) for v in value[:8])
    return str(value)
