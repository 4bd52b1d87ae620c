"""scan(): run a model over prompts with the engine on, and turn its records into a ScanResult.

With ``out`` the scan saves each finished batch to the run folder at once (atomically) and, when run
again with the same settings, skips the prompts already done: an interrupted scan resumes without losing
or duplicating a row.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from catchtag.data.prompts import Prompt, model_context, tokenize_prompts
from catchtag.distributed import Dist
from catchtag.engine.attention import DEFAULT_SINK_CAP, captured_forward, request_positions
from catchtag.engine.request import ActivationRequest, SinkSettings
from catchtag.errors import CatchtagError
from catchtag.result import HEAD_COLUMNS, ScanResult

SWEEP_COLUMNS = ["prompt_id", "layer", "head", "eps", "n_sinks", "ve", "r2"]


def _as_prompts(texts, tokenizer, model, max_tokens, truncate) -> list[Prompt]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
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
    return [cache[i] for i in ids]


def _batch_tensors(prompts: list[Prompt], tokenizer, device):
    T = max(len(p.input_ids) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
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
                                            "tokens", "scores", "ve", "r2", "ve_uncentred")}
    sweep_cols: dict[str, list] = {k: [] for k in SWEEP_COLUMNS}
    E = len(settings.all_eps)
    for layer in sorted(cap.layers):
        st = cap.layers[layer].stats
        B, H, _ = st.col_scores.shape
        valid = st.token_valid.numpy()
        n_tokens, first = valid.sum(axis=-1), valid.argmax(axis=-1)
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
        if settings.sweep_eps:
            sweep_cols["prompt_id"].append(np.repeat(ids, H * E))
            sweep_cols["layer"].append(np.full(B * H * E, layer, dtype=np.int64))
            sweep_cols["head"].append(np.tile(np.repeat(np.arange(H, dtype=np.int64), E), B))
            sweep_cols["eps"].append(np.tile(np.asarray(settings.all_eps, dtype=np.float64), B * H))
            sweep_cols["n_sinks"].append(st.sweep_n_sinks.numpy().ravel().astype(np.int64))
            sweep_cols["ve"].append(st.sweep_ve.double().numpy().ravel())
            sweep_cols["r2"].append(st.sweep_r2.double().numpy().ravel())
    cat = {k: np.concatenate(v) if v else np.empty(0) for k, v in cols.items()}
    offsets = pa.array(np.concatenate([[0], np.cumsum(cat["n_sinks"])]).astype(np.int32))
    lists = {name: pa.ListArray.from_arrays(offsets, pa.array(cat[key], type=kind))
             for name, key, kind in (("sink_positions", "positions", pa.int64()), ("sink_tokens", "tokens", pa.string()),
                                     ("sink_scores", "scores", pa.float64()))}
    heads = pa.table({name: lists[name] if name in lists else pa.array(cat[name]) for name in HEAD_COLUMNS})
    sweep = pa.table({k: pa.array(np.concatenate(v)) for k, v in sweep_cols.items()}) if settings.sweep_eps else None
    return heads, sweep


def _batch_activations(cap, request, hidden, prompts):
    """Per-token arrays of one batch: name -> (B, L, nh, P, dim); positions (B, P) in prompt coordinates."""
    if request is None:
        return {}, None, [], {}
    layers = sorted(l for l in cap.layers if cap.layers[l].activations)
    acts: dict[str, np.ndarray] = {}
    positions = None
    if layers:
        names = cap.layers[layers[0]].activations.keys()
        for name in names:
            acts[name] = torch.stack([cap.layers[l].activations[name] for l in layers], dim=1).numpy()
        pos = cap.layers[layers[0]].positions
        first = cap.layers[layers[0]].stats.token_valid.float().argmax(dim=-1)
        positions = torch.where(pos >= 0, pos - first[:, None], pos).numpy()
    hidden_out = {}
    if request.hidden_states and hidden is not None:
        any_layer = next(iter(cap.layers.values()))
        pos_abs = request_positions(request, any_layer.stats.token_valid.to(hidden[0].device))
        for i in request.hidden_states:
            hs = hidden[i].float()
            idx = pos_abs.clamp_min(0)[:, :, None].expand(-1, -1, hs.shape[-1])
            hidden_out[i] = (hs.gather(1, idx) * (pos_abs >= 0)[:, :, None]).cpu().numpy()
    return acts, positions, layers, hidden_out


# What a scan writes into its folder (--overwrite removes these and nothing else).
RUN_ENTRIES = ("run.json", "parts", "heads.parquet", "prompts.parquet", "sweep.parquet", "summary.json", "figures")
# Fingerprint keys that only name the run's inputs: the same prompts (prompts_sha1) are the same run however the
# data file is spelled, so these never block a resume.
SPELLING_ONLY = ("data",)


class RunFolder:
    """A scan's folder: run.json (what was asked), parts/ (one file per finished batch), final tables."""

    def __init__(self, folder: str | Path, fingerprint: dict, overwrite: bool = False, dist: Dist = Dist()):
        self.folder = Path(folder)
        self.parts = self.folder / "parts"
        self.rank = dist.rank
        manifest = self.folder / "run.json"
        if dist.is_main:  # one rank checks and prepares the folder; the others check after the barrier
            if overwrite and self.folder.is_dir():  # a file given as --out is refused by _check
                self._discard()
            self._check(manifest, fingerprint)
            self.parts.mkdir(parents=True, exist_ok=True)
            _write_atomic(manifest, json.dumps(fingerprint, indent=1))
            for stale in self.parts.glob("*.tmp*"):
                stale.unlink()
        dist.barrier()
        if not dist.is_main:
            self._check(manifest, fingerprint)

    def _discard(self) -> None:
        """--overwrite: remove what a scan wrote into this folder, and nothing else. A folder that is not a
        catchtag run, or that holds files a scan did not write, is refused and left as it is."""
        import shutil

        if not (self.folder / "run.json").is_file():
            if any(self.folder.iterdir()):
                raise CatchtagError(f"--overwrite refused: {self.folder} is not a catchtag run (no run.json), so "
                                    f"nothing in it was removed. Fix: choose an empty or new --out")
            return
        foreign = sorted(p.name for p in self.folder.iterdir() if p.name not in RUN_ENTRIES)
        if foreign:
            raise CatchtagError(f"--overwrite refused: {self.folder} also holds files a scan did not write "
                                f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}), so nothing was "
                                f"removed. Fix: move them away, or choose another --out")
        for name in RUN_ENTRIES:
            path = self.folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()

    def _check(self, manifest: Path, fingerprint: dict) -> None:
        if self.folder.exists() and not self.folder.is_dir():
            raise CatchtagError(f"--out {self.folder} is a file, not a folder. Fix: choose a folder for the run")
        if manifest.is_file():
            old = {k: v for k, v in json.loads(manifest.read_text()).items() if k not in SPELLING_ONLY}
            fingerprint = {k: v for k, v in fingerprint.items() if k not in SPELLING_ONLY}
            if old != fingerprint:
                changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                raise CatchtagError(f"{self.folder} holds a run with other settings ({', '.join(changed)} differ). "
                                    f"Fix: use another --out, or --overwrite to start it again")
        elif self.folder.exists() and any(self.folder.iterdir()):
            raise CatchtagError(f"{self.folder} exists and is not a catchtag run. Fix: choose an empty or new --out")

    def part_files(self, kind: str) -> list[Path]:
        """Finished part files of every rank (names: KIND-r<rank>-<n>.parquet)."""
        return sorted(f for f in self.parts.glob(f"{kind}-*.parquet") if ".tmp" not in f.name)

    def done_ids(self) -> set[int]:
        done: set[int] = set()
        for f in self.part_files("prompts"):
            done.update(pd.read_parquet(f, columns=["prompt_id"])["prompt_id"].tolist())
        return done

    def elapsed(self) -> float:
        return float(sum(pd.read_parquet(f, columns=["seconds"])["seconds"].iloc[0]
                         for f in self.part_files("prompts")))

    def write_part(self, heads: pd.DataFrame, sweep: pd.DataFrame | None, prompts: pd.DataFrame, acts: dict | None):
        """Write one batch's rows; the prompts file goes last, so a batch counts as done only when complete."""
        n = 0
        while (self.parts / f"prompts-r{self.rank}-{n:05d}.parquet").exists():
            n += 1
        tag = f"r{self.rank}-{n:05d}"
        _write_parquet(heads, self.parts / f"heads-{tag}.parquet")
        if sweep is not None:
            _write_parquet(sweep, self.parts / f"sweep-{tag}.parquet")
        if acts:
            tmp = self.parts / f"acts-{tag}.tmp.npz"
            np.savez(tmp, **acts)
            os.replace(tmp, self.parts / f"acts-{tag}.npz")
        _write_parquet(prompts, self.parts / f"prompts-{tag}.parquet")

    def read_tables(self):
        done = [f.name[len("prompts-"):-len(".parquet")] for f in self.part_files("prompts")]
        heads = pd.concat([pd.read_parquet(self.parts / f"heads-{t}.parquet") for t in done], ignore_index=True)
        prompts = pd.concat([pd.read_parquet(self.parts / f"prompts-{t}.parquet") for t in done], ignore_index=True)
        sweeps = [self.parts / f"sweep-{t}.parquet" for t in done if (self.parts / f"sweep-{t}.parquet").exists()]
        sweep = pd.concat([pd.read_parquet(f) for f in sweeps], ignore_index=True) if sweeps else None
        acts = [(self.parts / f"acts-{t}.npz") for t in done if (self.parts / f"acts-{t}.npz").exists()]
        return heads, prompts, sweep, [dict(np.load(f)) for f in acts]


def _write_parquet(table, path: Path) -> None:
    """A DataFrame or Arrow table to ``path``, atomically (written beside it, then renamed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_suffix(".tmp.parquet")
    if isinstance(table, pa.Table):
        pq.write_table(table, tmp)
    else:
        table.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fingerprint(model_name, data_name, settings: SinkSettings, prompts, dtype, request) -> dict:
    digest = hashlib.sha1(json.dumps([p.input_ids for p in prompts]).encode()).hexdigest()
    return {"model": model_name, "data": data_name, "eps": settings.eps, "min_rows": settings.min_rows,
            "sweep_eps": list(settings.all_eps) if settings.sweep_eps else [], "dtype": str(dtype),
            "n_prompts": len(prompts), "prompts_sha1": digest,
            "request": None if request is None else repr((request.layers, request.heads, request.positions,
                                                         request.space, tuple(request.hidden_states)))}


def versions() -> dict:
    import transformers

    from catchtag import __version__

    return {"catchtag": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def scan(model, tokenizer, texts, *, eps: float = 0.2, min_rows: int = 16, sweep_eps: Sequence[float] = (),
         max_tokens: int | None = None, batch_size: int = 8, request: ActivationRequest | None = None,
         out: str | Path | None = None, overwrite: bool = False, truncate: bool = True, progress: bool = True,
         backend: str = "auto", chunk_rows: int | None = None, model_name: str | None = None,
         data_name: str | None = None, dist: Dist | None = None) -> ScanResult:
    """Detect sinks and decompose every head of ``model`` on ``texts``.

    texts: a string, a list of strings, or a list of ``Prompt`` (already tokenised). eps / min_rows: sink
    threshold and minimum rows per column (docs/method.md). sweep_eps: extra thresholds computed in the
    same pass (ScanResult.sweep). request: per-token activations, attention maps or hidden states to keep.
    out: a run folder to save into as it goes; rerunning with the same arguments resumes.
    dist: under torchrun, this rank's place (catchtag.distributed.init()); each rank scans its shard into
    ``out`` and every rank returns the whole result once all are done.
    Returns a ScanResult whose ``heads`` has one row per (prompt, layer, head).
    """
    settings = SinkSettings(eps=eps, min_rows=min_rows, sweep_eps=tuple(sweep_eps), chunk_rows=chunk_rows)
    if batch_size < 1:
        raise CatchtagError(f"batch size must be >= 1, got {batch_size}")
    prompts = _as_prompts(texts, tokenizer, model, max_tokens, truncate)
    dist = dist or Dist()
    if dist.world > 1 and out is None:
        raise CatchtagError("a scan over several processes needs a run folder (--out) to gather the ranks' rows")
    device = model.get_input_embeddings().weight.device  # with a device map, where the inputs go
    model_name = model_name or getattr(model, "name_or_path", "") or type(model).__name__
    n_layers = model.config.num_hidden_layers
    if n_layers is None:
        raise CatchtagError("the model config does not say how many layers it has")
    if min(len(p.input_ids) for p in prompts) < settings.min_rows:
        import warnings

        warnings.warn(f"some prompts are shorter than min_rows={settings.min_rows} tokens: no column of theirs can "
                      f"be a sink. Lower --min-rows or use longer prompts", stacklevel=2)

    run = None
    todo = prompts
    if out is not None:
        run = RunFolder(out, _fingerprint(model_name, data_name, settings, prompts, model.dtype, request), overwrite,
                        dist)
        done = run.done_ids()
        todo = [p for p in dist.shard(prompts) if p.prompt_id not in done]
    todo = sorted(todo, key=lambda p: -len(p.input_ids))  # long first: an out-of-memory shows at once

    heads_parts, sweep_parts, prompt_parts, act_parts = [], [], [], []
    sink_cap, k_hint, backends_used = DEFAULT_SINK_CAP, None, set()
    decoded: dict[int, str] = {}
    attention_maps: dict = {}
    sink_attention: dict = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        mine = len(dist.shard(prompts))
        bar = tqdm(total=mine, initial=mine - len(todo), unit="prompt", dynamic_ncols=True, position=dist.rank,
                   desc="scan" if dist.world == 1 else f"scan rank {dist.rank}/{dist.world}")
    def collect(cap, batch, acts, positions, act_layers, hidden, seconds):
        """One finished batch's host work: token strings, rows, tables, the part files. The next batch's forward
        pass runs on the GPU meanwhile (captured_forward's ``meanwhile``)."""
        strings = {p.prompt_id: _token_strings(tokenizer, p.input_ids, decoded) for p in batch}  # this rank's only
        heads_df, sweep_df = _records_to_tables(cap, batch, strings, settings)  # Arrow tables
        prompts_df = pd.DataFrame({"prompt_id": [p.prompt_id for p in batch],
                                   "n_tokens": [len(p.input_ids) for p in batch],
                                   "tokens": [strings[p.prompt_id] for p in batch],
                                   "seconds": seconds})
        act_arrays = dict(acts)
        if positions is not None:
            act_arrays["positions"] = positions
            act_arrays["layers"] = np.asarray(act_layers)
        for i, arr in hidden.items():
            act_arrays[f"hidden_{i}"] = arr
        if act_arrays:
            act_arrays["prompt_id"] = np.asarray([p.prompt_id for p in batch])
        if run is not None:
            writes.append(writer.submit(run.write_part, heads_df, sweep_df, prompts_df, act_arrays))
        else:
            heads_parts.append(heads_df)
            sweep_parts.append(sweep_df)
            prompt_parts.append(prompts_df)
            if act_arrays:
                act_parts.append(act_arrays)
        attention_maps.update({(p.prompt_id, layer, h): _trim(cap.layers[layer].attention_maps[h][b],
                                                         cap.layers[layer].stats.token_valid[b])
                               for layer in cap.layers for h in cap.layers[layer].attention_maps
                               for b, p in enumerate(batch)})
        if request is not None and request.sink_attention:
            sink_attention.update(_sink_attention(cap, batch))
        if bar is not None:
            bar.update(len(batch))

    pending: list = []  # the finished batch whose host work waits for the next forward pass
    # part files are written by one thread beside the loop (in order; pyarrow leaves the interpreter free meanwhile)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catchtag-parts")
    writes: list = []

    def flush():
        while pending:
            collect(*pending.pop())

    decoder = _decoder(model)  # the scan needs no logits: skip the LM head
    want_hidden = bool(request is not None and request.hidden_states)

    def scan_batches():
        nonlocal sink_cap, k_hint
        mark = time.perf_counter()
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            ids, mask = _batch_tensors(batch, tokenizer, device)
            try:
                with torch.no_grad():
                    cap, output = captured_forward(
                        lambda: decoder(input_ids=ids, attention_mask=mask, use_cache=False,
                                        output_hidden_states=want_hidden), settings, request, backend, sink_cap,
                        meanwhile=flush, k_hint=k_hint)
            except torch.OutOfMemoryError:
                flush()  # the batch before this one is complete: keep it
                raise CatchtagError(f"out of memory on {device} with batch size {len(batch)} x {ids.shape[1]} "
                                    f"tokens. Fix: a smaller --batch-size (or --max-tokens)") from None
            flush()  # already done while the pass ran, unless it failed first
            sink_cap, k_hint = cap.sink_cap, cap.k_hint  # a cap raised for one batch stays raised: no second pass
            backends_used.update(cap.backends_used)
            if len(cap.layers) != n_layers:
                raise CatchtagError(f"only {len(cap.layers)} of {n_layers} layers went through catchtag's attention "
                                    f"function; is the model loaded with catchtag.load_model (or engine.enable)?")
            acts, positions, act_layers, hidden = _batch_activations(
                cap, request, output.hidden_states if want_hidden else None, batch)
            del output
            now = time.perf_counter()
            pending.append((cap, batch, acts, positions, act_layers, hidden, now - mark))
            mark = now
        flush()

    try:
        scan_batches()
    finally:
        writer.shutdown(wait=True)  # an interrupted scan still leaves every batch it finished on disk
    for w in writes:
        w.result()  # a failed write fails the scan
    if bar is not None:
        bar.close()

    if run is not None:
        dist.barrier()  # every rank's parts are written
        heads, prompt_table, sweep, act_parts = run.read_tables()
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
        "backends_used": sorted(backends_used), "world_size": dist.world})
    _attach_activations(result, act_parts, request)
    result.attention_maps = attention_maps  # kept for this call's prompts only (they are not saved in runs)
    result.sink_attention = sink_attention  # likewise
    if run is not None:
        if dist.is_main:
            result.save(run.folder)
        result.settings["seconds"] = run.elapsed()
    else:
        result.settings["seconds"] = float(prompt_table["seconds"].sum())
    return result


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


def _attach_activations(result: ScanResult, parts: list[dict], request) -> None:
    """Stack per-batch activation arrays in prompt order (positions padded with -1 to a common length)."""
    if not parts:
        return
    order = np.concatenate([p["prompt_id"] for p in parts])
    sort = np.argsort(order, kind="stable")

    def stack(key, pad_axis):
        arrays = [p[key] for p in parts]
        width = max(a.shape[pad_axis] for a in arrays)
        padded = []
        for a in arrays:
            pad = [(0, 0)] * a.ndim
            pad[pad_axis] = (0, width - a.shape[pad_axis])
            padded.append(np.pad(a, pad, constant_values=-1 if key == "positions" else 0))
        return np.concatenate(padded, axis=0)[sort]

    keys = parts[0].keys()
    for key in keys:
        if key in ("prompt_id", "layers"):
            continue
        if key == "positions":
            result.positions = stack(key, 1)
        elif key.startswith("hidden_"):
            result.hidden_states[int(key.split("_", 1)[1])] = stack(key, 1)
        else:
            result.activations[key] = stack(key, 3)
    if "layers" in parts[0]:
        result.activation_layers = [int(x) for x in parts[0]["layers"]]
    if request is not None:
        H = int(result.heads["head"].max()) + 1
        result.activation_heads = list(request.heads) if request.heads is not None else list(range(H))
