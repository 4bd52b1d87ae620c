"""The coverage matrix: every causal-LM model type of the installed transformers, checked against its own output.

For each model type a tiny random model is built from its default config (catchtag.tiny) and held to:
  1. logits with catchtag's attention (inside a capture) equal to the model's own eager attention (float32,
     relative 1e-5), on a padded batch (left and right padding) longer than every sliding window;
  2. column scores, sinks, VE (both forms), R^2, the learned sink share and the heads' writes into the residual
     stream (result, through a gate where the model has one) equal to the float64 eager reference;
  3. ``catchtag.scan`` runs and gives one row per prompt, analysed layer and head.
A type that passes is "parity"; any other is "refused", with the reason, and ``engine.enable`` refuses it in one
line. ``python -m catchtag.coverage`` writes the matrix (engine/model_types.json, which enable reads) and
docs/models.md; tests/test_coverage.py fails when a type's status gets worse.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from catchtag.errors import CatchtagError

TIE_TOL = 1e-6  # a column score this close to eps is a tie: float32 and the float64 reference may split it
ROUTE_DRAWS = 3  # input draws tried while an MoE's routing differs between the two passes (route_differs)
LOGIT_RTOL = 1e-5  # logits with catchtag against the model's own eager attention, relative (logits_rel)
STAT_TOL = 1e-4  # column scores, VE, R^2 against the float64 reference (float32 arithmetic)
MAX_PARAMS = 40_000_000  # a tiny model above this is not built (a config the generic rules could not shrink)
T = 48  # tokens of the check's batch: longer than the tiny models' sliding windows (24) and sparse selections (8)

# Why a model type that computes attention in its own code is refused, where more can be said than that.
OWN_CODE = {
    "bloom": "ALiBi: its attention adds a position bias in its own code, not through AttentionInterface",
    "mpt": "ALiBi: its attention adds a position bias in its own code, not through AttentionInterface",
    "falcon_mamba": "a state-space model: it has no attention layer",
    "mamba": "a state-space model: it has no attention layer",
    "mamba2": "a state-space model: it has no attention layer",
    "rwkv": "a recurrent model: it has no attention layer",
    "xlstm": "a recurrent model: it has no attention layer",
}


# What a failing check means, where it was traced (the status still comes from the check; this only words it).
EXPLAINED = {
    "recurrent_gemma": "its recurrent layers read the attention output at padding positions, which catchtag sets to "
                       "zero and the model's own eager attention does not, so a left-padded batch gives other logits",
}


@dataclass
class Coverage:
    """One model type's row of the matrix."""

    model_type: str
    status: str  # "parity" or "refused"
    reason: str = ""
    families: list[str] = field(default_factory=list)  # learned sinks, gated, hybrid, sliding window, softcap, ...
    logits_rel: float | None = None  # largest logit difference relative to the largest logit
    layers: str = ""  # analysed attention layers / decoder layers
    backends: list[str] = field(default_factory=list)  # the engine backends that computed the statistics


def families(model, config) -> list[str]:
    """What kind of attention a model has, read from its config and modules (for the matrix and the docs)."""
    text = config.get_text_config()
    kinds = []
    names = {type(m).__name__ for m in model.modules()}
    if any(hasattr(m, "sinks") and isinstance(m.sinks, torch.nn.Parameter) for m in model.modules()):
        kinds.append("learned sinks")
    from catchtag.engine.arch import GATED

    if names & GATED:
        kinds.append("gated")
    if getattr(text, "kv_lora_rank", None):
        kinds.append("MLA")
    if any(getattr(text, k, None) for k in ("sliding_window", "sliding_window_size", "attention_chunk_size")):
        kinds.append("sliding window")
    if getattr(text, "attn_logit_softcapping", None) or getattr(text, "attn_softcapping", None):
        kinds.append("softcap")
    if any(getattr(text, k, None) for k in ("index_topk", "indexer_types")):
        kinds.append("sparse attention")
    pattern = " ".join(str(getattr(text, k, "")) for k in ("layer_types", "layers_block_type",
                                                              "hybrid_override_pattern", "layer_pattern"))
    if any(w in pattern.lower() for w in ("mamba", "linear", "conv", "recurrent", "ssm", "m-", "deltanet")) or \
            any(getattr(text, k, None) for k in ("mamba_d_state", "ssm_state_size", "mamba_d_ssm")):
        kinds.append("hybrid")
    if getattr(config, "is_encoder_decoder", False):
        kinds.append("encoder-decoder")
    return kinds


def logits_rel(got, want, valid) -> float:
    """The logits' difference relative to their size, over real tokens: |got - want| / |want| (Frobenius norms).
    Float32 rounding gives about 1e-6 here; the largest single entry, relative to the largest logit, reaches 1e-5 on
    deep tiny models with large random weights for the model's own SDPA as much as for catchtag."""
    return float((got - want)[valid].double().norm() / want[valid].double().norm().clamp_min(1e-30))


def _forward(model, ids, mask):
    """The model's outputs, with its routers' logits where it is a mixture of experts that returns them."""
    if getattr(model.config.get_text_config(), "output_router_logits", None) is not None:
        try:
            return model(input_ids=ids, attention_mask=mask, use_cache=False, output_router_logits=True)
        except TypeError:
            pass
    return model(input_ids=ids, attention_mask=mask, use_cache=False)


def route_differs(got, want, valid, text_config) -> bool:
    """Whether the two passes sent some real token to other experts in some layer (False: the same everywhere, or no
    router logits to compare). Two top-k choices of an MoE router can lie closer than float32 rounding; one token's
    flip then changes it and every later token (they attend to it) by far more than rounding, in any two
    implementations of the same attention. ``check`` then draws other inputs: a draw with the same routing is
    compared exactly, and a wrong attention would change the routing in every draw, so it still fails."""
    a, b = getattr(got, "router_logits", None), getattr(want, "router_logits", None)
    k = int(getattr(text_config, "num_experts_per_tok", 0) or 0)
    if not a or not b or len(a) != len(b) or k < 1:
        return False
    B, T = valid.shape
    for x, y in zip(a, b):
        if x is None or y is None or x.shape != y.shape or x.numel() % (B * T):
            return False
        x, y = x.reshape(B, T, -1).float(), y.reshape(B, T, -1).float()
        kk = min(k, x.shape[-1])
        pick_x = x.topk(kk, dim=-1).indices.sort(dim=-1).values
        pick_y = y.topk(kk, dim=-1).indices.sort(dim=-1).values
        if ((pick_x != pick_y).any(dim=-1).to(valid.device) & valid).any():
            return True
    return False


def _build(model_type: str, seed: int):
    from transformers import AutoModelForCausalLM

    from catchtag.tiny import tiny_config

    config = tiny_config(model_type)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    n = sum(p.numel() for p in meta.parameters())
    if n > MAX_PARAMS:
        raise RuntimeError(f"its tiny config still has {n / 1e6:.0f}M parameters")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    return model, config


def check(model_type: str, seed: int | None = None, device: str = "cpu", backend: str = "auto") -> Coverage:
    """Hold one model type to its own eager attention and the float64 reference (see the module docstring), on
    ``device`` (the statistics from ``backend``: on CUDA, auto picks the triton kernels where they serve)."""
    from catchtag.engine.attention import capture, enable
    from catchtag.engine.request import ActivationRequest, SinkSettings
    from catchtag.tiny import padded_batch

    seed = random.randrange(1 << 30) if seed is None else seed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, config = _build(model_type, seed)
    except Exception as err:  # noqa: BLE001  (a config the generic rules cannot shrink: not verified)
        msg = " ".join(str(err).split())[:160]
        return Coverage(model_type, "refused", f"not verified: no tiny model of this type could be built from its "
                                               f"default config ({type(err).__name__}: {msg})")
    model = model.to(device)
    row = Coverage(model_type, "refused", families=families(model, config))
    text = config.get_text_config()
    vocab = min(int(getattr(text, "vocab_size", 256) or 256), 256)
    settings = SinkSettings(eps=0.08, min_rows=4, chunk_rows=11)
    request = ActivationRequest(positions="last", space="both")
    for draw in range(ROUTE_DRAWS):  # inputs drawn again (same weights) while an MoE routing flips, see route_differs
        ids, mask = (x.to(device) for x in padded_batch([T, T - 9, T - 5], ["right", "right", "left"], T,
                                                         seed + draw, vocab))
        try:
            with torch.no_grad():
                want_out = _forward(model, ids, mask)
                want = want_out.logits.float()
        except Exception as err:  # noqa: BLE001
            row.reason = f"not verified: its tiny model does not run ({type(err).__name__}: " \
                         f"{' '.join(str(err).split())[:120]})"
            return row
        try:
            enable(model, verified_only=False)
            with torch.no_grad(), capture(settings, request, backend=backend) as cap:
                got_out = _forward(model, ids, mask)
                got = got_out.logits.float()
        except CatchtagError as err:
            row.reason = str(err).split(". Fix:")[0]
            return row
        except Exception as err:  # noqa: BLE001
            row.reason = f"fails inside catchtag ({type(err).__name__}: {' '.join(str(err).split())[:120]})"
            return row
        if not route_differs(got_out, want_out, mask.bool(), text):
            break
    n_layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    row.layers = f"{len(cap.layers)}/{n_layers}"
    if not cap.layers:
        row.reason = OWN_CODE.get(model_type, "computes attention in its own code, not through transformers' "
                                              "AttentionInterface")
        return row
    if len(cap.called) != len(cap.layers):
        row.reason = f"runs its attention layers {len(cap.called)} times for {len(cap.layers)} layers (a recurrent " \
                     f"depth): per-layer statistics would mix the passes"
        return row
    valid = mask.bool()
    row.logits_rel = logits_rel(got, want, valid)
    if not row.logits_rel <= LOGIT_RTOL:
        row.reason = EXPLAINED.get(model_type, f"its logits with catchtag differ from its own eager attention by "
                                               f"{row.logits_rel:.1e} (relative)")
        return row
    row.backends = sorted(cap.backends_used)
    problem = _compare_reference(model, ids, mask, cap, settings)
    if problem:
        row.reason = problem
        return row
    problem = _scan_runs(model, model_type, backend)
    if problem:
        row.reason = problem
        return row
    row.status = "parity"
    return row


def _compare_reference(model, ids, mask, cap, settings) -> str | None:
    """What differs from the float64 reference (None: nothing)."""
    from catchtag.engine.reference import reference_scan

    try:
        ref_rows, _ = reference_scan(model, ids, mask, eps=settings.eps, min_rows=settings.min_rows)
    except Exception as err:  # noqa: BLE001
        return f"not verified: the float64 reference fails on it ({type(err).__name__}: " \
               f"{' '.join(str(err).split())[:100]})"
    if {r["layer"] for r in ref_rows} != set(cap.layers):
        return f"catchtag saw layers {sorted(cap.layers)}, its eager attention {sorted({r['layer'] for r in ref_rows})}"
    for r in ref_rows:
        rec = cap.layers[r["layer"]]
        st, b, h = rec.stats, r["prompt"], r["head"]
        where = f"layer {r['layer']} head {h}"
        valid = st.token_valid[b]  # the capture's records are on the CPU
        scores = st.col_scores[b, h][valid].numpy()
        if not np.array_equal(np.isnan(scores), np.isnan(r["scores"])):
            return f"{where}: eligible columns differ from the reference"
        if np.isfinite(scores).any() and np.nanmax(np.abs(scores - r["scores"])) > STAT_TOL:
            return f"{where}: column scores differ from the reference by {np.nanmax(np.abs(scores - r['scores'])):.1e}"
        first = int(valid.float().argmax())
        sinks = sorted((st.sink_idx[b, h][st.sink_ok[b, h]] - first).tolist())
        # a column whose score ties with eps (within float32 rounding of the reference's) may fall either side
        apart = [c for c in set(sinks) ^ set(r["sinks"]) if not abs(r["scores"][c] - settings.eps) <= TIE_TOL]
        if apart:
            return f"{where}: sinks {sinks} differ from the reference's {r['sinks']}"
        tol = STAT_TOL * max(1.0, min(r["conditioning"], 1e3) ** 2 / 1e2)
        for name in (("ve", "r2", "ve_uncentred") if sinks == r["sinks"] else ()):  # a tie: other sinks, other VE
            if abs(float(getattr(st, name)[b, h]) - r[name]) > tol:
                got = float(getattr(st, name)[b, h])
                return f"{where}: {name} {got:.6f} differs from the reference's {r[name]:.6f}"
        learned = 0.0 if st.learned_sink is None else float(st.learned_sink[b, h])
        if abs(learned - r["learned_sink"]) > STAT_TOL:
            return f"{where}: learned sink share {learned:.6f} differs from the reference's {r['learned_sink']:.6f}"
        # the heads' writes: catchtag's result against the reference's projection and gate applied to catchtag's own
        # head output at that token (an MoE's routing can move a layer's input by more than float32 rounding
        # between the two passes; the attention itself is held to the reference by the statistics above)
        i = rec.heads.index(h)
        big = max(1.0, float(np.abs(r["result"]).max()))
        for name, head_space in (("result", "z"), ("result_tag", "z_tag")):
            got = rec.activations[name][b, i, 0].numpy()
            want = r["write"](rec.activations[head_space][b, i, 0].double().numpy())
            if np.abs(got - want).max() > STAT_TOL * big:
                return f"{where}: {name} (the head's write into the residual stream) differs from the reference"
    return None


def _scan_runs(model, model_type: str, backend: str = "auto") -> str | None:
    """A run of ``catchtag.scan``: one row per prompt, analysed layer and head, and no error."""
    from catchtag.scan import scan
    from catchtag.tiny import tiny_tokenizer

    texts = ["Attention sinks catch the attention of the tokens after them, and tag them.",
             "The capital of France is Paris; the capital of Italy is Rome."]
    try:
        result = scan(model, tiny_tokenizer(), texts, eps=0.08, min_rows=4, progress=False, model_name=model_type,
                      backend=backend)
    except Exception as err:  # noqa: BLE001
        return f"catchtag scan fails on it ({type(err).__name__}: {' '.join(str(err).split())[:120]})"
    if result.heads.empty or result.heads["prompt_id"].nunique() != len(texts):
        return "catchtag scan gives no rows for it"
    return None


def check_all(types=None, seed: int | None = None, progress: bool = True) -> list[Coverage]:
    """The matrix for ``types`` (default: every causal-LM model type of the installed transformers)."""
    from transformers.utils import logging as hf_logging

    from catchtag.tiny import causal_lm_types

    hf_logging.set_verbosity_error()
    rows = []
    todo = list(types or causal_lm_types())
    for i, model_type in enumerate(todo):
        t0 = time.perf_counter()
        row = check(model_type, seed)
        rows.append(row)
        if progress:
            seconds = time.perf_counter() - t0
            print(f"[{i + 1}/{len(todo)}] {model_type}: {row.status} {row.reason[:90]} ({seconds:.1f} s)", flush=True)
    return rows


def write(rows: list[Coverage], matrix: Path, docs: Path) -> None:
    """The matrix as engine/model_types.json (what enable reads) and docs/models.md (what a reader reads)."""
    import transformers

    data = {"transformers": transformers.__version__,
            "model_types": {r.model_type: {"status": r.status, "reason": r.reason, "families": r.families}
                            for r in sorted(rows, key=lambda r: r.model_type)}}
    matrix.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    n_ok = sum(r.status == "parity" for r in rows)
    lines = [
        "# Models: which architectures catchtag analyses",
        "",
        "<!-- written by `python -m catchtag.coverage --write`; do not edit by hand -->",
        "",
        f"Every causal-LM model type of transformers {transformers.__version__} ({len(rows)} types), checked with a "
        f"tiny random model built from its default config: logits with catchtag equal the model's own eager "
        f"attention (float32, relative {LOGIT_RTOL:g}), column scores, sinks, VE, R^2, the learned sink share and the "
        f"heads' writes into the residual stream equal the float64 eager reference, and `catchtag scan` runs. "
        f"Where float32 rounding sends a token to other experts of a mixture of experts in one pass than in the "
        f"other (two router logits closer than rounding), the check draws other inputs for the same weights (up to "
        f"{ROUTE_DRAWS} draws). "
        f"**{n_ok} types reach parity**; every other type is refused by catchtag in one line naming the reason "
        f"below (`catchtag.load_model`, `catchtag.scan` and every command refuse it), never run with numbers that "
        f"differ from the model's own.",
        "",
        "Families: *learned sinks* (a per-head sink logit in the softmax: its share is reported per head, beside the "
        "token sinks), *gated* (the head output is multiplied by a gate before the output projection: statistics are "
        "taken before the gate, the head's write into the residual stream after it), *hybrid* (attention layers "
        "among state-space, linear-attention or convolution layers: the attention layers are analysed, the others "
        "are named in the scan's summary), *MLA* (multi-head latent attention), *sparse attention* (each query "
        "attends to a selected set of keys), *sliding window*, *softcap*.",
        "",
        "A model type that is not listed (a newer transformers, a model with remote code) is checked when it is "
        "loaded: its logits on a few random tokens with catchtag must equal its own eager attention, else it is "
        "refused.",
        "",
        "| model type | status | families | reason |",
        "|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r.status != "parity", r.model_type)):
        reason = r.reason.replace("|", "/")
        lines.append(f"| `{r.model_type}` | {r.status} | {', '.join(r.families)} | {reason} |")
    docs.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m catchtag.coverage", description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="model types to check (default: all)")
    parser.add_argument("--write", action="store_true", help="write engine/model_types.json and docs/models.md")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = check_all(args.types or None, seed=args.seed)
    print(f"{sum(r.status == 'parity' for r in rows)} of {len(rows)} model types reach parity")
    if args.write:
        root = Path(__file__).resolve().parents[2]
        write(rows, Path(__file__).with_name("engine") / "model_types.json", root / "docs" / "models.md")


if __name__ == "__main__":
    main()
