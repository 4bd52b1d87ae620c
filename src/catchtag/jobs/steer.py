"""`catchtag steer`: push selected heads' outputs along their mean tag difference and watch the answer move."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from catchtag.errors import CatchtagError
from catchtag.interventions.modes import DEFAULT_SCALES
from catchtag.jobs.options import (REQUIRED, Job, JobConfig, at_least, batch_size_setting, device_setting,
                                   dtype_setting, figures_setting, folder_out, heads, numbers, seed_setting, setting)



def _n_prompts(flag, value):
    if value is not None:  # 0 on the command line: all of the test split (None)
        at_least(2, 64, " (one per label; 0: all of the test split)")(flag, value)


@dataclass(frozen=True)
class SteerConfig(JobConfig):
    """Add a selected head's mean tag difference (label 1 minus label 0) at its output on test prompts."""

    command = "steer"
    positional = ("probes",)

    probes: Path = setting(REQUIRED, "a finished `catchtag probe` run folder", "--probes", "-p", required=True)
    heads: Optional[list] = setting(None, "heads to steer as LAYER.HEAD,...; default: the probe run's selected heads",
                                    cli=Optional[str], parse=heads)
    top: int = setting(1, "how many selected heads to steer when --heads is not given", check=at_least(1, 1))
    scales: tuple = setting(DEFAULT_SCALES, "multiples of the mean tag difference to add", cli=str,
                            parse=numbers("-8,-4,0,4,8", required=True), cli_default="-8,-4,0,4,8")
    n_random: int = setting(2, "random directions of the same norm (the control)", check=at_least(0, 2))
    n_prompts: Optional[int] = setting(64, "test prompts to steer (balanced; 0: all of the test split)",
                                       cli=int, parse=lambda flag, v: None if v == 0 else v, check=_n_prompts)
    seed: int = seed_setting("seed of the random directions")
    batch_size: int = batch_size_setting()
    out: Optional[Path] = folder_out(None, "output folder (default PROBES/steer)")
    device: str = device_setting()
    dtype: str = dtype_setting()
    figures: bool = figures_setting("skip the figure")

    def owns(self) -> Path | None:
        return Path(self.out) if self.out is not None else Path(self.probes) / "steer"


def _probe_summary(probes: Path):
    from catchtag.summaries import ProbeSummary

    try:
        summary = ProbeSummary.read(probes)
    except CatchtagError:
        summary = {}
    if not {"selected_heads", "task", "model"} <= set(summary):
        raise CatchtagError(f"{probes} is not a finished probe run (no probe summary.json). Fix: run `catchtag "
                            f"probe --out {probes}` first")
    return summary


def run(c: SteerConfig) -> dict:
    """What ``catchtag steer`` does: read a finished probe run (``catchtag probe --out PROBES``), take its
    selected heads (or ``heads``), steer test prompts (the first ``n_prompts``, balanced; None: all) along each
    head's mean tag difference, and write steering.parquet, steering.json and a figure into OUT (default
    PROBES/steer)."""
    import numpy as np
    import pandas as pd

    from catchtag.interventions.steering import steering_curve, tag_direction
    from catchtag.jobs.probe import load_probe_inputs
    from catchtag.models import load_model
    from catchtag.report.analysis_figures import steering_figure
    from catchtag.runs import save_figure_file, write_table
    from catchtag.summaries import SteerSummary

    probes = Path(c.probes)
    summary = _probe_summary(probes)
    chosen = c.heads or [(int(r["layer"]), int(r["head"])) for r in summary["selected_heads"][:c.top]]
    if not chosen:
        raise CatchtagError("no heads to steer: the probe run selected none. Fix: pass --heads LAYER.HEAD")
    scales = c.scales if 0 in c.scales else tuple(sorted({0.0, *c.scales}))
    out = c.owns()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    net, tokenizer = load_model(summary["model"], device=c.device, dtype=c.dtype)
    inputs = load_probe_inputs(net, tokenizer, summary, probes, batch_size=c.batch_size)
    frame, result, answer_ids = inputs["frame"], inputs["result"], inputs["answer_ids"]
    train = (frame["split"] == "train").to_numpy()
    test = ~train
    labels = frame["label"].to_numpy()
    if c.n_prompts is not None:
        keep = np.zeros(len(frame), dtype=bool)
        for label in (0, 1):
            keep[np.flatnonzero(test & (labels == label))[:c.n_prompts // 2]] = True
        test = keep
    test_prompts = [p for p, t in zip(inputs["prompts"], test) if t]
    curves, directions = [], {}
    for layer, head in chosen:
        if layer not in result.cache.layers or head not in result.cache.heads:
            raise CatchtagError(f"head ({layer}, {head}) is not in the probe run's activations. Fix: pick heads the "
                                f"model has")
        head_tag = result.cache.get("z_tag", layer=layer, head=head, pos=-1).astype(np.float64)
        direction = tag_direction(head_tag[train], labels[train])
        directions[f"{layer}.{head}"] = {"norm": float(np.linalg.norm(direction)),
                                         "mean_tag_norm": float(np.linalg.norm(head_tag[train], axis=1).mean()),
                                         "mean_output_norm": float(np.linalg.norm(
                                             result.cache.get("z", layer=layer, head=head, pos=-1)[train],
                                             axis=1).mean())}
        curves.append(steering_curve(net, tokenizer, test_prompts, labels[test], answer_ids, layer, head, direction,
                                     scales=scales, n_random=c.n_random, seed=c.seed, batch_size=c.batch_size))
    table = pd.concat(curves, ignore_index=True)
    write_table(table, out / "steering.parquet")
    report = SteerSummary(model=summary["model"], task=summary["task"], probes=str(probes), heads=chosen,
                          scales=[float(s) for s in scales], n_random=c.n_random, n_test_prompts=int(test.sum()),
                          directions=directions, seconds=time.perf_counter() - started,
                          rows=table.to_dict(orient="records"))
    if c.figures:
        report.figures = [str(save_figure_file(steering_figure(table, summary, int(test.sum())), out / "steering.png"))]
    report.out = str(out) + "/"
    report.write(out)
    return report


def lines(report: dict, c: SteerConfig) -> list[str]:
    rows = []
    for layer, head in report["heads"]:
        rows.append(f"layer {layer} head {head} (|direction| {report['directions'][f'{layer}.{head}']['norm']:.3g}):")
        rows += [f"  {r['direction']:<6} scale {r['scale']:+5.1f}: log-odds shift {r['shift']:+.3f} "
                 f"± {r['shift_sem']:.3f}, accuracy {100 * r['accuracy']:.1f}%"
                 for r in report["rows"] if (r["layer"], r["head"]) == (layer, head) and r["index"] == 0]
    rows.append(f"wrote {report.get('out', '')}steering.parquet, steering.json ({report['seconds']:.0f} s)")
    return rows


JOB = Job(SteerConfig, run, lines)
