"""`catchtag sweep`: mean sinks per head against mean VE over 12 thresholds, from runs or from new scans."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from catchtag.errors import CatchtagError
from catchtag.jobs.compare import runs_setting
from catchtag.jobs.options import (Job, JobConfig, at_least, batch_size_setting, data_setting, device_setting,
                                   dtype_setting, eps_setting, folder_out, min_rows_setting, setting)


@dataclass(frozen=True)
class SweepConfig(JobConfig):
    """Threshold sweep, eps 0.03..0.4 (12 values, one forward pass): mean sinks per head vs mean VE per model."""

    command = "sweep"
    positional = ("runs", "out")

    runs: Optional[list] = runs_setting("run folders scanned with --sweep (or use --model)", required=False)
    model: Optional[list] = setting(None, "scan this model (repeatable) with 12 eps", "--model", "-m",
                                    cli=Optional[list[str]])
    data: Optional[str] = data_setting("data to scan with --model (default: builtin:prose; a toy: model's own task "
                                       "data)")
    max_tokens: int = setting(256, "tokens per prompt when scanning", check=at_least(0, 256, " (0: no limit)"))
    limit: Optional[int] = setting(None, "use only the first K prompts when scanning", check=at_least(1, 32))
    eps: float = eps_setting()
    min_rows: int = min_rows_setting()
    batch_size: int = batch_size_setting()
    out: Path = folder_out("runs/sweep", "folder for sweep.png, sweep.csv (and scans)")
    device: str = device_setting()
    dtype: str = dtype_setting()

    def __post_init__(self):
        if isinstance(self.model, str):
            object.__setattr__(self, "model", [self.model])
        super().__post_init__()

    def check_together(self) -> None:
        if not self.runs and not self.model:
            raise CatchtagError("give run folders (from `catchtag scan --sweep ...`) or --model to scan. Fix: e.g. "
                                "`catchtag sweep RUN_FOLDER` or `catchtag sweep --model smollm2-135m`")


def run(c: SweepConfig) -> dict:
    """Plot the threshold sweep of existing runs, or first scan MODEL(s) on DATA with the 12 eps in one pass
    each (the scan folder goes to OUT/scan-<model> and resumes if interrupted)."""
    from catchtag.analysis.sweep import SWEEP_EPS, sweep_runs
    from catchtag.jobs.scan import JOB as SCAN, ScanConfig
    from catchtag.report.analysis_figures import sweep_figure
    from catchtag.runs import save_figure_file, write_csv, write_json

    out = Path(c.out)
    runs = list(c.runs or [])
    for m in c.model or []:
        folder = out / f"scan-{m.replace(':', '_').replace('/', '_')}"
        SCAN.execute(ScanConfig(model=m, data=c.data, out=folder, eps=c.eps, min_rows=c.min_rows,
                                max_tokens=c.max_tokens, limit=c.limit, batch_size=c.batch_size, device=c.device,
                                dtype=c.dtype, sweep_eps=SWEEP_EPS, figures=False))
        runs.append(folder)
    table = sweep_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(table, out / "sweep.csv")
    figure = save_figure_file(sweep_figure(table), out / "sweep.png")
    summary = {"table": table.to_dict(orient="records"), "figure": str(figure)}
    write_json(out / "sweep.json", summary)
    return summary


def lines(s: dict, c: SweepConfig) -> list[str]:
    return [f"{r['run']:<24} eps {r['eps']:<6g} sinks/head {r['mean_sinks_per_head']:.3f} "
            f"mean VE centred {r['mean_ve']:.3f}, uncentred {r['mean_ve_uncentred']:.3f}" for r in s["table"]] \
        + [f"wrote {s['figure']}"]


JOB = Job(SweepConfig, run, lines)
