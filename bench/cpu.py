"""The CPU path: catchtag's analysis against plain SDPA and eager attention maps, on smollm2-135m, one process.

    .venv/bin/python bench/cpu.py                     # sizes 8x256, 1x1024, 1x2048, 3 timed rounds, both passes
    .venv/bin/python bench/cpu.py --sizes 8x256 --reps 5 --part decoder --json cpu.json

Modes, all in this one process on the same random token ids (the model's own byte-level vocabulary):
sdpa (transformers' SDPA attention, what a plain forward costs), eager (+ output_attentions=True: every T x T map
kept, what one would do without catchtag), catchtag (the full analysis at eps 0.2 through the torch backend, which
``auto`` picks on the CPU). Two forms of each pass (``--part``): ``decoder``, the decoder stack alone
(model.model: what a scan runs, since it needs no logits) and ``model``, the whole model with its LM head (a fixed
cost of the 49k-vocabulary projection that flatters every ratio). Under torch.no_grad with use_cache=False; the
modes are interleaved (one pass of each in turn, --reps rounds after one warm-up round) so a drift of the machine's
speed reaches them alike; tokens/s is B*T over the median wall time. Run nothing else on the machine meanwhile: on a
shared 2-core machine another job slows every row.
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


def _forward(model, part, mode, ids):
    from catchtag.engine.attention import captured_forward
    from catchtag.engine.request import SinkSettings

    net = model.model if part == "decoder" else model
    if mode == "catchtag":
        return captured_forward(lambda: net(input_ids=ids, use_cache=False), SinkSettings())[0]
    net(input_ids=ids, use_cache=False, output_attentions=mode == "eager")
    return None


def _switch(model, mode):
    from catchtag.engine.attention import enable

    if mode == "catchtag":
        enable(model)
    else:
        model.set_attn_implementation(mode)


def measure(model, part, ids, reps) -> dict:
    """{mode: (median seconds, sinks per head)} with the modes interleaved."""
    times = {m: [] for m in MODES}
    sinks = {m: None for m in MODES}
    with torch.no_grad():
        for rnd in range(reps + 1):
            for mode in MODES:
                _switch(model, mode)
                t0 = time.perf_counter()
                cap = _forward(model, part, mode, ids)
                if rnd:  # round 0 warms up
                    times[mode].append(time.perf_counter() - t0)
                if cap is not None:
                    sinks[mode] = float(sum(int(r.stats.sink_ok.sum()) for r in cap.layers.values())) / (
                        len(cap.layers) * ids.shape[0] * model.config.num_attention_heads)
    return {m: (statistics.median(times[m]), sinks[m]) for m in MODES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sizes", default=",".join(f"{b}x{t}" for b, t in SIZES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="")
    ap.add_argument("--part", default="decoder,model", help="decoder, model or both (comma-separated)")
    a = ap.parse_args()
    from catchtag.models import load_model

    model, tok = load_model(a.model, device="cpu", dtype="float32")
    print(f"{a.model} on the CPU, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    rows = []
    g = torch.Generator().manual_seed(0)
    for size in a.sizes.split(","):
        B, T = map(int, size.split("x"))
        ids = torch.randint(0, len(tok), (B, T), generator=g)
        for part in a.part.split(","):
            for mode, (seconds, sinks) in measure(model, part, ids, a.reps).items():
                rows.append(dict(B=B, T=T, part=part, mode=mode, tok_s=B * T / seconds, seconds=seconds,
                                 sinks_per_head=sinks))
                print(json.dumps(rows[-1]), flush=True)
    print("| B x T | pass | mode | tokens/s | / SDPA | / eager | sinks/head |\n|---|---|---|---|---|---|---|")
    for r in rows:
        base = {m["mode"]: m["tok_s"] for m in rows if (m["B"], m["T"], m["part"]) == (r["B"], r["T"], r["part"])}
        sk = f"{r['sinks_per_head']:.2f}" if r["sinks_per_head"] is not None else ""
        print(f"| {r['B']}x{r['T']} | {r['part']} | {r['mode']} | {r['tok_s']:.0f} | {r['tok_s'] / base['sdpa']:.2f} | "
              f"{r['tok_s'] / base['eager']:.2f} | {sk} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
