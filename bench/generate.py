"""Decoding speed with catch/tag statistics on (catchtag.generation) against the model's plain generate().

    python bench/generate.py --model smollm2-135m --batches 1,8 --prefill 32 --new 256          # the CPU target
    python bench/generate.py --model random:qwen2.5-7b --batches 1,32 --prefill 1024 --new 512 \
        --device cuda --dtype bfloat16 --check                                                   # the H200 target

Both sides decode the same prompts greedily with the same cache for the same number of steps (no end token stops
them); tokens per second = sequences x forward passes / wall time (catchtag makes one more pass than it keeps: that
row completes the last token's statistics). --check also compares the greedy tokens, and the tracker's last state
with a scan of the finished texts, on a short run first.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from catchtag.data.prompts import Prompt
from catchtag.engine.request import SinkSettings
from catchtag.generation import batch_tables, generate_batch, generation_config, track_generation
from catchtag.models import load_model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompts_of(tokenizer, batch: int, length: int, seed: int = 0) -> list[Prompt]:
    """Prose prompts of exactly ``length`` tokens (random byte-tokens for a random model)."""
    from catchtag.data.prompts import prose_corpus

    ids = tokenizer(prose_corpus()[:200000])["input_ids"]
    need = batch * length
    ids = (ids * (need // max(1, len(ids)) + 1))[:need]
    return [Prompt(b, ids[b * length:(b + 1) * length]) for b in range(batch)]


def plain_generate(model, prompts, new: int, pad: int, cache: str | None = None):
    from catchtag.scan import _batch_tensors

    ids, mask = _batch_tensors(prompts, None, model.device, left=True, pad=pad)
    config = generation_config(model, new - 1, greedy=True, pad_token_id=pad)  # new - 1 + 1 = new passes
    if cache:  # eagerly, as catchtag decodes (transformers would compile a static cache's forward on a GPU)
        config.cache_implementation, config.disable_compile = cache, True
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)


def timed(fn, device):
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return out, time.perf_counter() - t, peak


def check_archs(archs, device: str, json_path: str | None) -> None:
    """Tiny random models on ``device``: catchtag's greedy tokens equal the model's own (SDPA, else eager) and the
    tracker's last state (its own VE kept) equals a scan of the finished texts (sinks and VE), with padding and
    sliding windows. An arch written TYPE:CACHE (e.g. llama:static) decodes with that cache class on both sides."""
    from transformers import AutoModelForCausalLM

    from catchtag.generation import generate
    from catchtag.tiny import tiny_config, tiny_tokenizer

    tok = tiny_tokenizer()
    rows = []
    for spec in archs:
        arch, _, cache = spec.partition(":")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(arch)).to(device).eval()
        texts = ["The quick brown fox jumps over the lazy dog, again.", "Hello there"]
        prompts = [Prompt(i, tok(t)["input_ids"], t) for i, t in enumerate(texts)]
        try:
            model.set_attn_implementation("sdpa")
        except ValueError:
            model.set_attn_implementation("eager")
        try:
            plain = plain_generate(model, prompts, 16, tok.pad_token_id, cache or None)
            if cache:
                model.generation_config.cache_implementation = cache
            got = generate(model, tok, prompts, max_new_tokens=15, eps=0.03, min_rows=4, progress=False,
                           tracker_ve=True)
            lean = generate(model, tok, prompts, max_new_tokens=15, eps=0.03, min_rows=4, progress=False,
                            tracker_ve=False)  # as the command runs: no Gram matrices
        except Exception as e:  # one architecture's failure is a row, the others still run
            rows.append({"arch": spec, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            print(rows[-1], flush=True)
            continue
        t0 = plain.shape[1] - 16
        same = all(list(r.token_ids)[len(p.input_ids):] == plain[b, t0:t0 + r.n_new_tokens].tolist()
                   for b, (p, r) in enumerate(zip(prompts, got.prompts.itertuples())))  # up to an end token
        rows.append({"arch": spec, "greedy_same_tokens": bool(same), **got.check,
                     "same_sinks_without_tracker_ve": lean.check["same_sinks"],
                     "same_tokens_without_tracker_ve": lean.prompts["token_ids"].map(list).tolist()
                     == got.prompts["token_ids"].map(list).tolist()})
        print(rows[-1], flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": device, "archs": rows}, f, indent=1)
    if any("error" in r or not (r["greedy_same_tokens"] and r["same_sinks"] == 1.0
                                and r["same_sinks_without_tracker_ve"] == 1.0 and r["same_tokens_without_tracker_ve"])
           for r in rows):
        raise SystemExit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prefill", type=int, default=32)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per side (the best is kept)")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--tracker-ve", action="store_true", help="the tracker also keeps its Gram matrices (its own VE), "
                    "as `catchtag generate --tracker-ve`; default: as the command runs, the VE from the scan")
    ap.add_argument("--archs", help="instead: tiny models of these types on --device, greedy tokens against the model "
                    "without catchtag and the tracker's last state against a scan (e.g. llama,gemma3,gpt_oss)")
    ap.add_argument("--json")
    args = ap.parse_args()

    if args.archs:
        check_archs(args.archs.split(","), args.device, args.json)
        return
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    settings = SinkSettings()
    cfg = model.config.get_text_config()
    print(f"{args.model} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{model.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    rows = []
    if args.check:
        from catchtag.generation import generate

        prompts = prompts_of(tok, 2, min(args.prefill, 64))
        model.set_attn_implementation("sdpa")
        plain = plain_generate(model, prompts, 32, pad)
        got = generate(model, tok, prompts, max_new_tokens=31, progress=False, tracker_ve=True)
        t0 = len(prompts[0].input_ids)
        same = all(list(r.token_ids)[t0:] == plain[b, t0:t0 + r.n_new_tokens].tolist()
                   for b, r in enumerate(got.prompts.itertuples()))
        rows.append({"check": {"greedy_same_tokens": bool(same), **got.check}})
        print("check:", rows[-1]["check"], flush=True)
    for batch in [int(x) for x in args.batches.split(",")]:
        prompts = prompts_of(tok, batch, args.prefill)
        gen = dict(max_new_tokens=args.new - 1, greedy=True)
        model.set_attn_implementation("sdpa")
        plain_generate(model, prompts, 4, pad)  # warm up both
        generate_batch(model, tok, prompts, settings, dict(gen, max_new_tokens=3), ve=args.tracker_ve)
        model.set_attn_implementation("sdpa")
        best = {"plain": None, "catchtag": None}
        tables_seconds = None
        for _ in range(args.repeats):
            model.set_attn_implementation("sdpa")
            _, t_plain, m_plain = timed(lambda: plain_generate(model, prompts, args.new, pad), device)
            got, t_ct, m_ct = timed(lambda: track_generation(model, tok, prompts, settings, gen, ve=args.tracker_ve),
                                    device)
            _, t_tables, _ = timed(lambda got=got: batch_tables(tok, prompts, settings, *got), device)
            del got
            tables_seconds = t_tables if tables_seconds is None else min(tables_seconds, t_tables)
            for side, t, m in (("plain", t_plain, m_plain), ("catchtag", t_ct, m_ct)):
                if best[side] is None or t < best[side][0]:
                    best[side] = (t, m)
        prefill_peak = {"plain": None, "catchtag": None}
        if device.type == "cuda":  # the prompt's pass alone (one pass, no decoding step): where the peak comes from
            _, _, prefill_peak["plain"] = timed(lambda: plain_generate(model, prompts, 1, pad), device)
            _, _, prefill_peak["catchtag"] = timed(
                lambda: track_generation(model, tok, prompts, settings, dict(gen, max_new_tokens=0),
                                         ve=args.tracker_ve), device)
            model.set_attn_implementation("sdpa")
        tps = {k: batch * args.new / v[0] for k, v in best.items()}
        kv = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * (args.prefill + args.new) * \
            getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads) * model.dtype.itemsize
        row = {"batch": batch, "tracker_ve": args.tracker_ve, "prefill": args.prefill, "new": args.new,
               "plain_tokens_per_s": tps["plain"],
               "catchtag_tokens_per_s": tps["catchtag"], "ratio": tps["catchtag"] / tps["plain"],
               "plain_seconds": best["plain"][0], "catchtag_seconds": best["catchtag"][0],
               "plain_peak_bytes": best["plain"][1], "catchtag_peak_bytes": best["catchtag"][1], "kv_cache_bytes": kv,
               "plain_prefill_peak_bytes": prefill_peak["plain"],
               "catchtag_prefill_peak_bytes": prefill_peak["catchtag"],
               "weights_bytes": sum(t.numel() * t.element_size() for t in model.parameters()),
               "tables_seconds": tables_seconds,
               "ratio_with_tables": best["plain"][0] / (best["catchtag"][0] + tables_seconds)}
        rows.append(row)
        mem = ""
        if device.type == "cuda":
            mem = (f"; peak memory {row['plain_peak_bytes'] / 2**30:.2f} -> {row['catchtag_peak_bytes'] / 2**30:.2f} "
                   f"GiB (KV cache {kv / 2**30:.2f} GiB); the prompt's pass alone "
                   f"{prefill_peak['plain'] / 2**30:.2f} -> {prefill_peak['catchtag'] / 2**30:.2f} GiB")
        print(f"batch {batch:>2} prefill {args.prefill} new {args.new}: plain {tps['plain']:.1f} tok/s, catchtag "
              f"{tps['catchtag']:.1f} tok/s, ratio {row['ratio']:.3f} (with the step tables: "
              f"{row['ratio_with_tables']:.3f}){mem}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "device": str(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
