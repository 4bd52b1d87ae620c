"""`catchtag compare`: finished scans of several models side by side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from catchtag.jobs.options import REQUIRED, Job, JobConfig, between, folder_out, setting


def runs_setting(help: str = "run folders written by `catchtag scan`", required: bool = True):
    return setting(REQUIRED if required else None, help, argument=True, cli=list[Path], required=required)


@dataclass(frozen=True)
class CompareConfig(JobConfig):
    """Models side by side: sinks per head (violin), VE per head (box), share of high-VE heads, per-layer means."""

    command = "compare"
    positional = ("runs", "out")

    runs: list = runs_setting("run folders written by `catchtag scan` (one per model)")
    out: Path = folder_out("runs/compare", "folder for compare.png and CSVs")
    ve_level: float = setting(0.3, "report the share of heads with VE above this", check=between(0, 1, 0.3,
                                                                                                 low_in=True))


def run(c: CompareConfig) -> dict:
    """Compare finished scans: compare.png, per-model, per-layer and per-head CSVs and compare.json in OUT."""
    from catchtag.analysis.compare import compare_runs
    from catchtag.report.analysis_figures import compare_figure
    from catchtag.runs import save_figure_file, write_csv, write_json

    cmp = compare_runs(c.runs, ve_level=c.ve_level)
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(cmp.summary, out / "compare_summary.csv")
    write_csv(cmp.per_layer, out / "compare_per_layer.csv")
    write_csv(cmp.per_head, out / "compare_per_head.csv")
    figure = save_figure_file(compare_figure(cmp), out / "compare.png")
    summary = {"runs": cmp.summary.to_dict(orient="records"), "figure": str(figure)}
    write_json(out / "compare.json", summary)
    return summary


def lines(s: dict, c: CompareConfig) -> list[str]:
    return [f"{r['run']:<24} sinks/head {r['mean_sinks_per_head']:.3f} · with a sink "
            f"{100 * r['share_heads_with_sink']:.1f}% · mean VE centred {r['mean_ve']:.3f}, uncentred "
            f"{r['mean_ve_uncentred']:.3f} (with a sink: centred {r['mean_ve_heads_with_sink']:.3f}, "
            f"uncentred {r['mean_ve_uncentred_heads_with_sink']:.3f}) · "
            f"VE > {c.ve_level}: {100 * r[f'share_ve_above_{c.ve_level}']:.1f}%" for r in s["runs"]] \
        + [f"wrote {s['figure']}"]


JOB = Job(CompareConfig, run, lines)
