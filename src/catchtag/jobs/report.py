"""`catchtag report`: one self-contained HTML page of every analysis of some runs (loads no model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from catchtag.jobs.compare import runs_setting
from catchtag.jobs.options import Job, JobConfig, file_out, setting


@dataclass(frozen=True)
class ReportConfig(JobConfig):
    """One self-contained HTML report (figures embedded, no network) with every analysis of RUNS. Loads no model:
    it draws what the run folders hold."""

    command = "report"
    positional = ("runs", "out")

    runs: list = runs_setting()
    out: Path = file_out("report.html")
    per_token: bool = setting(True, "also the per-token pictures each run keeps of its first prompt",
                              "--per-token/--no-per-token")


def run(c: ReportConfig) -> dict:
    """Render every analysis of RUNS into one HTML file; loads no model (the per-token pictures come from each
    run's views/, written by `catchtag scan`)."""
    from catchtag.report.html import write_report

    path = write_report(c.runs, c.out, per_token=c.per_token)
    return {"out": str(path), "bytes": Path(path).stat().st_size}


def lines(s: dict, c: ReportConfig) -> list[str]:
    return [f"wrote {s['out']} ({s['bytes'] / 1e6:.1f} MB)"]


JOB = Job(ReportConfig, run, lines)
