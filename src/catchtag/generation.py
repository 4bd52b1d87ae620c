"""generate(): let a model write, with catch and tag followed at every step (engine.decode beside the KV cache).

``generate_batch`` is the core (one batch of prompts through the model's own ``generate()``, the tracker's records
turned into tables, no files); ``generate`` drives it over prompts and, unless told not to, scans the finished
texts, so the same tables a scan gives stand beside the step tables, and the tracker's last state is checked against
that scan. The job (catchtag.jobs.generate) saves batch by batch and resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from catchtag.data.prompts import Prompt
from catchtag.engine.request import SinkSettings
from catchtag.errors import CatchtagError, check_type

OFFLOAD_STEPS = 64  # steps between moves of the tracker's records to the host
STEP_COLUMNS = ["prompt_id", "step", "position", "token", "layer", "head", "n_sinks", "caught", "tag_share",
                "explained", "tagging_sink"]
SINK_COLUMNS = ["prompt_id", "step", "layer", "head", "position", "token", "score"]
FINAL_COLUMNS = ["prompt_id", "layer", "head", "n_tokens", "n_sinks", "sink_positions", "ve", "ve_uncentred"]


@dataclass
class GenerationResult:
    """What ``generate`` returns.

    prompts: one row per prompt: prompt, completion (the generated text), n_prompt_tokens, n_new_tokens, ended
    ("eos" or "length"), token_ids (prompt and completion). steps: one row per (prompt, step, layer, head); step 0
    is the prompt's last token, step k the k-th generated token (at ``position`` in the text); n_sinks (the sinks
    after that token's row, as a scan of the text so far finds them), caught (the attention the token puts on them),
    tag_share (its tag's energy over its output's), explained (1 - |o - tag|^2 / |o|^2: the share of its output
    the tag accounts for), tagging_sink (the sink that takes most of its attention, -1: none).
    sinks: the sinks at each step (up to ``keep`` per head, highest score first). final: the tracker's state after
    the last token, as a scan's columns (n_sinks, sink_positions, ve, ve_uncentred). scan: a scan of the finished
    texts (None when not asked). check: how far ``final`` is from ``scan``."""

    prompts: pd.DataFrame
    steps: pd.DataFrame
    sinks: pd.DataFrame
    final: pd.DataFrame
    scan: object = None
    check: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @classmethod
    def load(cls, folder) -> "GenerationResult":
        """What a folder written by `catchtag generate` holds: its four tables, the scan of the finished texts, the
        check and the settings (from summary.json). A folder of another kind, or one whose run did not finish, is
        one line."""
        from pathlib import Path

        from catchtag.result import ScanResult
        from catchtag.summaries import GenerateSummary

        folder = Path(folder)
        names = ("prompts", "steps", "sinks", "final")
        missing = [f"{n}.parquet" for n in names if not (folder / f"{n}.parquet").is_file()]
        if missing or not (folder / "scan" / "run.json").is_file() or not (folder / "summary.json").is_file():
            raise CatchtagError(f"{folder} is not a finished `catchtag generate` folder (no "
                                f"{', '.join(missing) or 'scan/ or summary.json'}). Fix: run `catchtag generate ... "
                                f"--out {folder}` to the end first")
        summary = GenerateSummary.read(folder)
        tables = [pd.read_parquet(folder / f"{n}.parquet") for n in names]
        return cls(*tables, scan=ScanResult.load(folder / "scan"), check=dict(summary["check"]),
                   settings={"model": summary["model"], "eps": summary["eps"], "min_rows": summary["min_rows"],
                             **dict(summary["generation"])})

    @property
    def texts(self) -> list[str]:
        return list(self.prompts["completion"])

    def __repr__(self) -> str:
        n = len(self.prompts)
        return (f"GenerationResult({n} prompt(s), {int(self.prompts['n_new_tokens'].sum())} new tokens, "
                f"{len(self.steps)} step rows; .texts, .steps, .sinks, .final, .scan)")


def prompt_ids(tokenizer, text: str, chat: bool) -> list[int]:
    """A prompt's token ids: through the tokenizer's chat template (a user turn, then the assistant's) when ``chat``,
    else as plain text."""
    if chat:
        got = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if hasattr(got, "keys"):
            got = got["input_ids"]
        return [int(x) for x in got]
    return [int(x) for x in tokenizer(text)["input_ids"]]


def generation_config(model, max_new_tokens: int, greedy: bool = True, temperature: float = 1.0,
                      top_p: float = 1.0, top_k: int = 50, pad_token_id: int | None = None):
    """The model's own generation config with these options, one more token than asked (its row completes the
    last kept token's statistics: the tracker counts a row when the model reads it) and no stop at the end token
    (``_FollowEnds`` ends a sequence one step later, so the end token's own row is read)."""
    import copy

    gc = copy.deepcopy(model.generation_config)
    gc.max_new_tokens, gc.min_new_tokens, gc.max_length = max_new_tokens + 1, None, None
    gc.do_sample = not greedy
    if greedy:
        gc.temperature, gc.top_p, gc.top_k = None, None, None
    else:
        gc.temperature, gc.top_p, gc.top_k = temperature, top_p, top_k
    gc.num_beams, gc.use_cache, gc.eos_token_id = 1, True, None
    gc.pad_token_id = pad_token_id
    return gc


def end_ids(model, tokenizer) -> list[int]:
    """The tokens that end a sequence: the model's generation config's, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


class _FollowEnds:
    """A stopping criterion for generate(): a sequence ends one step after its end token (so the tracker reads that
    token's row), the tracker learns which sequences' next rows count, and the progress bar moves."""

    def __init__(self, tracker, prompt_len: int, eos: list[int], bar=None):
        self.tracker, self.prompt_len, self.bar = tracker, prompt_len, bar
        self.eos_token_id = eos  # generate() pads ended sequences when a criterion names end tokens
        self._eos = torch.tensor(eos or [-1])
        self.steps = 0

    def __call__(self, input_ids, scores, **kwargs):
        new = input_ids[:, self.prompt_len:-1]
        ended = torch.isin(new, self._eos.to(new.device)).any(dim=-1)
        self.tracker.set_active(~ended)
        self.steps += 1
        if self.steps % OFFLOAD_STEPS == 0:
            self.tracker.offload()
        if self.bar is not None:
            self.bar.update(1)
        return ended


def generate_batch(model, tokenizer, batch: list[Prompt], settings: SinkSettings, gen: dict, keep: int = 8,
                   bar=None, decoded: dict | None = None, ve: bool = True):
    """One batch: (prompts, steps, sinks, final) tables of ``GenerationResult`` for these prompts."""
    return batch_tables(tokenizer, batch, settings, *track_generation(model, tokenizer, batch, settings, gen, keep,
                                                                        bar, ve), decoded=decoded)


def track_generation(model, tokenizer, batch: list[Prompt], settings: SinkSettings, gen: dict, keep: int = 8,
                     bar=None, ve: bool = True):
    """The model's generate() on one left-padded batch with a SinkTracker following it: (tracker, sequences (B, T)
    on the CPU, left padding per sequence, prompt length T0, end tokens). ve: the tracker keeps what its VE needs
    (SinkTracker's ``ve``)."""
    from catchtag.engine.decode import SinkTracker, tracking
    from catchtag.scan import _batch_tensors, _input_device, using_catchtag

    eos = end_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    ids, mask = _batch_tensors(batch, tokenizer, _input_device(model), left=True, pad=pad)
    B, T0 = ids.shape
    n_new = int(gen["max_new_tokens"])
    tracker = SinkTracker(settings, capacity=T0 + n_new + 1, keep=keep, ve=ve)
    criterion = _FollowEnds(tracker, T0, eos, bar)
    config = generation_config(model, pad_token_id=pad, **gen)
    # transformers compiles the forward of a static cache on a GPU by itself; the tracker keeps host state (the step,
    # its records) that a compiled graph would freeze, and its Triton step is not for inductor: decode eagerly
    config.disable_compile = True
    from transformers import StoppingCriteriaList

    with using_catchtag(model), tracking(tracker), torch.no_grad():
        seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                              stopping_criteria=StoppingCriteriaList([criterion]))
    if not tracker.layers:
        from catchtag.scan import no_layer_message

        raise CatchtagError(no_layer_message(model))
    return tracker, seqs.cpu(), (T0 - mask.sum(dim=-1)).cpu().numpy(), T0, eos


def batch_tables(tokenizer, batch: list[Prompt], settings: SinkSettings, tracker, seqs, pads, T0: int, eos,
                 decoded: dict | None = None):
    """The (prompts, steps, sinks, final) tables of a tracked batch (``track_generation``)."""
    from catchtag.scan import _token_strings

    decoded = {} if decoded is None else decoded
    n_new = tracker.capacity - T0 - 1
    last_read = tracker.layers[min(tracker.layers)].rows - 1  # the last frame position whose row the model read
    prompt_rows, strings, ends = [], {}, []
    for b, p in enumerate(batch):
        new = seqs[b, T0:T0 + n_new].tolist()
        cut = next((i + 1 for i, x in enumerate(new) if x in eos), None)
        kept = new[:cut] if cut is not None else new
        kept = kept[:last_read - T0 + 1]  # generation stopped early for every sequence
        full = list(p.input_ids) + kept
        strings[p.prompt_id] = _token_strings(tokenizer, full, decoded)
        ends.append(pads[b] + len(full) - 1)  # last frame position that belongs to the sequence
        prompt_rows.append({"prompt_id": p.prompt_id, "prompt": p.text, "completion": tokenizer.decode(kept),
                            "n_prompt_tokens": len(p.input_ids), "n_new_tokens": len(kept),
                            "ended": "eos" if cut is not None and cut <= len(kept) else "length",
                            "token_ids": full})
    steps, sinks, final = [], [], []
    pid = np.asarray([p.prompt_id for p in batch])
    for layer in sorted(tracker.layers):
        r = tracker.records(layer)
        steps_t, sinks_t = _step_tables(r, layer, pid, pads, np.asarray(ends), T0, strings, settings)
        steps.append(steps_t)
        sinks.append(sinks_t)
        final.append(_final_table(tracker.final_stats(layer), layer, pid, pads, settings))
    return (pd.DataFrame(prompt_rows), pd.concat(steps, ignore_index=True), pd.concat(sinks, ignore_index=True),
            pd.concat(final, ignore_index=True))


def _step_tables(r: dict, layer: int, pid, pads, ends, T0: int, strings: dict, settings):
    row = r["row"].numpy()  # (S,)
    active = r["active"].numpy()  # (S,B)
    S, B = active.shape
    H = r["n_sinks"].shape[-1]
    keep_sb = active & (row[:, None] <= ends[None, :])
    s_i, b_i = np.nonzero(keep_sb)
    pos = row[s_i] - pads[b_i]
    tokens = np.asarray([strings[int(pid[b])][int(q)] for b, q in zip(b_i, pos)], dtype=object)
    n = len(s_i)
    out_sq = r["out_sq"].numpy()[s_i, b_i].astype(np.float64)
    safe = np.where(out_sq > 0, out_sq, 1.0)
    tagging = r["tagging_sink"].numpy()[s_i, b_i]
    steps = pd.DataFrame({
        "prompt_id": np.repeat(pid[b_i], H), "step": np.repeat(row[s_i] - (T0 - 1), H),
        "position": np.repeat(pos, H), "token": np.repeat(tokens, H), "layer": np.full(n * H, layer),
        "head": np.tile(np.arange(H), n), "n_sinks": r["n_sinks"].numpy()[s_i, b_i].ravel(),
        "caught": r["caught"].numpy()[s_i, b_i].ravel().astype(np.float64),
        "tag_share": np.where(out_sq > 0, r["tag_sq"].numpy()[s_i, b_i] / safe, 0.0).ravel(),
        "explained": np.where(out_sq > 0, 1 - r["resid_sq"].numpy()[s_i, b_i] / safe, 0.0).ravel(),
        "tagging_sink": np.where(tagging >= 0, tagging - pads[b_i][:, None], -1).ravel()}, columns=STEP_COLUMNS)
    top_idx, top_scores = r["top_idx"].numpy()[s_i, b_i], r["top_scores"].numpy()[s_i, b_i]  # (n,H,keep)
    j, h, k = np.nonzero(top_scores > float(settings.eps))
    sink_pos = top_idx[j, h, k] - pads[b_i[j]]
    sinks = pd.DataFrame({
        "prompt_id": pid[b_i[j]], "step": row[s_i[j]] - (T0 - 1), "layer": np.full(len(j), layer), "head": h,
        "position": sink_pos,
        "token": np.asarray([strings[int(pid[b_i[x]])][int(q)] for x, q in zip(j, sink_pos)], dtype=object),
        "score": top_scores[j, h, k].astype(np.float64)}, columns=SINK_COLUMNS)
    return steps, sinks


def _final_table(fs: dict, layer: int, pid, pads, settings) -> pd.DataFrame:
    e = settings.all_eps.index(float(settings.eps))
    B, H = fs["ve"].shape[:2]
    rows = []
    n_tokens = fs["token_valid"].sum(dim=-1).numpy()
    for b in range(B):
        for h in range(H):
            ok = fs["sink_ok"][b, h].numpy()
            rows.append({"prompt_id": int(pid[b]), "layer": layer, "head": h, "n_tokens": int(n_tokens[b]),
                         "n_sinks": int(fs["n_sinks"][b, h, e]),
                         "sink_positions": (fs["sink_idx"][b, h].numpy()[ok] - pads[b]).tolist(),
                         "ve": float(fs["ve"][b, h, e]), "ve_uncentred": float(fs["ve_uncentred"][b, h, e])})
    return pd.DataFrame(rows, columns=FINAL_COLUMNS)


def sink_events(sinks: pd.DataFrame, steps: pd.DataFrame) -> dict:
    """Each head's sinks over the steps of one prompt, only where they change: {(layer, head): [(step, positions,
    n_sinks), ...]} (positions as listed in ``sinks``, up to ``keep``; n_sinks counts them all)."""
    listed = {}
    for (layer, head, step), part in sinks.groupby(["layer", "head", "step"], sort=False)["position"]:
        listed[(int(layer), int(head), int(step))] = tuple(sorted(int(p) for p in part))
    events: dict = {}
    order = steps.sort_values(["layer", "head", "step"], kind="stable")
    for layer, head, step, n in zip(order["layer"].to_numpy(), order["head"].to_numpy(), order["step"].to_numpy(),
                                    order["n_sinks"].to_numpy()):
        key = (int(layer), int(head))
        now = (listed.get((key[0], key[1], int(step)), ()), int(n))
        seen = events.setdefault(key, [])
        if not seen or (seen[-1][1], seen[-1][2]) != now:
            seen.append((int(step), *now))
    return events


def check_against_scan(final: pd.DataFrame, heads: pd.DataFrame) -> dict:
    """How far the tracker's last state is from a scan of the finished texts: the share of (prompt, layer, head)
    with the same sinks, and the largest differences of n_tokens, VE and uncentred VE (NaN: not compared, where the
    tracker kept no VE, or any head's VE is missing)."""
    m = final.merge(heads, on=["prompt_id", "layer", "head"], suffixes=("", "_scan"))
    same = [list(a) == list(b) for a, b in zip(m["sink_positions"], m["sink_positions_scan"])]

    def largest(col: str) -> float:
        return float((m[col] - m[f"{col}_scan"]).abs().max(skipna=False)) if len(m) else float("nan")

    return {"heads_compared": int(len(m)), "same_sinks": float(np.mean(same)) if len(m) else float("nan"),
            "max_abs_ve_diff": largest("ve"), "max_abs_ve_uncentred_diff": largest("ve_uncentred"),
            "same_lengths": bool((m["n_tokens"] == m["n_tokens_scan"]).all())}


def as_prompts(texts, tokenizer, chat: bool | None) -> list[Prompt]:
    """Prompts from a string, a list of strings or of Prompts (already tokenised: used as they are)."""
    if isinstance(texts, (str, Prompt)):
        texts = [texts]
    check_type("prompts", texts, (list, tuple), "a string, a list of strings or a list of Prompts", ["Once upon"])
    out = []
    for i, t in enumerate(texts):
        check_type("prompts", t, (str, Prompt), "a string, a list of strings or a list of Prompts", ["Once upon"])
        if isinstance(t, Prompt):
            out.append(t)
            continue
        use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        if use_chat and not getattr(tokenizer, "chat_template", None):
            raise CatchtagError("chat=True, but this tokenizer has no chat template. Fix: chat=False (plain text)")
        out.append(Prompt(i, prompt_ids(tokenizer, t, use_chat), text=t))
    for p in out:
        if not p.input_ids:
            raise CatchtagError(f"prompt {p.prompt_id} is empty. Fix: give every prompt some text")
    return out


def generate(model, tokenizer, prompts, *, max_new_tokens: int = 64, greedy: bool = True, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 50, seed: int = 0, chat: bool | None = None,
             eps: float = SinkSettings.eps, min_rows: int = SinkSettings.min_rows, batch_size: int = 8,
             keep: int = 8, scan_final: bool = True, tracker_ve: bool | None = None,
             progress: bool = True) -> GenerationResult:
    """Let ``model`` write after each prompt with its own ``generate()``, following catch and tag at every step.

    prompts: a string, a list of strings (through the tokenizer's chat template when it has one, unless
    chat=False) or a list of ``Prompt``. greedy=False samples (temperature, top_p, top_k; seeded with ``seed``).
    eps / min_rows: the sink rule of a scan. keep: sinks listed per head and step. scan_final: also scan the
    finished texts (GenerationResult.scan) and check the tracker's last state against it. tracker_ve: the tracker
    also keeps each head's Gram matrix so ``final`` has its own VE (layers x heads x head_dim^2 float64 numbers per
    sequence, more than the KV cache of a short text); default: only without scan_final (the scan gives the VE)."""
    for name, value, kinds, example in (("max_new_tokens", max_new_tokens, (int,), 64), ("batch_size", batch_size,
                                        (int,), 8), ("keep", keep, (int,), 8), ("seed", seed, (int,), 0)):
        check_type(name, value, kinds, "a whole number >= 1", example)
        if value < (0 if name == "seed" else 1):
            raise CatchtagError(f"{name} must be >= 1, got {value}. Fix: e.g. {name}={example}")
    settings = SinkSettings(eps=eps, min_rows=min_rows)
    ve = not scan_final if tracker_ve is None else bool(tracker_ve)
    prompt_list = as_prompts(prompts, tokenizer, chat)
    gen = dict(max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p, top_k=top_k)
    from catchtag.progress import progress_bar

    batches = [prompt_list[i:i + batch_size] for i in range(0, len(prompt_list), batch_size)]
    bar = progress_bar(total=len(batches) * (max_new_tokens + 1), desc="generate", unit="step",
                       disable=not progress)
    parts, decoded = [], {}
    for k, batch in enumerate(batches):
        torch.manual_seed(seed + k)
        parts.append(generate_batch(model, tokenizer, batch, settings, gen, keep, bar, decoded, ve))
    bar.close()
    tables = [pd.concat([p[i] for p in parts], ignore_index=True) for i in range(4)]
    return finish(model, tokenizer, *tables, settings=settings, scan_final=scan_final, batch_size=batch_size,
                  progress=progress, extra={"max_new_tokens": max_new_tokens, "greedy": greedy, "seed": seed})


def finish(model, tokenizer, prompts, steps, sinks, final, *, settings: SinkSettings, scan_final: bool = True,
           batch_size: int = 8, progress: bool = True, out=None, model_name=None, data_name=None,
           extra: dict | None = None) -> GenerationResult:
    """The GenerationResult of finished batches: with scan_final, a scan of the finished texts (into ``out`` when
    given, resumable) and the check of the tracker's last state against it."""
    from catchtag.scan import scan

    result = GenerationResult(prompts=prompts, steps=steps, sinks=sinks, final=final,
                              settings={"eps": settings.eps, "min_rows": settings.min_rows, **(extra or {})})
    if scan_final:
        texts = [Prompt(int(r.prompt_id), [int(x) for x in r.token_ids], text=str(r.prompt) + str(r.completion))
                 for r in prompts.itertuples()]
        result.scan = scan(model, tokenizer, texts, eps=settings.eps, min_rows=settings.min_rows,
                           batch_size=batch_size, out=out, progress=progress, model_name=model_name,
                           data_name=data_name)
        result.check = check_against_scan(final, result.scan.heads)
    return result
