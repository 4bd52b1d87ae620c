"""Release by decoding: is the grouping a head's sinks make still linearly readable deeper in the residual stream?

For a head (l, h), each token is put in the group of the sink it attends to most (its tag's main source), when that
attention is at least ``level``; groups are numbered by the sink's order on the prompt (0: the earliest sink), the
sinks themselves and tokens below the level are left out. A linear probe (multinomial logistic regression on
standardised features) reads the group from the residual stream entering each deeper layer, trained and tested on
different prompts (grouped k-fold). The control keeps every token's position but takes its group from another
prompt (a fixed derangement of the prompts): the tokens in play in both prompts at the same position, no tie to the
tokens' own sinks. Its labels are a function of position like the real ones, and a residual stream carries position,
so the control can read above its own chance; each label set's chance (its largest group's share) is reported, and
accuracies are compared each to its own chance. Accuracy is the mean over prompts of the held-out accuracy, with a
95% interval over prompts (mean ± 1.96 standard errors, cut to [0, 1]).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from catchtag.analysis.common import mean_interval
from catchtag.errors import CatchtagError


def tag_or_bias(attribution: pd.DataFrame) -> pd.DataFrame:
    """Per head with a sink, from the ablation's per-prompt table (``catchtag ablate``'s attribution.parquet): how
    much of its output is a constant offset and how much could carry information. Columns: mean_sinks, the share of
    prompts with a sink at all (``tagged``) and with one that is not the first token (``prompt_dependent``: a sink
    that moves with the prompt), and the mean over tagged prompts of the tag's constant part's and token-dependent
    part's energy as shares of the head output's energy (``constant_share``, ``varying_share``; their sum is the
    tag's own energy share, at most the uncentred VE, which also counts the rest of the output that lies in the sink
    values' span)."""
    a = attribution
    tagged = a["n_sinks"] > 0
    out = a.assign(tagged=tagged, prompt_dependent=a["n_sinks_after_first"] > 0).groupby(["layer", "head"]).agg(
        mean_sinks=("n_sinks", "mean"), tagged=("tagged", "mean"), prompt_dependent=("prompt_dependent", "mean"),
        constant_share=("constant_share", "mean"), varying_share=("varying_share", "mean")).reset_index()
    return out[out["tagged"] > 0].reset_index(drop=True)


def sink_groups(sink_attention: np.ndarray, sink_positions, level: float = 0.1) -> np.ndarray:
    """(T,) group of each token (index of the sink it attends to most, in the order of ``sink_positions`` sorted
    by position; -1: below ``level``, or a sink itself) from its (T, K) attention to the head's K sinks."""
    a = np.asarray(sink_attention, dtype=np.float64)
    T = a.shape[0]
    groups = np.full(T, -1)
    if a.shape[1] == 0:
        return groups
    order = np.argsort(np.asarray(sink_positions))  # columns in position order
    a = a[:, order]
    best = a.argmax(axis=1)
    groups = np.where(a.max(axis=1) >= level, best, -1)
    groups[np.asarray(sink_positions, dtype=int)] = -1
    return groups


def _derangement(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if n < 2 or not (p == np.arange(n)).any():
            return p


def decode_by_depth(groups: list[np.ndarray], features: dict[int, list[np.ndarray]], folds: int = 5,
                    seed: int = 0, progress: str | None = None, n_jobs: int = -1) -> pd.DataFrame:
    """One row per layer: held-out accuracy of reading the groups from that layer's features (mean over prompts,
    95% interval), the same for the control, each label set's chance (its largest group's share) and counts.

    groups: per prompt, (T_p,) group labels (-1: left out); features: layer -> per prompt (T_p, d) arrays.
    progress: a label for a progress bar over the layers (None: no bar). n_jobs: layers decoded at once (joblib;
    -1: one per core); the probes are small, so cores help more than a multithreaded BLAS inside one fit."""
    from joblib import Parallel, delayed

    n = len(groups)
    if n < folds:
        raise CatchtagError(f"decoding needs at least {folds} prompts (one per fold), got {n}. Fix: more prompts "
                            f"(--limit)")
    perm = _derangement(n, seed)
    control = []
    for p in range(n):  # the group another prompt has at the same position (-1 where it has none)
        other = groups[perm[p]]
        g = np.full(len(groups[p]), -1)
        m = min(len(g), len(other))
        g[:m] = other[:m]
        g[groups[p] < 0] = -1  # the same tokens in play as in the real labels
        control.append(g)
    if len(np.unique(np.concatenate([g[g >= 0] for g in groups]))) < 2:
        raise CatchtagError("the tokens fall into fewer than two sink groups, so there is nothing to decode. "
                            "Fix: a head with two or more sinks on most prompts, or a lower --level")
    layers = sorted(features)
    jobs = Parallel(n_jobs=n_jobs, return_as="generator")(
        delayed(_decode_layer)(layer, features[layer], groups, control, folds) for layer in layers)
    if progress:
        from catchtag.progress import progress_bar

        jobs = progress_bar(jobs, total=len(layers), desc=progress, unit="layer")
    return pd.DataFrame(list(jobs))


def _decode_layer(layer: int, features: list[np.ndarray], groups, control, folds: int) -> dict:
    """decode_by_depth's row for one layer (a function of its own, so that joblib can run layers side by side)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    row = {"layer": layer}
    for kind, labels in (("", groups), ("control_", control)):
        X = np.concatenate([f[g >= 0] for f, g in zip(features, labels)])
        y = np.concatenate([g[g >= 0] for g in labels])
        prompt = np.concatenate([np.full(int((g >= 0).sum()), p) for p, g in enumerate(labels)])
        correct = np.zeros(len(y), dtype=bool)
        for train, test in GroupKFold(n_splits=folds).split(X, y, prompt):
            if len(np.unique(y[train])) < 2:
                correct[test] = y[test] == y[train][0]
                continue
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=300))
            probe.fit(X[train], y[train])
            correct[test] = probe.predict(X[test]) == y[test]
        per_prompt = pd.Series(correct).groupby(prompt).mean().to_numpy()
        m, low, high = mean_interval(per_prompt)  # grouped folds: at least two prompts
        row.update({f"{kind}accuracy": m, f"{kind}ci_low": max(low, 0.0), f"{kind}ci_high": min(high, 1.0)})
        row.update({f"{kind}chance": float(np.bincount(y).max() / len(y)), f"{kind}n_tokens": int(len(y))})
        if not kind:
            row.update({"n_groups": int(len(np.unique(y))), "n_prompts": int(len(per_prompt))})
    return row
