"""`catchtag pca`: the figure-2 picture of one head on one prompt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from catchtag.jobs.options import (Job, OnePromptConfig, between, check_layer_and_head, device_setting, dtype_setting,
                                   eps_setting, folder_out, min_rows_setting, setting)


@dataclass(frozen=True)
class PcaConfig(OnePromptConfig):
    """Figure-2 picture of one head: outputs coloured by top-3 PCs, attention with sinks, the residual stream deeper.

    Default head: the highest VE among heads with a sink beyond the first token."""

    command = "pca"

    layer: Optional[int] = setting(None, "layer (default: best head, see --help)", "--layer", "-l")
    head: Optional[int] = setting(None, "head (give with --layer)", "--head")
    deeper: Optional[int] = setting(None, "residual stream after this layer (default layer + 4)")
    eps: float = eps_setting()
    min_rows: int = min_rows_setting()
    tag_level: float = setting(0.1, "a token is tagged by its strongest sink if it pays it this much",
                               check=between(0, 1, 0.1))
    out: Path = folder_out("runs/pca", "folder for pca_L*H*.png and .json")
    device: str = device_setting()
    dtype: str = dtype_setting()

    def check_together(self) -> None:
        check_layer_and_head(self.layer, self.head)
        super().check_together()


def run(c: PcaConfig) -> dict:
    """The picture of one head (default: the best one) on one prompt: pca_L*H*.png and .json in OUT."""
    from catchtag.measure import pca_picture
    from catchtag.inputs import check_head, resolve_model, resolve_text
    from catchtag.report.analysis_figures import pca_figure
    from catchtag.runs import save_figure_file, write_json

    name, net, tok = resolve_model(c.model, c.device, c.dtype)
    check_head(net, c.layer, c.head)
    if c.deeper is not None:
        check_head(net, c.deeper, None, layer_flag="--deeper")
    p = resolve_text(tok, net, c.text, c.text_file, c.data, c.prompt, c.max_tokens)
    pic = pca_picture(net, tok, p, layer=c.layer, head=c.head, deeper=c.deeper, eps=c.eps, min_rows=c.min_rows,
                      tag_level=c.tag_level, name=name)
    out = Path(c.out)
    figure = save_figure_file(pca_figure(pic), out / f"pca_L{pic.layer}H{pic.head}.png")
    summary = {**pic.summary(), "settings": pic.settings, "figure": str(figure)}
    write_json(out / f"pca_L{pic.layer}H{pic.head}.json", summary)
    return summary


def lines(s: dict, config: PcaConfig) -> list[str]:
    return [f"head L{s['layer']}.H{s['head']}: VE {s['ve']:.3f}, sinks {list(zip(s['sinks'], s['sink_tokens']))}",
            f"silhouette of tokens grouped by tagging sink: head {s['silhouette_head']}, residual after layer "
            f"{s['deeper']}: {s['silhouette_deeper']}",
            f"wrote {s['figure']}"]


JOB = Job(PcaConfig, run, lines)
