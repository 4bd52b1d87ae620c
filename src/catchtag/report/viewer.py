"""The token viewer: one self-contained HTML page (no network) showing, for any layer and head (or all heads),
which tokens are sinks and which sink tags each token, with the attention a token pays to each sink on hover.

Data per head is O(T * K): each token's attention to each sink, quantised to a byte (1/255 steps) and base64
encoded, so 2k tokens x hundreds of heads stay a few MB and the page renders in milliseconds.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np


_HERE = Path(__file__).parent


def view_data(result, model: str = "", prompt_id: int | None = None, start: tuple[int, int] | None = None) -> dict:
    """What the page shows, from a ScanResult made with ActivationRequest(sink_attention=True)."""
    if "sink_attention" not in result.cache:
        from catchtag.errors import CatchtagError

        raise CatchtagError("this ScanResult has no sink attention. Scan with "
                            "request=ActivationRequest(layers=[], sink_attention=True)")
    if prompt_id is None:
        prompt_id = int(result.heads["prompt_id"].iloc[0])
    return _page(result, prompt_id, model, start, lambda row, n_tokens: _head_entry(
        row, result.cache.get("sink_attention", layer=row.layer, head=row.head, prompt=prompt_id)))


def generation_view_data(result, prompt_id: int, attention: dict, columns: dict, events: dict, n_prompt: int,
                         last_step: int, model: str = "", start: tuple[int, int] | None = None) -> dict:
    """What the page shows for a written text, with a step slider: ``result`` is the scan of the finished text
    (its heads table gives each head's last sinks and VE), ``events`` each head's sinks over the steps as
    [step, positions, n_sinks] whenever they change, ``attention`` / ``columns`` each token's attention to every
    position that was ever a sink of the head. At step k the page shows the text up to the k-th written token
    (step 0: the prompt) and the sinks a scan of that text finds."""
    def entry(row, n_tokens: int) -> dict:
        key = (int(row.layer), int(row.head))
        found = _head_entry(row, attention.get(key, np.zeros((n_tokens, 0), np.float32)))
        found.update(u=[int(c) for c in columns.get(key, [])],
                     ev=[[int(k), [int(p) for p in pos], int(n)] for k, pos, n in events.get(key, [])])
        return found

    data = _page(result, prompt_id, model, start, entry)
    data["steps"] = {"prompt": int(n_prompt), "last": int(last_step)}
    return data


def _page(result, prompt_id: int, model: str, start, entry) -> dict:
    """The page's data for one prompt of ``result``: its tokens, and ``entry(row, n_tokens)`` for each head."""
    tokens = list(result.prompts.set_index("prompt_id").loc[prompt_id, "tokens"])
    heads = [[None] * result.n_heads for _ in range(result.n_layers)]
    for row in result.heads[result.heads["prompt_id"] == prompt_id].itertuples(index=False):
        heads[row.layer][row.head] = entry(row, len(tokens))
    return {"model": model or result.settings.get("model", ""), "eps": result.settings.get("eps"),
            "min_rows": result.settings.get("min_rows"), "n_layers": result.n_layers, "n_heads": result.n_heads,
            "tokens": tokens, "heads": heads, "start": _start(result, start)}


def _head_entry(row, attention) -> dict:
    """One head's part of the page: its sinks, scores, both VE forms, and each token's attention to the columns
    (bytes: 1/255 steps, base64)."""
    q = np.clip(np.rint(np.asarray(attention, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
    return {"s": [int(x) for x in row.sink_positions], "sc": [round(float(x), 4) for x in row.sink_scores],
            "ve": round(float(row.ve), 4), "vu": _rounded(getattr(row, "ve_uncentred", None)),
            "a": base64.b64encode(q.tobytes(order="C")).decode("ascii")}


def _start(result, start) -> list[int]:
    """The head to open on: the one asked for, else the highest-VE head with a sink beyond the first token, else
    the highest-VE head."""
    if start is None:
        from catchtag.analysis.pca import choose_head

        try:
            start = choose_head(result)
        except Exception:
            start = (0, 0)
    return [int(start[0]), int(start[1])]


def _rounded(x) -> float | None:
    """4 decimals, or None (JSON null) where a value is missing: JSON has no NaN."""
    return None if x is None or x != x else round(float(x), 4)


def render_view(data: dict, title: str | None = None) -> str:
    """The HTML page for ``view_data`` output (CSS and JS inline)."""
    css = (_HERE / "viewer.css").read_text()
    js = (_HERE / "viewer.js").read_text()
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False).replace("</", "<\\/")
    title = title or f"catchtag viewer: {data['model']}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{css}</style></head>
<body>
<header><h1>{html.escape(title)} — {len(data['tokens'])} tokens, eps {data['eps']}, min_rows {data['min_rows']}</h1>
<div class="controls">
<label>Layer <select id="layer"></select></label>
<label>Head <select id="head"></select></label>
{_step_controls(data)}
<span class="note">Framed tokens are sinks; every other token takes the colour of the sink it attends to most
(stronger colour = more attention). Hover a token for its attention to each sink (bytes: 1/255 steps).</span>
</div>
<div id="info"></div><div id="legend"></div></header>
<main><div id="tokens" dir="auto"></div>
<aside><h2>VE (centred) per layer (rows) and head (columns); click to pick</h2><table id="grid"></table>
<div class="scale"><span>VE 0</span><div id="scale"></div><span>1</span></div></aside></main>
<div id="tip"></div>
<script id="catchtag-data" type="application/json">{payload}</script>
<script>{js}</script>
</body></html>
"""


def _step_controls(data: dict) -> str:
    """The step slider and play button of a written text's page (nothing for a scan's)."""
    steps = data.get("steps")
    if not steps:
        return ""
    return (f'<label>Step <input type="range" id="step" min="0" max="{steps["last"]}" value="{steps["last"]}">'
            f'</label><button id="play" type="button" title="play the steps">&#9654;</button>\n')


class TokenView:
    """The viewer page shown inline in a notebook, inside an iframe so that its CSS and JS cannot touch the
    notebook's own (and the notebook's cannot touch the page). ``save(path)`` writes the same page to a file."""

    def __init__(self, page: str, height: int = 640):
        self.html, self.height = page, height

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.html, quote=True)}" title="catchtag token viewer" '
                f'style="width:100%;height:{int(self.height)}px;border:1px solid #ccc"></iframe>')

    def save(self, out) -> Path:
        from catchtag.runs import write_text

        return write_text(Path(out), self.html)
