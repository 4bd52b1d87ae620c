"""Each command's settings, declared once: a frozen dataclass per job whose fields carry the default, the flag, the
help and the check. The Python API (``run_scan(...)``) builds the dataclass from its keywords; the command line
(cli.py) is generated from the same fields, the way transformers' HfArgumentParser derives a command line from
TrainingArguments. ``JobConfig.check`` runs every check that needs no model, so a bad value is refused before one
loads. Light on purpose: the CLI imports this to build its commands; a job's heavy imports happen when it runs."""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from catchtag.engine.request import SinkSettings
from catchtag.errors import CatchtagError, check_type
from catchtag.inputs import (check_at_least, check_between, check_device, check_dtype, check_file_out,
                             check_folder_out, parse_numbers)

REQUIRED = ...  # a setting the command line must give (the Python API keeps a default)


def setting(default, help: str, *flags: str, check: Callable[[str, Any], None] | None = None, cli: Any = None,
            parse: Callable[[str, Any], Any] | None = None, argument: bool = False, required: bool = False,
            negate: bool = False, python_only: bool = False, cli_default: Any = None):
    """A job setting: its default, its help and its flags (default: --NAME), and where needed:
    check(flag, value) refuses a bad value with a CatchtagError before any model loads; cli is the type the command
    line takes and parse(flag, text) turns it into the setting ("20.3,21.0" -> [(20, 3), (21, 0)]); argument: a
    positional argument of the command; required: the command line must give it; negate: the flag switches the
    setting off (--no-figures sets figures=False); python_only: no flag (a setting for scripts and tests);
    cli_default: the default as the command line shows it, where the setting's own is not text (a tuple)."""
    return field(default=default, metadata={"help": help, "flags": flags, "check": check, "cli": cli, "parse": parse,
                                            "argument": argument, "required": required, "negate": negate,
                                            "python_only": python_only, "cli_default": cli_default})


def flag_of(f: dataclasses.Field) -> str:
    """The long flag that names a setting in messages (--batch-size for batch_size)."""
    return next((d for d in f.metadata.get("flags", ()) if d.startswith("--")), "--" + f.name.replace("_", "-"))


# ---- checks -------------------------------------------------------------------------------------------------------
def at_least(minimum, example, note: str = "") -> Callable[[str, Any], None]:
    return lambda flag, value: check_at_least(flag, value, minimum, example, note)


def between(low, high, example, **inclusive) -> Callable[[str, Any], None]:
    return lambda flag, value: check_between(flag, value, low, high, example, **inclusive)


def one_of(*choices: str, example: str | None = None) -> Callable[[str, Any], None]:
    def check(flag, value):
        if value is not None and value not in choices:
            raise CatchtagError(f"{flag} must be {' or '.join(choices)}, got {value!r}. Fix: {flag} "
                                f"{example or choices[0]}")
    return check


def _folder_out(flag, value):
    if value is not None:
        check_folder_out(value, flag)


def _file_out(flag, value):
    if value is not None:
        check_file_out(value)


def _device(flag, value):
    check_device(value)


def _dtype(flag, value):
    check_dtype(value)


def _data(flag, value):
    from catchtag.data.prompts import check_data

    if value is not None:
        check_data(value)


# ---- parsing what the command line gives as text ----------------------------------------------------------------
def numbers(example: str, required: bool = False) -> Callable[[str, Any], tuple[float, ...]]:
    """'0.05,0.1' -> (0.05, 0.1); a tuple given in Python passes through."""
    def parse(flag, value):
        return parse_numbers(flag, value, example, required) if isinstance(value, str) or value is None else \
            tuple(float(v) for v in value)
    return parse


def heads(flag: str, text) -> Optional[list[tuple[int, int]]]:
    """'20.3,21.0' -> [(20, 3), (21, 0)]; a list of pairs given in Python passes through (checked the same way)."""
    if not text:
        return None
    if isinstance(text, str):
        try:
            found = [(int(a), int(b)) for a, b in (item.strip().split(".") for item in text.split(","))]
        except ValueError:
            found = []
    else:
        found = [tuple(h) for h in text]
    if not found or any(len(h) != 2 or h[0] < 0 or h[1] < 0 for h in found):
        raise CatchtagError(f"{flag} must look like LAYER.HEAD[,LAYER.HEAD...] (numbers from 0), got {text!r}. "
                            f"Fix: e.g. {flag} 20.3,21.0")
    twice = sorted({h for h in found if found.count(h) > 1})
    if twice:
        raise CatchtagError(f"{flag} names {', '.join(f'{a}.{b}' for a, b in twice)} more than once. Fix: name each "
                            f"head once")
    return [(int(a), int(b)) for a, b in found]


# ---- settings several jobs share (one declaration each) ----------------------------------------------------------
def model_setting():
    return setting("smollm2-135m", "model name (see `catchtag models`) or path", "--model", "-m")


def data_setting(help: str = ".txt, .jsonl (text field) or builtin:NAME (default: builtin:prose; a toy: model's "
                             "own task data)"):
    return setting(None, help, "--data", "-d", check=_data)


def folder_out(default, help: str, required: bool = False):
    return setting(default, help, "--out", "-o", check=_folder_out, required=required)


def file_out(default, help: str = "the HTML file to write"):
    return setting(default, help, "--out", "-o", check=_file_out)


def eps_setting():
    return setting(SinkSettings.eps, "sink threshold on the column score", check=between(0, 1, 0.2))


def min_rows_setting():
    return setting(SinkSettings.min_rows, "a column needs this many rows that see it to be a sink",
                   check=at_least(1, 16))


def batch_size_setting():
    return setting(8, "prompts per forward pass", check=at_least(1, 8))


def device_setting():
    return setting("auto", "auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N", check=_device)


def dtype_setting(help: str = "auto, float32, bfloat16, float16"):
    return setting("auto", help, check=_dtype)


def seed_setting(help: str):
    return setting(0, help, check=at_least(0, 0))


def figures_setting(help: str = "skip the figures"):
    return setting(True, help, "--no-figures", negate=True)


def check_layer_and_head(layer, head) -> None:
    if (layer is None) != (head is None):
        raise CatchtagError("give both --layer and --head, or neither. Fix: e.g. --layer 3 --head 0")


_KINDS = {int: ((int,), "a whole number"), float: ((int, float), "a number"), bool: ((bool,), "True or False"),
          str: ((str,), "text"), Path: ((str, os.PathLike), "a path")}


def _check_kind(f: dataclasses.Field, value, hint) -> None:
    """A setting of the wrong type from Python (eps="x", limit=1.5) refused in one line; settings that take a
    model object as well as a name, and those parsed from text, are checked where they are used."""
    if value is None or value is REQUIRED or f.metadata.get("parse") is not None or f.name == "model":
        return
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
    known = [_KINDS[k] for k in kinds if k in _KINDS]
    if known:
        example = f.default if f.default not in (None, REQUIRED) else {int: 8, float: 0.1}.get(kinds[0], "...")
        check_type(f.name, value, tuple(t for types, _ in known for t in types), " or ".join(w for _, w in known),
                   example)


# ---- the base of every job's settings -----------------------------------------------------------------------------
@dataclass(frozen=True)
class JobConfig:
    """Settings of one job. Subclasses declare their fields with ``setting`` (or the shared ones above), the
    command's name and help, and the settings the Python function takes by position; ``check_together`` holds the
    checks that involve more than one setting."""

    command: ClassVar[str]
    positional: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        for f in fields(self):  # text from the command line (or a value from Python) into the setting's form
            parse = f.metadata.get("parse")
            if parse is not None:
                object.__setattr__(self, f.name, parse(flag_of(f), getattr(self, f.name)))
        names = {f.name for f in fields(self)}
        if "data" in names and "model" in names and self.data is None:  # a toy: model's own task data
            from catchtag.models import default_data

            model = self.model[0] if isinstance(self.model, (list, tuple)) and self.model and \
                isinstance(self.model[0], str) else self.model
            object.__setattr__(self, "data", default_data(model))

    def check(self) -> None:
        """Every check that needs no model: each setting's type (a Python caller can pass anything), its own check,
        then those across settings."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            if getattr(self, f.name) is REQUIRED:
                raise CatchtagError(f"{self.command} needs {f.name}. Fix: give {f.name}=...")
            _check_kind(f, getattr(self, f.name), hints[f.name])
            check = f.metadata.get("check")
            if check is not None:
                check(flag_of(f), getattr(self, f.name))
        self.check_together()

    def check_together(self) -> None:
        """Checks across settings (overridden where a job has them)."""

    def owns(self) -> Path | None:
        """The --out a failed run removes again when it created it and wrote nothing into it."""
        out = getattr(self, "out", None)
        return Path(out) if out is not None else None

    def lock_folder(self) -> Path | None:
        """The folder one writer at a time may write (runs.WriterLock): the job's --out folder; None for a job that
        writes one file (report, view) or locks its own folder (a scan's run folder)."""
        out = self.owns()
        return out if out is not None and out.suffix != ".html" else None

    @classmethod
    def from_call(cls, args: tuple, kwargs: dict) -> "JobConfig":
        """The settings from a Python call: the first arguments by position (``positional``), the rest by name;
        a name that is no setting of this job is refused in one line."""
        if len(args) > len(cls.positional):
            raise CatchtagError(f"{cls.command} takes at most {len(cls.positional)} settings by position "
                                f"({', '.join(cls.positional) or 'none'}), got {len(args)}. Fix: pass the others by "
                                f"name")
        named = dict(zip(cls.positional, args))
        twice = sorted(set(named) & set(kwargs))
        if twice:
            raise CatchtagError(f"{cls.command}: {', '.join(twice)} given twice. Fix: give each setting once")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise CatchtagError(f"{cls.command} has no setting {', '.join(unknown)}. Fix: use one of "
                                f"{', '.join(sorted(known))}")
        return cls(**named, **kwargs)


@dataclass(frozen=True)
class Job:
    """A command: its settings, what it does (``run`` takes the checked settings and returns the summary it wrote)
    and the lines the command line prints from that summary."""

    config: type[JobConfig]
    run: Callable[[Any], Any]
    lines: Callable[[Any, Any], list[str]] = lambda summary, config: []

    @property
    def name(self) -> str:
        return self.config.command

    def execute(self, config: JobConfig):
        """Check the settings, then run the job with its output folder locked against a second writer (one line
        and exit 2 for the second, instead of two jobs interleaving their files); a job that fails before writing
        anything leaves no folder behind."""
        config.check()
        folder = config.lock_folder()
        if folder is None:
            return self.run(config)
        from catchtag.runs import WriterLock

        lock = WriterLock(Path(folder), f"catchtag {self.name}")
        done = False
        try:
            result = self.run(config)
            done = True
            return result
        finally:
            lock.release(undo=not done and not any(p.name != lock.path.name for p in lock.path.parent.iterdir()),
                         remove=done)

    def api(self) -> Callable[..., Any]:
        """The Python function of this job (``run_scan`` ...): the same settings by name, checked the same way."""
        job = self

        def function(*args, **kwargs):
            return job.execute(job.config.from_call(args, kwargs))

        declared = {f.name: f for f in fields(self.config)}
        parameters = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=declared[n].default)
                      for n in self.config.positional]
        parameters += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=f.default)
                       for n, f in declared.items() if n not in self.config.positional]
        function.__signature__ = inspect.Signature(parameters)
        function.__name__ = function.__qualname__ = f"run_{self.name}"
        function.__doc__ = self.run.__doc__
        function.__module__ = "catchtag.jobs"
        return function


@dataclass(frozen=True)
class OnePromptConfig(JobConfig):
    """The settings of a job on one prompt (pca, geometry, view): the model, and the prompt as --text, --text-file or
    prompt --prompt of --data, cut to --max-tokens; checked before the model loads (resolve_text checks the rest)."""

    positional = ("model", "out")

    model: str = model_setting()
    text: Optional[str] = setting(None, "the prompt (default: prompt --prompt of --data)", "--text", "-t")
    text_file: Optional[Path] = setting(None, "read the prompt from this file", "--text-file", cli=Optional[Path])
    data: Optional[str] = data_setting("where the default prompt comes from (default: builtin:prose; a toy: model's "
                                       "own task data)")
    prompt: int = setting(0, "which prompt of --data (0-based, as `catchtag scan` numbers them)", "--prompt")
    max_tokens: Optional[int] = setting(256, "cut the prompt to this many tokens")

    def check_together(self) -> None:
        from catchtag.inputs import check_one_prompt

        check_one_prompt(self.text, self.text_file, self.data, self.prompt, self.max_tokens)
