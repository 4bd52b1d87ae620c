"""The command line: a thin layer over the Python API (one command per API function)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from catchtag.errors import CatchtagError

app = typer.Typer(
    name="catchtag",
    help="Attention sinks and the catch, tag, release mechanism in Hugging Face causal LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


from catchtag.toy.cli import toy_app  # noqa: E402

app.add_typer(toy_app, name="toy")


@app.callback()
def _root() -> None:
    """catchtag: detect sinks, decompose heads into tag / non-tag, and show it."""


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def models() -> None:
    """List the models catchtag can load, and which are installed here."""
    from catchtag.models import available_models

    rows = available_models()
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        mark = "installed" if row["installed"] else f"not installed: {row['install']}"
        typer.echo(f"{row['name']:<{width}} {mark:<60} {row['description']}")
    typer.echo("Also: a local Hugging Face folder, a local .gguf file, or a hub id already in the local cache.")


_DEVICE = typer.Option("auto", help="auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N")


@app.command()
def scan(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="model name (see `catchtag models`) or path"),
    data: str = typer.Option("builtin:prose", "--data", "-d", help=".txt, .jsonl (text field) or builtin:NAME"),
    out: Path = typer.Option(..., "--out", "-o", help="run folder (resumes if it holds the same run)"),
    eps: float = typer.Option(0.2, help="sink threshold on the column score"),
    min_rows: int = typer.Option(16, help="a column needs this many rows that see it to be a sink"),
    max_tokens: Optional[int] = typer.Option(256, help="tokens per prompt: longer prompts are cut to this many "
                                             "(announced, and counted in summary.json); builtin corpora are cut "
                                             "into prompts of this size; 0: no limit"),
    chunk: Optional[int] = typer.Option(None, help="cut the whole data into prompts of this many tokens"),
    limit: Optional[int] = typer.Option(None, help="use only the first K prompts"),
    batch_size: int = typer.Option(8, help="prompts per forward pass"),
    device: str = _DEVICE,
    dtype: str = typer.Option("auto", help="auto (float32 on cpu, bfloat16 on cuda), float32, bfloat16, float16"),
    sweep: Optional[str] = typer.Option(None, help="extra eps values computed in the same pass, e.g. 0.05,0.1,0.3"),
    no_truncate: bool = typer.Option(False, "--no-truncate", help="refuse prompts longer than the model's context"),
    overwrite: bool = typer.Option(False, help="discard an existing run in --out"),
    no_figures: bool = typer.Option(False, "--no-figures", help="skip the PNG figures"),
    no_views: bool = typer.Option(False, "--no-views", help="skip the per-token pictures of the first prompt that "
                                                             "`catchtag report` shows (views/)"),
    device_map: Optional[str] = typer.Option(None, help="split the layers over the visible GPUs (accelerate): auto, balanced, balanced_low_0 or sequential"),
) -> None:
    """Detect sinks and decompose every head on DATA; write heads.parquet, summary.json and figures to OUT."""
    from catchtag.jobs import run_scan

    try:
        sweep_eps = tuple(float(x) for x in sweep.split(",")) if sweep else ()
        summary = run_scan(model=model, data=data, out=out, eps=eps, min_rows=min_rows, max_tokens=max_tokens,
                           chunk=chunk, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
                           sweep_eps=sweep_eps, truncate=not no_truncate, overwrite=overwrite,
                           figures=not no_figures, views=not no_views, device_map=device_map)
    except CatchtagError as err:
        _fail(str(err))
    except ValueError as err:
        _fail(f"bad value: {err}")
    if summary is None:  # a torchrun rank other than 0: rank 0 reports
        return
    s = summary["result"]
    ranks = summary["settings"].get("world_size", 1)
    typer.echo(f"\n{s['n_prompts']} prompts x {s['n_layers']} layers x {s['n_heads']} heads "
               f"({summary['wall_seconds']:.1f} s" + (f", {ranks} processes)" if ranks > 1 else ")"))
    typer.echo(f"mean sinks per head {s['mean_sinks_per_head']:.3f} · heads with a sink "
               f"{100 * s['share_heads_with_sink']:.1f}% · mean VE {s['mean_ve']:.3f} "
               f"(heads with a sink: {s['mean_ve_heads_with_sink']:.3f})")
    typer.echo("top sink tokens: " + ", ".join(f"{t!r} ({c})" for t, c in s["top_sink_tokens"][:5]))
    typer.echo(f"wrote {out}/heads.parquet, summary.json" + ("" if no_figures else ", figures/*.png")
               + ("" if no_views else ", views/ (the first prompt's per-token pictures)"))


# ---- analyses (docs/analyses.md) ------------------------------------------------------------------------------------
_MODEL = typer.Option("smollm2-135m", "--model", "-m", help="model name (see `catchtag models`) or path")
_TEXT = typer.Option(None, "--text", "-t", help="the prompt (default: prompt --prompt of --data)")
_TEXT_FILE = typer.Option(None, "--text-file", help="read the prompt from this file")
_DATA = typer.Option("builtin:prose", "--data", "-d", help="where the default prompt comes from")
_PROMPT = typer.Option(0, "--prompt", help="which prompt of --data (0-based, as `catchtag scan` numbers them)")
_MAX_TOKENS = typer.Option(256, help="cut the prompt to this many tokens")


def _run_job(job, *args, **kwargs) -> dict:
    try:
        return job(*args, **kwargs)
    except CatchtagError as err:
        _fail(str(err))
    except ValueError as err:
        _fail(f"bad value: {err}")


@app.command()
def pca(
    model: str = _MODEL, text: Optional[str] = _TEXT, text_file: Optional[Path] = _TEXT_FILE, data: str = _DATA,
    prompt: int = _PROMPT, max_tokens: int = _MAX_TOKENS,
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help="layer (default: best head, see --help)"),
    head: Optional[int] = typer.Option(None, "--head", help="head (give with --layer)"),
    deeper: Optional[int] = typer.Option(None, help="residual stream after this layer (default layer + 4)"),
    eps: float = typer.Option(0.2, help="sink threshold on the column score"),
    min_rows: int = typer.Option(16, help="a column needs this many rows that see it to be a sink"),
    tag_level: float = typer.Option(0.1, help="a token is tagged by its strongest sink if it pays it this much"),
    out: Path = typer.Option(Path("runs/pca"), "--out", "-o", help="folder for pca_L*H*.png and .json"),
    device: str = _DEVICE,
) -> None:
    """Figure-2 picture of one head: outputs coloured by top-3 PCs, attention with sinks, the residual stream deeper.

    Default head: the highest VE among heads with a sink beyond the first token."""
    from catchtag.jobs import run_pca

    s = _run_job(run_pca, model, out, text=text, text_file=str(text_file) if text_file else None, data=data,
                 prompt=prompt, max_tokens=max_tokens, layer=layer, head=head, deeper=deeper, eps=eps,
                 min_rows=min_rows, tag_level=tag_level, device=device)
    typer.echo(f"head L{s['layer']}.H{s['head']}: VE {s['ve']:.3f}, sinks {list(zip(s['sinks'], s['sink_tokens']))}")
    typer.echo(f"silhouette of tokens grouped by tagging sink: head {s['silhouette_head']}, "
               f"residual after layer {s['deeper']}: {s['silhouette_deeper']}")
    typer.echo(f"wrote {s['figure']}")


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="run folders written by `catchtag scan` (one per model)"),
    out: Path = typer.Option(Path("runs/compare"), "--out", "-o", help="folder for compare.png and CSVs"),
    ve_level: float = typer.Option(0.3, help="report the share of heads with VE above this"),
) -> None:
    """Models side by side: sinks per head (violin), VE per head (box), share of high-VE heads, per-layer means."""
    from catchtag.jobs import run_compare

    s = _run_job(run_compare, runs, out, ve_level=ve_level)
    for r in s["runs"]:
        typer.echo(f"{r['run']:<24} sinks/head {r['mean_sinks_per_head']:.3f} · with a sink "
                   f"{100 * r['share_heads_with_sink']:.1f}% · mean VE {r['mean_ve']:.3f} (with a sink "
                   f"{r['mean_ve_heads_with_sink']:.3f}) · VE > {ve_level}: {100 * r[f'share_ve_above_{ve_level}']:.1f}%")
    typer.echo(f"wrote {s['figure']}")


@app.command()
def sweep(
    runs: Optional[list[Path]] = typer.Argument(None, help="run folders scanned with --sweep (or use --model)"),
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", help="scan this model (repeatable) with 12 eps"),
    data: str = typer.Option("builtin:prose", "--data", "-d", help="data to scan with --model"),
    max_tokens: int = typer.Option(256, help="tokens per prompt when scanning"),
    limit: Optional[int] = typer.Option(None, help="use only the first K prompts when scanning"),
    batch_size: int = typer.Option(8, help="prompts per forward pass"),
    out: Path = typer.Option(Path("runs/sweep"), "--out", "-o", help="folder for sweep.png, sweep.csv (and scans)"),
    device: str = _DEVICE,
) -> None:
    """Threshold sweep, eps 0.03..0.4 (12 values, one forward pass): mean sinks per head vs mean VE per model."""
    from catchtag.jobs import run_sweep

    s = _run_job(run_sweep, runs, out, model=model, data=data, max_tokens=max_tokens, limit=limit,
                 batch_size=batch_size, device=device)
    for r in s["table"]:
        typer.echo(f"{r['run']:<24} eps {r['eps']:<6g} sinks/head {r['mean_sinks_per_head']:.3f} "
                   f"mean VE {r['mean_ve']:.3f}")
    typer.echo(f"wrote {s['figure']}")


@app.command()
def taxonomy(
    runs: list[Path] = typer.Argument(..., help="run folders written by `catchtag scan`"),
    out: Path = typer.Option(Path("runs/taxonomy"), "--out", "-o", help="folder for taxonomy.png and CSVs"),
    top: int = typer.Option(15, help="how many sink tokens to list"),
) -> None:
    """Sink-token taxonomy: each sink token's count, heads and mean VE; kinds (punctuation, function words, ...)."""
    from catchtag.jobs import run_taxonomy

    s = _run_job(run_taxonomy, runs, out, top=top)
    for name, r in s["runs"].items():
        shares = ", ".join(f"{k['kind']} {100 * k['share']:.1f}%" for k in r["kinds"])
        typer.echo(f"{name}: {shares}")
    typer.echo(f"wrote {s['figure']}")


@app.command()
def geometry(
    model: str = _MODEL, text: Optional[str] = _TEXT, text_file: Optional[Path] = _TEXT_FILE, data: str = _DATA,
    prompt: int = _PROMPT, max_tokens: int = _MAX_TOKENS,
    n_positions: int = typer.Option(64, help="token positions sampled (memory: layers x heads x positions x hidden)"),
    max_pairs: int = typer.Option(20000, help="pairs of tags sampled per kind"),
    eps: float = typer.Option(0.2, help="sink threshold on the column score"),
    min_rows: int = typer.Option(16, help="a column needs this many rows that see it to be a sink"),
    out: Path = typer.Option(Path("runs/geometry"), "--out", "-o", help="folder for geometry.png and CSVs"),
    device: str = _DEVICE,
) -> None:
    """Tag geometry: cosine between distinct tags, and between each tag and the token it is added to."""
    from catchtag.jobs import run_geometry

    s = _run_job(run_geometry, model, out, text=text, text_file=str(text_file) if text_file else None, data=data,
                 prompt=prompt, max_tokens=max_tokens, n_positions=n_positions, max_pairs=max_pairs, eps=eps,
                 min_rows=min_rows, device=device)
    for kind in ("different layers", "same layer, different heads", "same head, different sinks", "tag_vs_token"):
        if kind in s:
            typer.echo(f"{kind:<30} mean {s[kind]['mean']:+.3f} · within ±0.05: "
                       f"{100 * s[kind]['share_within_0.05']:.1f}% · 5-95%: [{s[kind]['p5']:+.3f}, {s[kind]['p95']:+.3f}]")
    typer.echo(f"wrote {s['figure']}")


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="run folders written by `catchtag scan`"),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="the HTML file to write"),
    per_token: bool = typer.Option(True, "--per-token/--no-per-token",
                                   help="also the per-token pictures each run keeps of its first prompt"),
) -> None:
    """One self-contained HTML report (figures embedded, no network) with every analysis of RUNS. Loads no model:
    it draws what the run folders hold."""
    from catchtag.jobs import run_report

    s = _run_job(run_report, runs, out, per_token=per_token)
    typer.echo(f"wrote {s['out']} ({s['bytes'] / 1e6:.1f} MB)")


@app.command()
def view(
    model: str = _MODEL, text: Optional[str] = _TEXT, text_file: Optional[Path] = _TEXT_FILE, data: str = _DATA,
    prompt: int = _PROMPT,
    max_tokens: Optional[int] = typer.Option(256, help="cut the prompt to this many tokens"),
    eps: float = typer.Option(0.2, help="sink threshold on the column score"),
    min_rows: int = typer.Option(16, help="a column needs this many rows that see it to be a sink"),
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help="layer to open on (with --head)"),
    head: Optional[int] = typer.Option(None, "--head", help="head to open on"),
    out: Path = typer.Option(Path("view.html"), "--out", "-o", help="the HTML file to write"),
    device: str = _DEVICE,
) -> None:
    """Interactive token viewer (offline HTML): sinks per layer/head, tokens coloured by the sink that tags them."""
    from catchtag.jobs import run_view

    s = _run_job(run_view, model, out, text=text, text_file=str(text_file) if text_file else None, data=data,
                 prompt=prompt, max_tokens=max_tokens, eps=eps, min_rows=min_rows, layer=layer, head=head,
                 device=device)
    typer.echo(f"wrote {s['out']} ({s['n_tokens']} tokens, {s['bytes'] / 1e6:.2f} MB)")


# ---- probes and steering (docs/probes.md) ----------------------------------------------------------------
def _parse_heads(text: Optional[str]) -> Optional[list[tuple[int, int]]]:
    """'20.3,21.0' -> [(20, 3), (21, 0)]."""
    if not text:
        return None
    try:
        return [(int(a), int(b)) for a, b in (item.strip().split(".") for item in text.split(","))]
    except ValueError:
        raise CatchtagError(f"--heads must look like LAYER.HEAD[,LAYER.HEAD...], e.g. 20.3,21.0; got {text!r}") from None


@app.command()
def probe(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="model name (see `catchtag models`) or path"),
    task: str = typer.Option("truth", "--task", "-t", help="truth (builtin:truth) or sentiment (builtin:sentiment)"),
    out: Path = typer.Option(..., "--out", "-o", help="probe run folder (its scan resumes)"),
    shots: int = typer.Option(2, help="few-shot demonstrations before each statement"),
    template: Optional[str] = typer.Option(None, help="one example, with {text} and ending in {answer}, e.g. "
                                           "'{text} This statement is: {answer}'"),
    eps: float = typer.Option(0.2, help="sink threshold on the column score"),
    min_rows: int = typer.Option(16, help="a column needs this many rows that see it to be a sink"),
    limit: Optional[int] = typer.Option(None, help="use only about this many prompts (balanced per split and label)"),
    batch_size: int = typer.Option(8, help="prompts per forward pass"),
    cv: int = typer.Option(5, help="cross-validation folds (train split only) for the regularisation"),
    top: int = typer.Option(5, help="how many heads to select"),
    seed: int = typer.Option(0, help="CV fold seed"),
    device: str = _DEVICE,
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16, float16"),
    no_figures: bool = typer.Option(False, "--no-figures", help="skip the heat map"),
) -> None:
    """Probe every head's last-token full, tag-only and non-tag output for TASK's label; select heads."""
    from catchtag.jobs import run_probe

    try:
        s = run_probe(model=model, task=task, out=out, shots=shots, template=template, eps=eps, min_rows=min_rows,
                      limit=limit, batch_size=batch_size, cv=cv, seed=seed, top=top, device=device, dtype=dtype,
                      figures=not no_figures)
    except CatchtagError as err:
        _fail(str(err))
    m = s["model_accuracy"]
    typer.echo(f"\n{s['n_train']} train / {s['n_test']} test prompts ({s['mean_prompt_tokens']:.0f} tokens), "
               f"{s['n_probes']} probes ({s['seconds']['probes']:.0f} s)")
    typer.echo(f"model's own {shots}-shot test accuracy: {100 * m['test']:.1f}% "
               f"[{100 * m['test_ci'][0]:.0f}, {100 * m['test_ci'][1]:.0f}]")
    for kind in ("tag", "nontag", "full"):
        b = s["best_test_accuracy"][kind]
        typer.echo(f"best {kind:<6} probe: {100 * b['test_accuracy']:.1f}% at layer {b['layer']} head {b['head']} "
                   f"(mean over heads {100 * s['mean_test_accuracy'][kind]:.1f}%)")
    typer.echo((out / "selected_heads.md").read_text())
    typer.echo(f"wrote {out}/probes.parquet, heads.csv, selected_heads.md, summary.json"
               + ("" if no_figures else ", probe_heatmap.png"))


@app.command()
def steer(
    probes: Path = typer.Option(..., "--probes", "-p", help="a finished `catchtag probe` run folder"),
    heads: Optional[str] = typer.Option(None, help="heads to steer as LAYER.HEAD,...; default: the probe run's "
                                        "selected heads"),
    top: int = typer.Option(1, help="how many selected heads to steer when --heads is not given"),
    scales: str = typer.Option("-8,-4,0,4,8", help="multiples of the mean tag difference to add"),
    n_random: int = typer.Option(2, help="random directions of the same norm (the control)"),
    n_prompts: int = typer.Option(64, help="test prompts to steer (balanced; 0: all of the test split)"),
    seed: int = typer.Option(0, help="seed of the random directions"),
    batch_size: int = typer.Option(8, help="prompts per forward pass"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default PROBES/steer)"),
    device: str = _DEVICE,
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16, float16"),
    no_figures: bool = typer.Option(False, "--no-figures", help="skip the figure"),
) -> None:
    """Add a selected head's mean tag difference (label 1 minus label 0) at its output on test prompts."""
    from catchtag.jobs import run_steer

    try:
        scale_values = tuple(float(x) for x in scales.split(","))
        report = run_steer(probes, heads=_parse_heads(heads), top=top, scales=scale_values, n_random=n_random,
                           n_prompts=n_prompts or None, seed=seed, batch_size=batch_size, out=out, device=device, dtype=dtype,
                           figures=not no_figures)
    except CatchtagError as err:
        _fail(str(err))
    except ValueError as err:
        _fail(f"bad value: {err}")
    rows = report["rows"]
    for layer, head in report["heads"]:
        typer.echo(f"layer {layer} head {head} (|direction| {report['directions'][f'{layer}.{head}']['norm']:.3g}):")
        for r in rows:
            if (r["layer"], r["head"]) == (layer, head) and r["index"] == 0:
                typer.echo(f"  {r['direction']:<6} scale {r['scale']:+5.1f}: log-odds shift {r['shift']:+.3f} "
                           f"± {r['shift_sem']:.3f}, accuracy {100 * r['accuracy']:.1f}%")
    typer.echo(f"wrote {report.get('out', '')}steering.parquet, steering.json ({report['seconds']:.0f} s)")


def _warn_in_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


def main() -> None:
    import os
    import warnings

    warnings.showwarning = _warn_in_one_line  # one clean line each, not Python's file:line report
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its tokenizer-length notices are not the user's concern
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted: rerun the same command to resume", err=True)
        _exit_now_under_torchrun(130)
        sys.exit(130)
    except SystemExit as stop:  # typer.Exit and click's errors end here
        if stop.code not in (0, None):
            _exit_now_under_torchrun(stop.code if isinstance(stop.code, int) else 1)
        raise
    except BaseException:
        from catchtag.distributed import world_size

        if world_size() > 1:  # printed here, because the exit below skips Python's own report
            import traceback

            traceback.print_exc()
            _exit_now_under_torchrun(1)
        raise


def _exit_now_under_torchrun(code: int) -> None:
    """Under torchrun a failed rank leaves at once, skipping interpreter teardown: NCCL's would wait for ranks
    that are themselves waiting for this one, and torchrun stops the others only once this rank has exited.
    Outside torchrun this does nothing and the caller exits as usual."""
    from catchtag.distributed import world_size

    if world_size() > 1:
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
