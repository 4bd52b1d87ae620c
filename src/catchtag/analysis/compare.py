"""Models side by side (docs/analyses.md): sinks per head, VE per head, share of high-VE heads, per-layer means.

Every number is computed from the runs' tables (``catchtag scan`` folders or ScanResults), so two models
scanned on the same prompts compare directly. Layers are also given as relative depth (layer / (L - 1)),
since models have different numbers of layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from catchtag.errors import CatchtagError
from catchtag.result import ScanResult


@dataclass
class Comparison:
    """summary: one row per run; per_head: run, layer, head, mean sinks and VE (centred ``ve`` and uncentred
    ``ve_uncentred``, docs/method.md) over prompts; per_layer: run, layer, relative depth, mean sinks and both VEs
    over prompts and heads."""

    summary: pd.DataFrame
    per_head: pd.DataFrame
    per_layer: pd.DataFrame
    ve_level: float


def load_runs(runs) -> dict[str, ScanResult]:
    """Run folders / ScanResults -> {name: ScanResult}; names are the scanned model (folder name on clashes)."""
    if isinstance(runs, dict):
        return {str(k): (v if isinstance(v, ScanResult) else ScanResult.load(v)) for k, v in runs.items()}
    if isinstance(runs, (str, Path, ScanResult)):
        runs = [runs]
    out: dict[str, ScanResult] = {}
    for run in runs:
        if not isinstance(run, (str, Path, ScanResult)):
            raise CatchtagError(f"a run is a folder written by `catchtag scan` (a str or Path) or a ScanResult, got "
                                f"{run!r} ({type(run).__name__}). Fix: e.g. compare_runs(['runs/a', 'runs/b'])")
        result = run if isinstance(run, ScanResult) else ScanResult.load(run)
        name = str(result.settings.get("model") or (Path(run).name if not isinstance(run, ScanResult) else "run"))
        if name in out and not isinstance(run, ScanResult):  # the same model twice: the folder tells them apart,
            parts = Path(run).absolute().parts                 # with as many of its parents as that takes
            for depth in range(2, len(parts) + 1):
                name = "/".join(parts[-depth:])
                if name not in out:
                    break
        n = 2
        while name in out:  # still taken (the same folder twice, or results from memory)
            name, n = f"{name.rsplit(' (', 1)[0]} ({n})", n + 1
        out[name] = result
    if not out:
        raise CatchtagError("no runs given. Pass one or more folders written by `catchtag scan`")
    return out


def compare_runs(runs, ve_level: float = 0.3) -> Comparison:
    """Compare scans of several models (folders or ScanResults, or a {name: run} dict)."""
    results = load_runs(runs)
    summaries, per_head, per_layer = [], [], []
    prompt_sets = {}
    for name, r in results.items():
        h = r.heads
        prompt_sets[name] = int(h["prompt_id"].nunique())
        with_sink = h[h["n_sinks"] > 0]
        if "ve_uncentred" not in h:  # runs scanned before the column existed: unknown, not the centred value
            h = h.assign(ve_uncentred=float("nan"))
        unc = "ve_uncentred"
        ph = h.groupby(["layer", "head"]).agg(sinks=("n_sinks", "mean"), ve=("ve", "mean"),
                                              ve_uncentred=(unc, "mean")).reset_index()
        ph.insert(0, "run", name)
        per_head.append(ph)
        pl = h.groupby("layer").agg(sinks=("n_sinks", "mean"), ve=("ve", "mean"), ve_uncentred=(unc, "mean"),
                                    share_ve_above=("ve", lambda v: float((v > ve_level).mean()))).reset_index()
        pl.insert(0, "run", name)
        pl["depth"] = pl["layer"] / max(1, r.n_layers - 1)
        per_layer.append(pl)
        beyond_first = h["sink_positions"].apply(lambda p: sum(int(x) > 0 for x in p))
        summaries.append({
            "run": name, "n_prompts": prompt_sets[name], "n_layers": r.n_layers, "n_heads": r.n_heads,
            "eps": r.settings.get("eps"), "min_rows": r.settings.get("min_rows"),
            "mean_sinks_per_head": float(h["n_sinks"].mean()),
            "mean_sinks_beyond_first": float(beyond_first.mean()),
            "share_heads_with_sink": float((h["n_sinks"] > 0).mean()),
            "mean_ve": float(h["ve"].mean()),
            "mean_ve_heads_with_sink": float(with_sink["ve"].mean()) if len(with_sink) else 0.0,
            "median_ve_heads_with_sink": float(with_sink["ve"].median()) if len(with_sink) else 0.0,
            f"share_ve_above_{ve_level}": float((h["ve"] > ve_level).mean()),
            f"share_head_means_ve_above_{ve_level}": float((ph["ve"] > ve_level).mean()),
            "max_head_mean_ve": float(ph["ve"].max()),
            # the uncentred share (energy, the mean direction included): the form to set beside published numbers
            "mean_ve_uncentred": float(h[unc].mean()),
            "mean_ve_uncentred_heads_with_sink": float(h.loc[h["n_sinks"] > 0, unc].mean())
            if len(with_sink) else 0.0,
        })
    return Comparison(pd.DataFrame(summaries), pd.concat(per_head, ignore_index=True),
                      pd.concat(per_layer, ignore_index=True), ve_level)
