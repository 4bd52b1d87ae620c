"""The CPU path: catchtag's analysis against plain SDPA and eager attention maps, on smollm2-135m, one process.

    .venv/bin/python bench/cpu.py                     # sizes 8x256, 1x1024, 1x2048, 3 timed passes each
    .venv/bin/python bench/cpu.py --sizes 8x256 --reps 5 --json cpu.json

Modes, all in this one process on the same random token ids (the model's own byte-level vocabulary):
sdpa (transformers' SDPA attention, what a plain forward costs), eager (+ output_attentions=True: every T x T map
kept, what one would do without catchtag), catchtag (the full analysis at eps 0.2 through the torch backend, which
``auto`` picks on the CPU). Each mode runs the whole model (model(...), LM head included) under torch.no_grad with
use_cache=False; tokens/s is B*T over the median wall time of --reps passes after one warm-up. Run nothing else on
the machine meanwhile: on a shared 2-core machine another job slows every row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SIZES = ((8, 256), (1, 1024), (1, 2048))
MODES = ("sdpa", "eager", "catchtag")


def measure(model, mode, ids, reps):
    from catchtag.engine.attention import captured_forward, enable
    from catchtag.engine.request import SinkSettings

    if mode == "catchtag":
        enable(model)
    else:
        model.set_attn_implementation(mode)

    def once():
        if mode == "catchtag":
            return captured_forward(lambda: model(input_ids=ids, use_cache=False), SinkSettings())[0]
        model(input_ids=ids, use_cache=False, output_attentions=mode == "eager")
        return None

    times = []
    with torch.no_grad():
        once()
        for _ in range(reps):
            t0 = time.perf_counter()
            cap = once()
            times.append(time.perf_counter() - t0)
    sinks = None
    if cap is not None:
        sinks = float(sum(int(r.stats.sink_ok.sum()) for r in cap.layers.values())) / (
            len(cap.layers) * ids.shape[0] * model.config.num_attention_heads)
    return statistics.median(times), sinks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sizes", default=",".join(f"{b}x{t}" for b, t in SIZES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    from catchtag.models import load_model

    model, tok = load_model(a.model, device="cpu", dtype="float32")
    print(f"{a.model} on the CPU, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    rows = []
    g = torch.Generator().manual_seed(0)
    for size in a.sizes.split(","):
        B, T = map(int, size.split("x"))
        ids = torch.randint(0, len(tok), (B, T), generator=g)
        for mode in MODES:
            seconds, sinks = measure(model, mode, ids, a.reps)
            rows.append(dict(B=B, T=T, mode=mode, tok_s=B * T / seconds, seconds=seconds, sinks_per_head=sinks))
            print(json.dumps(rows[-1]), flush=True)
    print("| B x T | mode | tokens/s | / SDPA | / eager | sinks/head |\n|---|---|---|---|---|---|")
    for r in rows:
        base = {m["mode"]: m["tok_s"] for m in rows if (m["B"], m["T"]) == (r["B"], r["T"])}
        sk = f"{r['sinks_per_head']:.2f}" if r["sinks_per_head"] is not None else ""
        print(f"| {r['B']}x{r['T']} | {r['mode']} | {r['tok_s']:.0f} | {r['tok_s'] / base['sdpa']:.2f} | "
              f"{r['tok_s'] / base['eager']:.2f} | {sk} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
