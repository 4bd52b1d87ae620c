"""Throughput and peak memory of catchtag's full analysis against plain SDPA and eager attention maps.

One command on a CUDA machine (random weights, nothing downloaded):

    python bench/attention.py                 # both tables (planted sinks, then none) for 4x1024 .. 1x65536
    python bench/attention.py --sinks planted --sizes 4x1024 --scan 64   # one size, plus an end-to-end scan row
    python bench/attention.py --check --sizes ""         # the triton backend against the torch path on CUDA
    python bench/attention.py --colsum 16384 --sizes ""  # pass 1 and pass 2 alone at one layer's shape
    python bench/attention.py --profile 1x16384 --sizes ""  # kernel times of a 4-layer model, SDPA vs catchtag
    python bench/attention.py --max-t 131072             # the table plus one pass at 1 x 131072

The model is Qwen2.5-7B-shaped (28 layers, hidden 3584, 28 query / 4 key-value heads of 128, MLP 18944),
bf16, built from its config. Random weights have no sinks at eps 0.2 (attention is nearly uniform), which
would time the sink pass at K = 0; ``--sinks planted`` (the default table) plants them with forward hooks on
every layer's q and k projections (``plant_sinks``), in every mode alike. Each mode runs the decoder stack
(model.model, no LM head: the analysis needs no logits, and a 152k-vocabulary head at T=65536 would take
20 GB on its own) with use_cache=False under torch.no_grad. Modes: sdpa, eager (+ output_attentions),
catchtag (eps 0.2), catchtag-sweep (the 12 thresholds of ``catchtag sweep`` in the same pass). Tokens/s is
B*T over the median wall time of ``--reps`` passes after one warm-up; peak GiB is
torch.cuda.max_memory_allocated over a timed pass (the 15.2 GB of weights included); sinks/head is the mean
number of sinks per head at eps 0.2 in the measured pass. ``--scan N`` adds the end to end row: ``catchtag.scan``
of N prompts of B x T tokens into a run folder (tables written) against the bare SDPA forward of the same
batches through the same call (model(...) with the LM head), both with the planted sinks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SIZES = ((4, 1024), (1, 4096), (1, 16384), (1, 65536))
SWEEP = (0.03, 0.05, 0.07, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.35, 0.4)  # catchtag.analysis.sweep.SWEEP_EPS


def plant_sinks(model, strength: float | None = None, fractions=(0.0, 0.25, 0.5)):
    """Forward hooks that plant sinks in every layer and head; returns the hook handles (``.remove()`` them).

    Every query gets a component ``a u`` and the keys at a few positions (the given fractions of each prompt's
    length, the first token included) get ``a u``, u a unit vector on the slowest-rotating RoPE coordinate
    (theta^-(D-2)/D per position: 0.08 rad over 65536 positions at theta 1e6), so the planted logit
    a^2 / sqrt(D) is the same at every distance. With a^2 / sqrt(D) = log(10 T) the sinks take most of each row's
    attention: three per head with column scores about 0.54, 0.39 and 0.33, the rest of the columns near 0.
    """
    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    u_index = D // 2 - 1  # rotate_half pairs (i, i + D/2): pair D/2 - 1 turns slowest

    def amplitude(T):
        logit = strength if strength is not None else float(torch.log(torch.tensor(10.0 * T)))
        return (logit * D ** 0.5) ** 0.5

    def on_q(module, args, out):
        a = amplitude(out.shape[1])
        view = out.view(*out.shape[:2], H, D)
        view[..., u_index] += a
        return out

    def on_k(module, args, out):
        T = out.shape[1]
        a = amplitude(T)
        view = out.view(*out.shape[:2], KV, D)
        for f in fractions:
            view[:, int(f * T), :, u_index] += a
        return out

    handles = []
    for layer in model.model.layers:
        attn = layer.self_attn
        handles += [attn.q_proj.register_forward_hook(on_q), attn.k_proj.register_forward_hook(on_k)]
    return handles


def build_model(layers: int | None = None, shape: str = "qwen2.5-7b"):
    """random:<shape> (catchtag.models.RANDOM_SHAPES: qwen2.5-7b, gemma2-9b), optionally with fewer layers."""
    from transformers import AutoModelForCausalLM

    from catchtag.models import random_config

    cfg = random_config(shape)
    if layers:
        cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


_K_HINT: dict = {}


def forward(model, mode, ids, settings):
    from catchtag.engine.attention import captured_forward

    if mode.startswith("catchtag"):  # as a scan does: the last pass's candidate count is the next one's hint
        cap, _ = captured_forward(lambda: model.model(input_ids=ids, use_cache=False), settings,
                                  k_hint=_K_HINT.get(id(model)))
        _K_HINT[id(model)] = cap.k_hint
        return cap
    model.model(input_ids=ids, use_cache=False, output_attentions=(mode == "eager"))
    return None


def _register_bench_modes():
    """Two attention functions for the benchmark only: "catchtag-sinks" is catchtag's with a learned sink logit per
    head passed as a model with learned sinks passes it (gpt-oss: ``s_aux``), to time what learned sinks cost on the
    same shape; "fused-no-softcap" is SDPA without the softcap (Gemma-2's own code refuses SDPA because SDPA cannot
    apply it): the speed of the plain fused kernel at the same shape, the baseline of the softcap rows."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from catchtag.engine.attention import catchtag_attention, catchtag_mask

    def with_sinks(module, query, key, value, mask, **kwargs):
        if not hasattr(module, "_bench_sinks"):
            module._bench_sinks = torch.zeros(query.shape[1], device=query.device, dtype=query.dtype)
        return catchtag_attention(module, query, key, value, mask, s_aux=module._bench_sinks, **kwargs)

    def sdpa_no_softcap(module, query, key, value, mask, softcap=None, **kwargs):
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    AttentionInterface.register("catchtag-sinks", with_sinks)
    AttentionMaskInterface.register("catchtag-sinks", catchtag_mask)
    AttentionInterface.register("fused-no-softcap", sdpa_no_softcap)
    AttentionMaskInterface.register("fused-no-softcap", sdpa_mask)


def measure(model, mode, B, T, reps, warmup=1):
    from catchtag.engine.attention import enable
    from catchtag.engine.request import SinkSettings

    if mode in ("catchtag", "catchtag-sweep"):
        enable(model)
    else:
        model.set_attn_implementation(mode)
    settings = SinkSettings(sweep_eps=SWEEP if mode == "catchtag-sweep" else ())
    ids = torch.randint(0, model.config.vocab_size, (B, T), device="cuda", generator=None)
    times, peak, sinks = [], 0.0, None
    try:
        with torch.no_grad():
            for _ in range(warmup):
                forward(model, mode, ids, settings)
            for _ in range(reps):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                cap = forward(model, mode, ids, settings)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                peak = max(peak, torch.cuda.max_memory_allocated() / 2**30)
                if cap is not None:
                    sinks = float(sum(int(r.stats.sink_ok.sum()) for r in cap.layers.values())) / (
                        len(cap.layers) * B * model.config.num_attention_heads)
    except torch.OutOfMemoryError:
        return dict(mode=mode, B=B, T=T, tok_s=None, peak_gib=None, note="out of memory")
    finally:
        torch.cuda.empty_cache()
    t = statistics.median(times)
    return dict(mode=mode, B=B, T=T, tok_s=B * T / t, peak_gib=peak, seconds=t, reps=reps, sinks_per_head=sinks)


def table(rows):
    """One markdown table; sinks/head of the sdpa and eager rows is the analysis' count on the same input."""
    lines = ["| B x T | mode | tokens/s | peak GiB | throughput / SDPA | memory / SDPA | sinks/head |",
             "|---|---|---|---|---|---|---|"]
    base = {(r["B"], r["T"]): r for r in rows if r["mode"] in ("sdpa", "fused-no-softcap")}
    counted = {(r["B"], r["T"]): r["sinks_per_head"] for r in rows if r.get("sinks_per_head") is not None}
    for r in rows:
        s = base.get((r["B"], r["T"]))
        sk = counted.get((r["B"], r["T"]))
        sk = f"{sk:.2f}" if sk is not None else "-"
        if r["tok_s"] is None:
            lines.append(f"| {r['B']}x{r['T']} | {r['mode']} | {r['note']} | - | - | - | {sk} |")
            continue
        ratio_t = f"{r['tok_s'] / s['tok_s']:.3f}" if s and s["tok_s"] else "-"
        ratio_m = f"{r['peak_gib'] / s['peak_gib']:.3f}" if s and s["tok_s"] else "-"
        lines.append(f"| {r['B']}x{r['T']} | {r['mode']} | {r['tok_s'] / 1e3:.1f}k | {r['peak_gib']:.1f} | "
                     f"{ratio_t} | {ratio_m} | {sk} |")
    return "\n".join(lines)


def scan_row(model, B, T, n_prompts, reps=2, profile_scan=False, trace=""):
    """End to end: catchtag.scan of n_prompts random prompts of T tokens (batch B, run folder written) against the
    bare SDPA forward of the same batches through the same call; tokens/s of each, medians over ``reps``."""
    from catchtag.data.prompts import Prompt
    from catchtag.engine.attention import enable
    from catchtag.models import tiny_tokenizer
    from catchtag.scan import scan

    tok = tiny_tokenizer(T + 1)
    g = torch.Generator().manual_seed(0)
    prompts = [Prompt(i, torch.randint(0, 256, (T,), generator=g).tolist()) for i in range(n_prompts)]
    enable(model)
    scan(model, tok, prompts[:B], batch_size=B, progress=False)  # warm-up: kernels compiled and tuned
    scan_times = []
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as tmp:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            result = scan(model, tok, prompts, batch_size=B, out=Path(tmp) / "run", progress=False)
            scan_times.append(time.perf_counter() - t0)
    model.set_attn_implementation("sdpa")
    ids = [torch.tensor([p.input_ids for p in prompts[i:i + B]], device="cuda") for i in range(0, n_prompts, B)]
    sdpa_times = []
    with torch.no_grad():
        model(input_ids=ids[0], attention_mask=torch.ones_like(ids[0]), use_cache=False)
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for x in ids:
                model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
            torch.cuda.synchronize()
            sdpa_times.append(time.perf_counter() - t0)
    if profile_scan:  # where a scan's time goes on the host (the GPU side: --profile)
        import cProfile
        import pstats

        enable(model)
        with tempfile.TemporaryDirectory() as tmp:
            prof = cProfile.Profile()
            prof.enable()
            scan(model, tok, prompts, batch_size=B, out=Path(tmp) / "run", progress=False)
            torch.cuda.synchronize()
            prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        # the GPU side of the same scan: how much of the wall time the GPU was busy
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with tempfile.TemporaryDirectory() as tmp, torch_profile(activities=[ProfilerActivity.CPU,
                                                                             ProfilerActivity.CUDA]) as tprof:
            t0 = time.perf_counter()
            scan(model, tok, prompts, batch_size=B, out=Path(tmp) / "run", progress=False)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        if trace:  # the timeline of a short scan (4 batches), for chrome://tracing or a script
            with tempfile.TemporaryDirectory() as tmp, torch_profile(
                    activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as short:
                scan(model, tok, prompts[:4 * B], batch_size=B, out=Path(tmp) / "run", progress=False)
                torch.cuda.synchronize()
            short.export_chrome_trace(trace)
        events = tprof.key_averages()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # not the aten ops too
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
        print(f"scan under the torch profiler: wall {wall:.3f} s, GPU busy {busy:.3f} s ({busy / wall:.1%})")
        print(events.table(sort_by="self_device_time_total", row_limit=20))
        model.set_attn_implementation("sdpa")
    n = n_prompts * T
    h = result.heads
    return dict(B=B, T=T, prompts=n_prompts, scan_tok_s=n / statistics.median(scan_times),
                sdpa_tok_s=n / statistics.median(sdpa_times), ratio=statistics.median(sdpa_times) /
                statistics.median(scan_times), sinks_per_head=float(h["n_sinks"].mean()),
                backends=result.settings.get("backends_used"), scan_s=scan_times, sdpa_s=sdpa_times)


def check(only: str = ""):
    """The triton backend against the torch path on CUDA: random tensors (bf16 and float32, GQA, padding,
    sliding window, a planted sink) and tiny models through capture(). Prints the worst errors."""
    from catchtag.engine.backends import layer_statistics
    from catchtag.engine.kernels import colsum
    from catchtag.engine.request import SinkSettings

    colsum.FIXED_BLOCK = (64, 64)  # one compile per shape family instead of an autotune each
    worst = {}
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs it only under TRITON_INTERPRET=1
    g = torch.Generator(device=dev).manual_seed(int(time.time()))
    shapes = ((2, 8, 2, 300, 64, None, True, None), (1, 28, 4, 4096, 128, None, False, None),
              (3, 4, 4, 257, 128, 50, True, None), (2, 6, 3, 1000, 96, None, True, None),
              (1, 28, 4, 4096, 128, 1000, False, None), (2, 16, 8, 1000, 256, 300, True, 5.0),
              (1, 16, 8, 4096, 256, None, False, 50.0))
    if dev == "cpu":
        shapes = ((2, 4, 2, 40, 16, None, True, None), (1, 4, 2, 64, 16, 20, False, 5.0))
    for dtype in (torch.float32, torch.bfloat16):
        for (B, H, KV, T, D, window, pad, softcap) in shapes:
            q = torch.randn(B, H, T, D, device=dev, generator=g)
            k = torch.randn(B, KV, T, D, device=dev, generator=g)
            v = torch.randn(B, KV, T, D, device=dev, generator=g)
            u = torch.randn(D, device=dev, generator=g)
            q += 0.5 * u
            k[:, :, 0] = 3 * u
            k[:, :, T // 3] = 2 * u  # two planted sinks, the second one weaker
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            valid = torch.ones(B, T, dtype=torch.bool, device=dev)
            if pad:
                valid[0, : T // 5] = False
                valid[-1, T - T // 7:] = False
            i = torch.arange(T, device=dev)
            m = (i[:, None] >= i[None, :]) & valid[:, None, :]
            if window:
                m &= (i[:, None] - i[None, :]) < window
            mask = m[:, None] if (pad or window) else None
            key = f"{str(dtype)[6:]} B{B} H{H}/{KV} T{T} D{D} w{window} pad{pad} softcap{softcap}"
            if only not in key:
                continue
            st = SinkSettings(eps=0.05, min_rows=8, sweep_eps=(0.02, 0.2))
            t0 = time.time()
            o1, t1, s1, _ = layer_statistics(q, k, v, mask, D ** -0.5, softcap, st, backend="torch")
            o2, t2, s2, _ = layer_statistics(q, k, v, mask, D ** -0.5, softcap, st, backend="triton")
            rv = valid[:, None, :, None]
            rel = lambda a, b: float(((a.float() - b.float()) * rv).norm() / ((b.float() * rv).norm() + 1e-30))  # noqa
            fin = ~torch.isnan(s1.col_scores)
            assert torch.equal(fin, ~torch.isnan(s2.col_scores))
            e = dict(out=rel(o2, o1), tag=rel(t2, t1),
                     scores=float((s2.col_scores - s1.col_scores)[fin].abs().max() / s1.col_scores[fin].abs().max()),
                     ve=float((s2.sweep_ve - s1.sweep_ve).abs().max()),
                     r2=float((s2.sweep_r2 - s1.sweep_r2).abs().max()),
                     ve_uncentred=float((s2.sweep_ve_uncentred - s1.sweep_ve_uncentred).abs().max()),
                     same_sinks=bool(torch.equal(s1.sweep_n_sinks, s2.sweep_n_sinks)
                                     and torch.equal(s1.sink_idx[s1.sink_ok], s2.sink_idx[s2.sink_ok])),
                     n_sinks=int(s1.sink_ok.sum()))
            e["seconds"] = round(time.time() - t0, 1)
            worst[key] = e
            print(key, json.dumps({a: (round(b, 7) if isinstance(b, float) else b) for a, b in e.items()}), flush=True)
    colsum.FIXED_BLOCK = None
    return worst


def profile(sizes):
    """CUDA kernel and host times of one pass of a 4-layer model of the same shape with planted sinks, SDPA against
    catchtag: the kernels by GPU time, then the operators by host time."""
    model = build_model(layers=4)
    plant_sinks(model)
    from torch.profiler import ProfilerActivity, profile as prof

    for B, T in sizes:
        for mode in ("sdpa", "catchtag"):
            measure(model, mode, B, T, reps=1)
            with prof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
                r = measure(model, mode, B, T, reps=1, warmup=0)
            print(f"== {mode}, 4 layers, {B}x{T}: {r['seconds'] * 1e3:.1f} ms")
            ka = p.key_averages()
            print(ka.table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=50))
            print(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))


def colsum_alone(T, block=None, profile_sink=False):
    """Time pass 1 alone against the flash forward at one layer's shape (1 x T, 28/4 heads of 128)."""
    import triton

    from catchtag.engine.stats import attention_and_lse
    from catchtag.engine.kernels.colsum import column_sums

    q = torch.randn(1, 28, T, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4, T, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    valid = torch.ones(1, T, dtype=torch.bool, device="cuda")
    out, lse = attention_and_lse(q, k, v, None, 128 ** -0.5, valid)
    flops_qk = 28 * 128 * 2 * T * T / 2  # one causal q.k^T
    t_flash = triton.testing.do_bench(lambda: attention_and_lse(q, k, v, None, 128 ** -0.5, valid),
                                      return_mode="median")
    t_col = triton.testing.do_bench(lambda: column_sums(q, k, lse, valid, 128 ** -0.5, block=block),
                                    return_mode="median")
    from catchtag.engine.backends import row_counts
    from catchtag.engine.kernels.sinkpass import sink_pass
    from catchtag.engine.request import SinkSettings

    counts = row_counts(valid, None)
    scores = torch.rand(1, 28, T, device="cuda") * 0.01
    scores[..., torch.tensor([0, 5, 100, T // 2])] = 0.5  # 4 sinks per head
    times_sink = {}
    for label, st in (("eps 0.2", SinkSettings()), ("12-eps sweep", SinkSettings(sweep_eps=(
            0.03, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.25, 0.3, 0.35, 0.4)))):
        times_sink[label] = triton.testing.do_bench(
            lambda: sink_pass(q, k, v, out, lse, valid, scores, counts, 128 ** -0.5, st), return_mode="median")
    print(f"1x{T} one layer: sink pass with 4 sinks/head: "
          + ", ".join(f"{a} {b:.3f} ms" for a, b in times_sink.items()))
    if profile_sink:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
            for _ in range(5):
                sink_pass(q, k, v, out, lse, valid, scores, counts, 128 ** -0.5, SinkSettings())
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=50))
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=50))
    print(f"1x{T} one layer: flash fwd + lse {t_flash:.3f} ms ({2 * flops_qk / t_flash / 1e9:.0f} TFLOP/s), "
          f"colsum {t_col:.3f} ms ({flops_qk / t_col / 1e9:.0f} TFLOP/s, block {block or 'autotuned'})", flush=True)


def flash_alone():
    """Time the fused softcapped attention (kernels/flash.py) alone against PyTorch's fused kernel without the softcap,
    at one layer of the Gemma-2-9B shape (16/8 heads of 256) and of the Qwen2.5-7B shape (28/4 of 128), bf16."""
    import triton

    from catchtag.engine.kernels import flash
    from catchtag.engine.stats import _causal_attention_and_lse

    rows = []
    for (H, KV, D), (B, T) in ((h, s) for h in ((16, 8, 256), (28, 4, 128)) for s in ((4, 1024), (1, 4096))):
        q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        valid = torch.ones(B, T, dtype=torch.bool, device="cuda")
        ref, ref_lse = _causal_attention_and_lse(q, k, v, D ** -0.5)
        got, lse = flash.flash_attention(q, k, v, D ** -0.5, valid, padded=False)
        err = float((got.float() - ref.float()).norm() / ref.float().norm())
        t_fused = triton.testing.do_bench(lambda: _causal_attention_and_lse(q, k, v, D ** -0.5), return_mode="median")
        t_plain = triton.testing.do_bench(lambda: flash.flash_attention(q, k, v, D ** -0.5, valid, padded=False),
                                          return_mode="median")
        t_cap = triton.testing.do_bench(lambda: flash.flash_attention(q, k, v, D ** -0.5, valid, softcap=50.0,
                                                                      padded=False), return_mode="median")
        flops = 4 * B * H * D * T * T / 2
        r = dict(heads=f"{H}/{KV}x{D}", size=f"{B}x{T}", fused_ms=t_fused, flash_ms=t_plain, flash_softcap_ms=t_cap,
                 fused_tflops=flops / t_fused / 1e9, flash_softcap_tflops=flops / t_cap / 1e9, rel_err_vs_fused=err,
                 lse_err=float((lse - ref_lse.float()).abs().max()), config=str(flash._tuned.best_config))
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(f"{b}x{t}" for b, t in SIZES))
    ap.add_argument("--modes", default="sdpa,eager,catchtag,catchtag-sweep",
                    help="also catchtag-sinks (a learned sink logit per head), fused-no-softcap (gemma2-9b's baseline)")
    ap.add_argument("--sinks", default="planted,none", help="planted (hooks, see plant_sinks) and/or none")
    ap.add_argument("--scan", type=int, default=0, help="also an end-to-end scan of this many prompts of the "
                                                            "first size, against the bare SDPA forward")
    ap.add_argument("--profile-scan", action="store_true", help="with --scan: cProfile of one more scan (host time)")
    ap.add_argument("--trace", default="", help="with --profile-scan: write a Chrome trace of a 4-batch scan here")
    ap.add_argument("--reps", type=int, default=3, help="timed passes per cell (1 at T >= 65536)")
    ap.add_argument("--max-t", type=int, default=0, help="also try catchtag and SDPA at 1 x this T, one pass")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--check-only", default="", help="with --check: only the cases whose label holds this text")
    ap.add_argument("--flash", action="store_true", help="time the fused softcapped attention kernel alone")
    ap.add_argument("--shape", default="qwen2.5-7b", help="random:<shape> of catchtag.models: qwen2.5-7b, gemma2-9b")
    ap.add_argument("--profile", default="", help="B x T sizes to profile, e.g. 4x1024,1x16384")
    ap.add_argument("--json", default="")
    ap.add_argument("--colsum", type=int, default=0, help="time pass 1 alone at 1 x this T (also for ncu)")
    ap.add_argument("--profile-sink", action="store_true", help="with --colsum: profile the sink pass")
    ap.add_argument("--block", default="", help="fixed colsum tile BLOCK_M,BLOCK_N for --colsum")
    a = ap.parse_args()
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if a.colsum:
        colsum_alone(a.colsum, tuple(map(int, a.block.split(","))) if a.block else None, a.profile_sink)
    if a.check:
        check(a.check_only)
    if a.flash:
        flash_alone()
    if a.profile:
        profile([tuple(map(int, x.split("x"))) for x in a.profile.split(",")])
    if not a.sizes and not a.scan:
        return
    _register_bench_modes()
    model = build_model(shape=a.shape)
    sizes = [tuple(map(int, x.split("x"))) for x in a.sizes.split(",")] if a.sizes else []
    if a.max_t:
        sizes.append((1, a.max_t))
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": a.shape, "tables": {}}
    for sinks in a.sinks.split(","):
        handles = plant_sinks(model) if sinks == "planted" else []
        rows = []
        for B, T in sizes:
            for mode in a.modes.split(","):
                if mode == "eager" and B * T >= 65536:
                    rows.append(dict(mode=mode, B=B, T=T, tok_s=None, peak_gib=None,
                                     note="not run (out of memory at 1x16384)"))
                    continue
                big = T >= 65536
                r = measure(model, mode, B, T, reps=1 if big else a.reps, warmup=1)
                rows.append(r)
                print(json.dumps(r), flush=True)
        out["tables"][sinks] = rows
        print(f"\n## sinks: {sinks}\n" + table(rows), flush=True)
        if a.scan and sinks == "planted":
            B, T = sizes[0] if sizes else (4, 1024)
            out["scan"] = scan_row(model, B, T, a.scan, profile_scan=a.profile_scan, trace=a.trace)
            r = out["scan"]
            print(f"\nend to end, {r['prompts']} prompts of {T} tokens, batch {B}: catchtag scan "
                  f"{r['scan_tok_s'] / 1e3:.1f}k tok/s, bare SDPA forward {r['sdpa_tok_s'] / 1e3:.1f}k tok/s, ratio "
                  f"{r['ratio']:.3f}, sinks/head {r['sinks_per_head']:.2f}, backends {r['backends']}", flush=True)
        for h in handles:
            h.remove()
    try:
        from catchtag.engine.kernels.colsum import _tuned
        print("colsum tile:", _tuned.best_config)
    except Exception as exc:  # noqa: BLE001
        print("colsum tile: unknown", exc)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
