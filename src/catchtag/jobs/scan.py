"""`catchtag scan`: load a model, scan the data, write the run folder (heads.parquet, summary.json, figures, views)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from catchtag.errors import CatchtagError
from catchtag.summaries import ScanSummary
from catchtag.inputs import check_between
from catchtag.jobs.options import (Job, JobConfig, at_least, batch_size_setting, data_setting, device_setting,
                                   dtype_setting,
                                   eps_setting, figures_setting, folder_out, min_rows_setting, model_setting, numbers,
                                   setting)


def _each_eps(flag, values):
    for value in values:
        check_between(flag, value, 0, 1, "0.05,0.1,0.3")


@dataclass(frozen=True)
class ScanConfig(JobConfig):
    """Detect sinks and decompose every head on DATA; write heads.parquet, summary.json and figures to OUT."""

    command = "scan"
    positional = ("model", "data", "out")

    model: str = model_setting()
    data: Optional[str] = data_setting()
    out: Path = folder_out("runs/scan", "run folder (resumes if it holds the same run)", required=True)
    eps: float = eps_setting()
    min_rows: int = min_rows_setting()
    max_tokens: Optional[int] = setting(256, "tokens per prompt: longer prompts are cut to this many (announced, and "
                                        "counted in summary.json); builtin corpora are cut into prompts of this "
                                        "size; 0: no limit", check=at_least(0, 256, " (0: no limit)"))
    chunk: Optional[int] = setting(None, "cut the whole data into prompts of this many tokens", check=at_least(1, 256))
    limit: Optional[int] = setting(None, "use only the first K prompts", check=at_least(1, 32))
    batch_size: int = batch_size_setting()
    device: str = device_setting()
    dtype: str = dtype_setting("auto (float32 on cpu, bfloat16 on cuda), float32, bfloat16, float16")
    sweep_eps: tuple = setting((), "extra eps values computed in the same pass, e.g. 0.05,0.1,0.3", "--sweep",
                               cli=Optional[str], parse=numbers("0.05,0.1,0.3"), check=_each_eps)
    truncate: bool = setting(True, "refuse prompts longer than the model's context", "--no-truncate", negate=True)
    overwrite: bool = setting(False, "discard an existing run in --out")
    figures: bool = figures_setting("skip the PNG figures")
    views: bool = setting(True, "skip the per-token pictures of the first prompt that `catchtag report` shows "
                                "(views/)", "--no-views", negate=True)
    device_map: Optional[str] = setting(None, "split the layers over the visible GPUs (accelerate): auto, balanced, "
                                              "balanced_low_0 or sequential")

    def check_together(self) -> None:
        if self.overwrite and self.out is not None:  # refused before the model loads, not after
            from catchtag.runs import check_overwrite

            check_overwrite(Path(self.out))

    def owns(self) -> Path | None:
        return None  # a scan's folder resumes: the run folder itself keeps or removes what it wrote (and locks it)


def run(config: ScanConfig) -> ScanSummary | None:
    """Load MODEL, scan DATA, write heads.parquet, summary.json and figures into OUT; return the summary.

    views: also keep the per-token pictures of the first prompt (pca picture, tag geometry, token viewer) in
    OUT/views, so that `catchtag report` draws them without loading the model (rerunning the scan adds them to a
    run that lacks them).
    Under torchrun each rank scans its shard; rank 0 writes the tables and returns the summary, the other ranks
    return None. device_map="auto" splits a model too large for one GPU over the visible GPUs (accelerate).
    """
    from catchtag.data.prompts import load_prompts
    from catchtag.distributed import finish, init
    from catchtag.models import load_model, resolve_device
    from catchtag.runs import versions
    from catchtag.scan import scan

    c = config
    started = time.perf_counter()
    device = resolve_device(c.device)
    dist = init(device)
    # No try/finally around this: after a failure the process group is left as it is (tearing it down waits for
    # the other ranks, which may be waiting for this one); the CLI then exits at once (cli.main).
    net, tokenizer = load_model(c.model, device=dist.device(device), dtype=c.dtype, device_map=c.device_map)
    load_seconds = time.perf_counter() - started
    prompts = load_prompts(c.data, tokenizer, net, max_tokens=c.max_tokens, chunk=c.chunk, truncate=c.truncate,
                           limit=c.limit)
    result = scan(net, tokenizer, prompts, eps=c.eps, min_rows=c.min_rows, sweep_eps=c.sweep_eps,
                  max_tokens=c.max_tokens, batch_size=c.batch_size, out=c.out, overwrite=c.overwrite,
                  model_name=c.model, data_name=c.data, dist=dist)
    finish(dist)
    if not dist.is_main:
        return None
    out = Path(c.out)
    summary = ScanSummary(model=c.model, model_class=type(net).__name__, data=c.data, settings=result.settings,
                          versions=versions(), result=result.summary(), seconds=result.settings["seconds"],
                          load_seconds=load_seconds,
                          truncated={"prompts": sum(1 for p in prompts if p.n_cut),
                                     "tokens_cut": sum(p.n_cut for p in prompts), "max_tokens": c.max_tokens,
                                     "chunk": c.chunk})
    if c.figures:
        from catchtag.report.figures import scan_figures
        from catchtag.runs import save_figure_file

        summary.figures = [str(save_figure_file(fig, out / "figures" / f"{name}.png"))
                           for name, fig in scan_figures(result).items()]
    if c.views and not (out / "views" / "views.json").is_file():
        first = min(prompts, key=lambda p: p.prompt_id)
        summary.views = write_views(net, tokenizer, first, out / "views", eps=c.eps, min_rows=c.min_rows,
                                    name=c.model)
    summary.wall_seconds = time.perf_counter() - started
    summary.write(out)
    return summary


def write_views(net, tokenizer, prompt, folder: Path, *, eps: float, min_rows: int, name: str) -> dict:
    """The per-token pictures of one prompt that a report shows (pca picture, tag geometry, token viewer data),
    written into ``folder`` from two passes over the prompt: the geometry's request (which also keeps every head's
    attention to its sinks: the viewer's data, with the rows that choose the pca picture's head), and the picture's.
    A picture that cannot be made (no sink to picture, ...) is recorded with the reason. Returns what views.json
    says."""
    from catchtag.analysis.geometry import geometry_from_result, geometry_request
    from catchtag.engine.request import ActivationRequest
    from catchtag.measure import pca_picture
    from catchtag.report.viewer import view_data
    from catchtag.runs import write_json, write_record
    from catchtag.scan import scan

    folder = Path(folder)
    made, notes, first = [], {}, []

    def one_pass(request):
        first.append(scan(net, tokenizer, [prompt], eps=eps, min_rows=min_rows, request=request, progress=False,
                          model_name=name))
        return first[-1]

    def geometry():
        request, positions = geometry_request(net.config.num_hidden_layers, len(prompt.input_ids))
        write_record(geometry_from_result(one_pass(request), positions, model=name), folder, "geometry")

    def viewer():  # the geometry's pass, or (where it could not run) one that keeps only the sink attention
        result = first[0] if first else one_pass(ActivationRequest(layers=[], sink_attention=True))
        write_json(folder / "viewer.json", view_data(result, model=name))

    def pca():
        write_record(pca_picture(net, tokenizer, prompt, eps=eps, min_rows=min_rows, name=name,
                                 chosen_from=first[0] if first else None), folder, "pca")

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="some prompts are shorter than min_rows")
        for what, make in (("geometry", geometry), ("viewer", viewer), ("pca", pca)):
            try:
                make()
                made.append(what)
            except CatchtagError as err:  # nothing to picture on this prompt: the report says why
                notes[what] = str(err)
    info = {"prompt_id": prompt.prompt_id, "n_tokens": len(prompt.input_ids), "made": made, "not_made": notes}
    write_json(folder / "views.json", info)
    return info


def lines(summary: dict, config: ScanConfig) -> list[str]:
    s = summary["result"]
    ranks = summary["settings"].get("world_size", 1)
    return [f"\n{s['n_prompts']} prompts x {s['n_layers']} layers x {s['n_heads']} heads "
            f"({summary['wall_seconds']:.1f} s" + (f", {ranks} processes)" if ranks > 1 else ")"),
            f"mean sinks per head {s['mean_sinks_per_head']:.3f} · heads with a sink "
            f"{100 * s['share_heads_with_sink']:.1f}% · mean VE centred {s['mean_ve']:.3f}, uncentred "
            f"{s['mean_ve_uncentred']:.3f} (heads with a sink: centred {s['mean_ve_heads_with_sink']:.3f}, "
            f"uncentred {s['mean_ve_uncentred_heads_with_sink']:.3f})",
            "top sink tokens: " + ", ".join(f"{t!r} ({c})" for t, c in s["top_sink_tokens"][:5]),
            f"wrote {config.out}/heads.parquet, summary.json" + (", figures/*.png" if config.figures else "")
            + (", views/ (the first prompt's per-token pictures)" if config.views else "")]


JOB = Job(ScanConfig, run, lines)
