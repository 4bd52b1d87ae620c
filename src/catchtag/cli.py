"""The command line: a thin layer over the Python API (one command per API function)."""

from __future__ import annotations

import errno
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from catchtag.data.prompts import check_data
from catchtag.errors import CatchtagError
from catchtag.inputs import (check_at_least, check_between, check_device, check_dtype, check_file_out,
                             check_folder_out, check_one_prompt, check_scan_numbers, check_sink_settings,
                             parse_numbers)
from catchtag.interventions.modes import check_mode
from catchtag.models import default_data


def _click_classes(*names: str) -> tuple[type, ...]:
    """Click's classes of these names wherever this typer keeps them: typer >= 0.2x carries its own copy of click
    (and its own Exit and Abort), older typers use click itself."""
    found: list[type] = []
    for module in ("typer.exceptions", "typer._click.exceptions", "click.exceptions"):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        found += [cls for cls in (getattr(mod, n, None) for n in names) if cls is not None and cls not in found]
    return tuple(found)


_CLICK_ERRORS = _click_classes("ClickException")  # usage errors: a bad number, an unknown option, a missing argument
_CLICK_EXITS = _click_classes("Exit", "Abort")  # ways out raised on purpose, never reported as a failure
_RUN_FOLDERS: list[Path] = []  # the --out of the job that is running, for the interrupt and failure lines


class _OneLineErrors(TyperGroup):
    """Every error ends as one line on stderr and exit 2: click's usage errors (which it prints as a usage block
    and a framed message) and a CatchtagError that a command raises (its checks before the job) or lets through."""

    def make_context(self, *args, **kwargs):
        with _one_line_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_errors(ctx):
            return super().invoke(ctx)


@contextmanager
def _one_line_errors(ctx=None):
    def where():  # the subcommand is known once the group has started it
        sub = getattr(ctx, "invoked_subcommand", None) if ctx is not None else None
        return f"{ctx.command_path} {sub}" if sub else None

    try:
        yield
    except CatchtagError as err:
        _fail(str(err), where=where())
    except _CLICK_ERRORS as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # `catchtag` alone shows the help
            raise
        here = err.ctx.command_path if getattr(err, "ctx", None) is not None else None
        _fail(f"{err.format_message().rstrip('.')}. Fix: see `{here or 'catchtag'} --help`",
              code=getattr(err, "exit_code", 2) or 2)
    except KeyboardInterrupt:
        out = _RUN_FOLDERS[-1] if _RUN_FOLDERS else None
        typer.secho("interrupted" + (f": {out} keeps every batch that was finished; rerun the same command to resume"
                                     if out is not None and out.exists() else ""), fg=typer.colors.RED, err=True)
        raise typer.Exit(130) from None
    except OSError as err:  # a folder that cannot be written, a full disk: the user can fix these
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and err.filename:
            _fail(f"cannot write {err.filename} ({err.strerror}). Fix: give --out a folder you can write to")
        if err.errno == errno.ENOSPC:
            _fail(f"the disk is full{f' writing {err.filename}' if err.filename else ''}. Fix: free some space (or "
                  f"write to another disk), then rerun the same command: a scan resumes where it stopped", code=1)
        _unexpected(err, where())
    except Exception as err:  # noqa: BLE001  (anything else: one line and a log, never a bare traceback)
        if isinstance(err, _CLICK_EXITS):
            raise
        _unexpected(err, where())


def _unexpected(err: BaseException, where: str | None) -> None:
    """A failure catchtag did not foresee: one line naming the command and a log file holding the traceback, exit 1."""
    import datetime
    import os
    import traceback

    from catchtag.models import cache_dir

    command = where or _command_path()
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log = None
    try:
        folder = cache_dir() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / f"{command.replace(' ', '-')}-{stamp}-{os.getpid()}.log"
        log.write_text(f"{' '.join(sys.argv)}\n\n{text}", encoding="utf-8")
    except OSError:
        log = None
    first = (str(err).strip().splitlines() or [""])[0][:200]
    where_log = f"the traceback is in {log}" if log is not None else "no log could be written"
    _fail(f"{command} failed: {type(err).__name__}{': ' + first if first else ''} ({where_log}). Fix: if the inputs "
          f"are right this is a bug in catchtag: please report it with that log", code=1)


app = typer.Typer(
    name="catchtag",
    help="Attention sinks and the catch, tag, release mechanism in Hugging Face causal LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=_OneLineErrors,
)


from catchtag.toy.cli import toy_app  # noqa: E402

app.add_typer(toy_app, name="toy")


@app.callback()
def _root() -> None:
    """catchtag: detect sinks, decompose heads into tag / non-tag, and show it."""


def _fail(message: str, code: int = 2, where: str | None = None) -> None:
    """Print ``error: MESSAGE`` as one line on stderr and exit with ``code``. A message that names no fix gets the
    --help of the command (``where``, default: the one running) as its fix."""
    message = " ".join(str(message).split())
    if "Fix" not in message:
        message = f"{message.rstrip('.')}. Fix: see `{where or _command_path()} --help`"
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _command_path() -> str:
    """`catchtag scan` (as it was called) for the command that is running; `catchtag` outside one."""
    for module in ("typer._click.globals", "click.globals"):  # typer >= 0.2x carries its own click
        try:
            ctx = __import__(module, fromlist=["get_current_context"]).get_current_context(silent=True)
        except ImportError:
            continue
        if ctx is not None:
            return ctx.command_path
    return "catchtag"


def _run_job(job, *args, owns: Path | None = None, **kwargs) -> dict:
    """Run a job; a CatchtagError (or a ValueError from a bad value) becomes one line and exit 2. A job that fails
    leaves no --out (``owns``) it created behind, when that holds no file yet (a folder made before the failure);
    one that holds files is kept, as a scan can resume from it."""
    created = owns is not None and not Path(owns).exists()
    folder = owns if owns is not None else kwargs.get("out")
    if folder is not None:
        _RUN_FOLDERS.append(Path(folder))
    try:
        return job(*args, **kwargs)
    except (CatchtagError, ValueError) as err:
        if created:
            _remove_if_empty(Path(owns))
        if isinstance(err, CatchtagError):
            _fail(str(err))
        _fail(f"bad value: {err}")


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not folder.is_symlink() and not any(p.is_file() for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


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
_MODEL = typer.Option("smollm2-135m", "--model", "-m", help="model name (see `catchtag models`) or path")
_EPS = typer.Option(0.2, help="sink threshold on the column score")
_MIN_ROWS = typer.Option(16, help="a column needs this many rows that see it to be a sink")
_DTYPE = typer.Option("auto", help="auto, float32, bfloat16, float16")


@app.command()
def scan(
    model: str = _MODEL,
    data: Optional[str] = typer.Option(None, "--data", "-d", help=".txt, .jsonl (text field) or builtin:NAME "
                                       "(default: builtin:prose; a toy: model's own task data)"),
    out: Path = typer.Option(..., "--out", "-o", help="run folder (resumes if it holds the same run)"),
    eps: float = _EPS,
    min_rows: int = _MIN_ROWS,
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
    device_map: Optional[str] = typer.Option(None, help="split the layers over the visible GPUs (accelerate): auto, "
                                                        "balanced, balanced_low_0 or sequential"),
) -> None:
    """Detect sinks and decompose every head on DATA; write heads.parquet, summary.json and figures to OUT."""
    from catchtag.jobs import run_scan

    # what can be checked before the model is loaded is checked here, cheapest first (a CatchtagError raised here
    # becomes one line: _OneLineErrors)
    check_sink_settings(eps, min_rows)
    sweep_eps = parse_numbers("--sweep", sweep, "0.05,0.1,0.3")
    for value in sweep_eps:
        check_between("--sweep", value, 0, 1, "0.05,0.1,0.3")
    check_scan_numbers(max_tokens=max_tokens, chunk=chunk, limit=limit, batch_size=batch_size)
    check_folder_out(out)
    check_device(device)
    check_dtype(dtype)
    data = data or default_data(model)
    check_data(data)
    summary = _run_job(run_scan, model=model, data=data, out=out, eps=eps, min_rows=min_rows, max_tokens=max_tokens,
                       chunk=chunk, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
                       sweep_eps=sweep_eps, truncate=not no_truncate, overwrite=overwrite, figures=not no_figures,
                       views=not no_views, device_map=device_map)
    if summary is None:  # a torchrun rank other than 0: rank 0 reports
        return
    s = summary["result"]
    ranks = summary["settings"].get("world_size", 1)
    typer.echo(f"\n{s['n_prompts']} prompts x {s['n_layers']} layers x {s['n_heads']} heads "
               f"({summary['wall_seconds']:.1f} s" + (f", {ranks} processes)" if ranks > 1 else ")"))
    typer.echo(f"mean sinks per head {s['mean_sinks_per_head']:.3f} · heads with a sink "
               f"{100 * s['share_heads_with_sink']:.1f}% · mean VE centred {s['mean_ve']:.3f}, uncentred "
               f"{s['mean_ve_uncentred']:.3f} (heads with a sink: centred {s['mean_ve_heads_with_sink']:.3f}, "
               f"uncentred {s['mean_ve_uncentred_heads_with_sink']:.3f})")
    typer.echo("top sink tokens: " + ", ".join(f"{t!r} ({c})" for t, c in s["top_sink_tokens"][:5]))
    typer.echo(f"wrote {out}/heads.parquet, summary.json" + ("" if no_figures else ", figures/*.png")
               + ("" if no_views else ", views/ (the first prompt's per-token pictures)"))


# ---- analyses (docs/analyses.md) ------------------------------------------------------------------------------------
_TEXT = typer.Option(None, "--text", "-t", help="the prompt (default: prompt --prompt of --data)")
_TEXT_FILE = typer.Option(None, "--text-file", help="read the prompt from this file")
_DATA = typer.Option(None, "--data", "-d", help="where the default prompt comes from (default: builtin:prose; a "
                                                 "toy: model's own task data)")
_PROMPT = typer.Option(0, "--prompt", help="which prompt of --data (0-based, as `catchtag scan` numbers them)")
_MAX_TOKENS = typer.Option(256, help="cut the prompt to this many tokens")


@app.command()
def pca(
    model: str = _MODEL, text: Optional[str] = _TEXT, text_file: Optional[Path] = _TEXT_FILE,
    data: Optional[str] = _DATA,
    prompt: int = _PROMPT, max_tokens: int = _MAX_TOKENS,
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help="layer (default: best head, see --help)"),
    head: Optional[int] = typer.Option(None, "--head", help="head (give with --layer)"),
    deeper: Optional[int] = typer.Option(None, help="residual stream after this layer (default layer + 4)"),
    eps: float = _EPS,
    min_rows: int = _MIN_ROWS,
    tag_level: float = typer.Option(0.1, help="a token is tagged by its strongest sink if it pays it this much"),
    out: Path = typer.Option(Path("runs/pca"), "--out", "-o", help="folder for pca_L*H*.png and .json"),
    device: str = _DEVICE,
) -> None:
    """Figure-2 picture of one head: outputs coloured by top-3 PCs, attention with sinks, the residual stream deeper.

    Default head: the highest VE among heads with a sink beyond the first token."""
    from catchtag.jobs import run_pca

    check_sink_settings(eps, min_rows)
    check_between("--tag-level", tag_level, 0, 1, 0.1)
    _check_layer_and_head(layer, head)
    data = data or default_data(model)
    check_one_prompt(text, text_file, data, prompt, max_tokens)
    check_folder_out(out)
    check_device(device)
    s = _run_job(run_pca, model, out, text=text, text_file=str(text_file) if text_file else None, data=data,
                 prompt=prompt, max_tokens=max_tokens, layer=layer, head=head, deeper=deeper, eps=eps,
                 min_rows=min_rows, tag_level=tag_level, device=device, owns=out)
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

    check_between("--ve-level", ve_level, 0, 1, 0.3, low_in=True)
    check_folder_out(out)
    s = _run_job(run_compare, runs, out, ve_level=ve_level, owns=out)
    for r in s["runs"]:
        typer.echo(f"{r['run']:<24} sinks/head {r['mean_sinks_per_head']:.3f} · with a sink "
                   f"{100 * r['share_heads_with_sink']:.1f}% · mean VE centred {r['mean_ve']:.3f}, uncentred "
                   f"{r['mean_ve_uncentred']:.3f} (with a sink: centred {r['mean_ve_heads_with_sink']:.3f}, "
                   f"uncentred {r['mean_ve_uncentred_heads_with_sink']:.3f}) · "
                   f"VE > {ve_level}: {100 * r[f'share_ve_above_{ve_level}']:.1f}%")
    typer.echo(f"wrote {s['figure']}")


@app.command()
def sweep(
    runs: Optional[list[Path]] = typer.Argument(None, help="run folders scanned with --sweep (or use --model)"),
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", help="scan this model (repeatable) with 12 eps"),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="data to scan with --model "
                                       "(default: builtin:prose; a toy: model's own task data)"),
    max_tokens: int = typer.Option(256, help="tokens per prompt when scanning"),
    limit: Optional[int] = typer.Option(None, help="use only the first K prompts when scanning"),
    batch_size: int = typer.Option(8, help="prompts per forward pass"),
    out: Path = typer.Option(Path("runs/sweep"), "--out", "-o", help="folder for sweep.png, sweep.csv (and scans)"),
    device: str = _DEVICE,
) -> None:
    """Threshold sweep, eps 0.03..0.4 (12 values, one forward pass): mean sinks per head vs mean VE per model."""
    from catchtag.jobs import run_sweep

    if not runs and not model:
        raise CatchtagError("give run folders (from `catchtag scan --sweep ...`) or --model to scan. Fix: e.g. "
                            "`catchtag sweep RUN_FOLDER` or `catchtag sweep --model smollm2-135m`")
    check_scan_numbers(max_tokens=max_tokens, limit=limit, batch_size=batch_size)
    check_folder_out(out)
    check_device(device)
    if model:
        data = data or default_data(model[0])
        check_data(data)
    s = _run_job(run_sweep, runs, out, model=model, data=data, max_tokens=max_tokens, limit=limit,
                 batch_size=batch_size, device=device, owns=out)
    for r in s["table"]:
        typer.echo(f"{r['run']:<24} eps {r['eps']:<6g} sinks/head {r['mean_sinks_per_head']:.3f} "
                   f"mean VE centred {r['mean_ve']:.3f}, uncentred {r['mean_ve_uncentred']:.3f}")
    typer.echo(f"wrote {s['figure']}")


@app.command()
def taxonomy(
    runs: list[Path] = typer.Argument(..., help="run folders written by `catchtag scan`"),
    out: Path = typer.Option(Path("runs/taxonomy"), "--out", "-o", help="folder for taxonomy.png and CSVs"),
    top: int = typer.Option(15, help="how many sink tokens to list"),
) -> None:
    """Sink-token taxonomy: each sink token's count, heads and mean VE; kinds (punctuation, function words, ...)."""
    from catchtag.jobs import run_taxonomy

    check_at_least("--top", top, 1, 15)
    check_folder_out(out)
    s = _run_job(run_taxonomy, runs, out, top=top, owns=out)
    for name, r in s["runs"].items():
        shares = ", ".join(f"{k['kind']} {100 * k['share']:.1f}%" for k in r["kinds"])
        typer.echo(f"{name}: {shares}")
    typer.echo(f"wrote {s['figure']}")


@app.command()
def geometry(
    model: str = _MODEL, text: Optional[str] = _TEXT, text_file: Optional[Path] = _TEXT_FILE,
    data: Optional[str] = _DATA,
    prompt: int = _PROMPT, max_tokens: int = _MAX_TOKENS,
    n_positions: int = typer.Option(64, help="token positions sampled (memory: layers x heads x positions x hidden)"),
    max_pairs: int = typer.Option(20000, help="pairs of tags sampled per kind"),
    eps: float = _EPS,
    min_rows: int = _MIN_ROWS,
    out: Path = typer.Option(Path("runs/geometry"), "--out", "-o", help="folder for geometry.png and CSVs"),
    device: str = _DEVICE,
) -> None:
    """Tag geometry: cosine between distinct tags, and between each tag and the token it is added to."""
    from catchtag.jobs import run_geometry

    check_sink_settings(eps, min_rows)
    check_at_least("--n-positions", n_positions, 1, 64)
    check_at_least("--max-pairs", max_pairs, 1, 20000)
    data = data or default_data(model)
    check_one_prompt(text, text_file, data, prompt, max_tokens)
    check_folder_out(out)
    check_device(device)
    s = _run_job(run_geometry, model, out, text=text, text_file=str(text_file) if text_file else None, data=data,
                 prompt=prompt, max_tokens=max_tokens, n_positions=n_positions, max_pairs=max_pairs, eps=eps,
                 min_rows=min_rows, device=device, owns=out)
    for kind in ("different layers", "same layer, different heads", "same head, different sinks", "tag_vs_token"):
        if kind in s:
            typer.echo(f"{kind:<30} mean {s[kind]['mean']:+.3f} · within ±0.05: "
                       f"{100 * s[kind]['share_within_0.05']:.1f}% · 5-95%: "
                       f"[{s[kind]['p5']:+.3f}, {s[kind]['p95']:+.3f}]")
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

    check_file_out(out)
    s = _run_job(run_report, runs, out, per_token=per_token, owns=out)
    typer.echo(f"wrote {s['out']} ({s['bytes'] / 1e6:.1f} MB)")


@app.command()
def view(
    model: str = _MODEL, text: Optional[str] = _TEXT, text_file: Optional[Path] = _TEXT_FILE,
    data: Optional[str] = _DATA,
    prompt: int = _PROMPT,
    max_tokens: Optional[int] = typer.Option(256, help="cut the prompt to this many tokens"),
    eps: float = _EPS,
    min_rows: int = _MIN_ROWS,
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help="layer to open on (with --head)"),
    head: Optional[int] = typer.Option(None, "--head", help="head to open on"),
    out: Path = typer.Option(Path("view.html"), "--out", "-o", help="the HTML file to write"),
    device: str = _DEVICE,
) -> None:
    """Interactive token viewer (offline HTML): sinks per layer/head, tokens coloured by the sink that tags them."""
    from catchtag.jobs import run_view

    check_sink_settings(eps, min_rows)
    _check_layer_and_head(layer, head)
    data = data or default_data(model)
    check_one_prompt(text, text_file, data, prompt, max_tokens)
    check_file_out(out)
    check_device(device)
    s = _run_job(run_view, model, out, text=text, text_file=str(text_file) if text_file else None, data=data,
                 prompt=prompt, max_tokens=max_tokens, eps=eps, min_rows=min_rows, layer=layer, head=head,
                 device=device, owns=out)
    typer.echo(f"wrote {s['out']} ({s['n_tokens']} tokens, {s['bytes'] / 1e6:.2f} MB)")


def _check_layer_and_head(layer: Optional[int], head: Optional[int]) -> None:
    if (layer is None) != (head is None):
        raise CatchtagError("give both --layer and --head, or neither. Fix: e.g. --layer 3 --head 0")


# ---- probes and steering (docs/probes.md) ----------------------------------------------------------------
def _parse_heads(text: Optional[str]) -> Optional[list[tuple[int, int]]]:
    """'20.3,21.0' -> [(20, 3), (21, 0)]."""
    if not text:
        return None
    try:
        heads = [(int(a), int(b)) for a, b in (item.strip().split(".") for item in text.split(","))]
    except ValueError:
        heads = []
    if not heads or any(layer < 0 or head < 0 for layer, head in heads):
        raise CatchtagError(f"--heads must look like LAYER.HEAD[,LAYER.HEAD...] (numbers from 0), got {text!r}. "
                            f"Fix: e.g. --heads 20.3,21.0")
    twice = sorted({h for h in heads if heads.count(h) > 1})
    if twice:
        raise CatchtagError(f"--heads names {', '.join(f'{a}.{b}' for a, b in twice)} more than once. Fix: name each "
                            f"head once")
    return heads


@app.command()
def probe(
    model: str = _MODEL,
    task: str = typer.Option("truth", "--task", "-t", help="truth (builtin:truth) or sentiment (builtin:sentiment)"),
    out: Path = typer.Option(..., "--out", "-o", help="probe run folder (its scan resumes)"),
    shots: int = typer.Option(2, help="few-shot demonstrations before each statement"),
    template: Optional[str] = typer.Option(None, help="one example, with {text} and ending in {answer}, e.g. "
                                           "'{text} This statement is: {answer}'"),
    eps: float = _EPS,
    min_rows: int = _MIN_ROWS,
    limit: Optional[int] = typer.Option(None, help="use only about this many prompts (balanced per split and label)"),
    batch_size: int = typer.Option(8, help="prompts per forward pass"),
    cv: int = typer.Option(5, help="cross-validation folds (train split only) for the regularisation"),
    top: int = typer.Option(5, help="how many heads to select"),
    seed: int = typer.Option(0, help="CV fold seed"),
    device: str = _DEVICE,
    dtype: str = _DTYPE,
    no_figures: bool = typer.Option(False, "--no-figures", help="skip the heat map"),
) -> None:
    """Probe every head's last-token full, tag-only and non-tag output for TASK's label; select heads."""
    from catchtag.jobs import run_probe

    check_sink_settings(eps, min_rows)
    check_at_least("--limit", limit, 1, 200)
    check_at_least("--batch-size", batch_size, 1, 8)
    check_at_least("--cv", cv, 2, 5)
    if limit is not None and limit < 4 * cv:
        raise CatchtagError(f"--limit {limit} leaves too few prompts for {cv}-fold CV (a train and a test split of "
                            f"two labels). Fix: --limit {4 * cv} or more, or a smaller --cv")
    check_at_least("--top", top, 1, 5)
    check_at_least("--seed", seed, 0, 0)
    check_folder_out(out)
    check_device(device)
    check_dtype(dtype)
    s = _run_job(run_probe, model=model, task=task, out=out, shots=shots, template=template, eps=eps,
                 min_rows=min_rows, limit=limit, batch_size=batch_size, cv=cv, seed=seed, top=top, device=device,
                 dtype=dtype, figures=not no_figures, owns=out)
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
    dtype: str = _DTYPE,
    no_figures: bool = typer.Option(False, "--no-figures", help="skip the figure"),
) -> None:
    """Add a selected head's mean tag difference (label 1 minus label 0) at its output on test prompts."""
    from catchtag.jobs import run_steer

    check_at_least("--top", top, 1, 1)
    check_at_least("--n-random", n_random, 0, 2)
    if n_prompts != 0:
        check_at_least("--n-prompts", n_prompts, 2, 64, " (one per label; 0: all of the test split)")
    check_at_least("--seed", seed, 0, 0)
    check_at_least("--batch-size", batch_size, 1, 8)
    scale_values = parse_numbers("--scales", scales, "-8,-4,0,4,8", required=True)
    head_list = _parse_heads(heads)
    if out is not None:
        check_folder_out(out)
    check_device(device)
    check_dtype(dtype)
    report = _run_job(run_steer, probes, heads=head_list, top=top, scales=scale_values, n_random=n_random,
                      n_prompts=n_prompts or None, seed=seed, batch_size=batch_size, out=out, device=device,
                      dtype=dtype, figures=not no_figures, owns=out if out is not None else probes / "steer")
    rows = report["rows"]
    for layer, head in report["heads"]:
        typer.echo(f"layer {layer} head {head} (|direction| {report['directions'][f'{layer}.{head}']['norm']:.3g}):")
        for r in rows:
            if (r["layer"], r["head"]) == (layer, head) and r["index"] == 0:
                typer.echo(f"  {r['direction']:<6} scale {r['scale']:+5.1f}: log-odds shift {r['shift']:+.3f} "
                           f"± {r['shift_sem']:.3f}, accuracy {100 * r['accuracy']:.1f}%")
    typer.echo(f"wrote {report.get('out', '')}steering.parquet, steering.json ({report['seconds']:.0f} s)")


@app.command()
def ablate(
    model: str = _MODEL,
    data: Optional[str] = typer.Option(None, "--data", "-d", help=".txt, .jsonl (text field) or builtin:NAME "
                                       "(default: builtin:prose; a toy: model's own task data)"),
    out: Path = typer.Option(..., "--out", "-o", help="run folder (a scan's, or a new one): writes OUT/ablate/"),
    heads: Optional[str] = typer.Option(None, help="heads to ablate as LAYER.HEAD,...; default: --top"),
    top: int = typer.Option(8, help="ablate the heads with the largest first-order loss change"),
    group: Optional[str] = typer.Option(None, help="layer (every head with a sink in a layer at once) or all"),
    mode: str = typer.Option("mean", help="mean (the tag replaced by its prompt mean: its token-dependent part "
                             "removed), constant (its mean removed: the constant part) or zero (the tag removed)"),
    controls: int = typer.Option(2, help="random-direction controls of the same energy per target and prompt (each "
                                 "prompt draws its own directions)"),
    eps: float = _EPS,
    min_rows: int = _MIN_ROWS,
    max_tokens: Optional[int] = typer.Option(256, help="tokens per prompt"),
    limit: Optional[int] = typer.Option(32, help="use only the first K prompts"),
    batch_size: int = typer.Option(8, help="prompts per forward pass"),
    seed: int = typer.Option(0, help="seed of the controls' random directions"),
    device: str = _DEVICE,
    dtype: str = _DTYPE,
    no_figures: bool = typer.Option(False, "--no-figures", help="skip the figures"),
) -> None:
    """Release, causally: remove heads' tags and measure the next-token loss over the tagged tokens (with controls),
    a first-order estimate for every head, and which later heads change (OUT/ablate/)."""
    from catchtag.jobs import run_ablate

    check_sink_settings(eps, min_rows)
    check_at_least("--top", top, 1, 8)
    check_at_least("--controls", controls, 0, 3)
    check_at_least("--limit", limit, 1, 32)
    check_at_least("--batch-size", batch_size, 1, 8)
    check_at_least("--max-tokens", max_tokens, 1, 256)
    check_at_least("--seed", seed, 0, 0)
    check_mode(mode)
    if group not in (None, "layer", "all"):
        raise CatchtagError(f"--group must be layer or all, got {group!r}. Fix: --group layer")
    data = data or default_data(model)
    check_data(data)
    head_list = _parse_heads(heads)
    check_folder_out(out)
    check_device(device)
    check_dtype(dtype)
    s = _run_job(run_ablate, model=model, data=data, out=out, heads=head_list, top=top, group=group, mode=mode,
                 controls=controls, eps=eps, min_rows=min_rows, max_tokens=max_tokens, limit=limit,
                 batch_size=batch_size, seed=seed, device=device, dtype=dtype, figures=not no_figures, owns=out)
    typer.echo(f"\n{s['n_prompts']} prompts, {s['mode']}-ablation, {s['controls']} control(s) per target "
               f"({s['seconds']['total']:.0f} s: attribution {s['seconds']['attribution']:.0f} s, ablations "
               f"{s['seconds']['ablation']:.0f} s)")
    for r in s["targets"]:
        lo, hi = r["ci"]
        has_ci = lo is not None and hi is not None and lo == lo
        ci = f"[{lo:+.4f}, {hi:+.4f}]" if has_ci else "(one prompt: no interval)"
        typer.echo(f"  {r['target']:<10} loss change {r['delta_nll']:+.4f} {ci} nats over {r['n_prompts_tagged']} "
                   f"prompt(s) with a tag; control {r['control_delta_nll']:+.4f}; first-order "
                   f"{r['attribution']:+.4f}; VE {r['ve']:.3f} (uncentred {r['ve_uncentred']:.3f}); tag energy: "
                   f"constant {r['constant_share']:.3f}, token-dependent {r['varying_share']:.3f}")
    rank = s["attribution_vs_real_rank_correlation"]
    if rank:
        typer.echo(f"rank correlation of first-order and real changes over {rank['n_heads']} heads: "
                   f"{rank['spearman']:.2f}")
    typer.echo(f"wrote {out}/ablate/: attribution.parquet, ablation.parquet, release.parquet, tag_or_bias.csv, "
               f"summary.json"
               + ("" if no_figures else ", ablation.png, release.png"))


@app.command()
def release(
    model: str = _MODEL,
    data: Optional[str] = typer.Option(None, "--data", "-d", help=".txt, .jsonl (text field) or builtin:NAME "
                                       "(default: builtin:prose; a toy: model's own task data)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    heads: Optional[str] = typer.Option(None, "--heads", "--head", help="heads as LAYER.HEAD,...; default: --top"),
    top: int = typer.Option(3, help="the heads with the highest mean VE among those with two or more sinks"),
    level: float = typer.Option(0.1, help="a token joins the group of the sink it attends to most, from this much"),
    eps: float = _EPS,
    min_rows: int = _MIN_ROWS,
    max_tokens: Optional[int] = typer.Option(256, help="tokens per prompt"),
    limit: Optional[int] = typer.Option(32, help="use only the first K prompts"),
    batch_size: int = typer.Option(8, help="prompts per forward pass"),
    folds: int = typer.Option(5, help="cross-validation folds over prompts"),
    seed: int = typer.Option(0, help="seed of the control's shuffle"),
    device: str = _DEVICE,
    dtype: str = _DTYPE,
    no_figures: bool = typer.Option(False, "--no-figures", help="skip the figure"),
) -> None:
    """Release by decoding: read a head's sink grouping from the residual stream at every deeper layer, against a
    control with other prompts' groups."""
    from catchtag.jobs import run_release

    check_sink_settings(eps, min_rows)
    check_between("--level", level, 0, 1, 0.1)
    check_at_least("--top", top, 1, 3)
    check_at_least("--limit", limit, 1, 32)
    check_at_least("--max-tokens", max_tokens, 1, 256)
    check_at_least("--batch-size", batch_size, 1, 8)
    check_at_least("--folds", folds, 2, 5)
    check_at_least("--seed", seed, 0, 0)
    if limit is not None and limit < folds:
        raise CatchtagError(f"--limit {limit} is fewer prompts than --folds {folds}. Fix: --limit {folds} or more")
    data = data or default_data(model)
    check_data(data)
    head_list = _parse_heads(heads)
    check_folder_out(out)
    check_device(device)
    check_dtype(dtype)
    s = _run_job(run_release, model=model, data=data, out=out, heads=head_list, top=top, level=level, eps=eps,
                 min_rows=min_rows, max_tokens=max_tokens, limit=limit, batch_size=batch_size, folds=folds, seed=seed,
                 device=device, dtype=dtype, figures=not no_figures, owns=out)
    for layer, head in s["heads"]:
        mine = [r for r in s["rows"] if (r["source_layer"], r["head"]) == (layer, head)]
        first, last = mine[0], mine[-1]
        typer.echo(f"head {layer}.{head}: layer {first['layer']} accuracy {first['accuracy']:.3f} (control "
                   f"{first['control_accuracy']:.3f}) ... layer {last['layer']} {last['accuracy']:.3f} (control "
                   f"{last['control_accuracy']:.3f}); chance {first['chance']:.3f} (control "
                   f"{first['control_chance']:.3f})")
    typer.echo(f"wrote {out}/release_decoding.csv, summary.json" + ("" if no_figures else ", release_decoding.png"))


def _warn_in_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


def main() -> None:
    import os
    import warnings

    warnings.showwarning = _warn_in_one_line  # one clean line each, not Python's file:line report
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its tokenizer-length notices are not the user's concern
    if not sys.stderr.isatty():  # transformers' own bars (loading, converting, saving weights) would garble a log
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")  # catchtag's own progress prints plain lines there instead
    try:
        app()
    except KeyboardInterrupt:  # outside a command (while the CLI itself starts); inside one, _one_line_errors says it
        typer.echo("interrupted", err=True)
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
