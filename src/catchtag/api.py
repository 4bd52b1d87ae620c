"""End-to-end jobs the CLI runs: each loads what it needs, calls the public functions, writes a run folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

from catchtag.data.prompts import load_prompts
from catchtag.distributed import finish, init
from catchtag.engine.request import SinkSettings
from catchtag.models import load_model
from catchtag.scan import scan, versions


def run_scan(model: str = "smollm2-135m", data: str = "builtin:prose", out: str | Path = "runs/scan", *,
             eps: float = 0.2, min_rows: int = 16, max_tokens: int | None = 256, chunk: int | None = None,
             limit: int | None = None, batch_size: int = 8, device: str = "cpu", dtype: str = "auto",
             sweep_eps=(), truncate: bool = True, overwrite: bool = False, figures: bool = True,
             device_map: str | None = None) -> dict | None:
    """Load MODEL, scan DATA, write heads.parquet, summary.json and figures into OUT; return the summary.

    Under torchrun each rank scans its shard; rank 0 writes the tables and returns the summary, the other ranks
    return None. device_map="auto" splits a model too large for one GPU over the visible GPUs (accelerate).
    """
    SinkSettings(eps=eps, min_rows=min_rows, sweep_eps=tuple(sweep_eps))  # bad thresholds fail before loading
    started = time.perf_counter()
    dist = init(device)
    try:
        net, tokenizer = load_model(model, device=dist.device(device), dtype=dtype, device_map=device_map)
        load_seconds = time.perf_counter() - started
        prompts = load_prompts(data, tokenizer, net, max_tokens=max_tokens, chunk=chunk, truncate=truncate,
                               limit=limit)
        result = scan(net, tokenizer, prompts, eps=eps, min_rows=min_rows, sweep_eps=sweep_eps,
                      batch_size=batch_size, out=out, overwrite=overwrite, model_name=model, data_name=data,
                      dist=dist)
        if not dist.is_main:
            return None
    finally:
        finish(dist)
    out = Path(out)
    summary = {"model": model, "model_class": type(net).__name__, "data": data,
               "settings": result.settings, "versions": versions(), "result": result.summary(),
               "seconds": result.settings["seconds"], "load_seconds": load_seconds,
               "wall_seconds": time.perf_counter() - started}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if figures:
        from catchtag.report.figures import scan_figures

        summary["figures"] = [str(p) for p in scan_figures(result, out / "figures")]
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
