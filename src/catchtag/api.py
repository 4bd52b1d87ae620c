"""End-to-end jobs the CLI runs: each loads what it needs, calls the public functions, writes a run folder.

``run_scan`` writes a scan run folder (heads.parquet, summary.json, figures). The analysis jobs return a
JSON-able summary and write into ``out``: <analysis>.png, <analysis>.json and CSV tables. Model-based analyses
(pca, geometry, view) take a model name or an already loaded (model, tokenizer) pair, so a script can load a
model once and run several of them. (Probes and steering have their jobs beside them: ``run_probe``,
``run_steer``.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from catchtag.data.prompts import load_prompts
from catchtag.distributed import finish, init
from catchtag.engine.request import SinkSettings
from catchtag.errors import CatchtagError
from catchtag.inputs import check_file_out, check_head, resolve_model, resolve_text  # noqa: F401 (re-exported)
from catchtag.models import load_model, resolve_device
from catchtag.scan import scan, versions


def _json(obj):
    if isinstance(obj, dict):
        return {str(k): _json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json(data), indent=1, ensure_ascii=False))


def run_scan(model: str = "smollm2-135m", data: str = "builtin:prose", out: str | Path = "runs/scan", *,
             eps: float = 0.2, min_rows: int = 16, max_tokens: int | None = 256, chunk: int | None = None,
             limit: int | None = None, batch_size: int = 8, device: str = "auto", dtype: str = "auto",
             sweep_eps=(), truncate: bool = True, overwrite: bool = False, figures: bool = True,
             device_map: str | None = None) -> dict | None:
    """Load MODEL, scan DATA, write heads.parquet, summary.json and figures into OUT; return the summary.

    Under torchrun each rank scans its shard; rank 0 writes the tables and returns the summary, the other ranks
    return None. device_map="auto" splits a model too large for one GPU over the visible GPUs (accelerate).
    """
    SinkSettings(eps=eps, min_rows=min_rows, sweep_eps=tuple(sweep_eps))  # bad thresholds fail before loading
    if max_tokens is not None and max_tokens < 0:
        raise CatchtagError(f"--max-tokens must be >= 0 (0: no limit), got {max_tokens}. Fix: e.g. --max-tokens 256")
    for flag, value, example in (("--chunk", chunk, 256), ("--limit", limit, 32), ("--batch-size", batch_size, 8)):
        if value is not None and value < 1:
            raise CatchtagError(f"{flag} must be a whole number >= 1, got {value}. Fix: e.g. {flag} {example}")
    started = time.perf_counter()
    device = resolve_device(device)
    dist = init(device)
    # No try/finally around this: after a failure the process group is left as it is (tearing it down waits for
    # the other ranks, which may be waiting for this one); the CLI then exits at once (cli.main).
    net, tokenizer = load_model(model, device=dist.device(device), dtype=dtype, device_map=device_map)
    load_seconds = time.perf_counter() - started
    prompts = load_prompts(data, tokenizer, net, max_tokens=max_tokens, chunk=chunk, truncate=truncate,
                           limit=limit)
    result = scan(net, tokenizer, prompts, eps=eps, min_rows=min_rows, sweep_eps=sweep_eps, max_tokens=max_tokens,
                  batch_size=batch_size, out=out, overwrite=overwrite, model_name=model, data_name=data,
                  dist=dist)
    finish(dist)
    if not dist.is_main:
        return None
    out = Path(out)
    summary = {"model": model, "model_class": type(net).__name__, "data": data,
               "settings": result.settings, "versions": versions(), "result": result.summary(),
               "seconds": result.settings["seconds"], "load_seconds": load_seconds,
               "truncated": {"prompts": sum(1 for p in prompts if p.n_cut), "tokens_cut": sum(p.n_cut for p in prompts),
                             "max_tokens": max_tokens, "chunk": chunk},
               "wall_seconds": time.perf_counter() - started}
    write_json(out / "summary.json", summary)
    if figures:
        from catchtag.report.figures import scan_figures

        summary["figures"] = [str(p) for p in scan_figures(result, out / "figures")]
        write_json(out / "summary.json", summary)
    return summary


def run_pca(model="smollm2-135m", out="runs/pca", *, text=None, text_file=None, data="builtin:prose", prompt=0,
            max_tokens=256, layer=None, head=None, deeper=None, eps=0.2, min_rows=16, tag_level=0.1,
            device="auto", dtype="auto") -> dict:
    from catchtag.analysis.pca import pca_picture
    from catchtag.report.analysis_figures import pca_figure

    name, net, tok = resolve_model(model, device, dtype)
    check_head(net, layer, head)
    if deeper is not None:
        check_head(net, deeper, None, layer_flag="--deeper")
    p = resolve_text(tok, net, text, text_file, data, prompt, max_tokens)
    pic = pca_picture(net, tok, p, layer=layer, head=head, deeper=deeper, eps=eps, min_rows=min_rows,
                      tag_level=tag_level, name=name)
    out = Path(out)
    figure = pca_figure(pic, out / f"pca_L{pic.layer}H{pic.head}.png")
    summary = {**pic.summary(), "settings": pic.settings, "figure": str(figure)}
    write_json(out / f"pca_L{pic.layer}H{pic.head}.json", summary)
    return summary


def run_compare(runs, out="runs/compare", *, ve_level=0.3) -> dict:
    from catchtag.analysis.compare import compare_runs
    from catchtag.report.analysis_figures import compare_figure

    cmp = compare_runs(runs, ve_level=ve_level)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cmp.summary.to_csv(out / "compare_summary.csv", index=False)
    cmp.per_layer.to_csv(out / "compare_per_layer.csv", index=False)
    cmp.per_head.to_csv(out / "compare_per_head.csv", index=False)
    figure = compare_figure(cmp, out / "compare.png")
    summary = {"runs": cmp.summary.to_dict(orient="records"), "figure": str(figure)}
    write_json(out / "compare.json", summary)
    return summary


def run_sweep(runs=None, out="runs/sweep", *, model=None, data="builtin:prose", max_tokens=256, limit=None,
              eps=0.2, min_rows=16, batch_size=8, device="auto", dtype="auto") -> dict:
    """Plot the threshold sweep of existing runs, or first scan MODEL(s) on DATA with the 12 eps in one pass
    each (the scan folder goes to OUT/scan-<model> and resumes if interrupted)."""
    from catchtag.analysis.sweep import SWEEP_EPS, sweep_runs
    from catchtag.report.analysis_figures import sweep_figure

    out = Path(out)
    runs = list(runs or [])
    models = [model] if isinstance(model, str) else list(model or [])
    if not runs and not models:
        raise CatchtagError("give run folders (from `catchtag scan --sweep ...`) or --model to scan")
    if models:
        for m in models:
            folder = out / f"scan-{m.replace(':', '_').replace('/', '_')}"
            run_scan(model=m, data=data, out=folder, eps=eps, min_rows=min_rows, max_tokens=max_tokens, limit=limit,
                     batch_size=batch_size, device=device, dtype=dtype, sweep_eps=SWEEP_EPS, figures=False)
            runs.append(folder)
    table = sweep_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "sweep.csv", index=False)
    figure = sweep_figure(table, out / "sweep.png")
    summary = {"table": table.to_dict(orient="records"), "figure": str(figure)}
    write_json(out / "sweep.json", summary)
    return summary


def run_taxonomy(runs, out="runs/taxonomy", *, top=15) -> dict:
    from catchtag.analysis.compare import load_runs
    from catchtag.analysis.taxonomy import kind_shares, sink_taxonomy
    from catchtag.report.analysis_figures import taxonomy_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables, summary = {}, {"runs": {}}
    for i, (name, result) in enumerate(load_runs(runs).items()):
        tokens, kinds = sink_taxonomy(result), kind_shares(result)
        tables[name] = (tokens, kinds)
        safe = f"{i}_" + "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        tokens.to_csv(out / f"taxonomy_tokens_{safe}.csv", index=False)
        kinds.to_csv(out / f"taxonomy_kinds_{safe}.csv", index=False)
        summary["runs"][name] = {"top_tokens": tokens.head(top).to_dict(orient="records"),
                                 "kinds": kinds.to_dict(orient="records")}
    summary["figure"] = str(taxonomy_figure(tables, out / "taxonomy.png", top=top))
    write_json(out / "taxonomy.json", summary)
    return summary


def run_geometry(model="smollm2-135m", out="runs/geometry", *, text=None, text_file=None, data="builtin:prose",
                 prompt=0, max_tokens=256, n_positions=64, max_pairs=20000, eps=0.2, min_rows=16, device="auto",
                 dtype="auto") -> dict:
    from catchtag.analysis.geometry import tag_geometry
    from catchtag.report.analysis_figures import geometry_figure

    name, net, tok = resolve_model(model, device, dtype)
    p = resolve_text(tok, net, text, text_file, data, prompt, max_tokens)
    geom = tag_geometry(net, tok, p, n_positions=n_positions, max_pairs=max_pairs, eps=eps, min_rows=min_rows,
                        name=name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    geom.pairs.to_csv(out / "geometry_pairs.csv", index=False)
    geom.tag_vs_token.to_csv(out / "geometry_tag_vs_token.csv", index=False)
    figure = geometry_figure({name: geom}, out / "geometry.png")
    summary = {**geom.summary(), "settings": geom.settings, "figure": str(figure)}
    write_json(out / "geometry.json", summary)
    return summary


def run_view(model="smollm2-135m", out="view.html", *, text=None, text_file=None, data="builtin:prose", prompt=0,
             max_tokens=256, eps=0.2, min_rows=16, layer=None, head=None, device="auto", dtype="auto") -> dict:
    """Write the interactive token viewer for one prompt (opens on --layer/--head if given)."""
    from catchtag.report.viewer import token_view

    if (layer is None) != (head is None):
        raise CatchtagError("give both --layer and --head, or neither")
    check_file_out(out)
    name, net, tok = resolve_model(model, device, dtype)
    check_head(net, layer, head)
    p = resolve_text(tok, net, text, text_file, data, prompt, max_tokens)
    path = token_view(net, tok, p, out, eps=eps, min_rows=min_rows, name=name,
                      start=None if layer is None else (layer, head))
    return {"out": str(path), "n_tokens": len(p.input_ids), "bytes": Path(path).stat().st_size}


def run_report(runs, out="report.html", *, per_token=True, text=None, prompt=0, device="auto") -> dict:
    from catchtag.report.html import write_report

    check_file_out(out)
    path = write_report(runs, out, per_token=per_token, text=text, prompt=prompt, device=device)
    return {"out": str(path), "bytes": Path(path).stat().st_size}
