"""The jobs layer: what each CLI command does, end to end. A job loads the model and data, calls the analyses
(which only compute), and writes the outputs (through catchtag.runs, atomically); nothing below it loads models
or writes files.

``run_scan`` writes a scan run folder (heads.parquet, summary.json, figures). The analysis jobs return a
JSON-able summary and write into ``out``: <analysis>.png, <analysis>.json and CSV tables. Model-based analyses
(pca, geometry, view) take a model name or an already loaded (model, tokenizer) pair, so a script can load a
model once and run several of them. ``run_probe`` and ``run_steer`` are the probe and steering jobs.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from catchtag.analysis.common import mean_interval
from catchtag.analysis.probes import (CACHE_NAME, KINDS, HeadProbes, ProbeTask, answer_token_ids, demonstrations,
                                      few_shot_prompts, get_task, select_heads, selected_heads_markdown, task_frame,
                                      wide_table, wilson_interval)
from catchtag.analysis.release import tag_or_bias
from catchtag.data.prompts import load_prompts
from catchtag.distributed import finish, init
from catchtag.engine.request import SinkSettings
from catchtag.errors import CatchtagError
from catchtag.interventions.modes import check_mode
from catchtag.interventions.steering import DEFAULT_SCALES
from catchtag.inputs import check_file_out, check_head, resolve_model, resolve_text  # noqa: F401 (re-exported)
from catchtag.models import default_data, display_name, load_model, resolve_device
from catchtag.published import PROBES as PUBLISHED_PROBES
from catchtag.runs import WriterLock, prompts_sha1, versions, write_csv, write_json, write_table, write_text
from catchtag.scan import scan

if TYPE_CHECKING:
    from catchtag.report.viewer import TokenView


def run_scan(model: str = "smollm2-135m", data: str | None = None, out: str | Path = "runs/scan", *,
             eps: float = 0.2, min_rows: int = 16, max_tokens: int | None = 256, chunk: int | None = None,
             limit: int | None = None, batch_size: int = 8, device: str = "auto", dtype: str = "auto",
             sweep_eps=(), truncate: bool = True, overwrite: bool = False, figures: bool = True,
             views: bool = True, device_map: str | None = None) -> dict | None:
    """Load MODEL, scan DATA, write heads.parquet, summary.json and figures into OUT; return the summary.

    views: also keep the per-token pictures of the first prompt (pca picture, tag geometry, token viewer) in
    OUT/views, so that `catchtag report` draws them without loading the model (rerunning the scan adds them to a
    run that lacks them).
    Under torchrun each rank scans its shard; rank 0 writes the tables and returns the summary, the other ranks
    return None. device_map="auto" splits a model too large for one GPU over the visible GPUs (accelerate).
    """
    data = data or default_data(model)
    SinkSettings(eps=eps, min_rows=min_rows, sweep_eps=tuple(sweep_eps))  # bad thresholds fail before loading
    if max_tokens is not None and max_tokens < 0:
        raise CatchtagError(f"--max-tokens must be >= 0 (0: no limit), got {max_tokens}. Fix: e.g. --max-tokens 256")
    for flag, value, example in (("--chunk", chunk, 256), ("--limit", limit, 32), ("--batch-size", batch_size, 8)):
        if value is not None and value < 1:
            raise CatchtagError(f"{flag} must be a whole number >= 1, got {value}. Fix: e.g. {flag} {example}")
    if overwrite and out is not None:  # refused before the model loads, not after
        from catchtag.runs import check_overwrite

        check_overwrite(Path(out))
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
    if views and not (out / "views" / "views.json").is_file():
        first = min(prompts, key=lambda p: p.prompt_id)
        summary["views"] = write_views(net, tokenizer, first, out / "views", eps=eps, min_rows=min_rows, name=model)
        write_json(out / "summary.json", summary)
    return summary


def write_views(net, tokenizer, prompt, folder: Path, *, eps: float, min_rows: int, name: str) -> dict:
    """The per-token pictures of one prompt that a report shows (pca picture, tag geometry, token viewer data),
    written into ``folder``; a picture that cannot be made (no sink to picture, ...) is recorded with the reason.
    Returns what views.json says."""
    from catchtag.analysis.geometry import tag_geometry
    from catchtag.analysis.pca import pca_picture
    from catchtag.engine.request import ActivationRequest
    from catchtag.report.viewer import view_data
    from catchtag.runs import write_record

    folder = Path(folder)
    made, notes = [], {}

    def viewer():
        r = scan(net, tokenizer, [prompt], eps=eps, min_rows=min_rows, progress=False, model_name=name,
                 request=ActivationRequest(layers=[], sink_attention=True))
        write_json(folder / "viewer.json", view_data(r, model=name))

    steps = (("pca", lambda: write_record(pca_picture(net, tokenizer, prompt, eps=eps, min_rows=min_rows, name=name),
                                          folder, "pca")),
             ("geometry", lambda: write_record(tag_geometry(net, tokenizer, prompt, eps=eps, min_rows=min_rows,
                                                            name=name), folder, "geometry")),
             ("viewer", viewer))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="some prompts are shorter than min_rows")
        for what, make in steps:
            try:
                make()
                made.append(what)
            except CatchtagError as err:  # nothing to picture on this prompt: the report says why
                notes[what] = str(err)
    info = {"prompt_id": prompt.prompt_id, "n_tokens": len(prompt.input_ids), "made": made, "not_made": notes}
    write_json(folder / "views.json", info)
    return info


def run_pca(model="smollm2-135m", out="runs/pca", *, text=None, text_file=None, data=None, prompt=0,
            max_tokens=256, layer=None, head=None, deeper=None, eps=0.2, min_rows=16, tag_level=0.1,
            device="auto", dtype="auto") -> dict:
    from catchtag.analysis.pca import pca_picture
    from catchtag.report.analysis_figures import pca_figure

    data = data or default_data(model)
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
    write_csv(cmp.summary, out / "compare_summary.csv")
    write_csv(cmp.per_layer, out / "compare_per_layer.csv")
    write_csv(cmp.per_head, out / "compare_per_head.csv")
    figure = compare_figure(cmp, out / "compare.png")
    summary = {"runs": cmp.summary.to_dict(orient="records"), "figure": str(figure)}
    write_json(out / "compare.json", summary)
    return summary


def run_sweep(runs=None, out="runs/sweep", *, model=None, data=None, max_tokens=256, limit=None,
              eps=0.2, min_rows=16, batch_size=8, device="auto", dtype="auto") -> dict:
    """Plot the threshold sweep of existing runs, or first scan MODEL(s) on DATA with the 12 eps in one pass
    each (the scan folder goes to OUT/scan-<model> and resumes if interrupted)."""
    data = data or default_data(model[0] if model else None)
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
    write_csv(table, out / "sweep.csv")
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
        write_csv(tokens, out / f"taxonomy_tokens_{safe}.csv")
        write_csv(kinds, out / f"taxonomy_kinds_{safe}.csv")
        summary["runs"][name] = {"top_tokens": tokens.head(top).to_dict(orient="records"),
                                 "kinds": kinds.to_dict(orient="records")}
    summary["figure"] = str(taxonomy_figure(tables, out / "taxonomy.png", top=top))
    write_json(out / "taxonomy.json", summary)
    return summary


def run_geometry(model="smollm2-135m", out="runs/geometry", *, text=None, text_file=None, data=None,
                 prompt=0, max_tokens=256, n_positions=64, max_pairs=20000, eps=0.2, min_rows=16, device="auto",
                 dtype="auto") -> dict:
    from catchtag.analysis.geometry import tag_geometry
    from catchtag.report.analysis_figures import geometry_figure

    data = data or default_data(model)
    name, net, tok = resolve_model(model, device, dtype)
    p = resolve_text(tok, net, text, text_file, data, prompt, max_tokens)
    geom = tag_geometry(net, tok, p, n_positions=n_positions, max_pairs=max_pairs, eps=eps, min_rows=min_rows,
                        name=name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(geom.pairs, out / "geometry_pairs.csv")
    write_csv(geom.tag_vs_token, out / "geometry_tag_vs_token.csv")
    figure = geometry_figure({name: geom}, out / "geometry.png")
    summary = {**geom.summary(), "settings": geom.settings, "figure": str(figure)}
    write_json(out / "geometry.json", summary)
    return summary


def run_view(model="smollm2-135m", out="view.html", *, text=None, text_file=None, data=None, prompt=0,
             max_tokens=256, eps=0.2, min_rows=16, layer=None, head=None, device="auto", dtype="auto") -> dict:
    """Write the interactive token viewer for one prompt (opens on --layer/--head if given)."""
    data = data or default_data(model)
    if (layer is None) != (head is None):
        raise CatchtagError("give both --layer and --head, or neither")
    check_file_out(out)
    name, net, tok = resolve_model(model, device, dtype)
    check_head(net, layer, head)
    p = resolve_text(tok, net, text, text_file, data, prompt, max_tokens)
    path = token_view(net, tok, p, out, eps=eps, min_rows=min_rows, name=name,
                      start=None if layer is None else (layer, head))
    return {"out": str(path), "n_tokens": len(p.input_ids), "bytes": Path(path).stat().st_size}


def run_report(runs, out="report.html", *, per_token=True) -> dict:
    """Render every analysis of RUNS into one HTML file; loads no model (the per-token pictures come from each
    run's views/, written by `catchtag scan`)."""
    from catchtag.report.html import write_report

    check_file_out(out)
    path = write_report(runs, out, per_token=per_token)
    return {"out": str(path), "bytes": Path(path).stat().st_size}


# ---- probes and steering -------------------------------------------------------------------------------
def _data_name(task: ProbeTask, shots: int) -> str:
    digest = hashlib.sha1(task.template.encode()).hexdigest()[:8]
    return f"probe:{task.name}:shots={shots}:template={digest}"


def load_probe_inputs(net, tokenizer, settings: dict, folder: Path, batch_size: int = 8, progress: bool = True) -> dict:
    """Build the task's prompts and scan them (resuming the run in FOLDER/scan): the labelled frame, the
    tokenised prompts, the ScanResult with last-token activations, and the answer token ids."""
    from catchtag.data.prompts import model_context, tokenize_prompts
    from catchtag.engine.request import ActivationRequest

    task = get_task(settings["task"], settings.get("template"))
    frame = task_frame(task.name)
    if settings.get("limit"):
        frame = frame.groupby(["split", "label"], group_keys=False).head(int(settings["limit"]) // 4)
        frame = frame.reset_index(drop=True)
    texts = few_shot_prompts(task, frame["text"].tolist(), demonstrations(task.name, settings["shots"]))
    prompts = tokenize_prompts(texts, tokenizer, context=model_context(net))
    request = ActivationRequest(positions="last", space="both")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="some prompts are shorter than min_rows")
        result = scan(net, tokenizer, prompts, eps=settings["eps"], min_rows=settings["min_rows"],
                      batch_size=batch_size, request=request, out=folder / "scan", model_name=settings["model"],
                      data_name=_data_name(task, settings["shots"]), progress=progress)
    return {"task": task, "frame": frame, "prompts": prompts, "texts": texts, "result": result,
            "answer_ids": answer_token_ids(tokenizer, task)}


def run_probe(model: str = "smollm2-135m", task: str = "truth", out: str | Path = "runs/probe", *, shots: int = 2,
              template: str | None = None, eps: float = 0.2, min_rows: int = 16, limit: int | None = None,
              batch_size: int = 8, cv: int = 5, seed: int = 0, top: int = 5, min_tag: float = 0.7,
              max_nontag: float = 0.65, device: str = "auto", dtype: str = "auto", figures: bool = True) -> dict:
    """What ``catchtag probe`` does: few-shot prompts for TASK, one engine pass per prompt (resumable in
    OUT/scan), the model's own few-shot accuracy, 3 probes per (layer, head), selected heads, a table
    (probes.parquet, heads.csv), a heat map and summary.json in OUT. Returns the summary."""
    from catchtag.analysis.answers import answer_logprobs
    from catchtag.report.analysis_figures import probe_heatmap

    probe_task = get_task(task, template)
    SinkSettings(eps=eps, min_rows=min_rows)
    if limit is not None and limit < 4 * cv:
        raise CatchtagError(f"--limit {limit} leaves too few prompts for {cv}-fold CV; use at least {4 * cv}")
    demonstrations(task, shots)  # bad --shots fails before loading the model
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": model, "task": task, "template": probe_task.template, "shots": shots, "eps": eps,
                "min_rows": min_rows, "limit": limit, "cv": cv, "seed": seed}
    started = time.perf_counter()
    net, tokenizer = load_model(model, device=device, dtype=dtype)
    load_seconds = time.perf_counter() - started
    t0 = time.perf_counter()
    inputs = load_probe_inputs(net, tokenizer, settings, out, batch_size=batch_size)
    scan_seconds = time.perf_counter() - t0
    frame, result, answer_ids = inputs["frame"], inputs["result"], inputs["answer_ids"]
    labels = frame["label"].to_numpy()
    train = (frame["split"] == "train").to_numpy()
    test = ~train

    # the model's own few-shot answer on the test split: which answer token is more likely at the last token
    t0 = time.perf_counter()
    test_prompts = [p for p, t in zip(inputs["prompts"], test) if t]
    logp = answer_logprobs(net, tokenizer, test_prompts, answer_ids, batch_size=batch_size, progress=True)
    model_answers = frame[test].assign(logp_label0=logp[:, 0], logp_label1=logp[:, 1],
                                       predicted=(logp[:, 1] > logp[:, 0]).astype(int),
                                       prompt=[t for t, keep in zip(inputs["texts"], test) if keep])
    write_table(model_answers, out / "model_answers.parquet")
    answer_seconds = time.perf_counter() - t0
    correct_test = int((model_answers["predicted"].to_numpy() == labels[test]).sum())
    mass = np.exp(logp).sum(axis=1)

    t0 = time.perf_counter()
    cache = result.cache
    acts = {k: np.stack([cache.get(CACHE_NAME[k], layer=l, pos=-1) for l in cache.layers], axis=1) for k in KINDS}
    probes = HeadProbes(KINDS, cv=cv, seed=seed).fit({k: a[train] for k, a in acts.items()}, labels[train],
                                                     layers=cache.layers, heads=cache.heads)
    table = probes.score_table({k: a[test] for k, a in acts.items()}, labels[test])
    probe_seconds = time.perf_counter() - t0
    sinks = result.heads.groupby(["layer", "head"]).agg(mean_sinks=("n_sinks", "mean")).reset_index()
    tag_norm = np.linalg.norm(np.stack([cache.get("z_tag", layer=l, pos=-1) for l in cache.layers], 1), axis=-1)
    full_norm = np.linalg.norm(np.stack([cache.get("z", layer=l, pos=-1) for l in cache.layers], 1), axis=-1)
    share = pd.DataFrame([{"layer": l, "head": h, "tag_share_of_output_norm": float(
        (tag_norm[:, li, hi] / np.maximum(full_norm[:, li, hi], 1e-12)).mean())}
        for li, l in enumerate(cache.layers) for hi, h in enumerate(cache.heads)])
    table = table.merge(sinks, on=["layer", "head"], how="left").merge(share, on=["layer", "head"], how="left")
    write_table(table, out / "probes.parquet")
    wide = wide_table(table).merge(sinks, on=["layer", "head"]).merge(share, on=["layer", "head"])
    write_csv(wide, out / "heads.csv", float_format="%.4f")
    selected = select_heads(wide, top=top, min_tag=min_tag, max_nontag=max_nontag)

    def best(kind):
        row = table[table["kind"] == kind].sort_values("test_accuracy", ascending=False).iloc[0]
        return {"layer": int(row["layer"]), "head": int(row["head"]), "test_accuracy": float(row["test_accuracy"]),
                "ci": [float(row["ci_low"]), float(row["ci_high"])]}

    summary = {
        **settings, "labels": list(probe_task.labels), "answer_token_ids": answer_ids,
        "n_prompts": len(frame), "n_train": int(train.sum()), "n_test": int(test.sum()),
        "mean_prompt_tokens": float(np.mean([len(p.input_ids) for p in inputs["prompts"]])),
        "example_prompt": inputs["texts"][0],
        "model_accuracy": {"test": correct_test / int(test.sum()),
                           "test_ci": list(wilson_interval(correct_test, int(test.sum()))),
                           "share_predicting_label1": float(model_answers["predicted"].mean()),
                           "mean_answer_mass": float(mass.mean())},
        "best_test_accuracy": {k: best(k) for k in KINDS},
        "mean_test_accuracy": {k: float(table[table["kind"] == k]["test_accuracy"].mean()) for k in KINDS},
        "selection": {"top": top, "min_tag_cv": min_tag, "max_nontag_cv": max_nontag, "on": "train-split CV accuracy"},
        "selected_heads": selected.to_dict(orient="records"),
        "published": PUBLISHED_PROBES[task],
        "seconds": {"load": load_seconds, "scan": scan_seconds, "model_answers": answer_seconds,
                    "probes": probe_seconds},
        "n_probes": len(table),
    }
    write_text(out / "selected_heads.md", selected_heads_markdown(summary))
    if figures:
        summary["figures"] = [str(probe_heatmap(table, summary, out / "probe_heatmap.png"))]
    write_json(out / "summary.json", summary)
    return summary


def run_steer(probes: str | Path, *, heads: Sequence[tuple[int, int]] | None = None, top: int = 1,
              scales=DEFAULT_SCALES, n_random: int = 2, n_prompts: int | None = 64, seed: int = 0, batch_size: int = 8,
              out: str | Path | None = None, device: str = "auto", dtype: str = "auto",
              figures: bool = True) -> dict:
    """What ``catchtag steer`` does: read a finished probe run (``catchtag probe --out PROBES``), take its
    selected heads (or ``heads``), steer test prompts (the first ``n_prompts``, balanced; None: all) along each
    head's mean tag difference, and write steering.parquet, steering.json and a figure into OUT (default
    PROBES/steer)."""
    from catchtag.interventions.steering import steering_curve, tag_direction
    from catchtag.report.analysis_figures import steering_figure

    probes = Path(probes)
    summary_path = probes / "summary.json"
    summary = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except ValueError:
            summary = {}
    if not {"selected_heads", "task", "model"} <= set(summary):
        raise CatchtagError(f"{probes} is not a finished probe run (no probe summary.json). Fix: run `catchtag "
                            f"probe --out {probes}` first")
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
        if layer not in result.cache.layers or head not in result.cache.heads:
            raise CatchtagError(f"head ({layer}, {head}) is not in the probe run's activations")
        head_tag = result.cache.get("z_tag", layer=layer, head=head, pos=-1).astype(np.float64)
        direction = tag_direction(head_tag[train], labels[train])
        directions[f"{layer}.{head}"] = {"norm": float(np.linalg.norm(direction)),
                                         "mean_tag_norm": float(np.linalg.norm(head_tag[train], axis=1).mean()),
                                         "mean_output_norm": float(np.linalg.norm(
                                             result.cache.get("z", layer=layer, head=head, pos=-1)[train],
                                             axis=1).mean())}
        curves.append(steering_curve(net, tokenizer, test_prompts, labels[test], answer_ids, layer, head, direction,
                                     scales=scales, n_random=n_random, seed=seed, batch_size=batch_size))
    table = pd.concat(curves, ignore_index=True)
    write_table(table, out / "steering.parquet")
    report = {"model": summary["model"], "task": summary["task"], "probes": str(probes), "heads": heads,
              "scales": [float(s) for s in scales], "n_random": n_random, "n_test_prompts": int(test.sum()),
              "directions": directions, "seconds": time.perf_counter() - started,
              "rows": table.to_dict(orient="records")}
    if figures:
        report["figures"] = [str(steering_figure(table, summary, out / "steering.png", int(test.sum())))]
    report["out"] = str(out) + "/"
    write_json(out / "steering.json", report)
    return report


# ---- the token viewer --------------------------------------------------------------------------------------
def show_tokens(model, tokenizer, text, *, eps: float = 0.2, min_rows: int = 16, max_tokens: int | None = None,
                name: str | None = None, start: tuple[int, int] | None = None, height: int = 640) -> TokenView:
    """The token viewer for one prompt as an object a notebook displays inline (``token_view`` writes a file)."""
    from catchtag.analysis.common import one_prompt
    from catchtag.engine.request import ActivationRequest
    from catchtag.report.viewer import TokenView, render_view, view_data

    result = scan(model, tokenizer, one_prompt(text), eps=eps, min_rows=min_rows, max_tokens=max_tokens,
                  request=ActivationRequest(layers=[], sink_attention=True), progress=False)
    result.settings["model"] = display_name(model, name)
    return TokenView(render_view(view_data(result, start=start)), height=height)


def token_view(model, tokenizer, text, out, *, eps: float = 0.2, min_rows: int = 16, max_tokens: int | None = None,
               name: str | None = None, start: tuple[int, int] | None = None) -> Path:
    """Scan one prompt keeping every head's attention to its sinks, and write the viewer page to ``out``."""
    return show_tokens(model, tokenizer, text, eps=eps, min_rows=min_rows, max_tokens=max_tokens, name=name,
                       start=start).save(out)


# ---- release, causally: catchtag ablate ------------------------------------------------------------------------
def _ablate_targets(heads, top, group, attrib: pd.DataFrame, n_layers: int):
    """[(name, [(layer, head), ...])]: what to ablate, from --heads, --group or the top heads by |attribution|."""
    if heads:
        return [(f"{l}.{h}", [(l, h)]) for l, h in heads]
    with_sink = attrib[attrib["n_sinks"] > 0]
    if group == "layer":
        return [(f"layer {l}", sorted({(int(l), int(h)) for h in g["head"].unique()}))
                for l, g in with_sink.groupby("layer")]
    if group == "all":
        return [("all", sorted({(int(r.layer), int(r.head)) for r in with_sink[["layer", "head"]]
                                .drop_duplicates().itertuples()}))]
    # the expected change per prompt of the data: a prompt where the head has no tag contributes 0
    est = attrib.assign(estimate=attrib["estimate"].fillna(0.0))
    heads_with = set(map(tuple, with_sink[["layer", "head"]].drop_duplicates().to_numpy().tolist()))
    mean = est.groupby(["layer", "head"])["estimate"].mean().abs().sort_values(ascending=False)
    mean = mean[[lh in heads_with for lh in mean.index]]
    return [(f"{l}.{h}", [(int(l), int(h))]) for l, h in list(mean.index[:top])]


def run_ablate(model: str = "smollm2-135m", data: str | None = None, out: str | Path = "runs/ablate", *,
               heads: Sequence[tuple[int, int]] | None = None, top: int = 8, group: str | None = None,
               mode: str = "mean", controls: int = 2, eps: float = 0.2, min_rows: int = 16,
               max_tokens: int | None = 256, limit: int | None = 32, batch_size: int = 8, seed: int = 0,
               device: str = "auto", dtype: str = "auto", figures: bool = True, progress: bool = True) -> dict:
    """What ``catchtag ablate`` does, into OUT/ablate/: a first-order attribution for every head (one forward and
    one backward pass per batch), real ablations of the chosen heads or groups with random-direction controls
    (loss change over the tagged tokens, 95% interval over prompts), the release map (which later heads change),
    tables, figures and summary.json. Resumable: each finished batch of each phase is saved as it goes; a second
    process on the same --out stops at once (WriterLock)."""
    data = data or default_data(model)
    check_mode(mode)
    if group not in (None, "layer", "all"):
        raise CatchtagError(f"--group must be layer or all, got {group!r}. Fix: --group layer")
    for flag, value, low in (("--top", top, 1), ("--controls", controls, 0), ("--batch-size", batch_size, 1)):
        if value < low:
            raise CatchtagError(f"{flag} must be >= {low}, got {value}. Fix: e.g. {flag} {max(low, 3)}")
    settings = SinkSettings(eps=eps, min_rows=min_rows)
    scan_manifest = Path(out) / "run.json"
    if scan_manifest.is_file():  # ablating into a scan's folder: the same model, or the report would mix them
        try:
            scanned = json.loads(scan_manifest.read_text()).get("model")
        except ValueError:
            scanned = None
        if scanned is not None and scanned != model:
            raise CatchtagError(f"{out} holds a scan of {scanned}, not of {model}: its report would show this "
                                f"ablation under the other model. Fix: another --out, or -m {scanned}")
    started = time.perf_counter()
    lock = WriterLock(Path(out) / "ablate", "catchtag ablate")
    done = False
    try:
        summary = _ablate(model, data, out, heads, top, group, mode, controls, settings, max_tokens, limit,
                          batch_size, seed, device, dtype, figures, progress, started)
        done = True
        return summary
    finally:
        lock.release(undo=not done and not any(p.name != lock.path.name for p in lock.path.parent.iterdir()))


def _ablate(model, data, out, heads, top, group, mode, controls, settings, max_tokens, limit, batch_size, seed,
            device, dtype, figures, progress, started) -> dict:
    from catchtag.interventions import ablation as ab
    from catchtag.scan import _batch_tensors

    eps, min_rows = settings.eps, settings.min_rows
    net, tokenizer = load_model(model, device=resolve_device(device), dtype=dtype)
    n_layers, n_heads = net.config.num_hidden_layers, net.config.num_attention_heads
    for l, h in heads or []:
        if not (0 <= l < n_layers and 0 <= h < n_heads):
            raise CatchtagError(f"--heads {l}.{h} is out of range: the model has {n_layers} layers x {n_heads} heads "
                                f"(0-based). Fix: pick heads in range")
    prompts = load_prompts(data, tokenizer, net, max_tokens=max_tokens, limit=limit)
    folder = Path(out) / "ablate"
    manifest = {"model": model, "prompts_sha1": prompts_sha1(prompts),
                "eps": eps, "min_rows": min_rows, "mode": mode, "seed": seed, "controls": controls,
                "control_directions": "per prompt",
                "heads": [list(x) for x in heads] if heads else None, "top": top, "group": group,
                "batch_size": batch_size}
    if (folder / "run.json").is_file() and json.loads((folder / "run.json").read_text()) != manifest:
        raise CatchtagError(f"{folder} holds an ablation with other settings. Fix: another --out, or move it away")
    write_json(folder / "run.json", manifest)
    parts = folder / "parts"
    device_ = next(net.parameters()).device
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    positions = ab.sample_positions(min(len(p.input_ids) for p in prompts))
    D = getattr(net.config, "head_dim", None) or net.config.hidden_size // n_heads

    def bar(total, desc, unit="batch"):
        if not progress:
            return None
        from catchtag.progress import progress_bar

        return progress_bar(total=total, desc=desc, unit=unit)

    # phase 1: the first-order attribution of every head (and each head's sinks and VE on these prompts)
    t0 = time.perf_counter()
    b1 = bar(len(batches), "attribution")
    for k, batch in enumerate(batches):
        path = parts / f"attribution-{k:05d}.parquet"
        if not path.is_file():
            ids, mask = _batch_tensors(batch, tokenizer, device_)
            est, _, cap, shares = ab.attribution(net, ids, mask, settings, mode)
            rows = []
            for b, p in enumerate(batch):
                for l in range(n_layers):
                    st = cap.layers[l].stats
                    first_real = int(st.token_valid[b].long().argmax())
                    for h in range(n_heads):
                        ok = st.sink_ok[b, h]
                        rows.append((p.prompt_id, l, h, float(est[b, l, h]), int(ok.sum()),
                                     int((ok & (st.sink_idx[b, h] != first_real)).sum()), float(st.ve[b, h]),
                                     float(st.ve_uncentred[b, h]), float(shares[b, l, h, 0]),
                                     float(shares[b, l, h, 1])))
            write_table(pd.DataFrame(rows, columns=["prompt_id", "layer", "head", "estimate", "n_sinks",
                                                    "n_sinks_after_first", "ve", "ve_uncentred", "constant_share",
                                                    "varying_share"]), path)
        if b1 is not None:
            b1.update(1)
    if b1 is not None:
        b1.close()
    attrib = pd.concat([pd.read_parquet(parts / f"attribution-{k:05d}.parquet") for k in range(len(batches))],
                       ignore_index=True)
    attribution_seconds = time.perf_counter() - t0
    targets = _ablate_targets(heads, top, group, attrib, n_layers)
    if not targets or not any(t for _, t in targets):
        raise CatchtagError(f"nothing to ablate: no head has a sink on these prompts at eps {eps}, min_rows "
                            f"{min_rows}. Fix: a lower --eps or --min-rows, longer prompts, or --heads")

    # phase 2: real ablations with controls, and the release map
    t0 = time.perf_counter()
    b2 = bar(len(batches) * len(targets), f"ablate {len(targets)} target(s) x (1 + {controls} controls) x "
             f"{len(batches)} batch(es)", unit="target")
    for k, batch in enumerate(batches):
        path = parts / f"ablation-{k:05d}.parquet"
        if not path.is_file():
            ids, mask = _batch_tensors(batch, tokenizer, device_)
            base = ab.baseline(net, ids, mask, settings, positions)
            rows, release = [], []
            for name, group_heads in targets:
                l0 = min(l for l, _ in group_heads)
                s0 = base.first_sink[:, [l for l, _ in group_heads], [h for _, h in group_heads]].amin(dim=1)
                for kind, draw in [("ablation", 0)] + [("control", d) for d in range(controls)]:
                    edit = ab.edits_for(group_heads, mode, kind, D, draw, seed, [p.prompt_id for p in batch])
                    nll, mean_row, z = ab.intervened(net, ids, mask, settings, positions, edit, base,
                                                     release=kind == "ablation")
                    delta = ab.loss_change(base.nll, nll, s0)
                    for b, p in enumerate(batch):
                        rows.append((p.prompt_id, name, kind, draw, float(delta[b])))
                    if kind == "ablation":
                        rel = ab.release_rows(base, mean_row, z, group_heads, n_layers)
                        for b, p in enumerate(batch):
                            for l in range(l0 + 1, n_layers):
                                for h in range(n_heads):
                                    release.append((p.prompt_id, name, l, h, float(rel["attention_tv"][b, l, h]),
                                                    float(rel["output_change"][b, l, h])))
                if b2 is not None:
                    b2.update(1)
            write_table(pd.DataFrame(release, columns=["prompt_id", "target", "layer", "head", "attention_tv",
                                                       "output_change"]), parts / f"release-{k:05d}.parquet")
            write_table(pd.DataFrame(rows, columns=["prompt_id", "target", "kind", "draw", "delta_nll"]), path)
        elif b2 is not None:
            b2.update(len(targets))
    if b2 is not None:
        b2.close()
    ablation_seconds = time.perf_counter() - t0
    table = pd.concat([pd.read_parquet(parts / f"ablation-{k:05d}.parquet") for k in range(len(batches))],
                      ignore_index=True)
    release = pd.concat([pd.read_parquet(parts / f"release-{k:05d}.parquet") for k in range(len(batches))],
                        ignore_index=True)
    write_table(attrib, folder / "attribution.parquet")
    write_table(table, folder / "ablation.parquet")
    release_map = release.groupby(["target", "layer", "head"], as_index=False)[["attention_tv", "output_change"]] \
        .mean()
    write_table(release_map, folder / "release.parquet")

    # estimate: the expected change per prompt of the data (0 where the head tags nothing); estimate_tagged: the
    # mean over the prompts where it tags something, the basis of the real changes in the summary
    per_head = attrib.assign(data_wide=attrib["estimate"].fillna(0.0)).groupby(["layer", "head"]).agg(
        estimate=("data_wide", "mean"), estimate_tagged=("estimate", "mean"), ve=("ve", "mean"),
        ve_uncentred=("ve_uncentred", "mean"), mean_sinks=("n_sinks", "mean")).reset_index()
    split = tag_or_bias(attrib)
    write_csv(split, folder / "tag_or_bias.csv", float_format="%.4f")
    summary_rows = []
    for name, group_heads in targets:
        t = table[table["target"] == name]
        real = t[t["kind"] == "ablation"].groupby("prompt_id")["delta_nll"].mean()
        ctrl = t[t["kind"] == "control"].groupby("prompt_id")["delta_nll"].mean()  # averaged over draws
        m, lo, hi = mean_interval(real.to_numpy())
        cm, clo, chi = mean_interval(ctrl.to_numpy())
        est = per_head.set_index(["layer", "head"]).loc[group_heads]
        summary_rows.append({"target": name, "heads": [list(x) for x in group_heads],
                             "n_prompts_tagged": int(real.notna().sum()), "delta_nll": m,
                             "ci": [lo, hi], "control_delta_nll": cm, "control_ci": [clo, chi],
                             "attribution": float(est["estimate_tagged"].sum()), "ve": float(est["ve"].mean()),
                             "ve_uncentred": float(est["ve_uncentred"].mean()),
                             "mean_sinks": float(est["mean_sinks"].mean()),
                             **{k: float(split.set_index(["layer", "head"]).reindex(group_heads)[k].mean())
                                for k in ("constant_share", "varying_share", "prompt_dependent")}})
    singles = [r for r in summary_rows if len(r["heads"]) == 1]
    rank = None
    if len(singles) >= 3:
        rho = pd.Series([r["attribution"] for r in singles]).corr(pd.Series([r["delta_nll"] for r in singles]),
                                                                 method="spearman")
        rank = {"spearman": float(rho), "n_heads": len(singles)}
    summary = {"model": model, "data": data, "n_prompts": len(prompts), "mode": mode, "controls": controls,
               "eps": eps, "min_rows": min_rows, "group": group, "targets": summary_rows,
               "attribution_vs_real_rank_correlation": rank,
               "seconds": {"attribution": attribution_seconds, "ablation": ablation_seconds,
                           "total": time.perf_counter() - started}, "versions": versions()}
    if figures:
        from catchtag.report.analysis_figures import ablation_figure, release_figure

        summary["figures"] = [str(ablation_figure(per_head, summary, folder / "ablation.png")),
                              str(release_figure(release_map, summary, n_layers, n_heads, folder / "release.png"))]
    write_json(folder / "summary.json", summary)
    return summary


# ---- release by decoding: catchtag release -----------------------------------------------------------------------
def run_release(model: str = "smollm2-135m", data: str | None = None, out: str | Path = "runs/release", *,
                heads: Sequence[tuple[int, int]] | None = None, top: int = 3, level: float = 0.1, eps: float = 0.2,
                min_rows: int = 16, max_tokens: int | None = 256, limit: int | None = 32, batch_size: int = 8,
                folds: int = 5, seed: int = 0, device: str = "auto", dtype: str = "auto",
                figures: bool = True) -> dict:
    """What ``catchtag release`` does: for each head (``heads``, or the ``top`` heads by mean VE among those with two
    or more sinks on average), group tokens by the sink that tags them and decode the group from the residual
    stream entering every deeper layer, against a control with the groups of other prompts (analysis/release.py);
    writes release_decoding.csv, summary.json and a figure into OUT."""
    data = data or default_data(model)
    from catchtag.analysis.release import decode_by_depth, sink_groups
    from catchtag.engine.request import ActivationRequest

    if not 0 < level < 1:
        raise CatchtagError(f"--level must lie in (0, 1), got {level}. Fix: e.g. --level 0.1")
    SinkSettings(eps=eps, min_rows=min_rows)
    started = time.perf_counter()
    net, tokenizer = load_model(model, device=resolve_device(device), dtype=dtype)
    n_layers, n_heads = net.config.num_hidden_layers, net.config.num_attention_heads
    for l, h in heads or []:
        if not (0 <= l < n_layers - 1 and 0 <= h < n_heads):
            raise CatchtagError(f"--heads {l}.{h} is out of range: the model has {n_layers} layers (a head below the "
                                f"last one) x {n_heads} heads. Fix: pick heads in range")
    prompts = load_prompts(data, tokenizer, net, max_tokens=max_tokens, limit=limit)
    if not heads:
        base = scan(net, tokenizer, prompts, eps=eps, min_rows=min_rows, batch_size=batch_size, progress=True)
        h = base.heads[base.heads["layer"] < n_layers - 1]
        ph = h.groupby(["layer", "head"]).agg(ve=("ve", "mean"), sinks=("n_sinks", "mean")).reset_index()
        ph = ph[ph["sinks"] >= 2].sort_values("ve", ascending=False)
        heads = [(int(r.layer), int(r.head)) for r in ph.head(top).itertuples()]
        if not heads:
            raise CatchtagError(f"no head has two or more sinks on average at eps {eps}, so no grouping to decode. "
                                f"Fix: a lower --eps, or --heads")
    first = min(l for l, _ in heads)
    request = ActivationRequest(layers=[], positions="all", hidden_states=list(range(first + 1, n_layers + 1)),
                                sink_attention=True)
    result = scan(net, tokenizer, prompts, eps=eps, min_rows=min_rows, batch_size=batch_size, request=request,
                  progress=True)
    cache, table = result.cache, result.heads.set_index(["prompt_id", "layer", "head"])
    n_tok = result.prompts.set_index("prompt_id")["n_tokens"]
    tables = []
    for layer, head in heads:
        groups = [sink_groups(cache.get("sink_attention", layer=layer, head=head, prompt=pid),
                              table.loc[(pid, layer, head), "sink_positions"], level) for pid in cache.prompt_ids]
        features = {i: [cache["resid_pre", i][row, :int(n_tok[pid])] for row, pid in enumerate(cache.prompt_ids)]
                    for i in range(layer + 1, n_layers + 1)}
        t = decode_by_depth(groups, features, folds=folds, seed=seed, progress=f"decode head {layer}.{head}")
        t.insert(0, "head", head)
        t.insert(0, "source_layer", layer)
        tables.append(t)
    decoding = pd.concat(tables, ignore_index=True)
    out = Path(out)
    write_csv(decoding, out / "release_decoding.csv", float_format="%.4f")
    summary = {"model": model, "data": data, "n_prompts": len(prompts), "level": level, "eps": eps,
               "min_rows": min_rows, "folds": folds, "heads": [list(x) for x in heads],
               "rows": decoding.to_dict(orient="records"), "seconds": time.perf_counter() - started,
               "versions": versions()}
    if figures:
        from catchtag.report.analysis_figures import release_decoding_figure

        summary["figure"] = str(release_decoding_figure(decoding, summary, out / "release_decoding.png"))
    write_json(out / "summary.json", summary)
    return summary
