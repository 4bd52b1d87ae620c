"""`catchtag ablate`: release, causally. Remove heads' tags and measure the next-token loss over the tagged tokens
(with random-direction controls), a first-order estimate for every head, and which later heads change."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from catchtag.errors import CatchtagError
from catchtag.interventions.modes import check_mode
from catchtag.jobs.options import (Job, JobConfig, at_least, batch_size_setting, data_setting, device_setting,
                                   dtype_setting, eps_setting, figures_setting, folder_out, heads, min_rows_setting,
                                   model_setting, one_of, seed_setting, setting)


@dataclass(frozen=True)
class AblateConfig(JobConfig):
    """Release, causally: remove heads' tags and measure the next-token loss over the tagged tokens (with controls),
    a first-order estimate for every head, and which later heads change (OUT/ablate/)."""

    command = "ablate"
    positional = ("model", "data", "out")

    model: str = model_setting()
    data: Optional[str] = data_setting()
    out: Path = folder_out("runs/ablate", "run folder (a scan's, or a new one): writes OUT/ablate/", required=True)
    heads: Optional[list] = setting(None, "heads to ablate as LAYER.HEAD,...; default: --top", cli=Optional[str],
                                    parse=heads)
    top: int = setting(8, "ablate the heads with the largest first-order loss change", check=at_least(1, 8))
    group: Optional[str] = setting(None, "layer (every head with a sink in a layer at once) or all",
                                   check=one_of("layer", "all"))
    mode: str = setting("mean", "mean (the tag replaced by its prompt mean: its token-dependent part removed), "
                                "constant (its mean removed: the constant part) or zero (the tag removed)",
                        check=lambda flag, value: check_mode(value))
    controls: int = setting(2, "random-direction controls of the same energy per target and prompt (each prompt "
                               "draws its own directions)", check=at_least(0, 3))
    eps: float = eps_setting()
    min_rows: int = min_rows_setting()
    max_tokens: Optional[int] = setting(256, "tokens per prompt", check=at_least(1, 256))
    limit: Optional[int] = setting(32, "use only the first K prompts", check=at_least(1, 32))
    batch_size: int = batch_size_setting()
    seed: int = seed_setting("seed of the controls' random directions")
    device: str = device_setting()
    dtype: str = dtype_setting()
    figures: bool = figures_setting()
    progress: bool = setting(True, "progress bars", python_only=True)

    def lock_folder(self) -> Path:
        return Path(self.out) / "ablate"  # a scan may be resuming in OUT itself

    def check_together(self) -> None:
        scan_manifest = Path(self.out) / "run.json"
        if scan_manifest.is_file():  # ablating into a scan's folder: the same model, or the report would mix them
            try:
                scanned = json.loads(scan_manifest.read_text()).get("model")
            except ValueError:
                scanned = None
            if scanned is not None and scanned != self.model:
                raise CatchtagError(f"{self.out} holds a scan of {scanned}, not of {self.model}: its report would show "
                                    f"this ablation under the other model. Fix: another --out, or -m {scanned}")


def run(c: AblateConfig) -> dict:
    """What ``catchtag ablate`` does, into OUT/ablate/: a first-order attribution for every head (one forward and
    one backward pass per batch), real ablations of the chosen heads or groups with random-direction controls
    (loss change over the tagged tokens, 95% interval over prompts), the release map (which later heads change),
    tables, figures and summary.json. Resumable: each finished batch of each phase is saved as it goes; a second
    process on the same --out stops at once (the job's lock on OUT/ablate)."""
    from catchtag.analysis.ablation import ablation_rows, ablation_targets, per_head
    from catchtag.analysis.release import tag_or_bias
    from catchtag.data.prompts import load_prompts
    from catchtag.engine.request import SinkSettings
    from catchtag.interventions import ablation as ab
    from catchtag.models import load_model, resolve_device
    from catchtag.runs import PhaseParts, prompts_sha1, save_figure_file, versions, write_csv, write_table
    from catchtag.summaries import AblateSummary

    started = time.perf_counter()
    settings = SinkSettings(eps=c.eps, min_rows=c.min_rows)
    net, tokenizer = load_model(c.model, device=resolve_device(c.device), dtype=c.dtype)
    n_layers, n_heads = net.config.num_hidden_layers, net.config.num_attention_heads
    for l, h in c.heads or []:
        if not (0 <= l < n_layers and 0 <= h < n_heads):
            raise CatchtagError(f"--heads {l}.{h} is out of range: the model has {n_layers} layers x {n_heads} heads "
                                f"(0-based). Fix: pick heads in range")
    prompts = load_prompts(c.data, tokenizer, net, max_tokens=c.max_tokens, limit=c.limit)
    folder = Path(c.out) / "ablate"
    manifest = {"model": c.model, "prompts_sha1": prompts_sha1(prompts),
                "eps": c.eps, "min_rows": c.min_rows, "mode": c.mode, "seed": c.seed, "controls": c.controls,
                "control_directions": "per prompt",
                "heads": [list(x) for x in c.heads] if c.heads else None, "top": c.top, "group": c.group,
                "batch_size": c.batch_size}
    parts = PhaseParts(folder, manifest, what="an ablation")
    batches = [prompts[i:i + c.batch_size] for i in range(0, len(prompts), c.batch_size)]
    positions = ab.sample_positions(min(len(p.input_ids) for p in prompts))

    # phase 1: the first-order attribution of every head (and each head's sinks, VE and tag split on these prompts)
    t0 = time.perf_counter()
    attrib = parts.run("attribution", batches, lambda batch: ab.attribution_rows(net, tokenizer, batch, settings,
                                                                                 c.mode),
                       desc="attribution", progress=c.progress)
    attribution_seconds = time.perf_counter() - t0
    targets = ablation_targets(c.heads, c.top, c.group, attrib)
    if not targets or not any(t for _, t in targets):
        raise CatchtagError(f"nothing to ablate: no head has a sink on these prompts at eps {c.eps}, min_rows "
                            f"{c.min_rows}. Fix: a lower --eps or --min-rows, longer prompts, or --heads")

    # phase 2: real ablations with controls, and the release map
    t0 = time.perf_counter()
    table, release = parts.run(("ablation", "release"), batches, lambda batch: ab.ablation_rows(
        net, tokenizer, batch, settings, positions, targets, c.mode, c.controls, c.seed),
        desc=f"ablate {len(targets)} target(s) x (1 + {c.controls} controls) x {len(batches)} batch(es)",
        progress=c.progress)
    ablation_seconds = time.perf_counter() - t0
    write_table(attrib, folder / "attribution.parquet")
    write_table(table, folder / "ablation.parquet")
    release_map = release.groupby(["target", "layer", "head"], as_index=False)[["attention_tv", "output_change"]] \
        .mean()
    write_table(release_map, folder / "release.parquet")
    write_csv(tag_or_bias(attrib), folder / "tag_or_bias.csv", float_format="%.4f")
    rows, rank = ablation_rows(attrib, table, targets)
    summary = AblateSummary(model=c.model, data=c.data, n_prompts=len(prompts), mode=c.mode, controls=c.controls,
                            eps=c.eps, min_rows=c.min_rows, group=c.group, targets=rows,
                            attribution_vs_real_rank_correlation=rank,
                            seconds={"attribution": attribution_seconds, "ablation": ablation_seconds,
                                     "total": time.perf_counter() - started}, versions=versions())
    if c.figures:
        from catchtag.report.analysis_figures import ablation_figure, release_figure

        summary.figures = [str(save_figure_file(ablation_figure(per_head(attrib), summary), folder / "ablation.png")),
                           str(save_figure_file(release_figure(release_map, summary, n_layers, n_heads),
                                                folder / "release.png"))]
    summary.write(c.out)
    return summary


def lines(s: dict, c: AblateConfig) -> list[str]:
    rows = [f"\n{s['n_prompts']} prompts, {s['mode']}-ablation, {s['controls']} control(s) per target "
            f"({s['seconds']['total']:.0f} s: attribution {s['seconds']['attribution']:.0f} s, ablations "
            f"{s['seconds']['ablation']:.0f} s)"]
    for r in s["targets"]:
        lo, hi = r["ci"]
        has_ci = lo is not None and hi is not None and lo == lo
        ci = f"[{lo:+.4f}, {hi:+.4f}]" if has_ci else "(one prompt: no interval)"
        rows.append(f"  {r['target']:<10} loss change {r['delta_nll']:+.4f} {ci} nats over {r['n_prompts_tagged']} "
                    f"prompt(s) with a tag; control {r['control_delta_nll']:+.4f}; first-order "
                    f"{r['attribution']:+.4f}; VE {r['ve']:.3f} (uncentred {r['ve_uncentred']:.3f}); tag energy: "
                    f"constant {r['constant_share']:.3f}, token-dependent {r['varying_share']:.3f}")
    rank = s["attribution_vs_real_rank_correlation"]
    if rank:
        rows.append(f"rank correlation of first-order and real changes over {rank['n_heads']} heads: "
                    f"{rank['spearman']:.2f}")
    rows.append(f"wrote {c.out}/ablate/: attribution.parquet, ablation.parquet, release.parquet, tag_or_bias.csv, "
                f"summary.json" + (", ablation.png, release.png" if c.figures else ""))
    return rows


JOB = Job(AblateConfig, run, lines)
