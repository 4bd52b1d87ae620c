"""Training seeds in parallel processes, held-out R^2, mechanism checks, resumable per-seed results."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import multiprocessing as mp

import pandas as pd
import torch

from catchtag.toy.model import ToyAttentionModel, ToyConfig
from catchtag.toy.task import NUMBER, SEP, SEP2, Batch, TaskConfig, make_batch, prefix_targets, token_masks

EVAL_SEED = 12345  # held-out set: a generator stream never used for training


@dataclass
class TrainConfig:
    """Optimisation settings. ``recipe`` names a preset (see ``RECIPES``); explicit fields override nothing
    silently: ``make_recipe`` builds the config and you may edit it afterwards."""

    recipe: str = "paper"
    steps: int = 2000
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.0  # > 0: AdamW (decoupled) on the attention and read-out weights, not on the tags
    warmup_steps: int = 0
    schedule: str = "constant"  # or "cosine"
    temp_start: float = 1.0  # attention-score multiplier at step 0, ramped linearly to 1 ...
    temp_steps: int = 0  # ... over this many steps (0: no ramp)
    temp_layers: tuple[int, ...] | None = None  # layers the ramp applies to (None: all)
    length_curriculum: tuple[int, ...] = ()  # lengths for equal training fractions before the final length
    grad_clip: float = 0.0
    sharpen: float | None = None  # late sharpening: layer-1 scores are multiplied by a factor ramped from 1 to
    sharpen_start: int | None = None  # this value between these steps (None: steps/2 ...
    sharpen_steps: int | None = None  # ... over steps/4), then kept: folded into the weights at the end
    l1_qk_std: float | None = None  # re-initialise layer-1 query/key weights and biases at this small std
    zero_init: tuple[str, ...] | None = None  # parameters set to 0 at init, e.g. ("layers.0.k.weight",): every
    # token then has the same layer-1 key (its bias), so attention starts uniform whatever the score scale
    prefix_zero_steps: int | None = None  # numbers before [SEP] are 0 for this many steps ...
    prefix_ramp_steps: int | None = None  # ... then scaled up linearly to their full range over this many
    hide_sep_steps: int | None = None  # layer 2 reads nothing from [SEP]/[SEP2] for this many steps ...
    hide_sep_ramp: int | None = None  # ... then their layer-2 value is scaled up linearly to 1 over this many
    dense_loss: bool | None = None  # also fit the target at every earlier valid position (task.prefix_targets)
    sep2_warmup_steps: int | None = None  # two-sink: first ask for mean after [SEP] + mean after [SEP2] this long
    eval_size: int = 4096
    threshold: float = 0.99  # success: held-out R^2 >= threshold
    sink_threshold: float = 0.5  # mechanism: layer-1 mass on the sink from the tokens after it
    release_threshold: float = 0.8  # mechanism: layer-2 mass (last token) on the tagged tokens
    tag_share: float | None = None  # tag used: removing a sink's tag costs >= this share of what knowing that
    # sink is worth, (R^2 - R^2 without the tag) / (R^2 - R^2 of the best sink-blind predictor) (None: 0.5)


HIDDEN_SEP_TRAIN = {"hide_sep_steps": 800, "dense_loss": True, "steps": 4000, "lr": 1e-2, "warmup_steps": 100,
                    "schedule": "cosine", "grad_clip": 1.0}
L1NORM_MODEL = {"qk_norm": True, "qk_gain": 10.0, "qk_norm_layers": (0,)}  # layer-1 QK-norm, gain starting at 10
L1NORM_WD_TRAIN = {**HIDDEN_SEP_TRAIN, "zero_init": ("layers.0.k.weight",), "weight_decay": 0.05}
L1NORM_WD_MODEL = {**L1NORM_MODEL, "qk_gain_fixed": True}

RECIPES = {
    # what we take the paper's setting to be: default init, Adam, constant lr, plain softmax attention
    "paper": {"train": {}, "model": {}},
    # ours (docs/toy.md): (1) for the first 800 steps layer 2 reads nothing from [SEP]/[SEP2] themselves
    # (their layer-2 value is zeroed, attention unchanged): this removes the competing "[SEP] collects the
    # prefix, layer 2 reads it" solution while the catch forms; (2) the loss fits the target at every valid
    # position, not only the last (every token after [SEP] must be tagged alike); (3) lr 1e-2 with 100 warmup
    # steps, cosine decay to 0 and gradient clipping at 1, over 4000 steps. Plain attention, default init.
    "hidden-sep": {"train": HIDDEN_SEP_TRAIN, "model": {}},
    # ours for the single variant (docs/toy.md): hidden-sep with layer 1's query weights and bias zero at init,
    # as muP's zero query: layer-1 attention starts uniform, so no seed starts with [SEP]'s large key (tag 10)
    # scored far below the numbers by a random query, where its catch has no gradient to grow from
    "hidden-sep-zero-q": {"train": {**HIDDEN_SEP_TRAIN, "zero_init": ("layers.0.q.weight", "layers.0.q.bias")},
                          "model": {}},
    # for the two-sink variant (docs/toy.md): hidden-sep with layer 1's queries and keys RMS-normalised and a
    # learnable gain starting at 10: attention ranks keys by direction, so a head that catches at [SEP2] gives
    # it nearly all the attention of the numbers after it (plain attention leaves [SEP2] a weak sink)
    "hidden-sep-l1norm": {"train": HIDDEN_SEP_TRAIN, "model": L1NORM_MODEL},
    # ours for the two-sink variant (docs/toy.md, 2026-11-24): hidden-sep-l1norm with (1) layer 1's key weights zero at
    # init (every token has the same key at step 0: attention starts uniform, no catch starts dead), (2) the
    # layer-1 gain fixed at 10, and (3) decoupled weight decay 0.05 on every weight but the tags: a weak [SEP2]
    # catch leaves the numbers after [SEP2] only a little apart from those between the sinks, and reading so
    # small a difference takes large layer-2 weights, which the decay makes costly; a full catch does not
    "hidden-sep-l1norm-wd": {"train": L1NORM_WD_TRAIN, "model": L1NORM_WD_MODEL},
    # ours for the two-sink variant (docs/toy.md, 2026-11-24, the second of the day): hidden-sep-l1norm-wd with
    # (1) layer 1's value weights zero at init too: every head starts by writing only its value bias, the same
    # vector for every token, and grows only the values the task asks for; almost every seed then fits; and (2)
    # [SEP2]'s tag starting at 20: the numbers between the sinks and those after [SEP2] are told apart by the
    # difference between the two sinks' layer-1 values, and a larger [SEP2] embedding makes [SEP2]'s own value
    # the cheap side of it (with tag 10, [SEP2] often writes little and only keeps [SEP]'s value off those numbers)
    "hidden-sep-l1norm-zv-t20": {
        "train": {**L1NORM_WD_TRAIN, "zero_init": ("layers.0.k.weight", "layers.0.v.weight")},
        "model": {**L1NORM_WD_MODEL, "init_tag2": 20.0}},
    # tried first (docs/toy.md): QK-normalised attention with a learnable gain (bounded logits at init);
    # it helps the single variant but leaves weak catches
    "qk-norm": {"train": {}, "model": {"qk_norm": True, "qk_gain": 1.0}},
}


def make_recipe(name: str = "paper", **overrides) -> TrainConfig:
    """The training settings of a named recipe; ``recipe_model_options`` gives its model settings."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    kw = dict(RECIPES[name]["train"])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(recipe=name, **kw)


def recipe_model_options(name: str = "paper") -> dict:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return dict(RECIPES[name]["model"])


def r2_score(y: torch.Tensor, t: torch.Tensor) -> float:
    return float(1 - ((y - t) ** 2).sum() / ((t - t.mean()) ** 2).sum())


def sink_blind_r2(batch: Batch, kind: int = SEP) -> float:
    """R^2 of the best affine prediction of the target from what is still known when sink ``kind`` is unseen.

    The floor that removing that sink's tag should bring a model down to: [SEP] unseen -> the mean of all
    numbers (two-sink: and the mean after [SEP2]); [SEP2] unseen -> the mean after [SEP] (the task read as if
    the numbers between the sinks were all the numbers after [SEP]). Least squares on ``batch`` itself."""
    masks = token_masks(batch)
    num = (batch.types == NUMBER).float()

    def mean(w: torch.Tensor) -> torch.Tensor:
        w = w.float()
        return (batch.values * w).sum(1) / w.sum(1).clamp_min(1)

    if kind == SEP:
        feats = [mean(num)] + ([mean(masks["after_sep2"])] if "after_sep2" in masks else [])
    elif kind == SEP2 and "after_sep2" in masks:
        feats = [mean(masks["after_sep"])]
    else:
        raise ValueError(f"no sink of token type {kind} in this batch")
    X = torch.stack(feats + [torch.ones_like(feats[0])], 1).double()
    w = torch.linalg.lstsq(X, batch.target.double()[:, None]).solution
    return r2_score((X @ w).squeeze(1).float(), batch.target)


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    return 1.0


def _temperature(step: int, cfg: TrainConfig) -> float:
    if cfg.temp_steps <= 0 or step >= cfg.temp_steps:
        return 1.0
    return cfg.temp_start + (1.0 - cfg.temp_start) * step / cfg.temp_steps


def _sharpening(step: int, cfg: TrainConfig) -> float:
    """Layer-1 score multiplier of the late sharpening (1 without it)."""
    if not cfg.sharpen:
        return 1.0
    start = cfg.sharpen_start if cfg.sharpen_start is not None else cfg.steps // 2
    span = cfg.sharpen_steps if cfg.sharpen_steps is not None else cfg.steps // 4
    return 1.0 + (cfg.sharpen - 1.0) * _delayed_ramp(step, start, span)


def _delayed_ramp(step: int, zero_steps: int | None, ramp_steps: int | None) -> float:
    """0 for the first ``zero_steps`` steps, then linearly up to 1 over ``ramp_steps`` (a curriculum factor)."""
    zero, ramp = zero_steps or 0, ramp_steps or 0
    if step < zero:
        return 0.0
    if ramp and step < zero + ramp:
        return (step - zero) / ramp
    return 1.0


def _length_at(step: int, cfg: TrainConfig, final: int) -> int:
    stages = list(cfg.length_curriculum) + [final]
    i = min(len(stages) - 1, step * len(stages) // max(1, cfg.steps))
    return int(stages[i])


def eval_batch(task: TaskConfig, size: int = 4096) -> Batch:
    g = torch.Generator().manual_seed(EVAL_SEED)
    return make_batch(size, task.length, task.variant, task.low, task.high, generator=g)


def init_model(model_cfg: ToyConfig, train_cfg: TrainConfig, seed: int) -> ToyAttentionModel:
    """The initial weights of seed ``seed`` (the recipe may shrink layer 1's query/key so that the gradient,
    not the random draw, decides whether [SEP] becomes a sink)."""
    torch.manual_seed(seed)
    model = ToyAttentionModel(model_cfg)
    std = train_cfg.l1_qk_std
    if std is not None:
        with torch.no_grad():
            for lin in (model.layers[0].q, model.layers[0].k):
                lin.weight.normal_(0.0, std)
                lin.bias.normal_(0.0, std)
    zero = train_cfg.zero_init
    if zero:
        params = dict(model.named_parameters())
        unknown = [n for n in zero if n not in params]
        if unknown:
            raise ValueError(f"zero_init names unknown parameters {unknown}; the model has {', '.join(params)}")
        with torch.no_grad():
            for n in zero:
                params[n].zero_()
    return model


def train_model(
    model_cfg: ToyConfig, train_cfg: TrainConfig, task: TaskConfig, seed: int = 0, log_every: int = 0
) -> tuple[ToyAttentionModel, list[dict]]:
    """Train one model from seed ``seed``; returns the model and a short loss history."""
    model = init_model(model_cfg, train_cfg, seed)
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1))
    if train_cfg.weight_decay > 0:  # decoupled (AdamW), on the attention and read-out weights, never the tag
        groups = [{"params": [p for n, p in model.named_parameters() if n != "tag"]},
                  {"params": [model.tag], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, foreach=True)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=train_cfg.lr, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, train_cfg))
    history = []
    for step in range(train_cfg.steps):
        model.set_temperature(_temperature(step, train_cfg), train_cfg.temp_layers)
        model.layers[0].temperature *= _sharpening(step, train_cfg)
        L = _length_at(step, train_cfg, task.length)
        b = make_batch(train_cfg.batch_size, L, task.variant, task.low, task.high, generator=g,
                       prefix_scale=_delayed_ramp(step, train_cfg.prefix_zero_steps, train_cfg.prefix_ramp_steps))
        f = _delayed_ramp(step, train_cfg.hide_sep_steps, train_cfg.hide_sep_ramp)  # layer-2 value of specials
        scale = {(1, SEP): f, (1, SEP2): f} if f != 1.0 else None
        warm = task.variant == "two-sink" and step < (train_cfg.sep2_warmup_steps or 0)
        if train_cfg.dense_loss or warm:
            _, aux = model(b.values, b.types, return_all=True, special_value_scale=scale)
            pred, (t, valid) = aux["every_position"], prefix_targets(b, second="after-sep2" if warm else "between")
            if not train_cfg.dense_loss:  # the last position only (always a valid one)
                pred, t, valid = pred[:, -1:], t[:, -1:], valid[:, -1:]
            loss = ((pred - t) ** 2)[valid].mean()
        else:
            loss = torch.nn.functional.mse_loss(model(b.values, b.types, special_value_scale=scale), b.target)
        opt.zero_grad()
        loss.backward()
        if not torch.isfinite(loss):
            history.append({"step": step, "loss": float("nan")})
            break
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == train_cfg.steps - 1):
            history.append({"step": step, "loss": float(loss.detach())})
    model.set_temperature(1.0)
    model.layers[0].temperature = _sharpening(train_cfg.steps, train_cfg)
    model.fold_temperature()  # a sharpened layer 1 keeps its final scores
    return model, history


@torch.no_grad()
def mechanism_metrics(model: ToyAttentionModel, batch: Batch) -> dict:
    """How much the learned model looks like catch, tag, release.

    sink_mass: layer-1 mean attention on [SEP] from the numbers after it (best head);
    release_mass: layer-2 attention of the last token on the numbers after [SEP] (best head);
    release_entropy: entropy of that attention renormalised on those numbers / log(count) (1 = uniform).
    Two-sink: also sink2_mass ([SEP2] from numbers after it), sink_between_mass ([SEP] from the numbers
    between the sinks: the ones only [SEP] can catch) and between_mass / between_entropy
    (a head attending to the numbers between [SEP] and [SEP2]); ``*_head`` says which head. The between head
    is chosen first and the release head among the other heads (a head that releases only the numbers
    between also has all its mass after [SEP]).
    r2_tag_removed (two-sink: also r2_tag2_removed): held-out R^2 when [SEP] ([SEP2]) writes only the value
    bias in layer 1, i.e. without its tag; r2_blind (r2_blind2): the best sink-blind predictor
    (``sink_blind_r2``); tag_share (tag2_share): (r2 - r2_tag_removed) / (r2 - r2_blind), the share of what
    knowing the sink is worth that its tag carries: the causal half of the check (``tag_causal_ok``).
    r2_without_tag (r2_without_tag2): the older ablation, the sink's whole layer-1 value zeroed (bias too).
    """
    y, aux = model(batch.values, batch.types, return_all=True)
    a1, a2 = aux["attn"]  # (B, H, L, L)
    masks = token_masks(batch)
    B, H, L, _ = a1.shape
    out: dict = {}

    def sink(kind_mask: torch.Tensor, pos: torch.Tensor, name: str) -> None:
        on = a1[torch.arange(B), :, :, pos]  # (B, H, L): mass every query gives the sink
        w = kind_mask[:, None, :].float()
        per_head = (on * w).sum((0, 2)) / w.sum((0, 2))
        h = int(per_head.argmax())
        out[f"{name}_mass"] = float(per_head[h])
        out[f"{name}_head"] = h

    def release(group: torch.Tensor, name: str, exclude: int | None = None) -> None:
        last = a2[:, :, -1, :]  # (B, H, L)
        m = group[:, None, :].float()
        mass = (last * m).sum(-1)  # (B, H)
        p = (last * m) / mass.clamp_min(1e-12)[..., None]
        ent = -(p * p.clamp_min(1e-12).log()).sum(-1)
        n = group.sum(-1).float()[:, None]
        ratio = torch.where(n > 1, ent / n.log().clamp_min(1e-12), torch.ones_like(ent))
        per_head = mass.mean(0)
        if exclude is not None and H > 1:  # the head that releases one group cannot also release the other
            per_head = per_head.clone()
            per_head[exclude] = -1.0
        h = int(per_head.argmax())
        out[f"{name}_mass"] = float(mass.mean(0)[h])
        out[f"{name}_entropy"] = float(ratio[:, h].mean())
        out[f"{name}_head"] = h

    sink(masks["after_sep"], batch.sep, "sink")
    if "between" in masks:
        # the between group lies inside the after-[SEP] group, so a head releasing only it also has all its
        # mass after [SEP]: pick the between head first, then the release head among the others
        sink(masks["after_sep2"], batch.sep2, "sink2")
        sink(masks["between"], batch.sep, "sink_between")
        release(masks["between"], "between")
        release(masks["after_sep"], "release", exclude=out["between_head"])
    else:
        release(masks["after_sep"], "release")
    out["r2"] = r2_score(y, batch.target)
    # causal check of the tag, per sink: cut what it writes in layer 1 to the value bias and compare the fit with
    # the best sink-blind predictor's; the older ablation (its whole layer-1 value zeroed) is kept for comparison
    for kind, sfx in [(SEP, "")] + ([(SEP2, "2")] if "between" in masks else []):
        zeroed = model(batch.values, batch.types, special_value_scale={(0, kind): 0.0})
        out[f"r2_without_tag{sfx}"] = r2_score(zeroed, batch.target)
        removed = r2_score(model(batch.values, batch.types, tag_removed=(kind,)), batch.target)
        blind = sink_blind_r2(batch, kind)
        out[f"r2_tag{sfx}_removed"] = removed
        out[f"r2_blind{sfx}"] = blind
        gap = out["r2"] - blind
        out[f"tag{sfx}_share"] = (out["r2"] - removed) / gap if gap > 1e-6 else float("nan")
    return out


def mechanism_ok(m: dict, cfg: TrainConfig) -> bool:
    """The attention check. Two-sink: every number is caught by its nearest sink before it ([SEP] from the
    numbers between the sinks, [SEP2] from the numbers after it); whether the numbers after [SEP2] also give
    [SEP] their attention (the construction) or only [SEP2] (a head that catches at whichever special came
    last) does not matter to the mechanism, and ``sink_mass`` over all numbers after [SEP] mixes the two."""
    first = m["sink_between_mass"] if "sink_between_mass" in m else m["sink_mass"]
    ok = first >= cfg.sink_threshold and m["release_mass"] >= cfg.release_threshold
    if "sink2_mass" in m:
        ok = ok and m["sink2_mass"] >= cfg.sink_threshold and m["between_mass"] >= cfg.release_threshold
    return bool(ok)


def tag_causal_ok(m: dict, cfg: TrainConfig) -> bool:
    """The causal half of the check: without each sink's tag the model loses >= tag_share (default 0.5) of what
    knowing that sink is worth over the best sink-blind predictor (``mechanism_metrics``'s tag_share).
    A share near 1: without the tag the model knows no more than a predictor that never saw the sink."""
    need = cfg.tag_share if cfg.tag_share is not None else 0.5
    shares = [m["tag_share"]] + ([m["tag2_share"]] if "tag2_share" in m else [])
    return bool(all(math.isfinite(x) and x >= need for x in shares))


# model options added later: left out of the run key while unset, so the ids of earlier cells stay
NEW_MODEL_FIELDS = {"qk_norm_layers", "init_tag2", "qk_gain_fixed"}


def run_id(model_cfg: ToyConfig, train_cfg: TrainConfig, task: TaskConfig) -> str:
    """Stable key of one table cell: every setting that changes the result (not the seed)."""
    tr = {k: v for k, v in asdict(train_cfg).items() if v is not None}  # new options default to None: old ids stay
    mo = {k: v for k, v in asdict(model_cfg).items() if v is not None or k not in NEW_MODEL_FIELDS}
    d = {"model": mo, "train": tr, "task": asdict(task)}
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:12]


def _train_one(args: tuple) -> dict:
    """Worker: one seed, one process, one thread."""
    model_cfg, train_cfg, task, seed, model_dir = args
    torch.set_num_threads(1)
    t0 = time.time()
    ev = eval_batch(task, train_cfg.eval_size)
    init = mechanism_metrics(init_model(model_cfg, train_cfg, seed), ev)  # what train_model starts from
    model, hist = train_model(model_cfg, train_cfg, task, seed)
    m = mechanism_metrics(model, ev)
    if not math.isfinite(m["r2"]):
        m["r2"] = float("-inf")
    row = {
        "seed": seed,
        "r2": m.pop("r2"),
        **m,
        "init_sink_mass": init["sink_mass"],
        "tag": [float(t) for t in model.tag.detach()],
        "seconds": round(time.time() - t0, 2),
    }
    row["success"] = bool(row["r2"] >= train_cfg.threshold)
    row["mechanism"] = mechanism_ok(row, train_cfg)
    row["tag_causal"] = tag_causal_ok(row, train_cfg)
    if model_dir:
        Path(model_dir).mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), Path(model_dir) / f"seed{seed}.pt")
    return row


def read_rows(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a half-written last line from an interrupted run
                continue
    return rows


@dataclass
class SeedResults:
    """Per-seed rows of one cell plus its summary."""

    run_id: str
    rows: pd.DataFrame
    settings: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def successes(self) -> int:
        return int(self.rows["success"].sum()) if self.n else 0

    @property
    def verified(self) -> int:
        """Successes whose attention passes the mechanism check (sinks and release, ``mechanism_ok``)."""
        return int((self.rows["success"] & self.rows["mechanism"]).sum()) if self.n else 0

    @property
    def tag_verified(self) -> int:
        """Successes whose tags carry the sinks' information (``tag_causal_ok``; rows written before 2026-11-24
        used the older check: >= 0.3 of R^2 lost with the sink's whole layer-1 value zeroed)."""
        if not self.n or "tag_causal" not in self.rows:  # rows written before the causal check existed
            return 0
        return int((self.rows["success"] & self.rows["tag_causal"].fillna(False).astype(bool)).sum())


def train_seeds(
    model_cfg: ToyConfig,
    train_cfg: TrainConfig,
    task: TaskConfig,
    seeds: int | list[int] = 10,
    out: str | Path | None = None,
    workers: int | None = None,
    label: str = "",
    progress: bool = True,
) -> SeedResults:
    """Train several seeds in parallel processes; with ``out``, append one JSONL row per finished seed to
    ``out/seeds.jsonl`` and skip seeds already there (rerunning resumes, never duplicates)."""
    if model_cfg.variant != task.variant:
        raise ValueError(f"model variant {model_cfg.variant!r} differs from task variant {task.variant!r}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if isinstance(seeds, int) and seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    rid = run_id(model_cfg, train_cfg, task)
    settings = {"model": asdict(model_cfg), "train": asdict(train_cfg), "task": asdict(task), "label": label}
    path = Path(out) / "seeds.jsonl" if out else None
    done = {}
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        for r in read_rows(path):
            if r.get("run_id") == rid:
                done.setdefault(r["seed"], r)
    todo = [s for s in seed_list if s not in done]
    if path:  # settings first, so that an interrupted cell can still be read back
        (Path(out) / "runs").mkdir(exist_ok=True)
        (Path(out) / "runs" / f"{rid}.json").write_text(json.dumps(settings, indent=1, default=list))
    model_dir = str(Path(out) / "models" / rid) if out else None
    new = []
    if todo:
        workers = workers or max(1, min(len(todo), os.cpu_count() or 1))
        jobs = [(model_cfg, train_cfg, task, s, model_dir) for s in todo]
        from catchtag.progress import progress_bar

        bar = progress_bar(total=len(todo), desc=label or rid, leave=False, disable=not progress)
        if workers == 1:
            results = (_train_one(j) for j in jobs)
            it = results
        else:
            ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
            it = (f.result() for f in as_completed([ex.submit(_train_one, j) for j in jobs]))
        try:
            for row in it:
                row = {"run_id": rid, "label": label, **row}
                if path:
                    with path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                new.append(row)
                bar.update(1)
        finally:
            bar.close()
            if workers != 1:
                ex.shutdown(cancel_futures=True)
    rows = [done[s] for s in seed_list if s in done] + new
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values("seed").reset_index(drop=True)
    return SeedResults(run_id=rid, rows=df, settings=settings)


def load_trained(out: str | Path, res: SeedResults, seed: int) -> ToyAttentionModel:
    m = ToyAttentionModel(ToyConfig(**res.settings["model"]))
    m.load_state_dict(torch.load(Path(out) / "models" / res.run_id / f"seed{seed}.pt"))
    return m


def summarize(res: SeedResults, **extra) -> dict:
    df = res.rows
    return {
        **extra,
        "seeds": res.n,
        "success": res.successes,
        "verified": res.verified,
        "tag_verified": res.tag_verified,
        "rate": f"{res.successes}/{res.n}",
        "median_r2": float(df["r2"].median()) if res.n else float("nan"),
        "mean_sink_mass_success": float(df.loc[df.success, "sink_mass"].mean()) if res.successes else float("nan"),
        "sec_per_seed": float(df["seconds"].mean()) if res.n else float("nan"),
        "run_id": res.run_id,
    }


def success_table(
    init_tags=(1.0, 6.0, 10.0),
    seeds: int = 10,
    recipe: str = "paper",
    length: int = 16,
    two_sink_heads=(2, 1),
    out: str | Path | None = None,
    workers: int | None = None,
    steps: int | None = None,
    init_tag_two_sink: float = 10.0,
    progress: bool = True,
) -> pd.DataFrame:
    """The two published comparisons: single variant over initial tag values, two-sink over heads per layer."""
    rows = []
    for tag in init_tags:
        res = train_seeds(
            ToyConfig("single", init_tag=tag, **recipe_model_options(recipe)), make_recipe(recipe, steps=steps),
            TaskConfig("single", length), seeds, out, workers, label=f"single tag={tag:g} {recipe}", progress=progress,
        )
        rows.append(summarize(res, variant="single", heads=1, init_tag=tag, recipe=recipe))
    for h in two_sink_heads:
        res = train_seeds(
            ToyConfig("two-sink", n_heads=h, init_tag=init_tag_two_sink, **recipe_model_options(recipe)),
            make_recipe(recipe, steps=steps),
            TaskConfig("two-sink", length), seeds, out, workers,
            label=f"two-sink heads={h} {recipe}", progress=progress,
        )
        rows.append(summarize(res, variant="two-sink", heads=h, init_tag=init_tag_two_sink, recipe=recipe))
    return pd.DataFrame(rows)
