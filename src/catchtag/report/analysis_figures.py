"""Figures of the analyses (pca, compare, sweep, taxonomy, geometry, probes, steering, ablation, release): each
function returns one matplotlib Figure, drawn outside pyplot; the job that wants a file saves it (runs), the report
embeds it."""

from __future__ import annotations

import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from catchtag.published import TAG_COSINE_BAND, TAG_TOKEN_COSINE_RANGE
from catchtag.report.figures import new_figure

SINK_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
RUN_COLORS = ["#3b6ea8", "#c0504d", "#6a9f58", "#8064a2", "#f79646", "#4bacc6"]


def _show_token(tok: str) -> str:
    return tok.replace("\n", "⏎").replace("\t", "⇥").replace("$", r"\$") or "∅"


def draw_tokens(ax, tokens, colors, *, sinks=(), outline=None, width: int = 110, fontsize: float = 6.0):
    """Write tokens left to right in a monospace grid, each on a box of its colour; sinks get a thick black
    frame; ``outline`` (T colours or None) draws a coloured underline per token."""
    ax.set_axis_off()
    x, y = 0, 0
    placed = []
    for i, tok in enumerate(tokens):
        text = _show_token(tok)
        n = max(1, len(text))
        if x + n > width and x > 0:
            x, y = 0, y + 1
        placed.append((i, x, y, n, text))
        x += n
    n_lines = y + 1
    ax.set_xlim(0, width)
    ax.set_ylim(n_lines, 0)
    sinks = set(int(s) for s in sinks)
    for i, x, y, n, text in placed:
        rgb = colors[i]
        ax.add_patch(Rectangle((x, y + 0.05), n, 0.8, facecolor=rgb, edgecolor="black" if i in sinks else "none",
                               linewidth=1.6 if i in sinks else 0))
        lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
        ax.text(x + n / 2, y + 0.47, text, ha="center", va="center", fontsize=fontsize, family="monospace",
                color="black" if lum > 0.5 else "white")
        if outline is not None and outline[i] is not None:
            ax.add_patch(Rectangle((x, y + 0.86), n, 0.12, facecolor=outline[i], edgecolor="none"))
    return n_lines


def pca_figure(pic) -> Figure:
    """Figure-2 style picture of one head (see analysis.pca.PcaPicture)."""
    T = len(pic.tokens)
    width = 96  # characters per line of the token strips: at 8 pt, readable when the report scales the figure down
    n_chars = sum(max(1, len(_show_token(t))) for t in pic.tokens)
    lines = max(2, int(np.ceil(n_chars / (width * 0.92))))
    text_h = 0.3 * lines + 0.6
    fig, _ = new_figure(figsize=(13, 2 * text_h + 4.4), subplots=False)
    gs = fig.add_gridspec(3, 3, height_ratios=[text_h, 4.0, text_h], hspace=0.55, wspace=0.3)
    sink_col = {g: SINK_COLORS[g % len(SINK_COLORS)] for g in range(len(pic.sinks))}
    outline = [sink_col.get(int(g)) if g >= 0 else None for g in pic.tagged_by]
    sink_desc = ", ".join(f"{s}:{pic.tokens[s]!r}" for s in pic.sinks) or "none"

    ax = fig.add_subplot(gs[0, :])
    draw_tokens(ax, pic.tokens, pic.head_rgb, sinks=pic.sinks, outline=outline, width=width, fontsize=8.0)
    ax.set_title(f"(a) head L{pic.layer}.H{pic.head} output per token, top-3 PCs as RGB "
                 f"({100 * pic.head_explained.sum():.0f}% of variance); framed: sinks; underline: tagging sink",
                 fontsize=9, loc="left")

    ax = fig.add_subplot(gs[1, 0])
    shown = np.power(np.clip(pic.attention, 0, 1), 0.5)
    ax.imshow(shown, cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    for g, s in enumerate(pic.sinks):
        ax.axvline(s, color=sink_col[g], lw=0.8, alpha=0.7)
        ax.plot([s], [-T * 0.02], marker="v", color=sink_col[g], ms=6, clip_on=False)
    ax.set_xlabel("key position (sinks marked)")
    ax.set_ylabel("query position")
    ax.set_title(f"(b) attention (sqrt scale), VE {pic.ve:.2f}", fontsize=9)

    for col, (pcs, var, which) in enumerate(((pic.head_pcs, pic.head_explained, f"head L{pic.layer}.H{pic.head}"),
                                              (pic.deeper_pcs, pic.deeper_explained,
                                               f"residual after layer {pic.deeper}")), start=1):
        ax = fig.add_subplot(gs[1, col])
        untag = pic.tagged_by < 0
        ax.scatter(pcs[untag, 0], pcs[untag, 1], s=7, c="#bbbbbb", label="no sink above level", linewidths=0)
        for g in range(len(pic.sinks)):
            sel = pic.tagged_by == g
            if sel.any():
                ax.scatter(pcs[sel, 0], pcs[sel, 1], s=9, c=sink_col[g], linewidths=0,
                           label=f"tagged by {pic.sinks[g]}:{_show_token(pic.tokens[pic.sinks[g]])!r} ({sel.sum()})")
        sil = pic.separation_head if col == 1 else pic.separation_deeper
        ax.set_xlabel(f"PC1 ({100 * var[0]:.0f}%)")
        ax.set_ylabel(f"PC2 ({100 * var[1]:.0f}%)")
        ax.set_title(f"({'c' if col == 1 else 'd'}) {which}: PC1 vs PC2, silhouette {sil:.2f}", fontsize=9)
        lim_x = np.percentile(pcs[1:, 0], [1, 99]) if T > 4 else None
        lim_y = np.percentile(pcs[1:, 1], [1, 99]) if T > 4 else None
        if lim_x is not None:
            pad_x, pad_y = 0.15 * np.ptp(lim_x) + 1e-9, 0.15 * np.ptp(lim_y) + 1e-9
            ax.set_xlim(lim_x[0] - pad_x, lim_x[1] + pad_x)
            ax.set_ylim(lim_y[0] - pad_y, lim_y[1] + pad_y)
        ax.legend(fontsize=6, loc="best", markerscale=1.5)

    ax = fig.add_subplot(gs[2, :])
    draw_tokens(ax, pic.tokens, pic.deeper_rgb, sinks=pic.sinks, outline=outline, width=width, fontsize=8.0)
    ax.set_title(f"(e) residual stream after layer {pic.deeper}, top-3 PCs as RGB "
                 f"({100 * pic.deeper_explained.sum():.0f}% of variance); underline: sink of L{pic.layer}.H{pic.head} "
                 f"that tags the token (attention >= {pic.tag_level})", fontsize=9, loc="left")
    fig.suptitle(f"{pic.model}: catch, tag, release in head L{pic.layer}.H{pic.head} on one {T}-token prompt; "
                 f"sinks {sink_desc}", fontsize=10)
    return fig


def compare_figure(cmp) -> Figure:
    """Sinks per head (violin), VE per head (box), share of heads with VE above the level, per-layer means."""
    runs = list(cmp.summary["run"])
    ph, pl = cmp.per_head, cmp.per_layer
    fig, axes = new_figure(1, 4, figsize=(16, 4.2), gridspec_kw={"width_ratios": [1, 1, 0.7, 1.5]})
    colors = {r: RUN_COLORS[i % len(RUN_COLORS)] for i, r in enumerate(runs)}
    data = [ph.loc[ph["run"] == r, "sinks"].to_numpy() for r in runs]
    parts = axes[0].violinplot(data, showmeans=True, showextrema=True)
    for body, r in zip(parts["bodies"], runs):
        body.set_facecolor(colors[r])
        body.set_alpha(0.6)
    axes[0].set_xticks(range(1, len(runs) + 1), runs, fontsize=8)
    axes[0].set_ylabel("sinks per head (mean over prompts)")
    axes[0].set_title("(a) sinks per head", fontsize=9)
    data = [ph.loc[ph["run"] == r, "ve"].to_numpy() for r in runs]
    box = axes[1].boxplot(data, patch_artist=True, widths=0.5)
    for patch, r in zip(box["boxes"], runs):
        patch.set_facecolor(colors[r])
        patch.set_alpha(0.6)
    axes[1].axhline(cmp.ve_level, color="grey", ls=":", lw=1)
    axes[1].set_xticks(range(1, len(runs) + 1), runs, fontsize=8)
    axes[1].set_ylabel("VE per head (mean over prompts)")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("(b) variance explained by tags", fontsize=9)
    key = f"share_ve_above_{cmp.ve_level}"
    axes[2].bar(range(len(runs)), 100 * cmp.summary[key], color=[colors[r] for r in runs], alpha=0.8)
    for i, v in enumerate(cmp.summary[key]):
        axes[2].text(i, 100 * v, f"{100 * v:.1f}%", ha="center", va="bottom", fontsize=8)
    axes[2].set_xticks(range(len(runs)), runs, fontsize=8)
    axes[2].set_ylabel(f"% of (prompt, layer, head) with VE > {cmp.ve_level}")
    axes[2].set_title(f"(c) heads with VE > {cmp.ve_level}", fontsize=9)
    ax2 = axes[3]
    ax3 = ax2.twinx()
    for r in runs:
        g = pl[pl["run"] == r]
        ax2.plot(g["depth"], g["ve"], "o-", color=colors[r], ms=3, label=f"{r}: mean VE")
        ax3.plot(g["depth"], g["sinks"], "s--", color=colors[r], ms=3, alpha=0.6, label=f"{r}: mean sinks")
    ax2.set_xlabel("relative depth (layer / (layers - 1))")
    ax2.set_ylabel("mean VE (solid)")
    ax3.set_ylabel("mean sinks per head (dashed)")
    lines = ax2.get_legend_handles_labels()
    lines3 = ax3.get_legend_handles_labels()
    ax2.legend(lines[0] + lines3[0], lines[1] + lines3[1], fontsize=6, loc="upper left")
    ax2.set_title("(d) per-layer means", fontsize=9)
    eps = sorted(set(cmp.summary["eps"].dropna()))
    fig.suptitle(f"Models side by side (eps={', '.join(map(str, eps))}; "
                 + "; ".join(f"{r}: {n} prompts" for r, n in zip(runs, cmp.summary["n_prompts"])) + ")", fontsize=10)
    fig.tight_layout()
    return fig


def sweep_figure(table, published: dict | None = None) -> Figure:
    """Mean sinks per head vs mean VE (all heads) as eps varies, one pair of curves per run: the uncentred share
    (solid; the form of the published curve beside it) and the centred one (dashed); eps written at the points."""
    from catchtag.published import SWEEP_8B

    published = SWEEP_8B if published is None else published
    fig, (ax, ax2) = new_figure(1, 2, figsize=(12, 4.5))
    for i, (run, g) in enumerate(table.groupby("run", sort=False)):
        c = RUN_COLORS[i % len(RUN_COLORS)]
        uncentred = "mean_ve_uncentred" in g and g["mean_ve_uncentred"].notna().all()
        if uncentred:
            ax.plot(g["mean_sinks_per_head"], g["mean_ve_uncentred"], "o-", color=c, ms=4,
                    label=f"{run}: VE uncentred")
        ax.plot(g["mean_sinks_per_head"], g["mean_ve"], "s--", color=c, alpha=0.7, ms=3, label=f"{run}: VE centred")
        for _, row in g.iterrows():
            ax.annotate(f"{row['eps']:g}", (row["mean_sinks_per_head"],
                                            row["mean_ve_uncentred"] if uncentred else row["mean_ve"]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points", color=c)
        ax2.plot(g["eps"], g["mean_sinks_per_head"], "o-", color=c, label=f"{run}", ms=4)
    if published:
        xs = [v[0] for v in published.values()]
        ys = [v[1] for v in published.values()]
        ax.plot(xs, ys, "kx:", label="published, 8B model (all heads)", ms=7)
        for e, (x, y) in published.items():
            ax.annotate(f"{e:g}", (x, y), fontsize=6, xytext=(3, -9), textcoords="offset points")
        ax2.plot(list(published), xs, "kx--", label="published, 8B model", ms=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("mean sinks per head (log scale)")
    ax.set_ylabel("mean VE by tags, all heads")
    ax.set_title("(a) sinks vs variance explained, points labelled by eps", fontsize=9)
    ax.legend(fontsize=7)
    ax2.set_yscale("log")
    ax2.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax2.set_xlabel("eps (sink threshold on the column score)")
    ax2.set_ylabel("mean sinks per head (log scale)")
    ax2.set_title("(b) sinks per head vs eps", fontsize=9)
    ax2.legend(fontsize=7)
    fig.suptitle("Threshold sweep: all eps from one forward pass per prompt", fontsize=10)
    fig.tight_layout()
    return fig


def taxonomy_figure(tables: dict, top: int = 15) -> Figure:
    """Per run: the most frequent sink tokens (count, heads, mean VE) and the share of each kind of sink."""
    from catchtag.analysis.taxonomy import KINDS

    n = len(tables)
    fig, axes = new_figure(n, 2, figsize=(13, 3.2 + 0.18 * top * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6, 1]})
    kind_colors = dict(zip(KINDS, ["#444444", "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e"]))
    for row, (run, (tokens, kinds)) in enumerate(tables.items()):
        first = tokens[tokens["kind"] == "first"]
        t = tokens[tokens["kind"] != "first"].head(top - 1)
        if len(first):  # position 0 as one bar, whatever token sits there
            agg = {"token": "position 0, any token", "kind": "first", "count": int(first["count"].sum()),
                   "n_heads": int(first["n_heads"].max()),
                   "mean_ve": float((first["mean_ve"] * first["count"]).sum() / first["count"].sum())}
            t = pd.concat([pd.DataFrame([agg]), t], ignore_index=True).sort_values("count", ascending=False)
        ax = axes[row, 0]
        ax.barh(range(len(t)), t["count"], color=[kind_colors[k] for k in t["kind"]])
        ax.set_yticks(range(len(t)), [f"<{x}>" if k == "first" else repr(_show_token(x))
                                      for x, k in zip(t["token"], t["kind"])], fontsize=7)
        ax.invert_yaxis()
        log = len(t) and t["count"].max() > 30 * max(1, t["count"].min())
        if log:
            ax.set_xscale("log")
        ax.set_xlabel("times a sink (prompt x layer x head)" + (", log scale" if log else ""))
        for i, (_, r) in enumerate(t.iterrows()):
            heads = f"<= {r['n_heads']}" if r["kind"] == "first" else r["n_heads"]
            ax.text(ax.get_xlim()[1], i, f" {heads} heads, VE {r['mean_ve']:.2f}", va="center",
                    fontsize=6, clip_on=False)
        ax.set_title(f"{run}: most frequent sink tokens (colour = kind; position 0 pooled)", fontsize=9)
        ax = axes[row, 1]
        k = kinds[kinds["kind"] != "first"]
        ax.bar(range(len(k)), 100 * k["share_beyond_first"].fillna(0), color=[kind_colors[x] for x in k["kind"]])
        for i, (_, r) in enumerate(k.iterrows()):
            ax.text(i, 100 * (r["share_beyond_first"] if r["share_beyond_first"] == r["share_beyond_first"] else 0),
                    f"{100 * (r['share_beyond_first'] or 0):.0f}%\n({r['count']})", ha="center", va="bottom",
                    fontsize=7)
        ax.set_xticks(range(len(k)), k["kind"], fontsize=7)
        ax.set_ylabel("% of sinks beyond position 0")
        first = kinds.loc[kinds["kind"] == "first", "share"].iloc[0]
        ax.set_ylim(0, 110)
        ax.set_title(f"{run}: kinds of sinks beyond the first token\n(position 0 is {100 * first:.1f}% of all sinks)",
                     fontsize=9)
    fig.tight_layout()
    return fig


def geometry_figure(geoms: dict) -> Figure:
    """Histograms of cosine between distinct tags (by kind of pair) and between each tag and its token."""
    from catchtag.analysis.geometry import PAIR_KINDS

    n = len(geoms)
    fig, axes = new_figure(n, 3, figsize=(14, 3.4 * n), squeeze=False, gridspec_kw={"width_ratios": [1, 1, 1]})
    bins = np.linspace(-1, 1, 81)
    for row, (run, g) in enumerate(geoms.items()):
        ax = axes[row, 0]
        for i, kind in enumerate(PAIR_KINDS):
            c = g.pairs.loc[g.pairs["kind"] == kind, "cosine"].to_numpy()
            if len(c):
                ax.hist(c, bins=bins, density=True, histtype="step", lw=1.4, color=RUN_COLORS[i],
                        label=f"{kind} (n={len(c)}, {100 * (np.abs(c) <= 0.05).mean():.0f}% within ±0.05)")
        sd = 1 / np.sqrt(g.hidden)
        xs = np.linspace(-1, 1, 400)
        ax.plot(xs, np.exp(-xs ** 2 / (2 * sd ** 2)) / (sd * np.sqrt(2 * np.pi)), "k:", lw=1,
                label=f"random directions in {g.hidden} dims")
        ax.axvspan(-TAG_COSINE_BAND, TAG_COSINE_BAND, color="grey", alpha=0.15)
        ax.set_xlabel("cosine similarity between two distinct tags (residual stream)")
        ax.set_ylabel("density")
        ax.set_title(f"{run}: distinct tags, one per (layer, head, sink), n={g.n_tags}", fontsize=9)
        ax.legend(fontsize=6)
        ax = axes[row, 1]
        c = g.tag_vs_token["cosine"].to_numpy()
        ax.hist(c, bins=bins, density=True, color="#6a9f58", alpha=0.8, label=f"n={len(c)}")
        ax.plot(xs, np.exp(-xs ** 2 / (2 * sd ** 2)) / (sd * np.sqrt(2 * np.pi)), "k:", lw=1, label="random")
        ax.axvspan(*TAG_TOKEN_COSINE_RANGE, color="orange", alpha=0.15, label="published range")
        ax.set_xlabel("cosine(tag of head at token i, residual stream entering the layer at i)")
        ax.set_title(f"{run}: tag vs the token it is added to (mean {c.mean() if len(c) else 0:.3f})", fontsize=9)
        ax.legend(fontsize=6)
        ax = axes[row, 2]
        per_layer = g.tag_vs_token.groupby("layer")["cosine"].agg(["mean", lambda v: np.percentile(v, 10),
                                                                   lambda v: np.percentile(v, 90)])
        per_layer.columns = ["mean", "p10", "p90"]
        ax.fill_between(per_layer.index, per_layer["p10"], per_layer["p90"], color="#6a9f58", alpha=0.3,
                        label="10-90th percentile")
        ax.plot(per_layer.index, per_layer["mean"], "o-", color="#6a9f58", ms=3, label="mean")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("layer")
        ax.set_ylabel("cosine(tag, token)")
        ax.set_title(f"{run}: tag vs token per layer", fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle("Tag geometry: are tags orthogonal to each other and to the tokens they tag?", fontsize=10)
    fig.tight_layout()
    return fig


def probe_heatmap(table: pd.DataFrame, summary: dict) -> Figure:
    """Layer x head heat maps of test accuracy for the tag, non-tag and full probes (selected heads boxed)."""
    from matplotlib.patches import Rectangle

    layers = sorted(table["layer"].unique())
    heads = sorted(table["head"].unique())
    fig, axes = new_figure(1, 3, figsize=(3 * (0.3 * len(heads) + 0.9) + 1.4, 0.2 * len(layers) + 1.9),
                             sharey=True, layout="constrained")
    titles = {"tag": "tag-only probe", "nontag": "non-tag probe", "full": "full-output probe"}
    for ax, kind in zip(axes, ("tag", "nontag", "full")):
        grid = table[table["kind"] == kind].pivot(index="layer", columns="head", values="test_accuracy")
        grid = grid.reindex(index=layers, columns=heads)
        im = ax.imshow(grid.to_numpy(), vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto", origin="lower")
        ax.set_title(titles[kind], fontsize=10)
        ax.set_xlabel("head")
        ax.set_xticks(range(len(heads)))
        ax.set_xticklabels(heads, fontsize=7)
        for r in summary["selected_heads"]:
            if r["passes"]:
                ax.add_patch(Rectangle((heads.index(r["head"]) - 0.5, layers.index(r["layer"]) - 0.5), 1, 1,
                                       fill=False, ec="red", lw=1.5))
    axes[0].set_ylabel("layer")
    axes[0].set_yticks(range(len(layers)))
    axes[0].set_yticklabels(layers, fontsize=7)
    cbar = fig.colorbar(im, ax=list(axes), shrink=0.9)
    cbar.set_label("test accuracy (chance 0.5)")
    m = summary["model_accuracy"]["test"]
    fig.suptitle(f"{summary['model']}, {summary['task']}: last-token probe test accuracy\n{summary['n_train']} train / "
                 f"{summary['n_test']} test prompts; model's own {summary['shots']}-shot accuracy {100 * m:.0f}%"
                 f" (red box: selected head)", fontsize=9)
    fig.set_dpi(100)  # many small panels: a little smaller than the others
    return fig


def steering_figure(table: pd.DataFrame, summary: dict, n_prompts: int | str = "?") -> Figure:
    """One panel per steered head: mean shift of the answer log-odds against the steering scale, for the
    tag direction and for each random direction of the same norm (error bars: standard error over prompts)."""
    heads = table[["layer", "head"]].drop_duplicates().to_numpy().tolist()
    fig, axes = new_figure(1, len(heads), figsize=(4.2 * len(heads), 3.6), squeeze=False, sharey=True)
    labels = summary.get("labels", ["label 0", "label 1"])
    for ax, (layer, head) in zip(axes[0], heads):
        sub = table[(table["layer"] == layer) & (table["head"] == head)]
        for (kind, index), grp in sub.groupby(["direction", "index"]):
            grp = grp.sort_values("scale")
            style = dict(color="C3", lw=2, marker="o", label="mean tag difference") if kind == "tag" else \
                dict(color="0.6", lw=1, marker=".", label="random, same norm" if index == 0 else None)
            ax.errorbar(grp["scale"], grp["shift"], yerr=grp["shift_sem"], capsize=2, **style)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"layer {layer}, head {head}")
        ax.set_xlabel("steering scale (x mean tag difference)")
    axes[0][0].set_ylabel(f"shift of log p({labels[1]}) - log p({labels[0]})")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{summary['model']}, {summary['task']}: steering one head at the last token\n"
                 f"({n_prompts} test prompts; shift of the mean log-odds vs no steering)", fontsize=9)
    fig.tight_layout()
    return fig


def ablation_figure(per_head: pd.DataFrame, summary: dict) -> Figure:
    """(a) First-order loss change of ablating each head's tag (layer x head) next to (b) its VE; (c) the real
    loss change of each ablated target with its 95% interval, beside the control's (random direction, same energy)
    and the first-order estimate."""
    L = int(per_head["layer"].max()) + 1
    fig, axes = new_figure(1, 3, figsize=(13, 0.18 * L + 2.6), layout="constrained",
                           gridspec_kw={"width_ratios": [1, 1, 1.3]})
    est = per_head.pivot(index="layer", columns="head", values="estimate").reindex(range(L)).to_numpy()
    ve = per_head.pivot(index="layer", columns="head", values="ve").reindex(range(L)).to_numpy()
    finite = np.abs(est[np.isfinite(est)])
    lim = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    im = axes[0].imshow(est, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", origin="lower")
    fig.colorbar(im, ax=axes[0], shrink=0.8, label="est. change of mean NLL (nats)")
    axes[0].set_title(f"(a) first-order loss change per prompt\n({summary['mode']}-ablating one head's tag)",
                      fontsize=9)
    im = axes[1].imshow(ve, cmap="viridis", vmin=0, vmax=max(0.05, float(np.nanmax(ve))), aspect="auto",
                        origin="lower")
    fig.colorbar(im, ax=axes[1], shrink=0.8, label="mean VE (centred)")
    axes[1].set_title("(b) variance explained by the tag", fontsize=9)
    for ax in axes[:2]:
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        for r in summary["targets"]:
            if len(r["heads"]) == 1:
                l, h = r["heads"][0]
                ax.add_patch(Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, ec="k", lw=1.2))
    rows = summary["targets"]
    y = np.arange(len(rows))
    real = np.array([r["delta_nll"] for r in rows])
    ci = np.array([r["ci"] for r in rows], dtype=float)
    ctrl = np.array([r["control_delta_nll"] for r in rows])
    cci = np.array([r["control_ci"] for r in rows], dtype=float)
    axes[2].errorbar(real, y, xerr=[real - ci[:, 0], ci[:, 1] - real], fmt="o", color="C3", label="tag ablated")
    axes[2].errorbar(ctrl, y + 0.25, xerr=[ctrl - cci[:, 0], cci[:, 1] - ctrl], fmt="s", color="0.5", ms=4,
                     label="control (random direction, same energy)")
    axes[2].plot([r["attribution"] for r in rows], y - 0.25, "x", color="C0", label="first-order estimate")
    axes[2].axvline(0, color="k", lw=0.5)
    axes[2].set_yticks(y)
    axes[2].set_yticklabels([r["target"] for r in rows], fontsize=7)
    axes[2].set_xlabel("loss change over tagged tokens (nats)\n95% interval over prompts")
    axes[2].legend(fontsize=7)
    rank = summary.get("attribution_vs_real_rank_correlation")
    axes[2].set_title("(c) real interventions" + (f"; rank corr. with (a): {rank['spearman']:.2f}" if rank else ""),
                      fontsize=9)
    fig.suptitle(f"{summary['model']}: release, causally ({summary['n_prompts']} prompts, eps {summary['eps']})",
                 fontsize=10)
    return fig


def release_figure(release_map: pd.DataFrame, summary: dict, n_layers: int, n_heads: int,
                   most: int = 8) -> Figure:
    """The release map: for each ablated target (up to ``most``), how much each later head's output changes
    (relative change at sampled tokens, layer x head; the target's own layer and those before it are blank)."""
    targets = [r["target"] for r in summary["targets"]][:most]
    cols = min(4, len(targets))
    rows = -(-len(targets) // cols)
    fig, axes = new_figure(rows, cols, figsize=(3.2 * cols + 1, 0.16 * n_layers * rows + 1.6 * rows),
                           squeeze=False, layout="constrained")
    vmax = float(release_map["output_change"].quantile(0.99)) if len(release_map) else 1.0
    im = None
    for ax, name in zip(axes.ravel(), targets):
        sub = release_map[release_map["target"] == name]
        grid = np.full((n_layers, n_heads), np.nan)
        # a target in the last layer has no later head: an empty (untyped) table, a blank panel
        grid[sub["layer"].to_numpy(dtype=int), sub["head"].to_numpy(dtype=int)] = sub["output_change"].to_numpy()
        im = ax.imshow(grid, cmap="magma", vmin=0, vmax=max(vmax, 1e-6), aspect="auto", origin="lower")
        ax.set_title(f"ablate {name}", fontsize=8)
        ax.set_xlabel("head", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
    for ax in axes.ravel()[len(targets):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=list(axes.ravel()), shrink=0.8, label="relative change of a later head's output")
    fig.suptitle(f"{summary['model']}: which later heads change when a tag is {summary['mode']}-ablated",
                 fontsize=9)
    return fig


def release_decoding_figure(decoding: pd.DataFrame, summary: dict) -> Figure:
    """Held-out accuracy of decoding each head's sink groups from the residual stream entering each deeper layer
    (solid, 95% interval over prompts) against the control with other prompts' groups (dashed), each with its own
    chance (dotted: the control's labels are another set, with another largest group)."""
    heads = decoding[["source_layer", "head"]].drop_duplicates().to_numpy().tolist()
    fig, axes = new_figure(1, len(heads), figsize=(4.2 * len(heads), 3.4), squeeze=False, sharey=True,
                           layout="constrained")
    for ax, (layer, head) in zip(axes[0], heads):
        d = decoding[(decoding["source_layer"] == layer) & (decoding["head"] == head)]
        ax.fill_between(d["layer"], d["ci_low"], d["ci_high"], color="C3", alpha=0.2)
        ax.plot(d["layer"], d["accuracy"], "o-", color="C3", ms=3, label="tagging sink's group")
        ax.fill_between(d["layer"], d["control_ci_low"], d["control_ci_high"], color="0.5", alpha=0.2)
        ax.plot(d["layer"], d["control_accuracy"], "s--", color="0.4", ms=3, label="control: other prompts' groups")
        ax.plot(d["layer"], d["chance"], ":", color="C3", lw=1.2, label="its chance (largest group's share)")
        ax.plot(d["layer"], d["control_chance"], ":", color="0.3", lw=1.2, label="the control's chance")
        ax.set_title(f"head {layer}.{head} ({int(d['n_groups'].max())} groups)", fontsize=9)
        ax.set_xlabel("residual stream entering layer")
    axes[0][0].set_ylabel("held-out accuracy")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{summary['model']}: is a head's sink grouping readable deeper? ({summary['n_prompts']} prompts, "
                 f"level {summary['level']})", fontsize=9)
    return fig
