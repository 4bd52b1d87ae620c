"""`catchtag generate`: let the model write, with catch and tag followed at every step beside its KV cache."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from catchtag.errors import CatchtagError
from catchtag.jobs.options import (Job, JobConfig, at_least, batch_size_setting, between, data_setting,
                                   device_setting, dtype_setting, eps_setting, figures_setting, folder_out,
                                   min_rows_setting, model_setting, one_of, seed_setting, setting)


@dataclass(frozen=True)
class GenerateConfig(JobConfig):
    """Let the model write after each prompt (its own generate(), with a KV cache) and follow the sinks at every step:
    per step, layer and head the sinks then and the new token's catch and tag; at the end a scan of the finished
    texts (OUT/scan), a page of sink timelines (OUT/generation.html) and the token viewer of the first text with a step
    slider (OUT/view.html)."""

    command = "generate"
    positional = ("model", "out")

    model: str = model_setting()
    prompt: Optional[str] = setting(None, "the prompt text (default: the prompts of --data)", "--prompt", "-p")
    data: Optional[str] = data_setting("prompts from .txt, .jsonl (text field) or builtin:NAME, when no --prompt "
                                       "(default: builtin:prose; a toy: its own task data)")
    limit: Optional[int] = setting(8, "use only the first K prompts of --data", check=at_least(1, 8))
    max_tokens: Optional[int] = setting(128, "cut each prompt of --data to this many tokens", check=at_least(1, 128))
    max_new_tokens: int = setting(64, "tokens to write after each prompt", check=at_least(1, 64))
    greedy: bool = setting(True, "sample instead of greedy decoding (with --temperature, --top-p, --top-k and --seed)",
                           "--sample", negate=True)
    temperature: float = setting(1.0, "sampling temperature", check=between(0, 100, 0.7))
    top_p: float = setting(1.0, "sampling: keep the smallest set of tokens with this much probability",
                           check=between(0, 1, 0.9, high_in=True))
    top_k: int = setting(50, "sampling: keep the K most likely tokens", check=at_least(1, 50))
    seed: int = seed_setting("seed of the sampling (batch k uses seed + k)")
    chat: str = setting("auto", "auto (the tokenizer's chat template for --prompt when it has one), on or off",
                        check=one_of("auto", "on", "off"))
    eps: float = eps_setting()
    min_rows: int = min_rows_setting()
    keep: int = setting(8, "sinks listed per head and step (highest scores)", check=at_least(1, 8))
    tracker_ve: bool = setting(False, "also keep each head's Gram matrix while writing, so the tracker's own VE is "
                               "checked against the scan (memory: layers x heads x head_dim^2 float64 per sequence)",
                               "--tracker-ve")
    batch_size: int = batch_size_setting()
    out: Path = folder_out("runs/generate", "folder to write the tables, the scan and the page into", required=True)
    device: str = device_setting()
    dtype: str = dtype_setting()
    figures: bool = figures_setting("skip the timeline figure and the page")
    progress: bool = setting(True, "progress bars", python_only=True)

    def check_together(self) -> None:
        if self.prompt is not None and not self.prompt.strip():
            raise CatchtagError("--prompt is empty. Fix: --prompt 'The capital of France is'")


def run(c: GenerateConfig) -> dict:
    """What ``catchtag generate`` does: the prompts through the model's own generate() in batches (each finished
    batch saved at once, so an interrupted run resumes without losing or doubling a row), then a scan of the finished
    texts into OUT/scan, the check of the tracker's last state against it, the tables, the page and summary.json."""
    from catchtag.data.prompts import Prompt, load_prompts
    from catchtag.engine.request import SinkSettings
    from catchtag.generation import as_prompts, finish, generate_batch, prompt_ids
    from catchtag.inputs import resolve_model
    from catchtag.progress import progress_bar
    from catchtag.runs import PhaseParts, prompts_sha1, save_figure_file, versions, write_table, write_text
    from catchtag.summaries import GenerateSummary

    import torch

    started = time.perf_counter()
    name, net, tok = resolve_model(c.model, c.device, c.dtype)
    has_template = bool(getattr(tok, "chat_template", None))
    if c.chat == "on" and not has_template:
        raise CatchtagError(f"--chat on, but the tokenizer of {name} has no chat template. Fix: --chat off")
    if c.prompt is not None:
        prompts = as_prompts([c.prompt], tok, None if c.chat == "auto" else c.chat == "on")
    else:
        prompts = load_prompts(c.data, tok, net, max_tokens=c.max_tokens, limit=c.limit)
        if c.chat == "on":
            prompts = [Prompt(p.prompt_id, prompt_ids(tok, p.text, True), p.text) for p in prompts]
    settings = SinkSettings(eps=c.eps, min_rows=c.min_rows)
    gen = dict(max_new_tokens=c.max_new_tokens, greedy=c.greedy, temperature=c.temperature, top_p=c.top_p,
               top_k=c.top_k)
    folder = Path(c.out)
    manifest = {"model": name, "prompts_sha1": prompts_sha1(prompts), "eps": c.eps, "min_rows": c.min_rows,
                "keep": c.keep, "tracker_ve": c.tracker_ve, "batch_size": c.batch_size, "seed": c.seed,
                "dtype": c.dtype, **gen}
    parts = PhaseParts(folder, manifest, what="a generation")
    batches = [prompts[i:i + c.batch_size] for i in range(0, len(prompts), c.batch_size)]
    bar = progress_bar(total=len(batches) * (c.max_new_tokens + 1), desc="generate", unit="step",
                       disable=not c.progress)
    decoded: dict = {}

    def one_batch(batch):
        torch.manual_seed(c.seed + batches.index(batch))
        return generate_batch(net, tok, batch, settings, gen, c.keep, bar, decoded, ve=c.tracker_ve)

    t0 = time.perf_counter()
    tables = parts.run(("prompts", "steps", "sinks", "final"), batches, one_batch, desc="generate", progress=False)
    bar.close()
    generate_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = finish(net, tok, *tables, settings=settings, batch_size=c.batch_size, progress=c.progress,
                    out=folder / "scan", model_name=name, data_name=None if c.prompt is not None else c.data)
    scan_seconds = time.perf_counter() - t0
    for table, file in zip(tables, ("prompts", "steps", "sinks", "final")):
        write_table(table, folder / f"{file}.parquet")
    written = result.steps[result.steps["step"] >= 1]
    by_step = result.steps.groupby("step")["n_sinks"].mean()
    summary = GenerateSummary(
        model=name, data=None if c.prompt is not None else c.data, n_prompts=len(prompts),
        new_tokens=int(result.prompts["n_new_tokens"].sum()),
        ended={k: int(v) for k, v in result.prompts["ended"].value_counts().items()},
        generation={**gen, "seed": c.seed, "chat": c.chat}, eps=c.eps, min_rows=c.min_rows, check=result.check,
        result={"sinks_per_head_after_prompt": float(by_step.iloc[0]),
                "sinks_per_head_at_end": float(by_step.iloc[-1]),
                "mean_caught_written": float(written["caught"].mean()) if len(written) else float("nan"),
                "mean_tag_share_written": float(written["tag_share"].mean()) if len(written) else float("nan")},
        seconds={"generate": generate_seconds, "scan": scan_seconds, "total": time.perf_counter() - started},
        versions=versions())
    if c.figures:
        from catchtag.report.generation import generation_page, moving_heads, sink_timeline_figure

        heads = moving_heads(result.sinks, result.steps)
        first = result.prompts.iloc[0]
        fig = sink_timeline_figure(result.sinks, result.steps, int(first["prompt_id"]), heads,
                                   int(first["n_prompt_tokens"]), title=f"{name}: sinks while prompt "
                                   f"{int(first['prompt_id'])} is written")
        summary.figures = [str(save_figure_file(fig, folder / "sink_timeline.png"))]
        strings = {int(k): list(v) for k, v in result.scan.prompts.set_index("prompt_id")["tokens"].items()}
        page = generation_page(result.prompts, result.steps, result.sinks, summary.to_json(), strings, heads,
                               viewer="view.html")
        summary.figures.append(str(write_text(folder / "generation.html", page)))
        from catchtag.jobs.view import show_generation

        summary.figures.append(str(show_generation(net, tok, result, name=name).save(folder / "view.html")))
    summary.write(folder)
    return summary


def lines(s: dict, c: GenerateConfig) -> list[str]:
    from catchtag.report.generation import check_sentence

    check, r = s["check"], s["result"]
    ended = ", ".join(f"{v} by {k}" for k, v in s["ended"].items())
    rows = [f"\n{s['n_prompts']} prompt(s), {s['new_tokens']} tokens written ({ended}) in "
            f"{s['seconds']['generate']:.1f} s; scan of the finished texts {s['seconds']['scan']:.1f} s",
            f"sinks per head: {r['sinks_per_head_after_prompt']:.2f} after the prompt, "
            f"{r['sinks_per_head_at_end']:.2f} at the end; written tokens put {r['mean_caught_written']:.3f} of their "
            f"attention on sinks (tag share {r['mean_tag_share_written']:.3f})",
            check_sentence(check),
            f"wrote {c.out}/: prompts, steps, sinks, final (.parquet), scan/, summary.json"
            + (", sink_timeline.png, generation.html, view.html (the token viewer, step by step)" if c.figures
               else "")]
    return rows


JOB = Job(GenerateConfig, run, lines)
