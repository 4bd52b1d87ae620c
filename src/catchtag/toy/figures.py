"""Pictures of the attention maps (what the sink and the release look like) and of per-seed results."""

from __future__ import annotations


import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from catchtag.toy.task import SEP, SEP2, Batch
from catchtag.report.figures import new_figure


def _labels(batch: Batch, i: int) -> list[str]:
    names = []
    for v, t in zip(batch.values[i].tolist(), batch.types[i].tolist()):
        names.append("SEP" if t == SEP else "SEP2" if t == SEP2 else f"{v:.1f}")
    return names


@torch.no_grad()
def plot_attention(model, batch: Batch, index: int = 0, title: str = "") -> Figure:
    """One row per layer, one column per head: the causal attention map of example ``index``."""
    y, aux = model(batch.values[index : index + 1], batch.types[index : index + 1], return_all=True)
    attn = [a[0].numpy() for a in aux["attn"]]  # (H, L, L) per layer
    H = attn[0].shape[0]
    labels = _labels(batch, index)
    L = len(labels)
    fig, axes = new_figure(2, H, figsize=(3.1 * H + 0.6, 5.8), squeeze=False)
    for li, a in enumerate(attn):
        for h in range(H):
            ax = axes[li][h]
            ax.imshow(a[h], cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {li + 1} head {h + 1}", fontsize=8)
            ax.set_xticks(range(L))
            ax.set_yticks(range(L))
            ax.set_xticklabels(labels, rotation=90, fontsize=5)
            ax.set_yticklabels(labels, fontsize=5)
            for s in (SEP, SEP2):
                for p in np.nonzero(batch.types[index].numpy() == s)[0]:
                    ax.axvline(p, color="red", lw=0.4, alpha=0.6)
    t = float(batch.target[index])
    fig.suptitle(f"{title}  target {t:.3f}  prediction {float(y[0]):.3f}", fontsize=8)
    fig.tight_layout()
    fig.set_dpi(90)
    return fig


def plot_construct_error(df: pd.DataFrame) -> Figure:
    """Error of the explicit construction against the tag value (log scale)."""
    fig, ax = new_figure(figsize=(4.2, 3.0))
    for v, g in df.groupby("variant"):
        ax.semilogy(g["tag"], g["rmse"].clip(lower=1e-12), "o-", label=v, ms=3)
    ax.set_xlabel("tag value")
    ax.set_ylabel("RMSE on held-out batch")
    ax.set_title("Theorem 7.1 construction", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.set_dpi(90)
    return fig


def plot_seeds(df: pd.DataFrame, title: str = "") -> Figure:
    """Per seed: held-out R^2 against layer-1 sink mass (the mechanism and the success go together)."""
    fig, ax = new_figure(figsize=(4.2, 3.0))
    r2 = df["r2"].clip(lower=-0.1)
    c = ["tab:green" if s else "tab:red" for s in df["success"]]
    ax.scatter(df["sink_mass"], r2, c=c, s=18)
    for _, r in df.iterrows():
        ax.annotate(str(int(r["seed"])), (r["sink_mass"], max(r["r2"], -0.1)), fontsize=6)
    ax.set_xlabel("layer-1 mass on [SEP] from tokens after it")
    ax.set_ylabel("held-out R^2 (clipped at -0.1)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.set_dpi(90)
    return fig
