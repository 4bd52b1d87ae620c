"""Steering with tags (beyond the paper): push a head's output along its mean tag difference and watch
the model's answer move.

For a selected head (layer, head), the direction is the mean head-space tag at the last token of the
train prompts with label 1 (TRUE / POSITIVE) minus that of label 0. On test prompts we add
``scale * direction`` to that head's output (before W_O) at the last token, through the engine's
``ActivationRequest(steer=...)``, and read the log-odds of the two answer tokens,
log p(label-1 answer) - log p(label-0 answer). Control: random head-space directions of the same norm.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from catchtag.analysis.answers import answer_logprobs
from catchtag.errors import CatchtagError
from catchtag.report.figures import new_figure, save_figure

__all__ = ["answer_logprobs", "random_directions", "run_steer", "steering_curve", "tag_direction"]

DEFAULT_SCALES = (-8.0, -4.0, 0.0, 4.0, 8.0)


def tag_direction(head_tag: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean head-space tag of label 1 minus label 0. head_tag: (n_prompts, dim); labels: (n_prompts,) 0/1."""
    labels = np.asarray(labels)
    if head_tag.ndim != 2 or len(head_tag) != len(labels):
        raise CatchtagError(f"head_tag must be (n_prompts, dim) with one label per prompt, got {head_tag.shape} "
                            f"and {labels.shape}")
    if set(np.unique(labels)) != {0, 1}:
        raise CatchtagError("tag_direction needs both labels (0 and 1) among the prompts")
    return head_tag[labels == 1].mean(axis=0) - head_tag[labels == 0].mean(axis=0)


def random_directions(norm: float, dim: int, n: int, seed: int = 0) -> np.ndarray:
    """n Gaussian directions in head space, each rescaled to ``norm`` (the control)."""
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, dim))
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True) * norm


def steering_curve(model, tokenizer, prompts, labels, answer_ids, layer: int, head: int, direction: np.ndarray,
                   scales=DEFAULT_SCALES, n_random: int = 3, seed: int = 0, batch_size: int = 8,
                   progress: bool = True) -> pd.DataFrame:
    """Steer (layer, head) by scale * direction (and by random directions of the same norm) on ``prompts``.

    Returns one row per (direction kind, direction index, scale): mean log-odds of label 1 vs label 0,
    its shift from the unsteered run, the mean probability of label 1 among the two answers, and the
    accuracy of the two-way answer. labels: (n_prompts,) 0/1; answer_ids: [label-0 token, label-1 token].
    """
    labels = np.asarray(labels)
    direction = np.asarray(direction, dtype=np.float64)
    norm = float(np.linalg.norm(direction))
    if norm == 0:
        raise CatchtagError(f"the tag direction of head ({layer}, {head}) is zero (no sink tags the last token "
                            f"there); pick another head")
    base = answer_logprobs(model, tokenizer, prompts, answer_ids, batch_size=batch_size)
    base_odds = base[:, 1] - base[:, 0]
    kinds = [("tag", 0, direction)]
    kinds += [("random", i, r) for i, r in enumerate(random_directions(norm, direction.size, n_random, seed))]
    rows = []
    total = len(kinds) * sum(1 for s in scales if s != 0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"steer L{layer}H{head}", unit="run", dynamic_ncols=True)
    for kind, index, vec in kinds:
        for scale in scales:
            if scale == 0:
                lp = base
            else:
                lp = answer_logprobs(model, tokenizer, prompts, answer_ids, batch_size=batch_size,
                                     steer={(layer, head): (scale * vec).astype(np.float32)})
                if bar is not None:
                    bar.update(1)
            odds = lp[:, 1] - lp[:, 0]
            p1 = 1.0 / (1.0 + np.exp(-odds))
            rows.append({"layer": layer, "head": head, "direction": kind, "index": index, "scale": float(scale),
                         "norm": norm * abs(scale), "mean_log_odds": float(odds.mean()),
                         "shift": float((odds - base_odds).mean()),
                         "shift_sem": float((odds - base_odds).std(ddof=1) / np.sqrt(len(odds))) if len(odds) > 1 else 0.0,
                         "p_label1": float(p1.mean()), "accuracy": float(((odds > 0).astype(int) == labels).mean())})
    if bar is not None:
        bar.close()
    return pd.DataFrame(rows)


def run_steer(probes: str | Path, *, heads: Sequence[tuple[int, int]] | None = None, top: int = 1,
              scales=DEFAULT_SCALES, n_random: int = 2, n_prompts: int | None = 64, seed: int = 0, batch_size: int = 8,
              out: str | Path | None = None, device: str = "auto", dtype: str = "auto",
              figures: bool = True) -> dict:
    """What ``catchtag steer`` does: read a finished probe run (``catchtag probe --out PROBES``), take its
    selected heads (or ``heads``), steer test prompts (the first ``n_prompts``, balanced; None: all) along each head's mean tag difference, and write
    steering.parquet, steering.json and a figure into OUT (default PROBES/steer)."""
    from catchtag.analysis.probes import load_probe_inputs
    from catchtag.models import load_model

    probes = Path(probes)
    summary_path = probes / "summary.json"
    if not summary_path.is_file():
        raise CatchtagError(f"{probes} is not a finished probe run (no summary.json). Fix: run `catchtag probe "
                            f"--out {probes}` first")
    summary = json.loads(summary_path.read_text())
    if heads is None:
        heads = [(int(r["layer"]), int(r["head"])) for r in summary["selected_heads"][:top]]
    if not heads:
        raise CatchtagError("no heads to steer: the probe run selected none. Fix: pass --head LAYER.HEAD")
    if not list(scales) or 0 not in [float(s) for s in scales]:
        scales = sorted({0.0, *map(float, scales)})
    out = Path(out) if out is not None else probes / "steer"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    net, tokenizer = load_model(summary["model"], device=device, dtype=dtype)
    inputs = load_probe_inputs(net, tokenizer, summary, probes, batch_size=batch_size)
    frame, result, answer_ids = inputs["frame"], inputs["result"], inputs["answer_ids"]
    train = (frame["split"] == "train").to_numpy()
    test = ~train
    labels = frame["label"].to_numpy()
    if n_prompts is not None:
        if n_prompts < 2:
            raise CatchtagError(f"--n-prompts must be >= 2 (one per label), got {n_prompts}")
        keep = np.zeros(len(frame), dtype=bool)
        for label in (0, 1):
            keep[np.flatnonzero(test & (labels == label))[:n_prompts // 2]] = True
        test = keep
    test_prompts = [p for p, t in zip(inputs["prompts"], test) if t]
    curves = []
    directions = {}
    for layer, head in heads:
        if layer not in result.activation_layers or head not in result.activation_heads:
            raise CatchtagError(f"head ({layer}, {head}) is not in the probe run's activations")
        li, hi = result.activation_layers.index(layer), result.activation_heads.index(head)
        head_tag = result.activations["head_tag"][:, li, hi, 0, :].astype(np.float64)
        direction = tag_direction(head_tag[train], labels[train])
        directions[f"{layer}.{head}"] = {"norm": float(np.linalg.norm(direction)),
                                         "mean_tag_norm": float(np.linalg.norm(head_tag[train], axis=1).mean()),
                                         "mean_output_norm": float(np.linalg.norm(
                                             result.activations["head_full"][train, li, hi, 0, :], axis=1).mean())}
        curves.append(steering_curve(net, tokenizer, test_prompts, labels[test], answer_ids, layer, head, direction,
                                     scales=scales, n_random=n_random, seed=seed, batch_size=batch_size))
    table = pd.concat(curves, ignore_index=True)
    table.to_parquet(out / "steering.parquet", index=False)
    report = {"model": summary["model"], "task": summary["task"], "probes": str(probes), "heads": heads,
              "scales": [float(s) for s in scales], "n_random": n_random, "n_test_prompts": int(test.sum()),
              "directions": directions, "seconds": time.perf_counter() - started,
              "rows": table.to_dict(orient="records")}
    if figures:
        report["figures"] = [str(steering_figure(table, summary, out / "steering.png", int(test.sum())))]
    report["out"] = str(out) + "/"
    (out / "steering.json").write_text(json.dumps(report, indent=1))
    return report


def steering_figure(table: pd.DataFrame, summary: dict, path: str | Path, n_prompts: int | str = "?") -> Path:
    """One panel per steered head: mean shift of the answer log-odds against the steering scale, for the
    tag direction and for each random direction of the same norm (error bars: standard error over prompts)."""
    import matplotlib

    matplotlib.use("Agg")

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
    return save_figure(fig, path)
