"""What a job reads before it computes: the model a name stands for, the one prompt of a per-prompt analysis, and
checks of the flags that point into them. Shared by the jobs (jobs.py) and the report, so neither imports the other."""

from __future__ import annotations

from pathlib import Path

from catchtag.data.prompts import Prompt, load_prompts, tokenize_prompts
from catchtag.errors import CatchtagError
from catchtag.models import display_name, load_model


def resolve_model(model, device: str = "auto", dtype: str = "auto"):
    """A model name -> (name, model, tokenizer); a (model, tokenizer) pair passes through."""
    if isinstance(model, (tuple, list)):
        net, tok = model
        return display_name(net), net, tok
    net, tok = load_model(model, device=device, dtype=dtype)
    return model, net, tok


def check_file_out(out) -> None:
    """An --out that must be a file: refuse a folder before any work is done."""
    if Path(out).is_dir():
        raise CatchtagError(f"--out {out} is a folder; this command writes one HTML file. Fix: e.g. --out "
                            f"{Path(out) / 'page.html'}")


def check_head(net, layer, head, layer_flag: str = "--layer") -> None:
    """--layer/--head inside the model, or one line saying what the model has."""
    n_layers, n_heads = net.config.num_hidden_layers, net.config.num_attention_heads
    if layer is not None and not 0 <= layer < n_layers:
        raise CatchtagError(f"{layer_flag} {layer} is out of range: the model has layers 0-{n_layers - 1}")
    if head is not None and not 0 <= head < n_heads:
        raise CatchtagError(f"--head {head} is out of range: the model has heads 0-{n_heads - 1}")


def resolve_text(tokenizer, net, text: str | None = None, text_file: str | None = None,
                 data: str = "builtin:prose", prompt: int = 0, max_tokens: int | None = 256):
    """The one prompt to analyse: --text, else --text-file, else prompt number ``prompt`` of ``data`` (cut to
    max_tokens tokens, as ``catchtag scan`` cuts it, so the prompt is one of the scanned ones)."""
    if text is not None and text_file is not None:
        raise CatchtagError("give --text or --text-file, not both")
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise CatchtagError(f"--text-file {path} does not exist")
        text = path.read_text(encoding="utf-8")
    if text is not None:
        p = tokenize_prompts([text], tokenizer, max_tokens=max_tokens)[0]
        return Prompt(0, p.input_ids, text)
    prompts = load_prompts(data, tokenizer, net, max_tokens=max_tokens, limit=None)
    if not 0 <= prompt < len(prompts):
        raise CatchtagError(f"--prompt {prompt} is out of range: {data} gives {len(prompts)} prompts")
    p = prompts[prompt]
    return Prompt(0, p.input_ids, p.text)
