"""The HTML report: every analysis of a set of runs in one self-contained file (figures embedded as PNG data
URIs, no network), with the settings and versions used and a caption under every picture.

It only renders: every table comes from the run folders, and the per-token sections (pca picture, tag geometry,
token viewer) from the pictures `catchtag scan` keeps of each run's first prompt (views/). A section that cannot be
drawn for a run says why in the page; the report itself succeeds on any finished run.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pandas as pd

from catchtag.report.figures import figure_html as _figure


_HERE = Path(__file__).parent


def _header(column) -> str:
    """A table column's name as the page shows it: VE always named for its form (``ve``: centred)."""
    c = str(column)
    if "ve_uncentred" in c:
        c = c.replace("ve_uncentred", "VE uncentred")
    elif re.search(r"(^|_)ve(_|$)", c):
        c = re.sub(r"(^|_)ve(_|$)", r"\1VE centred\2", c)
    return c.replace("_", " ")


def _table(df: pd.DataFrame, floats: int = 3, max_rows: int = 40) -> str:
    df = df.head(max_rows)
    head = "".join(f"<th class='l'>{html.escape(_header(c))}</th>" if df[c].dtype == object else
                   f"<th>{html.escape(_header(c))}</th>" for c in df.columns)
    rows = []
    for _, r in df.iterrows():
        cells = []
        for c in df.columns:
            v = r[c]
            if isinstance(v, float):
                cells.append(f"<td>{v:.{floats}f}</td>" if v == v else "<td>–</td>")
            elif isinstance(v, str):
                cells.append(f"<td class='l'>{html.escape(repr(v) if c == 'token' else v)}</td>")
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _mean_tokens(result) -> float | str:
    """Mean prompt length in tokens (one row per prompt), or "" when the run has no rows."""
    per_prompt = result.heads.drop_duplicates("prompt_id")["n_tokens"] if len(result.heads) else []
    return round(float(per_prompt.mean()), 1) if len(per_prompt) else ""


def _run_settings(name: str, folder, result) -> dict:
    from catchtag.summaries import ScanSummary

    summary = {}
    if folder is not None and (Path(folder) / ScanSummary.file).is_file():
        summary = ScanSummary.read(folder)
    s = result.settings
    return {"run": name, "folder": str(folder or ""), "model": s.get("model", ""), "data": s.get("data", ""),
            "prompts": int(result.heads["prompt_id"].nunique()),
            "tokens per prompt (mean)": _mean_tokens(result),
            "token limit": s.get("max_tokens") or "none",
            "eps": s.get("eps"), "min_rows": s.get("min_rows"),
            "sweep thresholds": ", ".join(f"{e:g}" for e in s.get("sweep_eps") or []) or "none",
            "dtype": s.get("dtype", ""), "scan seconds": round(float(s.get("seconds", 0) or 0), 1),
            "versions": ", ".join(f"{k} {v}" for k, v in summary.get("versions", {}).items()) or "not recorded"}


def write_report(runs, out="report.html", *, per_token: bool = True, title: str = "catchtag report") -> Path:
    """Write one HTML file with every analysis of ``runs`` (folders from ``catchtag scan``, or ScanResults).

    per_token: also the per-token sections, drawn from each run folder's views/ (a ScanResult held in memory has
    none: the page says so).
    """
    return _write_report(runs, out, per_token=per_token, title=title)


def _write_report(runs, out, *, per_token, title) -> Path:
    from catchtag.analysis.compare import compare_runs, load_runs
    from catchtag.analysis.sweep import sweep_runs
    from catchtag.published import SWEEP_8B
    from catchtag.analysis.taxonomy import kind_shares, sink_taxonomy
    from catchtag.report import analysis_figures as af
    from catchtag.report.figures import heatmap_figure
    from catchtag.runs import versions

    run_list = list(runs.values()) if isinstance(runs, dict) else list(runs)
    generations = {}  # a `catchtag generate` folder stands for the scan of its finished texts, plus its steps
    for i, run in enumerate(run_list):
        if isinstance(run, (str, Path)) and is_generation(Path(run)):
            generations[len(generations)] = Path(run)
            run_list[i] = Path(run) / "scan"
    if isinstance(runs, dict):
        runs = dict(zip(runs, run_list))
    results = load_runs(runs if isinstance(runs, dict) else run_list)
    folders = {name: (r if not hasattr(r, "heads") else None) for name, r in zip(results, run_list)}
    out = Path(out)
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<p class='note'>Catch, tag, release (Zhang, Khan, Papyan, NeurIPS 2025): sinks are columns whose mean "
             "attention from the rows that can see them exceeds eps; a head's tag is the part of its output that "
             "comes from its sinks. VE is the share of the head's output in the span of the sink value vectors, in "
             "two forms: <b>centred</b>, the share of its variation across tokens (outputs centred by their mean "
             "over the prompt), and <b>uncentred</b>, the share of its energy (the form to set next to published "
             "numbers). Pictures show the centred form unless they say otherwise.</p>",
             "<nav><a href='#settings'>settings</a><a href='#compare'>comparison</a><a href='#sweep'>threshold "
             "sweep</a><a href='#taxonomy'>sink tokens</a><a href='#heads'>per head</a>"
             + ("<a href='#pca'>release pictures</a><a href='#geometry'>tag geometry</a><a href='#viewer'>token "
                "viewer</a>" if per_token else "") + "<a href='#release'>release, causally</a>"
             + ("<a href='#writing'>while writing</a>" if generations else "") + "</nav>"]
    # settings
    settings = pd.DataFrame([_run_settings(n, folders[n], r) for n, r in results.items()])
    parts += ["<h2 id='settings'>Runs, settings and versions</h2>", _table(settings),
              f"<p class='note'>Report written with {html.escape(', '.join(f'{k} {v}' for k, v in versions().items()))}"
              ".</p>"]
    # comparison
    cmp = compare_runs(results)
    fig = af.compare_figure(cmp)
    parts += ["<h2 id='compare'>Models side by side</h2>",
              _figure(fig, "(a) Distribution over heads of the mean number of sinks per head (mean over prompts); "
                           "(b) the same for the variance explained by tags (VE; heads without a sink count as 0); "
                           "(c) share of (prompt, layer, head) with VE above 0.3; (d) means per layer against "
                           "relative depth, VE solid and sinks dashed. Published (paper): QK-norm Qwen3 keeps "
                           "~1.03 sinks per head with VE ~0.25."),
              _table(cmp.summary)]
    # sweep
    with_sweep = {n: r for n, r in results.items() if r.sweep is not None and len(r.sweep)}
    parts.append("<h2 id='sweep'>Threshold sweep</h2>")
    if with_sweep:
        table = sweep_runs(with_sweep)
        fig = af.sweep_figure(table)
        pub = ", ".join(f"eps {e:g}: {s:g} sinks, VE {v:g}" for e, (s, v) in SWEEP_8B.items())
        parts += [_figure(fig, "(a) Mean sinks per head against mean VE as the threshold eps varies (labels): "
                               "lower eps finds more sinks, whose span explains more variance. Solid: VE "
                               "uncentred; dashed: VE centred (both over all heads; the table also gives heads with "
                               f"a sink). Crosses: published values for an 8B model ({pub}). "
                               "(b) sinks per head against eps. All thresholds come from one forward pass."),
                  _table(table)]
    else:
        parts.append("<p class='note'>No run has a sweep; scan with <code>--sweep 0.03,...,0.4</code> or use "
                     "<code>catchtag sweep</code>.</p>")
    # taxonomy
    tax = {n: (sink_taxonomy(r), kind_shares(r)) for n, r in results.items()}
    fig = af.taxonomy_figure(tax)
    parts += ["<h2 id='taxonomy'>Which tokens are sinks</h2>",
              _figure(fig, "Left: the sink token strings seen most often over prompts, layers and heads, coloured "
                           "by kind, with the number of distinct heads and the mean VE of those heads. Right: kinds of "
                           "sinks beyond the first position (punctuation, whitespace, function words from a fixed "
                           "English list, other).")]
    for n, (tokens, kinds) in tax.items():
        if tokens.empty:  # no head of this run has a sink at its threshold
            parts += [f"<h3>{html.escape(n)}</h3>", f"<p>No head has a sink at eps {results[n].settings.get('eps')} "
                                                   f"in this run, so there are no sink tokens to list.</p>"]
            continue
        parts += [f"<h3>{html.escape(n)}</h3>", _table(kinds), _table(tokens.drop(columns=["share"]), max_rows=15)]
    # per-run heatmaps
    parts.append("<h2 id='heads'>Per layer and head</h2>")
    for n, r in results.items():
        a = heatmap_figure(r, "n_sinks", "mean sinks", cmap="magma")
        b = heatmap_figure(r, "ve", "mean VE centred", vmax=1)
        parts += [f"<h3>{html.escape(n)}</h3>",
                  _figure(a, f"{html.escape(n)}: mean number of sinks of each head over the prompts."),
                  _figure(b, f"{html.escape(n)}: mean VE (centred) of each head over the prompts.")]
        if "ve_uncentred" in r.heads:
            c = heatmap_figure(r, "ve_uncentred", "mean VE uncentred", vmax=1)
            parts.append(_figure(c, f"{html.escape(n)}: mean VE (uncentred: the share of the output's energy, the "
                                    "shared mean direction included) of each head over the prompts."))
    if per_token:
        parts += _per_token_sections(results, folders)
    parts += _ablation_sections(results, folders)
    if generations:
        parts += _generation_sections(list(generations.values()))
    css = (_HERE / "report.css").read_text()
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{css}</style></head><body>" + "\n".join(parts) + "</body></html>")
    from catchtag.runs import write_text

    return write_text(out, page)


def is_generation(folder: Path) -> bool:
    """Whether ``folder`` was written by `catchtag generate` (its step tables and the scan of its texts)."""
    return (folder / "steps.parquet").is_file() and (folder / "scan" / "run.json").is_file()


def _generation_sections(folders: list[Path]) -> list[str]:
    """Sinks while the model writes: for each `catchtag generate` folder, the sink timelines of the heads whose sinks
    move most and the written text coloured by the sink that tags each token (its first prompt)."""
    from catchtag.report.generation import (check_sentence, coloured_tokens_html, moving_heads,
                                             sink_timeline_figure)
    from catchtag.report.viewer import TokenView
    from catchtag.summaries import GenerateSummary

    parts = ["<h2 id='writing'>While the model writes</h2>",
             "<p class='note'>From <code>catchtag generate</code>: the sinks after every written token (a scan of the "
             "text so far would find the same), and each written token's attention to them. A written token can "
             "become a sink once min_rows later tokens have seen it.</p>"]
    for folder in folders:
        summary = GenerateSummary.read(folder)
        prompts = pd.read_parquet(folder / "prompts.parquet")
        steps = pd.read_parquet(folder / "steps.parquet")
        sinks = pd.read_parquet(folder / "sinks.parquet")
        tokens = pd.read_parquet(folder / "scan" / "prompts.parquet").set_index("prompt_id")["tokens"]
        heads = moving_heads(sinks, steps)
        first = prompts.iloc[0]
        pid, n_prompt = int(first["prompt_id"]), int(first["n_prompt_tokens"])
        check = summary["check"]
        parts += [f"<h3>{html.escape(str(summary['model']))}: {html.escape(folder.name)}</h3>",
                  f"<p>{summary['n_prompts']} prompt(s), {summary['new_tokens']} tokens written. "
                  f"{check_sentence(check)}</p>",
                  _figure(sink_timeline_figure(sinks, steps, pid, heads, n_prompt),
                          f"Prompt {pid}: at each step (x), the positions of the sinks then (y), coloured by their "
                          f"score, for the {len(heads)} heads whose sinks move most; dashed: where the prompt ends.")]
        strings = list(tokens.loc[pid])
        for layer, head in heads[:3]:
            parts.append(coloured_tokens_html(steps, pid, layer, head, strings[:n_prompt]))
        if (folder / "view.html").is_file():
            parts += [f"<p class='note'>Token viewer of prompt {pid}: move the step slider (or press play) to see the "
                      "text written token by token and each head's sinks as a scan of the text so far finds them.</p>",
                      TokenView((folder / "view.html").read_text(encoding="utf-8"), height=560)._repr_html_()]
    return parts


def _ablation_sections(results, folders) -> list[str]:
    """Release, causally: the tables `catchtag ablate` left in each run's ablate/ folder, drawn again here."""
    from catchtag.analysis.release import tag_or_bias
    from catchtag.report import analysis_figures as af

    from catchtag.summaries import AblateSummary

    found = {n: Path(f) for n, f in folders.items() if f is not None and (Path(f) / AblateSummary.file).is_file()}
    parts = ["<h2 id='release'>Release, causally</h2>"]
    if not found:
        return parts + ["<p class='note'>No run holds interventions. <code>catchtag ablate --model M --data D --out "
                        "RUN</code> adds them to a run folder.</p>"]
    for n, run in found.items():
        summary, folder = AblateSummary.read(run), run / "ablate"
        attrib = pd.read_parquet(folder / "attribution.parquet")
        per_head = attrib.assign(estimate=attrib["estimate"].fillna(0.0)).groupby(["layer", "head"]) \
            .agg(estimate=("estimate", "mean"), ve=("ve", "mean")).reset_index()
        release = pd.read_parquet(folder / "release.parquet")
        L, H = int(attrib["layer"].max()) + 1, int(attrib["head"].max()) + 1
        a = af.ablation_figure(per_head, summary)
        b = af.release_figure(release, summary, L, H)
        rank = summary.get("attribution_vs_real_rank_correlation")
        table = pd.DataFrame([{"target": t["target"], "prompts tagged": t.get("n_prompts_tagged"),
                               "loss change (nats)": t["delta_nll"], "95% low": t["ci"][0],
                               "95% high": t["ci"][1], "control": t["control_delta_nll"],
                               "first-order": t["attribution"], "VE (centred)": t["ve"],
                               "VE (uncentred)": t["ve_uncentred"]} for t in summary["targets"]])
        parts += [f"<h3>{html.escape(n)}</h3>",
                  _figure(a, f"{summary['mode'].capitalize()}-ablation of tags on {summary['n_prompts']} prompts: (a) "
                             "the first-order change of the mean next-token loss over the tagged tokens for every "
                             "head, (b) its VE, (c) the real change for the ablated targets with a 95% interval over "
                             "prompts, beside a control that removes the same energy per token along a random "
                             "direction" + (f"; rank correlation of first-order and real changes over "
                                            f"{rank['n_heads']} heads: {rank['spearman']:.2f}" if rank else "") + "."),
                  _table(table, floats=4),
                  _figure(b, "The release map: for each ablated target, the relative change of every later head's "
                             "output at sampled tokens.")]
        if "varying_share" in attrib.columns:  # runs of catchtag ablate before the split have no such columns
            split = tag_or_bias(attrib).sort_values("varying_share", ascending=False)
            parts += ["<h4>Tag or bias</h4>",
                      "<p class='note'>Each head's tag over the tokens it reaches, split into its constant part (its "
                      "mean: the same offset for every token, which a bias would give) and its token-dependent part "
                      "(what could carry information), as shares of the head output's energy; <i>prompt-dependent"
                      "</i>: the share of prompts with a sink other than the first token. <code>--mode constant"
                      "</code> and <code>--mode mean</code> remove each part. Heads by token-dependent share.</p>",
                      _table(split.rename(columns={"mean_sinks": "sinks", "tagged": "prompts tagged",
                                                   "prompt_dependent": "prompt-dependent",
                                                   "constant_share": "constant", "varying_share": "token-dependent"}),
                             floats=3, max_rows=15)]
    return parts


def _per_token_sections(results, folders) -> list[str]:
    from catchtag.analysis.geometry import TagGeometry
    from catchtag.analysis.pca import PcaPicture
    from catchtag.report import analysis_figures as af
    from catchtag.report.viewer import TokenView, render_view
    from catchtag.runs import read_record, repair_command

    pca_parts = ["<h2 id='pca'>Release pictures (one prompt, one head)</h2>"]
    viewer_parts = ["<h2 id='viewer'>Token viewer (one prompt)</h2>",
                    "<p class='note'>Pick a layer and head: sinks are framed, each token is coloured by the sink that "
                    "tags it, hovering shows its attention to every sink.</p>"]
    geoms, geo_notes = {}, []

    def not_drawn(n: str, why: str) -> str:
        return f"<h3>{html.escape(n)}</h3><p class='note'>Not drawn: {html.escape(why)}</p>"

    for n in results:
        folder = folders.get(n)
        views = Path(folder) / "views" if folder is not None else None
        if views is None or not (views / "views.json").is_file():
            why = ("this result was passed from memory; the per-token pictures come from a run folder written by "
                   "`catchtag scan`" if folder is None else
                   f"the run holds no per-token pictures (scanned with --no-views, from Python, or before they were "
                   f"kept). Fix: {repair_command(folder)} (without --no-views): it resumes at once and adds them")
            for section in (pca_parts, geo_notes, viewer_parts):
                section.append(not_drawn(n, why))
            continue
        info = json.loads((views / "views.json").read_text())
        notes = info.get("not_made", {})
        pic = read_record(PcaPicture, views, "pca")
        geom = read_record(TagGeometry, views, "geometry")
        if geom is not None:
            geoms[n] = geom
        else:
            geo_notes.append(not_drawn(n, notes.get("geometry", "not kept")))
        if (views / "viewer.json").is_file():
            page = render_view(json.loads((views / "viewer.json").read_text()), title=f"catchtag viewer: {n}")
            viewer_parts += [f"<h3>{html.escape(n)}: prompt {info.get('prompt_id', 0)}</h3>",
                             TokenView(page, height=560)._repr_html_()]
        else:
            viewer_parts.append(not_drawn(n, notes.get("viewer", "not kept")))
        if pic is None:
            pca_parts.append(not_drawn(n, notes.get("pca", "not kept")))
            continue
        fig = af.pca_figure(pic)
        summ = pic.summary()
        pca_parts += [f"<h3>{html.escape(n)}: head L{pic.layer}.H{pic.head}</h3>",
                      _figure(fig, f"(a) Output of head L{pic.layer}.H{pic.head} at every token of one prompt, its top "
                                   "three principal components shown as red, green and blue; sinks framed, each token "
                                   "underlined in the colour of the sink it attends to most (if at least "
                                   f"{pic.tag_level}). (b) The head's attention map with the sinks marked. (c, d) PC1 "
                                   "against PC2 of the head output and of the residual stream "
                                   f"{pic.deeper - pic.layer} layer(s) deeper, points coloured by tagging sink; the "
                                   "silhouette score says how well tokens sharing a sink cluster. (e) The deeper "
                                   "residual stream coloured like (a). Head chosen as the highest VE among heads with "
                                   "a sink beyond the first token."),
                      "<pre class='note'>" + html.escape(json.dumps(summ, indent=1, ensure_ascii=False)) + "</pre>"]
    if not geoms:
        return pca_parts + ["<h2 id='geometry'>Tag geometry</h2>", *geo_notes] + viewer_parts
    fig = af.geometry_figure(geoms)
    geo_parts = ["<h2 id='geometry'>Tag geometry</h2>", *geo_notes,
                 _figure(fig, "Left: cosine similarity between distinct residual-stream tags (W_O of each head applied "
                              "to its tag) at sampled tokens: pairs from different layers, from different heads of one "
                              "layer, and from one head at tokens tagged by different sinks; dotted: two random "
                              "directions in the model's width; shaded: ±0.05 (published: most distinct tags lie "
                              "there). Middle: cosine between a head's tag at token i and the residual stream entering "
                              "that layer at token i (published range −0.17..+0.02 shaded). "
                              "Right: the same per layer.")]
    for n, g in geoms.items():
        geo_parts.append(f"<h3>{html.escape(n)}</h3><pre class='note'>"
                         + html.escape(json.dumps(g.summary(), indent=1)) + "</pre>")
    return pca_parts + geo_parts + viewer_parts
