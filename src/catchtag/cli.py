"""The command line: a thin layer over the jobs. Each command is generated from its job's settings (catchtag/jobs:
one frozen dataclass per job), so flags, defaults, help and checks are declared once, with the Python API."""

from __future__ import annotations

import errno
import inspect
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from typer.core import TyperGroup

from catchtag.errors import CatchtagError


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
    except BrokenPipeError:  # the reader went away (`catchtag scan --help | head`): nothing is wrong, say nothing
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's own flush cannot fail again
        raise typer.Exit(1) from None
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


def _run_job(execute, config, owns: Path | None = None) -> dict | None:
    """Run a job; a CatchtagError (or a ValueError from a bad value) becomes one line and exit 2. A job that fails
    leaves no --out (``owns``) it created behind, when that holds no file yet (a folder made before the failure);
    one that holds files is kept, as a scan can resume from it."""
    created = owns is not None and not Path(owns).exists()
    folder = owns if owns is not None else getattr(config, "out", None)
    if folder is not None:
        _RUN_FOLDERS.append(Path(folder))
    try:
        return execute(config)
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


# ---- the commands, generated from the jobs' settings (catchtag/jobs) ----------------------------------------------
def _parameter(f, hints: dict) -> inspect.Parameter:
    """The typer parameter of one job setting: its flags, help and default; the command line's type where it takes
    the setting as text (--heads 20.3,21.0), a --no-X switch for a setting that is on by default."""
    from catchtag.jobs.options import REQUIRED

    m = f.metadata
    annotation = m["cli"] if m["cli"] is not None else hints[f.name]
    name, default = f.name, f.default
    if m["negate"]:
        name, annotation, default = "no_" + f.name, bool, False
    elif m["parse"] is not None and not isinstance(default, (str, int, float, type(None))):
        default = m["cli_default"]
    if m["required"]:
        default = ...
    elif default is REQUIRED:
        default = None
    info = (typer.Argument(default, help=m["help"]) if m["argument"] else
            typer.Option(default, *m["flags"], help=m["help"]))
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def _command(job) -> None:
    """Register ``catchtag JOB``: parse the flags into the job's settings, check them (before any model loads), run
    the job and print its lines."""
    import dataclasses
    import typing

    settings = [f for f in dataclasses.fields(job.config) if not f.metadata.get("python_only")]
    hints = typing.get_type_hints(job.config)
    parameters = [_parameter(f, hints) for f in settings]

    def command(**given) -> None:
        values = {f.name: (not given["no_" + f.name]) if f.metadata["negate"] else given[f.name] for f in settings}
        config = job.config(**values)
        summary = _run_job(job.execute, config, owns=config.owns())
        if summary is None:  # a torchrun rank other than 0: rank 0 reports
            return
        for line in job.lines(summary, config):
            typer.echo(line)

    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__name__ = job.name
    command.__doc__ = "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(job.config.__doc__).split("\n\n"))
    app.command(job.name)(command)


def _register() -> None:
    from catchtag.jobs import JOBS

    for job in JOBS.values():
        _command(job)


_register()


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
