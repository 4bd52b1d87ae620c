"""`catchtag release`: release by decoding. Read a head's sink grouping from the residual stream at every deeper
layer, against a control with other prompts' groups."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from catchtag.errors import CatchtagError
from catchtag.jobs.options import (Job, JobConfig, at_least, batch_size_setting, between, data_setting,
                                   device_setting, dtype_setting, eps_setting, figures_setting, folder_out, heads,
                                   min_rows_setting, model_setting, seed_setting, setting)


@dataclass(frozen=True)
class ReleaseConfig(JobConfig):
    """Release by decoding: read a head's sink grouping from the residual stream at every deeper layer, against a
    control with other prompts' groups."""

    command = "release"
    positional = ("model", "data", "out")

    model: str = model_setting()
    data: Optional[str] = data_setting()
    out: Path = folder_out("runs/release", "output folder", required=True)
    heads: Optional[list] = setting(None, "heads as LAYER.HEAD,...; default: --top", "--heads", "--head",
                                    cli=Optional[str], parse=heads)
    top: int = setting(3, "the heads with the highest mean VE among those with two or more sinks",
                       check=at_least(1, 3))
    level: float = setting(0.1, "a token joins the group of the sink it attends to most, from this much",
                           check=between(0, 1, 0.1))
    eps: float = eps_setting()
    min_rows: int = min_rows_setting()
    max_tokens: Optional[int] = setting(256, "tokens per prompt", check=at_least(1, 256))
    limit: Optional[int] = setting(32, "use only the first K prompts", check=at_least(1, 32))
    batch_size: int = batch_size_setting()
    folds: int = setting(5, "cross-validation folds over prompts", check=at_least(2, 5))
    seed: int = seed_setting("seed of the control's shuffle")
    device: str = device_setting()
    dtype: str = dtype_setting()
    figures: bool = figures_setting("skip the figure")

    def check_together(self) -> None:
        if self.limit is not None and self.limit < self.folds:
            raise CatchtagError(f"--limit {self.limit} is fewer prompts than --folds {self.folds}. Fix: --limit "
                                f"{self.folds} or more")


def _top_heads(result, n_layers: int, top: int) -> list[tuple[int, int]]:
    """The ``top`` heads below the last layer by mean VE among those with two or more sinks on average."""
    h = result.heads[result.heads["layer"] < n_layers - 1]
    ph = h.groupby(["layer", "head"]).agg(ve=("ve", "mean"), sinks=("n_sinks", "mean")).reset_index()
    ph = ph[ph["sinks"] >= 2].sort_values("ve", ascending=False)
    return [(int(r.layer), int(r.head)) for r in ph.head(top).itertuples()]


def run(c: ReleaseConfig) -> dict:
    """What ``catchtag release`` does: for each head (``heads``, or the ``top`` heads by mean VE among those with two
    or more sinks on average), group tokens by the sink that tags them and decode the group from the residual
    stream entering every deeper layer, against a control with the groups of other prompts (analysis/release.py);
    writes release_decoding.csv, summary.json and a figure into OUT."""
    import pandas as pd

    from catchtag.analysis.release import decode_by_depth, sink_groups
    from catchtag.data.prompts import load_prompts
    from catchtag.engine.request import ActivationRequest
    from catchtag.models import load_model, resolve_device
    from catchtag.runs import save_figure_file, versions, write_csv
    from catchtag.scan import scan
    from catchtag.summaries import ReleaseSummary

    started = time.perf_counter()
    net, tokenizer = load_model(c.model, device=resolve_device(c.device), dtype=c.dtype)
    n_layers, n_heads = net.config.num_hidden_layers, net.config.num_attention_heads
    for l, h in c.heads or []:
        if not (0 <= l < n_layers - 1 and 0 <= h < n_heads):
            raise CatchtagError(f"--heads {l}.{h} is out of range: the model has {n_layers} layers (a head below the "
                                f"last one) x {n_heads} heads. Fix: pick heads in range")
    prompts = load_prompts(c.data, tokenizer, net, max_tokens=c.max_tokens, limit=c.limit)
    chosen = c.heads
    if not chosen:
        base = scan(net, tokenizer, prompts, eps=c.eps, min_rows=c.min_rows, batch_size=c.batch_size, progress=True)
        chosen = _top_heads(base, n_layers, c.top)
        if not chosen:
            raise CatchtagError(f"no head has two or more sinks on average at eps {c.eps}, so no grouping to decode. "
                                f"Fix: a lower --eps, or --heads")
    first = min(l for l, _ in chosen)
    request = ActivationRequest(layers=[], positions="all", hidden_states=list(range(first + 1, n_layers + 1)),
                                sink_attention=True)
    result = scan(net, tokenizer, prompts, eps=c.eps, min_rows=c.min_rows, batch_size=c.batch_size, request=request,
                  progress=True)
    cache, table = result.cache, result.heads.set_index(["prompt_id", "layer", "head"])
    n_tok = result.prompts.set_index("prompt_id")["n_tokens"]
    tables = []
    for layer, head in chosen:
        groups = [sink_groups(cache.get("sink_attention", layer=layer, head=head, prompt=pid),
                              table.loc[(pid, layer, head), "sink_positions"], c.level) for pid in cache.prompt_ids]
        features = {i: [cache["resid_pre", i][row, :int(n_tok[pid])] for row, pid in enumerate(cache.prompt_ids)]
                    for i in range(layer + 1, n_layers + 1)}
        t = decode_by_depth(groups, features, folds=c.folds, seed=c.seed, progress=f"decode head {layer}.{head}")
        t.insert(0, "head", head)
        t.insert(0, "source_layer", layer)
        tables.append(t)
    decoding = pd.concat(tables, ignore_index=True)
    out = Path(c.out)
    write_csv(decoding, out / "release_decoding.csv", float_format="%.4f")
    summary = ReleaseSummary(model=c.model, data=c.data, n_prompts=len(prompts), level=c.level, eps=c.eps,
                             min_rows=c.min_rows, folds=c.folds, heads=[list(x) for x in chosen],
                             rows=decoding.to_dict(orient="records"), seconds=time.perf_counter() - started,
                             versions=versions())
    if c.figures:
        from catchtag.report.analysis_figures import release_decoding_figure

        summary.figure = str(save_figure_file(release_decoding_figure(decoding, summary), out / "release_decoding.png"))
    summary.write(out)
    return summary


def lines(s: dict, c: ReleaseConfig) -> list[str]:
    rows = []
    for layer, head in s["heads"]:
        mine = [r for r in s["rows"] if (r["source_layer"], r["head"]) == (layer, head)]
        first, last = mine[0], mine[-1]
        rows.append(f"head {layer}.{head}: layer {first['layer']} accuracy {first['accuracy']:.3f} (control "
                    f"{first['control_accuracy']:.3f}) ... layer {last['layer']} {last['accuracy']:.3f} (control "
                    f"{last['control_accuracy']:.3f}); chance {first['chance']:.3f} (control "
                    f"{first['control_chance']:.3f})")
    rows.append(f"wrote {c.out}/release_decoding.csv, summary.json" + (", release_decoding.png" if c.figures else ""))
    return rows


JOB = Job(ReleaseConfig, run, lines)
