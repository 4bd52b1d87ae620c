"""`catchtag view`: the interactive token viewer of one prompt (an offline HTML page), and its notebook form."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from catchtag.engine.request import SinkSettings
from catchtag.jobs.options import (Job, OnePromptConfig, check_layer_and_head, device_setting, dtype_setting,
                                   eps_setting, file_out, min_rows_setting, setting)

if TYPE_CHECKING:
    from catchtag.report.viewer import TokenView


@dataclass(frozen=True)
class ViewConfig(OnePromptConfig):
    """Interactive token viewer (offline HTML): sinks per layer/head, tokens coloured by the sink that tags them."""

    command = "view"

    eps: float = eps_setting()
    min_rows: int = min_rows_setting()
    generation: Optional[Path] = setting(None, "a `catchtag generate` folder: the viewer of its text number --prompt "
                                         "with a step slider (the model and sink rule are the run's)", "--generation",
                                         cli=Optional[Path])
    layer: Optional[int] = setting(None, "layer to open on (with --head)", "--layer", "-l")
    head: Optional[int] = setting(None, "head to open on", "--head")
    out: Path = file_out("view.html")
    device: str = device_setting()
    dtype: str = dtype_setting()

    def check_together(self) -> None:
        check_layer_and_head(self.layer, self.head)
        if self.generation is not None:
            from catchtag.errors import CatchtagError
            from catchtag.models import default_data

            if self.text is not None or self.text_file is not None or self.data != default_data(self.model):
                raise CatchtagError("--generation shows the texts the run wrote, so --text, --text-file and --data do "
                                    "not apply. Fix: leave them out")
            return
        super().check_together()


def run(c: ViewConfig) -> dict:
    """Write the interactive token viewer for one prompt (opens on --layer/--head if given)."""
    from catchtag.inputs import check_head, resolve_model, resolve_text

    if c.generation is not None:
        return _generation_view(c)
    name, net, tok = resolve_model(c.model, c.device, c.dtype)
    check_head(net, c.layer, c.head)
    p = resolve_text(tok, net, c.text, c.text_file, c.data, c.prompt, c.max_tokens)
    path = token_view(net, tok, p, c.out, eps=c.eps, min_rows=c.min_rows, name=name,
                      start=None if c.layer is None else (c.layer, c.head))
    return {"out": str(path), "n_tokens": len(p.input_ids), "bytes": Path(path).stat().st_size}


def _generation_view(c: ViewConfig) -> dict:
    """`catchtag view --generation RUN`: the step-by-step viewer of one text a generate run wrote."""
    from catchtag.errors import CatchtagError
    from catchtag.generation import GenerationResult
    from catchtag.inputs import check_head, resolve_model

    result = GenerationResult.load(c.generation)
    model = result.settings["model"]
    default = ViewConfig.__dataclass_fields__["model"].default
    if c.model not in (default, model):
        raise CatchtagError(f"{c.generation} was written by {model}, not {c.model}. Fix: leave out --model (the "
                            f"run's model is used)")
    for name, given, used in (("--eps", c.eps, result.settings["eps"]),
                              ("--min-rows", c.min_rows, result.settings["min_rows"])):
        if given != ViewConfig.__dataclass_fields__[name[2:].replace("-", "_")].default and given != used:
            raise CatchtagError(f"{name} {given}, but the run found its sinks with {name} {used}. Fix: leave out "
                                f"{name}")
    ids = [int(x) for x in result.prompts["prompt_id"]]
    if c.prompt not in ids:
        raise CatchtagError(f"--prompt {c.prompt}: the run wrote texts for prompts {ids[:8]}"
                            f"{' ...' if len(ids) > 8 else ''}. Fix: --prompt {ids[0]}")
    name, net, tok = resolve_model(model, c.device, c.dtype)
    check_head(net, c.layer, c.head)
    path = show_generation(net, tok, result, prompt_id=c.prompt, name=name,
                           start=None if c.layer is None else (c.layer, c.head)).save(c.out)
    row = result.prompts.set_index("prompt_id").loc[c.prompt]
    return {"out": str(path), "n_tokens": len(row["token_ids"]), "n_steps": int(row["n_new_tokens"]),
            "bytes": Path(path).stat().st_size}


def show_tokens(model, tokenizer, text, *, eps: float = SinkSettings.eps, min_rows: int = SinkSettings.min_rows,
                max_tokens: int | None = None, name: str | None = None, start: tuple[int, int] | None = None,
                height: int = 640) -> TokenView:
    """The token viewer for one prompt as an object a notebook displays inline (``token_view`` writes a file)."""
    from catchtag.analysis.common import one_prompt
    from catchtag.engine.request import ActivationRequest
    from catchtag.models import display_name
    from catchtag.report.viewer import TokenView, render_view, view_data
    from catchtag.scan import scan

    result = scan(model, tokenizer, one_prompt(text), eps=eps, min_rows=min_rows, max_tokens=max_tokens,
                  request=ActivationRequest(layers=[], sink_attention=True), progress=False)
    result.settings["model"] = display_name(model, name)
    return TokenView(render_view(view_data(result, start=start)), height=height)


def token_view(model, tokenizer, text, out, *, eps: float = SinkSettings.eps, min_rows: int = SinkSettings.min_rows,
               max_tokens: int | None = None, name: str | None = None, start: tuple[int, int] | None = None) -> Path:
    """Scan one prompt keeping every head's attention to its sinks, and write the viewer page to ``out``."""
    return show_tokens(model, tokenizer, text, eps=eps, min_rows=min_rows, max_tokens=max_tokens, name=name,
                       start=start).save(out)


def show_generation(model, tokenizer, result, *, prompt_id: int | None = None, name: str | None = None,
                    start: tuple[int, int] | None = None, height: int = 640) -> TokenView:
    """The token viewer of one written text (a GenerationResult of ``catchtag.generate``) with a step slider: at
    step k the text up to the k-th written token, each head's sinks then (what a scan of that text finds), each
    token coloured by the sink it attends to most. One more pass over the finished text (a few for a long one)
    keeps each token's attention to every position that was ever a sink; ``.save(path)`` writes the page."""
    from catchtag.data.prompts import Prompt
    from catchtag.errors import CatchtagError
    from catchtag.generation import sink_events
    from catchtag.measure import attention_to_columns
    from catchtag.models import display_name
    from catchtag.report.viewer import TokenView, generation_view_data, render_view

    if getattr(result, "scan", None) is None:
        raise CatchtagError("this GenerationResult has no scan of the finished texts, which the viewer reads. Fix: "
                            "catchtag.generate(..., scan_final=True)")
    prompts = result.prompts.set_index("prompt_id")
    pid = int(prompts.index[0]) if prompt_id is None else prompt_id
    if pid not in prompts.index:
        raise CatchtagError(f"no prompt_id {pid!r} in this generation (it has {list(prompts.index)[:8]}). Fix: "
                            f"prompt_id={int(prompts.index[0])}")
    row = prompts.loc[pid]
    steps = result.steps[result.steps["prompt_id"] == pid]
    events = sink_events(result.sinks[result.sinks["prompt_id"] == pid], steps)
    last = result.scan.heads[result.scan.heads["prompt_id"] == pid]
    columns = {key: sorted({p for _, positions, _ in events.get(key, []) for p in positions} |
                           {int(p) for p in sinks})
               for key, sinks in zip(zip(last["layer"].astype(int), last["head"].astype(int)), last["sink_positions"])}
    text = Prompt(pid, [int(x) for x in row["token_ids"]], text=str(row["prompt"]) + str(row["completion"]))
    attention = attention_to_columns(model, tokenizer, text, columns)
    data = generation_view_data(result.scan, pid, attention, columns, events, int(row["n_prompt_tokens"]),
                                int(steps["step"].max()), model=display_name(model, name), start=start)
    return TokenView(render_view(data, title=f"catchtag generate: {data['model']}, prompt {pid}"), height=height)


def lines(s: dict, config: ViewConfig) -> list[str]:
    steps = f", {s['n_steps']} written, step by step" if "n_steps" in s else ""
    return [f"wrote {s['out']} ({s['n_tokens']} tokens{steps}, {s['bytes'] / 1e6:.2f} MB)"]


JOB = Job(ViewConfig, run, lines)
