"""`catchtag probe`: probe every head's last-token full, tag-only and non-tag output for a task's label."""

from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from catchtag.errors import CatchtagError
from catchtag.jobs.options import (Job, JobConfig, at_least, batch_size_setting, device_setting, dtype_setting,
                                   eps_setting, figures_setting, folder_out, min_rows_setting, model_setting,
                                   seed_setting, setting)


@dataclass(frozen=True)
class ProbeConfig(JobConfig):
    """Probe every head's last-token full, tag-only and non-tag output for TASK's label; select heads."""

    command = "probe"
    positional = ("model", "task", "out")

    model: str = model_setting()
    task: str = setting("truth", "truth (builtin:truth) or sentiment (builtin:sentiment)", "--task", "-t")
    out: Path = folder_out("runs/probe", "probe run folder (its scan resumes)", required=True)
    shots: int = setting(2, "few-shot demonstrations before each statement")
    template: Optional[str] = setting(None, "one example, with {text} and ending in {answer}, e.g. '{text} This "
                                            "statement is: {answer}'")
    eps: float = eps_setting()
    min_rows: int = min_rows_setting()
    limit: Optional[int] = setting(None, "use only about this many prompts (balanced per split and label)",
                                   check=at_least(1, 200))
    batch_size: int = batch_size_setting()
    cv: int = setting(5, "cross-validation folds (train split only) for the regularisation", check=at_least(2, 5))
    top: int = setting(5, "how many heads to select", check=at_least(1, 5))
    seed: int = seed_setting("CV fold seed")
    min_tag: float = setting(0.7, "a selected head's tag probe reaches this CV accuracy", python_only=True)
    max_nontag: float = setting(0.65, "and its non-tag probe stays below this", python_only=True)
    device: str = device_setting()
    dtype: str = dtype_setting()
    figures: bool = figures_setting("skip the heat map")

    def check_together(self) -> None:
        from catchtag.analysis.probes import demonstrations, get_task

        if self.limit is not None and self.limit < 4 * self.cv:
            raise CatchtagError(f"--limit {self.limit} leaves too few prompts for {self.cv}-fold CV (a train and a "
                                f"test split of two labels). Fix: --limit {4 * self.cv} or more, or a smaller --cv")
        get_task(self.task, self.template)
        demonstrations(self.task, self.shots)  # a bad --shots fails before the model loads


def _data_name(task, shots: int) -> str:
    digest = hashlib.sha1(task.template.encode()).hexdigest()[:8]
    return f"probe:{task.name}:shots={shots}:template={digest}"


def load_probe_inputs(net, tokenizer, settings: dict, folder: Path, batch_size: int = 8, progress: bool = True) -> dict:
    """Build the task's prompts and scan them (resuming the run in FOLDER/scan): the labelled frame, the
    tokenised prompts, the ScanResult with last-token activations, and the answer token ids."""
    from catchtag.analysis.probes import answer_token_ids, demonstrations, few_shot_prompts, get_task, task_frame
    from catchtag.data.prompts import model_context, tokenize_prompts
    from catchtag.engine.request import ActivationRequest
    from catchtag.scan import scan

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


def run(c: ProbeConfig) -> dict:
    """What ``catchtag probe`` does: few-shot prompts for TASK, one engine pass per prompt (resumable in
    OUT/scan), the model's own few-shot accuracy, 3 probes per (layer, head), selected heads, a table
    (probes.parquet, heads.csv), a heat map and summary.json in OUT. Returns the summary."""
    import numpy as np

    from catchtag.measure import answer_logprobs
    from catchtag.analysis.probes import get_task, probe_summary, probe_table, select_heads, selected_heads_markdown
    from catchtag.models import load_model
    from catchtag.report.analysis_figures import probe_heatmap
    from catchtag.runs import save_figure_file, write_csv, write_table, write_text
    from catchtag.summaries import ProbeSummary

    probe_task = get_task(c.task, c.template)
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": c.model, "task": c.task, "template": probe_task.template, "shots": c.shots, "eps": c.eps,
                "min_rows": c.min_rows, "limit": c.limit, "cv": c.cv, "seed": c.seed}
    seconds = {}
    started = time.perf_counter()
    net, tokenizer = load_model(c.model, device=c.device, dtype=c.dtype)
    seconds["load"] = time.perf_counter() - started
    t0 = time.perf_counter()
    inputs = load_probe_inputs(net, tokenizer, settings, out, batch_size=c.batch_size)
    seconds["scan"] = time.perf_counter() - t0
    frame, result = inputs["frame"], inputs["result"]
    test = (frame["split"] != "train").to_numpy()

    # the model's own few-shot answer on the test split: which answer token is more likely at the last token
    t0 = time.perf_counter()
    logp = answer_logprobs(net, tokenizer, [p for p, t in zip(inputs["prompts"], test) if t], inputs["answer_ids"],
                           batch_size=c.batch_size, progress=True)
    model_answers = frame[test].assign(logp_label0=logp[:, 0], logp_label1=logp[:, 1],
                                       predicted=(logp[:, 1] > logp[:, 0]).astype(int),
                                       prompt=[t for t, keep in zip(inputs["texts"], test) if keep])
    write_table(model_answers, out / "model_answers.parquet")
    seconds["model_answers"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    table, wide = probe_table(result.cache, result.heads, frame, cv=c.cv, seed=c.seed)
    seconds["probes"] = time.perf_counter() - t0
    write_table(table, out / "probes.parquet")
    write_csv(wide, out / "heads.csv", float_format="%.4f")
    selected = select_heads(wide, top=c.top, min_tag=c.min_tag, max_nontag=c.max_nontag)
    summary = ProbeSummary.from_json(probe_summary(settings, inputs, table, selected, model_answers,
                                                   np.exp(logp).sum(axis=1), seconds, top=c.top, min_tag=c.min_tag,
                                                   max_nontag=c.max_nontag))
    write_text(out / "selected_heads.md", selected_heads_markdown(summary))
    if c.figures:
        summary.figures = [str(save_figure_file(probe_heatmap(table, summary), out / "probe_heatmap.png"))]
    summary.write(out)
    return summary


def lines(s: dict, c: ProbeConfig) -> list[str]:
    m = s["model_accuracy"]
    rows = [f"\n{s['n_train']} train / {s['n_test']} test prompts ({s['mean_prompt_tokens']:.0f} tokens), "
            f"{s['n_probes']} probes ({s['seconds']['probes']:.0f} s)",
            f"model's own {c.shots}-shot test accuracy: {100 * m['test']:.1f}% "
            f"[{100 * m['test_ci'][0]:.0f}, {100 * m['test_ci'][1]:.0f}]"]
    for kind in ("tag", "nontag", "full"):
        b = s["best_test_accuracy"][kind]
        rows.append(f"best {kind:<6} probe: {100 * b['test_accuracy']:.1f}% at layer {b['layer']} head {b['head']} "
                    f"(mean over heads {100 * s['mean_test_accuracy'][kind]:.1f}%)")
    rows.append((Path(c.out) / "selected_heads.md").read_text())
    rows.append(f"wrote {c.out}/probes.parquet, heads.csv, selected_heads.md, summary.json"
                + (", probe_heatmap.png" if c.figures else ""))
    return rows


JOB = Job(ProbeConfig, run, lines)
