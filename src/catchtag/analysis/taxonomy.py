"""Sink-token taxonomy (docs/analyses.md): which token strings become sinks, how often, in how many heads, and
with what VE; and which kinds of token they are beyond the first position.

Kinds (our choice, fixed and documented): ``first`` (position 0, usually BOS), ``punctuation`` (only
punctuation/symbol characters), ``whitespace`` (only spaces/newlines/tabs), ``function word`` (a fixed English
list below, case-insensitive, surrounding space ignored), ``other``.
"""

from __future__ import annotations

import string

import pandas as pd

KINDS = ("first", "punctuation", "whitespace", "function word", "other")

FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no all both either neither
i me my mine you your yours he him his she her hers it its we us our ours they them their theirs
who whom whose which what where when why how
and or but nor so yet if then than because while although though since unless until whether as
of in on at to for from by with without about into onto over under after before between through during
against among within upon off out up down near per via
is am are was were be been being do does did done have has had having
will would shall should can could may might must not
there here also just only very too more most such own same other
""".split())

_PUNCT = set(string.punctuation) | set("“”‘’–—…«»·•")


def token_kind(token: str, position: int | None = None) -> str:
    """The kind of a sink token string (see module docstring); position 0 is always ``first``."""
    if position == 0:
        return "first"
    if token == "" or token.isspace():
        return "whitespace"
    stripped = token.strip()
    if all(c in _PUNCT for c in stripped):
        return "punctuation"
    if stripped.lower() in FUNCTION_WORDS:
        return "function word"
    return "other"


def sink_rows(result) -> pd.DataFrame:
    """One row per (prompt, layer, head, sink): position, token, kind, column score, the head's VE."""
    from catchtag.errors import CatchtagError

    if not isinstance(getattr(result, "heads", None), pd.DataFrame):
        raise CatchtagError(f"expected a ScanResult (catchtag.scan(...) or ScanResult.load(RUN)), got "
                            f"{type(result).__name__}. Fix: pass the result of a scan")
    h = result.heads[result.heads["n_sinks"] > 0]
    rows = h.explode(["sink_positions", "sink_tokens", "sink_scores"]).rename(
        columns={"sink_positions": "position", "sink_tokens": "token", "sink_scores": "score"})
    rows["position"] = rows["position"].astype(int)
    rows["score"] = rows["score"].astype(float)
    rows["kind"] = [token_kind(t, p) for t, p in zip(rows["token"], rows["position"])]
    return rows[["prompt_id", "layer", "head", "position", "token", "kind", "score", "ve", "n_sinks"]]


def sink_taxonomy(result, top: int | None = None) -> pd.DataFrame:
    """Per sink token string (first position kept apart as its own row): times a sink, number of distinct
    (layer, head) pairs, mean column score, mean VE of the heads it is a sink of, its kind."""
    rows = sink_rows(result)
    if rows.empty:
        return pd.DataFrame(columns=["token", "kind", "count", "n_heads", "n_prompts", "mean_score", "mean_ve"])
    rows = rows.assign(key=[("<first> " + t) if k == "first" else t for t, k in zip(rows["token"], rows["kind"])],
                       layer_head=rows["layer"].astype(str) + "." + rows["head"].astype(str))
    table = rows.groupby("key").agg(token=("token", "first"), kind=("kind", "first"), count=("ve", "size"),
                                    n_heads=("layer_head", "nunique"), n_prompts=("prompt_id", "nunique"),
                                    mean_score=("score", "mean"), mean_ve=("ve", "mean"))
    table = table.sort_values("count", ascending=False).reset_index(drop=True)
    table["share"] = table["count"] / table["count"].sum()
    return table.head(top) if top else table


def kind_shares(result) -> pd.DataFrame:
    """Per kind: number of sink occurrences, share of all sinks, share of the sinks beyond the first position,
    distinct token strings, mean VE."""
    rows = sink_rows(result)
    total = max(1, len(rows))
    beyond = max(1, int((rows["kind"] != "first").sum()))
    out = []
    for kind in KINDS:
        g = rows[rows["kind"] == kind]
        out.append({"kind": kind, "count": len(g), "share": len(g) / total,
                    "share_beyond_first": (len(g) / beyond) if kind != "first" else float("nan"),
                    "n_token_strings": int(g["token"].nunique()),
                    "mean_ve": float(g["ve"].mean()) if len(g) else float("nan")})
    return pd.DataFrame(out)
