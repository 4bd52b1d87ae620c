"""`catchtag taxonomy`: which tokens become sinks, and of what kind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from catchtag.jobs.compare import runs_setting
from catchtag.jobs.options import Job, JobConfig, at_least, folder_out, setting


@dataclass(frozen=True)
class TaxonomyConfig(JobConfig):
    """Sink-token taxonomy: each sink token's count, heads and mean VE; kinds (punctuation, function words, ...)."""

    command = "taxonomy"
    positional = ("runs", "out")

    runs: list = runs_setting()
    out: Path = folder_out("runs/taxonomy", "folder for taxonomy.png and CSVs")
    top: int = setting(15, "how many sink tokens to list", check=at_least(1, 15))


def run(c: TaxonomyConfig) -> dict:
    """Each run's sink tokens and kinds: CSVs per run, taxonomy.png and taxonomy.json in OUT."""
    from catchtag.analysis.compare import load_runs
    from catchtag.analysis.taxonomy import kind_shares, sink_taxonomy
    from catchtag.report.analysis_figures import taxonomy_figure
    from catchtag.runs import save_figure_file, write_csv, write_json

    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    tables, summary = {}, {"runs": {}}
    for i, (name, result) in enumerate(load_runs(c.runs).items()):
        tokens, kinds = sink_taxonomy(result), kind_shares(result)
        tables[name] = (tokens, kinds)
        safe = f"{i}_" + "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        write_csv(tokens, out / f"taxonomy_tokens_{safe}.csv")
        write_csv(kinds, out / f"taxonomy_kinds_{safe}.csv")
        summary["runs"][name] = {"top_tokens": tokens.head(c.top).to_dict(orient="records"),
                                 "kinds": kinds.to_dict(orient="records")}
    summary["figure"] = str(save_figure_file(taxonomy_figure(tables, top=c.top), out / "taxonomy.png"))
    write_json(out / "taxonomy.json", summary)
    return summary


def lines(s: dict, c: TaxonomyConfig) -> list[str]:
    return [f"{name}: " + ", ".join(f"{k['kind']} {100 * k['share']:.1f}%" for k in r["kinds"])
            for name, r in s["runs"].items()] + [f"wrote {s['figure']}"]


JOB = Job(TaxonomyConfig, run, lines)
