"""The command line: a thin layer over the Python API (one command per API function)."""

from __future__ import annotations

import json
import sys
import time
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

    for row in available_models():
        mark = "installed" if row["installed"] else f"not installed: {row['install']}"
        typer.echo(f"{row['name']:<16} {mark:<60} {row['description']}")
    typer.echo("Also: a local Hugging Face folder, a local .gguf file, or a hub id already in the local cache.")


@app.command()
def scan(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="model name (see `catchtag models`) or path"),
    data: str = typer.Option("builtin:prose", "--data", "-d", help=".txt, .jsonl (text field) or builtin:NAME"),
    out: Path = typer.Option(..., "--out", "-o", help="run folder (resumes if it holds the same run)"),
    eps: float = typer.Option(0.2, help="sink threshold on the column score"),
    min_rows: int = typer.Option(16, help="a column needs this many rows that see it to be a sink"),
    max_tokens: Optional[int] = typer.Option(256, help="tokens per prompt (long texts are cut into such chunks)"),
    chunk: Optional[int] = typer.Option(None, help="cut the whole data into prompts of this many tokens"),
    limit: Optional[int] = typer.Option(None, help="use only the first K prompts"),
    batch_size: int = typer.Option(8, help="prompts per forward pass"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    dtype: str = typer.Option("auto", help="auto (float32 on cpu, bfloat16 on cuda), float32, bfloat16, float16"),
    sweep: Optional[str] = typer.Option(None, help="extra eps values computed in the same pass, e.g. 0.05,0.1,0.3"),
    no_truncate: bool = typer.Option(False, "--no-truncate", help="refuse prompts longer than the model's context"),
    overwrite: bool = typer.Option(False, help="discard an existing run in --out"),
    no_figures: bool = typer.Option(False, "--no-figures", help="skip the PNG figures"),
    device_map: Optional[str] = typer.Option(None, help="'auto': split the layers over the visible GPUs"),
) -> None:
    """Detect sinks and decompose every head on DATA; write heads.parquet, summary.json and figures to OUT."""
    from catchtag.api import run_scan

    try:
        sweep_eps = tuple(float(x) for x in sweep.split(",")) if sweep else ()
        summary = run_scan(model=model, data=data, out=out, eps=eps, min_rows=min_rows, max_tokens=max_tokens,
                           chunk=chunk, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
                           sweep_eps=sweep_eps, truncate=not no_truncate, overwrite=overwrite,
                           figures=not no_figures, device_map=device_map)
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
    typer.echo(f"wrote {out}/heads.parquet, summary.json" + ("" if no_figures else " and figures/*.png"))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
