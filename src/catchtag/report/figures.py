"""Figures of one scan: where the sinks are, how much the tags explain, which tokens are sinks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

if TYPE_CHECKING:  # only for annotations: result.py draws its notebook view with these figures
    from catchtag.result import ScanResult


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize=None, layout=None, subplots: bool = True, **subplot_kw):
    """(figure, axes) as ``pyplot.subplots`` makes them, but outside pyplot: no backend is chosen or switched
    (importing catchtag leaves a notebook's inline backend alone), and no global figure list holds them."""
    fig = Figure(figsize=figsize, layout=layout, dpi=110)  # the resolution it is saved and embedded at
    return (fig, fig.subplots(nrows, ncols, **subplot_kw)) if subplots else (fig, None)


def figure_img(fig, alt: str) -> str:
    """A matplotlib figure as an <img> with the PNG inline (rendered in memory at the figure's own resolution)."""
    import base64
    import html
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def figure_html(fig, caption: str) -> str:
    """A figure with its caption, for an HTML page."""
    return f"<figure>{figure_img(fig, caption)}<figcaption>{caption}</figcaption></figure>"


def _title(result: ScanResult, what: str) -> str:
    s = result.settings
    return f"{what}\n{s.get('model', '')} · eps={s.get('eps')} · {result.heads['prompt_id'].nunique()} prompts"


def ve_heatmap_figure(result: ScanResult):
    """The layer x head map of mean VE (also what a ScanResult shows in a notebook)."""
    return heatmap_figure(result, "ve", "mean VE", vmax=1)


def heatmap_figure(result: ScanResult, column: str, label: str, cmap: str = "viridis", vmax=None):
    table = result.head_means(column)
    fig, ax = new_figure(figsize=(max(4, 0.45 * table.shape[1] + 2.5), max(3.5, 0.22 * table.shape[0] + 1.5)))
    im = ax.imshow(table.values, aspect="auto", cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(table.shape[1]))
    step = max(1, table.shape[0] // 15)
    ax.set_yticks(range(0, table.shape[0], step))
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(_title(result, f"{label} per layer and head"), fontsize=9)
    fig.tight_layout()
    return fig


def ve_distribution_figure(result: ScanResult) -> Figure:
    h = result.heads
    with_sinks = h.loc[h["n_sinks"] > 0, "ve"].to_numpy()
    fig, (ax1, ax2) = new_figure(1, 2, figsize=(10, 3.8))
    ax1.hist(with_sinks, bins=np.linspace(0, 1, 41), color="#3b6ea8")
    ax1.set_xlabel("variance explained by the tag (heads with >= 1 sink)")
    ax1.set_ylabel("(prompt, layer, head) count")
    ax1.set_title(f"{len(with_sinks)} of {len(h)} heads have a sink; {(h['n_sinks'] == 0).sum()} have none (VE=0)",
                  fontsize=9)
    per_layer = h.groupby("layer").agg(ve=("ve", "mean"), sinks=("n_sinks", "mean"))
    ax2.plot(per_layer.index, per_layer["ve"], "o-", label="mean VE")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("mean VE (all heads)")
    ax3 = ax2.twinx()
    ax3.plot(per_layer.index, per_layer["sinks"], "s--", color="#c0504d", label="mean sinks/head")
    ax3.set_ylabel("mean sinks per head", color="#c0504d")
    ax2.set_title("per-layer means", fontsize=9)
    fig.suptitle(_title(result, "Variance explained by tags"), fontsize=9)
    fig.tight_layout()
    return fig


def sink_tokens_figure(result: ScanResult, top: int = 20) -> Figure:
    counts = result.sink_token_counts().head(top)
    fig, ax = new_figure(figsize=(7, max(3, 0.28 * len(counts) + 1)))
    labels = [repr(t) for t in counts["token"]]
    ax.barh(range(len(counts)), counts["count"], color="#6a9f58")
    ax.set_yticks(range(len(counts)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("times a sink (over prompts, layers, heads)")
    for i, ve in enumerate(counts["mean_ve"]):
        ax.text(ax.get_xlim()[1] * 0.99, i, f"VE {ve:.2f}", va="center", ha="right", fontsize=7)
    ax.set_title(_title(result, f"Most frequent sink tokens (top {top})"), fontsize=9)
    fig.tight_layout()
    return fig


def scan_figures(result: ScanResult) -> dict[str, Figure]:
    """The four standard figures of a scan, by the name its job saves each under (figures/NAME.png)."""
    return {"sinks_heatmap": heatmap_figure(result, "n_sinks", "mean sinks", cmap="magma"),
            "ve_heatmap": ve_heatmap_figure(result), "ve_distribution": ve_distribution_figure(result),
            "sink_tokens": sink_tokens_figure(result)}
