"""Threshold sweep (docs/analyses.md): mean sinks per head vs mean VE as eps goes from 0.03 to 0.4.

All thresholds come from one forward pass: ``scan(..., sweep_eps=SWEEP_EPS)`` evaluates the nested sink sets
of every eps at once and fills ``ScanResult.sweep``; this module only aggregates that table.
"""

from __future__ import annotations

import pandas as pd

from catchtag.errors import CatchtagError

SWEEP_EPS = (0.03, 0.05, 0.07, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.35, 0.4)


def sweep_table(result) -> pd.DataFrame:
    """One row per eps: mean sinks per head, share of heads with a sink, mean VE over all heads and over heads
    with a sink in both forms (``ve``: centred; ``ve_uncentred``: the form to set next to published numbers), mean
    R^2 (means over prompts x layers x heads). Runs scanned before the sweep kept the uncentred form give nan
    there."""
    sw = getattr(result, "sweep", None)
    if sw is None or sw.empty:
        raise CatchtagError("this run has no threshold sweep. Fix: scan with --sweep "
                            + ",".join(map(str, SWEEP_EPS)) + " (or use `catchtag sweep`, which does)")
    rows = []
    if "ve_uncentred" not in sw:
        sw = sw.assign(ve_uncentred=float("nan"))
    for eps, g in sw.groupby("eps"):
        has = g[g["n_sinks"] > 0]
        rows.append({"eps": float(eps), "mean_sinks_per_head": float(g["n_sinks"].mean()),
                     "share_heads_with_sink": float((g["n_sinks"] > 0).mean()),
                     "mean_ve": float(g["ve"].mean()),
                     "mean_ve_heads_with_sink": float(has["ve"].mean()) if len(has) else 0.0,
                     "mean_ve_uncentred": float(g["ve_uncentred"].mean()),
                     "mean_ve_uncentred_heads_with_sink": float(has["ve_uncentred"].mean()) if len(has) else 0.0,
                     "mean_r2": float(g["r2"].mean())})
    return pd.DataFrame(rows).sort_values("eps", ignore_index=True)


def sweep_runs(runs) -> pd.DataFrame:
    """sweep_table of several runs stacked, with a ``run`` column (names as in compare.load_runs)."""
    from catchtag.analysis.compare import load_runs

    tables = []
    for name, result in load_runs(runs).items():
        t = sweep_table(result)
        t.insert(0, "run", name)
        tables.append(t)
    return pd.concat(tables, ignore_index=True)
