"""scan(): run a model over prompts with the engine on, and turn its records into a ScanResult.

Two layers: ``scan_batch`` is the core (one batch: forward pass, statistics, tables and per-token arrays, no
files), and ``scan`` drives it (prompts, batches, progress, the run folder, overlap of host work with the next
pass). With ``out`` each finished batch is saved to the run folder at once (catchtag.runs) and, run again with the
same settings, the scan skips the prompts already done: an interrupted scan resumes without losing or
duplicating a row.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from catchtag.data.prompts import Prompt, model_context, tokenize_prompts
from catchtag.distributed import Dist
from catchtag.engine.attention import DEFAULT_SINK_CAP, captured_forward, request_positions
from catchtag.engine.positions import first_real
from catchtag.engine.request import ActivationRequest, SinkSettings
from catchtag.errors import CatchtagError, check_type
from catchtag.models import display_name
from catchtag.result import HEAD_COLUMNS, ScanResult
from catchtag.runs import RunFolder, cache_from_batches, fingerprint, repair_command, save_result

SWEEP_COLUMNS = ["prompt_id", "layer", "head", "eps", "n_sinks", "ve", "r2", "ve_uncentred"]


def _as_prompts(texts, tokenizer, model, max_tokens, truncate) -> list[Prompt]:
    if isinstance(texts, (str, Prompt)):
        texts = [texts]
    check_type("texts", texts, (list, tuple), "a string, a list of strings or a list of Prompts",
               ["The cat sat on the mat."])
    texts = list(texts)
    for t in texts:
        check_type("texts", t, (str, Prompt), "a string, a list of strings or a list of Prompts",
                   ["The cat sat on the mat."])
    if texts and all(isinstance(t, Prompt) for t in texts):
        for p in texts:
            if not p.input_ids:
                raise CatchtagError(f"prompt {p.prompt_id} is empty. Give every prompt some text")
        return texts
    return tokenize_prompts(texts, tokenizer, max_tokens=max_tokens, context=model_context(model), truncate=truncate)


def _token_strings(tokenizer, ids: Sequence[int], cache: dict[int, str] | None = None) -> list[str]:
    """Each token decoded on its own; ``cache`` (id -> string, kept over a scan) decodes each id once."""
    cache = {} if cache is None else cache
    new = list({i for i in ids if i not in cache})
    cache.update(zip(new, tokenizer.batch_decode([[i] for i in new])))
    return _join_split_characters(tokenizer, list(ids), [cache[i] for i in ids])


def _join_split_characters(tokenizer, ids: list[int], strings: list[str], longest: int = 8) -> list[str]:
    """Byte-level tokenizers split a character of several UTF-8 bytes (emoji, CJK, Arabic, Hebrew, ...) over
    tokens that each decode to U+FFFD: every token of such a run shows what the run decodes to together, so a
    token is shown as text, never as a replacement character. A U+FFFD that no run of up to ``longest`` tokens
    resolves (one that is in the text itself) stays."""
    i = 0
    while i < len(strings):
        if "\ufffd" not in strings[i]:
            i += 1
            continue
        j, joint = i + 1, strings[i]
        while "\ufffd" in joint and j < min(len(ids), i + longest):
            j += 1
            joint = tokenizer.decode(ids[i:j])
        if "\ufffd" in joint:
            i += 1
            continue
        strings[i:j] = [joint] * (j - i)
        i = j
    return strings


def _batch_tensors(prompts: list[Prompt], tokenizer, device, left: bool | None = None, pad: int | None = None):
    """(input ids, attention mask) of a padded batch: padded on the tokenizer's side (left=True: on the left, as
    generation needs) with its pad token (or ``pad``)."""
    T = max(len(p.input_ids) for p in prompts)
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    if left is None:
        left = getattr(tokenizer, "padding_side", "right") == "left"
    for b, p in enumerate(prompts):
        n = len(p.input_ids)
        sl = slice(T - n, T) if left else slice(0, n)
        ids[b, sl] = torch.tensor(p.input_ids)
        mask[b, sl] = 1
    return ids.to(device), mask.to(device)


def _records_to_tables(cap, prompts, token_strings, settings):
    """(heads, sweep or None) as Arrow tables: one row per (prompt, layer, head) (and per threshold of a sweep).

    Built from whole numpy columns, the sink lists as Arrow list arrays (offsets + flat values): a batch of
    4 prompts x 28 layers x 28 heads costs about a millisecond, not the tens of milliseconds of Python rows, which
    would rival the forward pass of a 7B model on a GPU."""
    import pyarrow as pa

    ids = np.asarray([p.prompt_id for p in prompts], dtype=np.int64)
    # every prompt's token strings, end to end: a sink's string is one fancy index
    strings = [np.asarray(token_strings[int(i)], dtype=object) for i in ids]
    starts = np.concatenate([[0], np.cumsum([len(x) for x in strings])[:-1]]).astype(np.int64)
    all_strings = np.concatenate(strings) if strings else np.empty(0, dtype=object)
    cols: dict[str, list] = {k: [] for k in ("prompt_id", "layer", "head", "n_tokens", "n_sinks", "positions",
                                            "tokens", "scores", "ve", "r2", "ve_uncentred", "learned_sink")}
    sweep_cols: dict[str, list] = {k: [] for k in SWEEP_COLUMNS}
    E = len(settings.all_eps)
    for layer in sorted(cap.layers):
        st = cap.layers[layer].stats
        B, H, _ = st.col_scores.shape
        valid = st.token_valid.numpy()
        n_tokens, first = valid.sum(axis=-1), first_real(valid)
        ok, idx = st.sink_ok.numpy(), st.sink_idx.numpy()
        scores = st.col_scores.float().numpy() if st.col_scores.dtype.itemsize < 4 else st.col_scores.numpy()
        b_i, h_i, _ = np.nonzero(ok)  # every sink, in (prompt, head) order, ascending within a head
        cols_i = idx[ok]
        positions = cols_i - first[b_i]
        cols["positions"].append(positions.astype(np.int64))
        cols["tokens"].append(all_strings[starts[b_i] + positions])
        cols["scores"].append(scores[b_i, h_i, cols_i].astype(np.float64))
        cols["n_sinks"].append(ok.sum(axis=-1).ravel().astype(np.int64))
        cols["prompt_id"].append(np.repeat(ids, H))
        cols["layer"].append(np.full(B * H, layer, dtype=np.int64))
        cols["head"].append(np.tile(np.arange(H, dtype=np.int64), B))
        cols["n_tokens"].append(np.repeat(n_tokens, H).astype(np.int64))
        for name in ("ve", "r2", "ve_uncentred"):
            cols[name].append(getattr(st, name).double().numpy().ravel())
        cols["learned_sink"].append(np.full(B * H, np.nan) if st.learned_sink is None
                                    else st.learned_sink.double().numpy().ravel())
        if settings.sweep_eps:
            sweep_cols["prompt_id"].append(np.repeat(ids, H * E))
            sweep_cols["layer"].append(np.full(B * H * E, layer, dtype=np.int64))
            sweep_cols["head"].append(np.tile(np.repeat(np.arange(H, dtype=np.int64), E), B))
            sweep_cols["eps"].append(np.tile(np.asarray(settings.all_eps, dtype=np.float64), B * H))
            sweep_cols["n_sinks"].append(st.sweep_n_sinks.numpy().ravel().astype(np.int64))
            sweep_cols["ve"].append(st.sweep_ve.double().numpy().ravel())
            sweep_cols["r2"].append(st.sweep_r2.double().numpy().ravel())
            sweep_cols["ve_uncentred"].append(st.sweep_ve_uncentred.double().numpy().ravel())
    cat = {k: np.concatenate(v) if v else np.empty(0) for k, v in cols.items()}
    offsets = pa.array(np.concatenate([[0], np.cumsum(cat["n_sinks"])]).astype(np.int32))
    lists = {name: pa.ListArray.from_arrays(offsets, pa.array(cat[key], type=kind))
             for name, key, kind in (("sink_positions", "positions", pa.int64()),
                                     ("sink_tokens", "tokens", pa.string()), ("sink_scores", "scores", pa.float64()))}
    columns = {name: lists[name] if name in lists else pa.array(cat[name]) for name in HEAD_COLUMNS}
    columns["learned_sink"] = pa.array(cat["learned_sink"], mask=np.isnan(cat["learned_sink"]))  # null: no such sink
    heads = pa.table(columns)
    sweep = pa.table({k: pa.array(np.concatenate(v)) for k, v in sweep_cols.items()}) if settings.sweep_eps else None
    return heads, sweep


@dataclass
class BatchOutput:
    """What ``scan_batch`` gives back for one batch: its Capture (statistics on the CPU) and, with a request,
    the per-token arrays as npz entries (runs.cache_from_batches names them)."""

    cap: object
    prompts: list[Prompt]
    arrays: dict


def _batch_arrays(cap, request, hidden, prompts) -> dict:
    """One batch's per-token arrays as npz entries: z*/result* (B, L, nh, P, dim), positions (B, P) in prompt
    coordinates, layers, heads, prompt_id, resid_pre_<i>, pattern_<pid>_<l>_<h>, sink_attention_<pid>_<l>_<h>."""
    if request is None:
        return {}
    out: dict[str, np.ndarray] = {}
    layers = sorted(l for l in cap.layers if cap.layers[l].activations)
    if layers:
        rec0 = cap.layers[layers[0]]
        for name in rec0.activations:
            out[name] = torch.stack([cap.layers[l].activations[name] for l in layers], dim=1).numpy()
        first = first_real(rec0.stats.token_valid)
        pos = rec0.positions
        out["positions"] = torch.where(pos >= 0, pos - first[:, None], pos).numpy()
        out["layers"] = np.asarray(layers, dtype=np.int64)
        out["heads"] = np.asarray(rec0.heads, dtype=np.int64)
    if request.hidden_states and hidden is not None:
        any_layer = next(iter(cap.layers.values()))
        pos_abs = request_positions(request, any_layer.stats.token_valid.to(hidden[0].device))
        if "positions" not in out:
            first = first_real(any_layer.stats.token_valid).to(pos_abs.device)
            out["positions"] = torch.where(pos_abs >= 0, pos_abs - first[:, None], pos_abs).cpu().numpy()
        for i in request.hidden_states:
            hs = hidden[i].float()
            idx = pos_abs.clamp_min(0)[:, :, None].expand(-1, -1, hs.shape[-1])
            out[f"resid_pre_{i}"] = (hs.gather(1, idx) * (pos_abs >= 0)[:, :, None]).cpu().numpy()
    for layer, record in cap.layers.items():
        valid = record.stats.token_valid
        for h, maps in record.attention_maps.items():
            for b, p in enumerate(prompts):
                out[f"pattern_{p.prompt_id}_{layer}_{h}"] = _trim(maps[b], valid[b])
    if request.sink_attention:
        for (pid, layer, h), arr in _sink_attention(cap, prompts).items():
            out[f"sink_attention_{pid}_{layer}_{h}"] = arr
    if out:
        out["prompt_id"] = np.asarray([p.prompt_id for p in prompts], dtype=np.int64)
    return out


def scan_batch(decoder, tokenizer, batch: list[Prompt], settings: SinkSettings, request=None, backend="auto",
               sink_cap=DEFAULT_SINK_CAP, k_hint=None, meanwhile=None) -> BatchOutput:
    """The core: one forward pass of ``batch`` with the engine on, its statistics and per-token arrays.
    meanwhile: host work to run while the pass is queued on the GPU (captured_forward)."""
    device = _input_device(decoder)
    ids, mask = _batch_tensors(batch, tokenizer, device)
    want_hidden = bool(request is not None and request.hidden_states)
    with torch.no_grad():
        cap, output = captured_forward(
            lambda: decoder(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=want_hidden),
            settings, request, backend, sink_cap, meanwhile=meanwhile, k_hint=k_hint)
    arrays = _batch_arrays(cap, request, output.hidden_states if want_hidden else None, batch)
    return BatchOutput(cap, batch, arrays)


def batch_tables(out: BatchOutput, settings: SinkSettings, strings: dict, seconds: float):
    """(heads, sweep or None) as Arrow tables and the prompts DataFrame of one finished batch."""
    heads, sweep = _records_to_tables(out.cap, out.prompts, strings, settings)
    prompts = pd.DataFrame({"prompt_id": [p.prompt_id for p in out.prompts],
                            "n_tokens": [len(p.input_ids) for p in out.prompts],
                            "tokens": [strings[p.prompt_id] for p in out.prompts], "seconds": seconds})
    return heads, sweep, prompts


def _input_device(model):
    """Where the inputs go (with a device map, the embeddings' device)."""
    try:
        return model.get_input_embeddings().weight.device
    except (NotImplementedError, AttributeError):  # a wrapper without the accessor (decoders of seq2seq models)
        return next(model.parameters()).device


def scan(model, tokenizer, texts, *, eps: float = SinkSettings.eps, min_rows: int = SinkSettings.min_rows,
         sweep_eps: Sequence[float] = (), max_tokens: int | None = None, batch_size: int = 8,
         request: ActivationRequest | None = None, out: str | Path | RunFolder | None = None, overwrite: bool = False,
         truncate: bool = True,
         progress: bool = True, backend: str = "auto", chunk_rows: int | None = None, model_name: str | None = None,
         data_name: str | None = None, dist: Dist | None = None) -> ScanResult:
    """Detect sinks and decompose every head of ``model`` on ``texts``.

    texts: a string, a list of strings, or a list of ``Prompt`` (already tokenised). eps / min_rows: sink
    threshold and minimum rows per column (docs/method.md). sweep_eps: extra thresholds computed in the
    same pass (ScanResult.sweep). request: per-token activations, attention patterns or hidden states to keep
    (ScanResult.cache). out: a run folder to save into as it goes; rerunning with the same arguments resumes.
    dist: under torchrun, this rank's place (catchtag.distributed.init()); each rank scans its shard into
    ``out`` and every rank returns the whole result once all are done.
    Returns a ScanResult whose ``heads`` has one row per (prompt, layer, head).
    """
    check_type("sweep_eps", sweep_eps, (tuple, list), "a tuple of numbers in (0, 1)", (0.1, 0.3))
    settings = SinkSettings(eps=eps, min_rows=min_rows, sweep_eps=tuple(sweep_eps), chunk_rows=chunk_rows)
    check_type("batch_size", batch_size, (int,), "a whole number >= 1", 8)
    if batch_size < 1:
        raise CatchtagError(f"batch size must be >= 1, got {batch_size}")
    if max_tokens is not None:
        check_type("max_tokens", max_tokens, (int,), "a whole number >= 0 (0: no limit) or None", 256)
        if max_tokens < 0:
            raise CatchtagError(f"max_tokens must be >= 0 (0: no limit), got {max_tokens}. Fix: e.g. max_tokens=256")
    if request is not None:
        check_type("request", request, (ActivationRequest,), "an ActivationRequest", ActivationRequest())
    if not hasattr(model, "config") or not callable(model):
        raise CatchtagError(f"model must be a loaded model (catchtag.load_model(...)[0], or one loaded with "
                            f"transformers), got {type(model).__name__}. Fix: model, tokenizer = "
                            f"catchtag.load_model('smollm2-135m')")
    if not callable(tokenizer):
        raise CatchtagError(f"tokenizer must be the model's tokenizer, got {type(tokenizer).__name__}. Fix: model, "
                            f"tokenizer = catchtag.load_model(...)")
    prompts = _as_prompts(texts, tokenizer, model, max_tokens, truncate)
    dist = dist or Dist()
    if dist.world > 1 and out is None:
        raise CatchtagError("a scan over several processes needs a run folder (--out) to gather the ranks' rows")
    device = _input_device(model)
    model_name = display_name(model, model_name)
    n_layers = model.config.get_text_config().num_hidden_layers
    if n_layers is None:
        raise CatchtagError("the model config does not say how many layers it has")
    if request is not None:
        request.check(n_layers, getattr(model.config.get_text_config(), "num_attention_heads", None))
    with using_catchtag(model):
        return _scan(model, tokenizer, prompts, settings, batch_size, request, out, overwrite, progress, backend,
                     model_name, data_name, dist, device, n_layers, max_tokens)


@contextmanager
def using_catchtag(model):
    """``model`` with catchtag's attention function for the block: a model loaded with transformers (any attention
    implementation, a PEFT wrapper) is switched (engine.enable: refused in one line if its type does not reach
    parity) and switched back after."""
    from catchtag.engine.attention import enable, is_enabled, unwrap

    inner = unwrap(model)
    if is_enabled(inner):
        yield model
        return
    previous = inner.config._attn_implementation
    enable(inner)
    try:
        yield model
    finally:
        inner.set_attn_implementation(previous)


def _scan(model, tokenizer, prompts, settings, batch_size, request, out, overwrite, progress, backend, model_name,
          data_name, dist, device, n_layers, max_tokens) -> ScanResult:
    if min(len(p.input_ids) for p in prompts) < settings.min_rows:
        import warnings

        warnings.warn(f"some prompts are shorter than min_rows={settings.min_rows} tokens: no column of theirs can "
                      f"be a sink. Lower --min-rows or use longer prompts", stacklevel=2)

    run = out if isinstance(out, RunFolder) else None
    if out is not None and run is None:
        run = RunFolder(out, fingerprint(model_name, data_name, settings, prompts, model.dtype, request), overwrite,
                        dist)
        try:  # the folder stays locked against a second writer until this scan is done with it
            return _scan(model, tokenizer, prompts, settings, batch_size, request, run, overwrite, progress, backend,
                         model_name, data_name, dist, device, n_layers, max_tokens)
        finally:
            run.close()
    todo = prompts
    if out is not None:
        done = run.done_ids()
        todo = [p for p in dist.shard(prompts) if p.prompt_id not in done]
    todo = sorted(todo, key=lambda p: -len(p.input_ids))  # long first: an out-of-memory shows at once

    heads_parts, sweep_parts, prompt_parts, act_parts = [], [], [], []
    sink_cap, k_hint, backends_used = DEFAULT_SINK_CAP, None, set()
    decoded: dict[int, str] = {}
    bar = None
    if progress:
        from catchtag.progress import progress_bar

        mine = len(dist.shard(prompts))
        bar = progress_bar(total=mine, initial=mine - len(todo), unit="prompt", position=dist.rank,
                   desc="scan" if dist.world == 1 else f"scan rank {dist.rank}/{dist.world}")
    # part files are written by one thread beside the loop (in order; pyarrow leaves the interpreter free meanwhile)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catchtag-parts")
    writes: list = []
    pending: list = []  # the finished batch whose host work waits for the next forward pass

    def collect(done: BatchOutput, seconds: float):
        """One finished batch's host work (token strings, tables, the part files), done while the next batch's
        forward pass runs on the GPU."""
        strings = {p.prompt_id: _token_strings(tokenizer, p.input_ids, decoded) for p in done.prompts}
        heads_t, sweep_t, prompts_df = batch_tables(done, settings, strings, seconds)
        if run is not None:
            for w in writes:  # a write that failed (a full disk) stops the scan here, not after every batch
                if w.done() and w.exception() is not None:
                    raise CatchtagError(f"could not write to {run.folder}: {w.exception()}. Fix: free space or "
                                        f"choose another --out; {repair_command(run.folder)} to resume") from None
            writes.append(writer.submit(run.write_part, heads_t, sweep_t, prompts_df, done.arrays))
        else:
            heads_parts.append(heads_t)
            sweep_parts.append(sweep_t)
            prompt_parts.append(prompts_df)
            if done.arrays:
                act_parts.append(done.arrays)
        if bar is not None:
            bar.update(len(done.prompts))

    def flush():
        while pending:
            collect(*pending.pop())

    decoder = _decoder(model)  # the scan needs no logits: skip the LM head
    try:
        mark = time.perf_counter()
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            try:
                done = scan_batch(decoder, tokenizer, batch, settings, request, backend, sink_cap, k_hint,
                                  meanwhile=flush)
            except torch.OutOfMemoryError:
                flush()  # the batch before this one is complete: keep it
                T = max(len(p.input_ids) for p in batch)
                raise CatchtagError(f"out of memory on {device} with batch size {len(batch)} x {T} tokens. Fix: a "
                                    f"smaller --batch-size (or --max-tokens)") from None
            flush()  # already done while the pass ran, unless it failed first
            sink_cap, k_hint = done.cap.sink_cap, done.cap.k_hint  # a raised cap stays raised: no second pass
            backends_used.update(done.cap.backends_used)
            if not done.cap.layers:
                raise CatchtagError(no_layer_message(model))
            now = time.perf_counter()
            pending.append((done, now - mark))
            mark = now
        flush()
    finally:
        writer.shutdown(wait=True)  # an interrupted scan still leaves every batch it finished on disk
    for w in writes:  # a failed write fails the scan
        if w.exception() is not None:
            raise CatchtagError(f"could not write to {run.folder}: {w.exception()}. Fix: free space or choose another "
                                f"--out; {repair_command(run.folder)} to resume") from None
    if bar is not None:
        bar.close()

    if run is not None:
        dist.barrier()  # every rank's parts are written
        heads, prompt_table, sweep, act_parts = run.read_parts()
    else:
        import pyarrow as pa

        heads = pa.concat_tables(heads_parts).to_pandas()
        prompt_table = pd.concat(prompt_parts, ignore_index=True)
        sweep = pa.concat_tables(sweep_parts).to_pandas() if settings.sweep_eps else None
    heads = heads.sort_values(["prompt_id", "layer", "head"], ignore_index=True)
    prompt_table = prompt_table.sort_values("prompt_id", ignore_index=True)
    if sweep is not None:
        sweep = sweep.sort_values(["prompt_id", "layer", "head", "eps"], ignore_index=True)
    result = ScanResult(heads=heads, prompts=prompt_table, sweep=sweep, settings={
        "model": model_name, "data": data_name, "eps": settings.eps, "min_rows": settings.min_rows,
        "sweep_eps": list(settings.all_eps) if settings.sweep_eps else [], "batch_size": batch_size,
        "max_tokens": max_tokens, "device": str(device), "dtype": str(model.dtype), "backend": backend,
        "backends_used": sorted(backends_used), "world_size": dist.world,
        **layer_summary(model, sorted(int(x) for x in heads["layer"].unique()), n_layers)})
    result.cache = cache_from_batches(act_parts)
    if run is not None:
        result.settings["seconds"] = run.elapsed()
        if dist.is_main:
            save_result(result, run.folder)
    else:
        result.settings["seconds"] = float(prompt_table["seconds"].sum())
    return result


def no_layer_message(model) -> str:
    """Why a pass captured no layer, naming the attention modules the model has."""
    names = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Attention")})
    found = ", ".join(names[:4]) or "none found"
    return (f"no layer of {type(model).__name__} went through catchtag's attention function: its attention modules "
            f"({found}) compute attention in their own code. Fix: see docs/models.md for the model types that work")


def layer_summary(model, analysed: list[int], n_layers: int) -> dict:
    """The analysed attention layers and what each other layer is (hybrids: state-space, linear attention, ...),
    in the model's own layer numbers."""
    from catchtag.engine.arch import layer_kinds

    kinds = layer_kinds(model.config, n_layers)
    return {"n_layers": n_layers, "attention_layers": analysed,
            "other_layers": {str(i): kinds.get(i, "not attention") for i in range(n_layers) if i not in analysed}}


def _decoder(model):
    """The model without its LM head where it has one (model.model, model.transformer, ...): same layers, same
    hidden states, no logits to compute."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) and base is not model else model


def _sink_attention(cap, batch) -> dict:
    """(prompt_id, layer, head) -> (T, n_sinks) attention to each sink, valid tokens only."""
    got = {}
    for layer, record in cap.layers.items():
        st = record.stats
        if st.sink_attn is None:
            raise CatchtagError("this engine backend does not return sink attention; use backend='torch'")
        for b, p in enumerate(batch):
            rows = st.token_valid[b].nonzero().squeeze(-1)
            for h in range(st.sink_attn.shape[1]):
                ok = st.sink_ok[b, h]
                got[(p.prompt_id, layer, h)] = st.sink_attn[b, h][rows][:, ok].numpy()
    return got


def _trim(attn: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    idx = valid.nonzero().squeeze(-1)
    return attn[idx][:, idx].numpy()
