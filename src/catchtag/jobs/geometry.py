"""`catchtag geometry`: how tags lie to each other and to the tokens they are added to, on one prompt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from catchtag.jobs.options import (Job, OnePromptConfig, at_least, device_setting, dtype_setting, eps_setting,
                                   folder_out, min_rows_setting, setting)

KINDS = ("different layers", "same layer, different heads", "same head, different sinks", "tag_vs_token")


@dataclass(frozen=True)
class GeometryConfig(OnePromptConfig):
    """Tag geometry: cosine between distinct tags, and between each tag and the token it is added to."""

    command = "geometry"

    n_positions: int = setting(64, "token positions sampled (memory: layers x heads x positions x hidden)",
                               check=at_least(1, 64))
    max_pairs: int = setting(20000, "pairs of tags sampled per kind", check=at_least(1, 20000))
    eps: float = eps_setting()
    min_rows: int = min_rows_setting()
    out: Path = folder_out("runs/geometry", "folder for geometry.png and CSVs")
    device: str = device_setting()
    dtype: str = dtype_setting()


def run(c: GeometryConfig) -> dict:
    """Cosines between distinct tags and between each tag and its token: geometry.png, CSVs and geometry.json."""
    from catchtag.measure import tag_geometry
    from catchtag.inputs import resolve_model, resolve_text
    from catchtag.report.analysis_figures import geometry_figure
    from catchtag.runs import save_figure_file, write_csv, write_json

    name, net, tok = resolve_model(c.model, c.device, c.dtype)
    p = resolve_text(tok, net, c.text, c.text_file, c.data, c.prompt, c.max_tokens)
    geom = tag_geometry(net, tok, p, n_positions=c.n_positions, max_pairs=c.max_pairs, eps=c.eps,
                        min_rows=c.min_rows, name=name)
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(geom.pairs, out / "geometry_pairs.csv")
    write_csv(geom.tag_vs_token, out / "geometry_tag_vs_token.csv")
    figure = save_figure_file(geometry_figure({name: geom}), out / "geometry.png")
    summary = {**geom.summary(), "settings": geom.settings, "figure": str(figure)}
    write_json(out / "geometry.json", summary)
    return summary


def lines(s: dict, config: GeometryConfig) -> list[str]:
    return [f"{kind:<30} mean {s[kind]['mean']:+.3f} · within ±0.05: {100 * s[kind]['share_within_0.05']:.1f}% · "
            f"5-95%: [{s[kind]['p5']:+.3f}, {s[kind]['p95']:+.3f}]" for kind in KINDS if kind in s] \
        + [f"wrote {s['figure']}"]


JOB = Job(GeometryConfig, run, lines)
