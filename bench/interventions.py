"""Interventions on a device: the chunked next-token NLL, the first-order attribution and the light control pass
agree with their plain or CPU references (the tests check the same on the CPU only), and the attribution's cost
against a scan of the same batch.

    python bench/interventions.py --device cuda                       # checks on tiny models, float32 and bf16
    python bench/interventions.py --device cuda --speed random:qwen2.5-7b --tokens 256 --batch 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from catchtag.engine.request import SinkSettings  # noqa: E402
from catchtag.interventions import ablation as ab  # noqa: E402
from catchtag.models import load_model  # noqa: E402


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def batch(vocab: int, B: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(vocab, 250), (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, : T // 4] = 0  # left padding on one prompt
    return ids, mask


def check(device: str) -> list[dict]:
    rows = []
    settings = SinkSettings(eps=0.08, min_rows=4)
    for arch in ("llama", "gemma3", "gpt2"):
        cpu, _ = load_model(f"tiny:{arch}", device="cpu", dtype="float32")
        ids, mask = batch(cpu.config.vocab_size, 3, 40)
        ref_est, ref_nll, _, _ = ab.attribution(cpu, ids, mask, settings, "mean")
        for dtype in ("float32", "bfloat16"):
            net, _ = load_model(f"tiny:{arch}", device=device, dtype=dtype)
            dev = next(net.parameters()).device
            i, m = ids.to(dev), mask.to(dev)
            with torch.no_grad():
                fast, plain = ab.forward_nll(net, i, m), ab._plain_forward_nll(net, i, m, grad=False)
            est, nll, _, _ = ab.attribution(net, i, m, settings, "mean")
            base = ab.baseline(net, i, m, settings, ab.sample_positions(30))
            edit = ab.edits_for([(1, 0)], "mean", "control", head_dim(net.config), prompt_ids=[0, 1, 2])
            light = ab.intervened(net, i, m, settings, ab.sample_positions(30), edit, base, release=False)[0]
            full = ab.intervened(net, i, m, settings, ab.sample_positions(30), edit, base)[0]
            fin = torch.isfinite(ref_est := torch.as_tensor(ref_est)) & torch.isfinite(torch.as_tensor(est))
            scale = float(ref_est[fin].abs().max()) or 1.0
            row = dict(arch=arch, dtype=dtype, device=str(dev),
                       nll_chunked_vs_plain=float((fast - plain).nan_to_num().abs().max()),
                       nll_vs_cpu=float((nll - ref_nll).nan_to_num().abs().max()),
                       attribution_vs_cpu=float((torch.as_tensor(est)[fin] - ref_est[fin]).abs().max()) / scale,
                       control_light_vs_full=float((light - full).nan_to_num().abs().max()))
            print(json.dumps(row), flush=True)
            if dtype == "float32":
                assert row["nll_chunked_vs_plain"] < 1e-4 and row["control_light_vs_full"] < 1e-4, row
                assert row["nll_vs_cpu"] < 1e-3 and row["attribution_vs_cpu"] < 1e-2, row
            rows.append(row)
    return rows


def speed(model: str, device: str, B: int, T: int, repeats: int = 3) -> dict:
    from catchtag.scan import _decoder, scan_batch

    net, tok = load_model(model, device=device, dtype="auto")
    dev = next(net.parameters()).device
    ids, mask = batch(net.config.vocab_size, B, T)
    ids, mask = ids.to(dev), mask.to(dev)
    from catchtag.data.prompts import Prompt

    prompts = [Prompt(b, ids[b][mask[b].bool()].tolist()) for b in range(B)]
    settings = SinkSettings(eps=0.2, min_rows=16)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def timed(f):
        f()
        sync()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            f()
            sync()
            best = min(best, time.perf_counter() - t)
        return best

    decoder = _decoder(net)
    scan_s = timed(lambda: scan_batch(decoder, tok, prompts, settings))
    attrib_s = timed(lambda: ab.attribution(net, ids, mask, settings, "mean"))
    base = ab.baseline(net, ids, mask, settings, ab.sample_positions(T))
    D, mid = head_dim(net.config), net.config.num_hidden_layers // 2
    edit = ab.edits_for([(mid, 0)], "mean", "ablation", D)
    ctrl = ab.edits_for([(mid, 0)], "mean", "control", D, prompt_ids=list(range(B)))
    abl_s = timed(lambda: ab.intervened(net, ids, mask, settings, ab.sample_positions(T), edit, base))
    ctrl_s = timed(lambda: ab.intervened(net, ids, mask, settings, ab.sample_positions(T), ctrl, base, release=False))
    row = dict(model=model, device=str(dev), batch=B, tokens=T, scan_s=scan_s, attribution_s=attrib_s,
               attribution_over_scan=attrib_s / scan_s, ablation_pass_mid_layer_s=abl_s,
               control_pass_mid_layer_s=ctrl_s)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--speed", default="", help="a model to time the attribution against a scan on")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    out = {"check": check(args.device)}
    if args.speed:
        out["speed"] = speed(args.speed, args.device, args.batch, args.tokens)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
