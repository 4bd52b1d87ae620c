"""Pictures of a generation (catchtag generate): how each head's sinks appear and move while the text is written,
and the written tokens coloured by the sink that tags them. Renders only: tables in, figures and HTML out."""

from __future__ import annotations

import html

import pandas as pd

from catchtag.report.figures import figure_html, new_figure

PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac"]


def moving_heads(sinks: pd.DataFrame, steps: pd.DataFrame, k: int = 6) -> list[tuple[int, int]]:
    """The k heads whose sinks move most while the text is written (the most distinct sink positions over the
    steps of all prompts), ties broken by the attention written tokens put on sinks; a model whose heads keep one
    sink throughout falls back to the heads that catch most."""
    written = steps[steps["step"] >= 1]
    if written.empty:
        written = steps
    caught = written.groupby(["layer", "head"])["caught"].mean().rename("caught")
    moves = sinks.groupby(["layer", "head"])["position"].nunique().rename("moves")
    table = pd.concat([caught, moves], axis=1).fillna(0).sort_values(["moves", "caught"], ascending=False,
                                                                     kind="stable")
    return [(int(a), int(b)) for a, b in table.index[:k]]


def sink_timeline_figure(sinks: pd.DataFrame, steps: pd.DataFrame, prompt_id: int, heads, n_prompt_tokens: int,
                         title: str = ""):
    """One panel per head: at each step (x), the positions of the sinks then (y), coloured by their score; the
    dashed line is where the prompt ends. A sink that appears late in the text shows as a row of dots starting
    late; one that stops being a sink, as a row that ends."""
    heads = list(heads)
    n = max(1, len(heads))
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = new_figure(rows, cols, figsize=(4.2 * cols, 3.0 * rows), layout="constrained", squeeze=False)
    s = sinks[sinks["prompt_id"] == prompt_id]
    st = steps[steps["prompt_id"] == prompt_id]
    last = int(st["step"].max()) if len(st) else 0
    sc = None
    for ax, (layer, head) in zip(axes.ravel(), heads):
        part = s[(s["layer"] == layer) & (s["head"] == head)]
        sc = ax.scatter(part["step"], part["position"], c=part["score"], s=9, cmap="viridis", vmin=0, vmax=1,
                        marker="s", linewidths=0)
        ax.axhline(n_prompt_tokens - 0.5, color="0.5", lw=0.8, ls="--")
        ax.set_xlim(-0.5, last + 0.5)
        ax.set_ylim(-0.5, n_prompt_tokens + last + 0.5)
        ax.set_title(f"L{layer}.H{head}", fontsize=9)
        ax.set_xlabel("step (tokens written)", fontsize=8)
        ax.set_ylabel("sink position", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(heads):]:
        ax.axis("off")
    if sc is not None:
        fig.colorbar(sc, ax=axes.ravel().tolist(), label="sink score", shrink=0.8)
    fig.suptitle(title or f"sinks while prompt {prompt_id} is written", fontsize=10)
    return fig


def coloured_tokens_html(steps: pd.DataFrame, prompt_id: int, layer: int, head: int, prompt_tokens: list[str]) -> str:
    """The prompt (grey) and the written tokens, each coloured by the sink that takes most of its attention in this
    head (one colour per sink position; white: no sink caught it); hovering shows the sink and the share caught."""
    st = steps[(steps["prompt_id"] == prompt_id) & (steps["layer"] == layer) & (steps["head"] == head)
               & (steps["step"] >= 1)].sort_values("step")
    colours: dict[int, str] = {}
    spans = [f'<span class="p">{html.escape(t)}</span>' for t in prompt_tokens]
    for r in st.itertuples():
        sink = int(r.tagging_sink)
        colour = colours.setdefault(sink, PALETTE[len(colours) % len(PALETTE)]) if sink >= 0 else "#ffffff"
        tip = f"step {r.step}: caught {r.caught:.2f}" + (f" by the sink at {sink}" if sink >= 0 else " (no sink)")
        spans.append(f'<span style="background:{colour}55" title="{html.escape(tip)}">{html.escape(str(r.token))}'
                     f'</span>')
    written = dict(zip(st["position"].astype(int), st["token"].astype(str)))

    def name(p: int) -> str:
        return html.escape(prompt_tokens[p] if p < len(prompt_tokens) else written.get(p, "(written)"))

    legend = " ".join(f'<span style="background:{c}55">sink at {p}: {name(p)}</span>'
                      for p, c in sorted(colours.items()) if p >= 0)
    return (f'<h3>L{layer}.H{head}</h3><p class="legend">{legend or "no written token was caught by a sink"}</p>'
            f'<p class="text">{"".join(spans)}</p>')


def check_sentence(check: dict) -> str:
    """The check of the tracker's last state against the scan of the finished texts, in words (the VE difference
    only where the tracker kept its own VE: --tracker-ve)."""
    ve = check.get("max_abs_ve_diff")
    ve = ("the VE from the scan (the tracker kept none: --tracker-ve compares it)" if ve is None or ve != ve
          else f"VE within {ve:.1e}")
    return (f"The step-by-step state against a scan of the finished texts: the same sinks in "
            f"{check['same_sinks']:.1%} of {check['heads_compared']} (prompt, layer, head); {ve}.")


def generation_page(prompts: pd.DataFrame, steps: pd.DataFrame, sinks: pd.DataFrame, summary: dict,
                    token_strings: dict[int, list[str]], heads=None, max_prompts: int = 4,
                    viewer: str | None = None) -> str:
    """A self-contained HTML page: per prompt, the sink timelines of the heads whose sinks move most, and the written
    text coloured by the sink that tags each token in those heads. viewer: a relative link to the step-by-step token
    viewer, named at the top."""
    heads = heads or moving_heads(sinks, steps)
    parts = [f"<h1>catchtag generate: {html.escape(str(summary.get('model', '')))}</h1>",
             f"<p>{summary.get('n_prompts')} prompt(s), {summary.get('new_tokens')} tokens written; sinks at eps "
             f"{summary.get('eps')}, min_rows {summary.get('min_rows')}. Heads shown: the {len(heads)} whose sinks "
             f"move most while the text is written.</p>"]
    if viewer:
        parts.append(f'<p>Step through the first text in the token viewer: <a href="{html.escape(viewer)}">'
                     f'{html.escape(viewer)}</a> (any head, a step slider).</p>')
    check = summary.get("check") or {}
    if check:
        parts.append(f"<p>{check_sentence(check)}</p>")
    for r in prompts.head(max_prompts).itertuples():
        strings = token_strings[int(r.prompt_id)]
        fig = sink_timeline_figure(sinks, steps, int(r.prompt_id), heads, int(r.n_prompt_tokens))
        parts.append(f"<h2>prompt {r.prompt_id}</h2>")
        parts.append(figure_html(fig, f"sinks of these heads while prompt {r.prompt_id} is written"))
        for layer, head in heads[:3]:
            parts.append(coloured_tokens_html(steps, int(r.prompt_id), layer, head,
                                              strings[:int(r.n_prompt_tokens)]))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222} .p{color:#888} "
             ".text{line-height:1.9;white-space:pre-wrap;font-family:monospace;font-size:13px} "
             ".legend span{margin-right:.6em;padding:0 .3em} figure{margin:0} img{max-width:100%}")
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>catchtag generate</title><style>{style}'
            f'</style></head><body>{"".join(parts)}</body></html>')
