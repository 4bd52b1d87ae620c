"""What the ablation tables of ``catchtag ablate`` say (pure: tables in, tables and rows out): which heads to
ablate when none are named, and per target the loss change with its interval beside its control's, the first-order
estimate, VE and the tag-or-bias split of its heads."""

from __future__ import annotations

import pandas as pd

from catchtag.analysis.common import mean_interval
from catchtag.analysis.release import tag_or_bias


def ablation_targets(heads, top: int, group: str | None, attribution: pd.DataFrame) -> list:
    """[(name, [(layer, head), ...])]: what to ablate, from ``heads``, ``group`` (layer, all) or the ``top`` heads by
    the size of their mean first-order estimate over the prompts (0 on a prompt where the head tags nothing)."""
    if heads:
        return [(f"{l}.{h}", [(l, h)]) for l, h in heads]
    with_sink = attribution[attribution["n_sinks"] > 0]
    if group == "layer":
        return [(f"layer {l}", sorted({(int(l), int(h)) for h in g["head"].unique()}))
                for l, g in with_sink.groupby("layer")]
    if group == "all":
        return [("all", sorted({(int(r.layer), int(r.head)) for r in with_sink[["layer", "head"]]
                                .drop_duplicates().itertuples()}))]
    est = attribution.assign(estimate=attribution["estimate"].fillna(0.0))
    heads_with = set(map(tuple, with_sink[["layer", "head"]].drop_duplicates().to_numpy().tolist()))
    mean = est.groupby(["layer", "head"])["estimate"].mean().abs().sort_values(ascending=False)
    mean = mean[[lh in heads_with for lh in mean.index]]
    return [(f"{l}.{h}", [(int(l), int(h))]) for l, h in list(mean.index[:top])]


def per_head(attribution: pd.DataFrame) -> pd.DataFrame:
    """One row per head: estimate, the expected change per prompt of the data (0 where the head tags nothing);
    estimate_tagged, the mean over the prompts where it tags something (the basis of the real changes); mean VE
    and sinks."""
    return attribution.assign(data_wide=attribution["estimate"].fillna(0.0)).groupby(["layer", "head"]).agg(
        estimate=("data_wide", "mean"), estimate_tagged=("estimate", "mean"), ve=("ve", "mean"),
        ve_uncentred=("ve_uncentred", "mean"), mean_sinks=("n_sinks", "mean")).reset_index()


def ablation_rows(attribution: pd.DataFrame, ablation: pd.DataFrame, targets: list) -> tuple[list[dict], dict | None]:
    """Per target: the mean loss change over the prompts it tags with its 95% interval, its control's (averaged
    over draws per prompt), the summed first-order estimate, VE and the tag-or-bias split of its heads; and the
    Spearman correlation of first-order and real changes when three or more single heads were ablated."""
    heads = per_head(attribution).set_index(["layer", "head"])
    split = tag_or_bias(attribution).set_index(["layer", "head"])
    rows = []
    for name, group_heads in targets:
        t = ablation[ablation["target"] == name]
        real = t[t["kind"] == "ablation"].groupby("prompt_id")["delta_nll"].mean()
        ctrl = t[t["kind"] == "control"].groupby("prompt_id")["delta_nll"].mean()
        m, lo, hi = mean_interval(real.to_numpy())
        cm, clo, chi = mean_interval(ctrl.to_numpy())
        est = heads.loc[group_heads]
        rows.append({"target": name, "heads": [list(x) for x in group_heads],
                     "n_prompts_tagged": int(real.notna().sum()), "delta_nll": m,
                     "ci": [lo, hi], "control_delta_nll": cm, "control_ci": [clo, chi],
                     "attribution": float(est["estimate_tagged"].sum()), "ve": float(est["ve"].mean()),
                     "ve_uncentred": float(est["ve_uncentred"].mean()), "mean_sinks": float(est["mean_sinks"].mean()),
                     **{k: float(split.reindex(group_heads)[k].mean())
                        for k in ("constant_share", "varying_share", "prompt_dependent")}})
    singles = [r for r in rows if len(r["heads"]) == 1]
    rank = None
    if len(singles) >= 3:
        rho = pd.Series([r["attribution"] for r in singles]).corr(pd.Series([r["delta_nll"] for r in singles]),
                                                                 method="spearman")
        rank = {"spearman": float(rho), "n_heads": len(singles)}
    return rows, rank
