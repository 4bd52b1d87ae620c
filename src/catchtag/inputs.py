"""What a job reads before it computes: the model a name stands for, the one prompt of a per-prompt analysis, and
checks of the flags that point into them. Shared by the jobs (jobs.py) and the report, so neither imports the other."""

from __future__ import annotations

import math
from pathlib import Path

from catchtag.data.prompts import Prompt, check_data, load_prompts, read_utf8, tokenize_prompts
from catchtag.errors import CatchtagError
from catchtag.models import display_name, load_model, resolve_device, resolve_dtype


def resolve_model(model, device: str = "auto", dtype: str = "auto"):
    """A model name -> (name, model, tokenizer); a (model, tokenizer) pair (a model loaded with transformers, any
    dtype or device map, or a PEFT wrapper) passes through, switched to catchtag's attention (refused in one line if
    its type does not reach parity: docs/models.md)."""
    if isinstance(model, (tuple, list)):
        from catchtag.engine.attention import enable, is_enabled, unwrap

        net, tok = model
        if not is_enabled(unwrap(net)):
            enable(net)
        return display_name(net), net, tok
    net, tok = load_model(model, device=device, dtype=dtype)
    return model, net, tok


def _file_above(path: Path) -> Path | None:
    """The nearest existing path above ``path`` when it is a file (so nothing can be created under it)."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def _refuse_under_a_file(flag: str, out: Path, what: str) -> None:
    above = _file_above(out)
    if above is not None:
        raise CatchtagError(f"{flag} {out}: {above} is a file, not a folder, so nothing can be written under it. "
                            f"Fix: choose {what} outside {above}")


def check_folder_out(out, flag: str = "--out") -> None:
    """An --out that must be a folder: refuse a file, or a path under a file, before any work is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CatchtagError(f"{flag} {out} is a file, not a folder. Fix: give a folder (a new one is created), "
                            f"e.g. {flag} {out.with_suffix('')}-out")
    _refuse_under_a_file(flag, out, "a folder")


def check_file_out(out) -> None:
    """An --out that must be a file: refuse a folder, or a path under a file, before any work is done."""
    out = Path(out)
    if out.is_dir():
        raise CatchtagError(f"--out {out} is a folder; this command writes one HTML file. Fix: e.g. --out "
                            f"{out / 'page.html'}")
    _refuse_under_a_file("--out", out, "a path")


def check_at_least(flag: str, value, minimum, example, note: str = "") -> None:
    """A whole-number flag that must be at least ``minimum`` (None: not given, passes). ``note`` follows the bound,
    e.g. " (0: no limit)"."""
    if value is not None and not value >= minimum:
        raise CatchtagError(f"{flag} must be >= {minimum}{note}, got {value}. Fix: e.g. {flag} {example}")


def check_between(flag: str, value, low, high, example, *, low_in: bool = False, high_in: bool = False) -> None:
    """A number that must lie between ``low`` and ``high`` (included where low_in/high_in; None: not given)."""
    if value is None:
        return
    above = value >= low if low_in else value > low
    below = value <= high if high_in else value < high
    if not (above and below):  # nan fails both
        span = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
        raise CatchtagError(f"{flag} must lie in {span}, got {value}. Fix: e.g. {flag} {example}")


def check_finite(flag: str, value, example) -> None:
    if value is not None and not math.isfinite(value):
        raise CatchtagError(f"{flag} must be a finite number, got {value}. Fix: e.g. {flag} {example}")


def parse_numbers(flag: str, text: str | None, example: str, required: bool = False) -> tuple[float, ...]:
    """'0.05,0.1' -> (0.05, 0.1) (empty items are skipped); anything but comma-separated finite numbers is refused
    with the flag named, and so is no number at all when ``required``."""
    try:
        values = tuple(float(x) for x in (text or "").split(",") if x.strip())
    except ValueError:
        values = None
    if values is None or not all(math.isfinite(v) for v in values) or (required and not values):
        raise CatchtagError(f"{flag} must be comma-separated numbers, got {text!r}. Fix: e.g. {flag} {example}")
    return values


def check_device(device: str | None) -> None:
    """--device names a device that exists here (auto, cpu, cuda, cuda:N), checked before any model is loaded."""
    resolve_device(device)


def check_dtype(dtype: str | None) -> None:
    """--dtype is one catchtag knows (auto, float32, bfloat16, ...)."""
    try:
        resolve_dtype(dtype, "cpu")
    except CatchtagError as err:
        raise CatchtagError(f"--dtype: {err}. Fix: --dtype auto (float32 on cpu, bfloat16 on cuda)") from None


def read_text_file(text_file) -> str:
    """The prompt in --text-file: an existing, non-empty UTF-8 file."""
    path = Path(text_file)
    if path.is_dir():
        raise CatchtagError(f"--text-file {path} is a folder. Fix: give a text file that holds the prompt")
    if not path.is_file():
        raise CatchtagError(f"--text-file {path} does not exist. Fix: check the path, or give the prompt with "
                            f"--text '...'")
    text = read_utf8(path)
    if not text.strip():
        raise CatchtagError(f"--text-file {path} is empty. Fix: put the prompt in it, or give it with --text '...'")
    return text


def check_one_prompt(text: str | None, text_file, data: str, prompt: int, max_tokens: int | None) -> None:
    """The flags of a per-prompt analysis (pca, geometry, view), checked before the model is loaded: --text or
    --text-file (readable) or --data (readable), --prompt and --max-tokens not negative. What needs the model
    (--prompt beyond the data's end) is checked by resolve_text."""
    if text is not None and text_file is not None:
        raise CatchtagError("give --text or --text-file, not both. Fix: drop one of them")
    check_at_least("--max-tokens", max_tokens, 0, 256, " (0: no limit)")
    if text_file is not None:
        read_text_file(text_file)
    elif text is None:
        check_at_least("--prompt", prompt, 0, 0)
        check_data(data)


def check_head(net, layer, head, layer_flag: str = "--layer") -> None:
    """--layer/--head inside the model, or one line saying what the model has."""
    n_layers, n_heads = net.config.num_hidden_layers, net.config.num_attention_heads
    if layer is not None and not 0 <= layer < n_layers:
        raise CatchtagError(f"{layer_flag} {layer} is out of range: the model has layers 0-{n_layers - 1}. Fix: "
                            f"{layer_flag} 0 to {n_layers - 1}")
    if head is not None and not 0 <= head < n_heads:
        raise CatchtagError(f"--head {head} is out of range: the model has heads 0-{n_heads - 1}. Fix: --head 0 "
                            f"to {n_heads - 1}")


def resolve_text(tokenizer, net, text: str | None = None, text_file: str | None = None,
                 data: str = "builtin:prose", prompt: int = 0, max_tokens: int | None = 256):
    """The one prompt to analyse: --text, else --text-file, else prompt number ``prompt`` of ``data`` (cut to
    max_tokens tokens, as ``catchtag scan`` cuts it, so the prompt is one of the scanned ones)."""
    if text is not None and text_file is not None:
        raise CatchtagError("give --text or --text-file, not both. Fix: drop one of them")
    if text_file is not None:
        text = read_text_file(text_file)
    if text is not None:
        p = tokenize_prompts([text], tokenizer, max_tokens=max_tokens)[0]
        return Prompt(0, p.input_ids, text)
    prompts = load_prompts(data, tokenizer, net, max_tokens=max_tokens, limit=None)
    if not 0 <= prompt < len(prompts):
        raise CatchtagError(f"--prompt {prompt} is out of range: {data} gives {len(prompts)} prompts. Fix: "
                            f"--prompt 0 to {len(prompts) - 1}")
    p = prompts[prompt]
    return Prompt(0, p.input_ids, p.text)
