"""Release, causally: what removing a head's tag does to the model's next-token loss and to the heads after it.

For a head (l, h) on one prompt, the tokens in range are those at or after the head's first sink s0 (the only ones
whose tag can be nonzero), and the loss is the mean next-token NLL over the predictions made at those tokens (a
token at position i predicts token i + 1). Three measurements, all over the same batches:
- ``attribution``: a first-order estimate for every head at once, from one forward and one backward pass per
  batch: delta loss ~ sum_i grad_{o_i}(loss) . (o'_i - o_i), with o' the ablated output (edits.py), divided by
  the number of predictions in range;
- ``ablate``: the real change, one intervened forward pass per head (or group of heads), with random-direction
  controls of the same per-token energy;
- the release map: for each ablated head, how much every later head (l' > l) changes: its average attention row
  (total variation between the baseline and the ablated pass's mean attention row; a lower bound on the mean TV of
  its rows) and its output (relative change of o at sampled tokens).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from catchtag.errors import CatchtagError
from catchtag.interventions.edits import HeadEdit, Intervention, first_sink, random_unit


@dataclass
class Baseline:
    """One batch's unintervened pass: per-position NLL (B, T) at the predicting position (nan where none), the
    first sink s0 (B, L, H) (T where the head has no sink), each head's mean attention row (B, L, H, T) and its
    outputs at sampled positions (B, L, H, P, D)."""

    nll: torch.Tensor
    first_sink: torch.Tensor
    mean_row: torch.Tensor
    z: torch.Tensor
    layer_outputs: list = field(default_factory=list)  # what each decoder layer returned (replayed below an edit)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's list of decoder layers (the ModuleList as long as the model is deep)."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise CatchtagError(f"cannot find the {n} decoder layers of {type(model).__name__}")


@contextmanager
def _recording(model, outputs: list):
    layers = decoder_layers(model)
    outputs[:] = [None] * len(layers)
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
               for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replay_below(model, outputs: list, first: int):
    """Decoder layers below ``first`` return what they returned in the baseline pass instead of computing: an edit
    at layer ``first`` cannot change them, so an intervened pass costs only the layers from ``first`` on."""
    layers = decoder_layers(model)
    patched = []
    for i in range(first):
        layers[i].forward = (lambda *a, _out=outputs[i], **k: _out)
        patched.append(layers[i])
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward


def _nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) next-token NLL at each predicting position (the last real token and padding: nan), float64 out of
    PyTorch's fused float32 cross-entropy (a float64 log-softmax over a 49k vocabulary costs more than the pass)."""
    B, T, V = logits.shape
    target = torch.roll(ids, -1, dims=1)
    nll = torch.nn.functional.cross_entropy(logits.reshape(B * T, V).float(), target.reshape(-1),
                                            reduction="none").reshape(B, T).double()
    valid = mask.bool()
    predicts = valid & torch.roll(valid, -1, dims=1)
    predicts[:, -1] = False
    return torch.where(predicts, nll, torch.full_like(nll, float("nan")))


def _mean_rows(cap, n_layers: int, start: int = 0) -> torch.Tensor:
    """(B, L, H, T): each head's mean attention row (column score x rows seeing the column / real rows), from the
    engine's column scores; columns seen by fewer than min_rows rows have no score and count as 0."""
    rows = []
    for layer in range(start, n_layers):
        st = cap.layers[layer].stats
        scores = torch.nan_to_num(st.col_scores.double(), nan=0.0)
        rows.append(scores * st.row_counts.double()[:, None, :] / st.token_valid.double().sum(-1)[:, None, None])
    return torch.stack(rows, dim=1)


def _first_sinks(cap, n_layers: int, T: int) -> torch.Tensor:
    return torch.stack([first_sink(cap.layers[layer].stats, T) for layer in range(n_layers)], dim=1)


def _in_range(nll: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: predictions made at tokens i >= s0 (s0 (B,))."""
    pos = torch.arange(nll.shape[1])
    return ~torch.isnan(nll) & (pos[None, :] >= s0[:, None])


def sample_positions(T: int, n: int = 32) -> list[int]:
    return sorted({int(x) for x in np.linspace(0, T - 1, min(n, T))})


def baseline(model, ids, mask, settings, positions) -> Baseline:
    """The unintervened pass of one batch (the engine on, every statistic the measurements need)."""
    from catchtag.engine.attention import capture
    from catchtag.engine.request import ActivationRequest

    n_layers = model.config.num_hidden_layers
    request = ActivationRequest(positions=positions, space="head")
    outputs: list = []
    with torch.no_grad(), capture(settings, request) as cap, _recording(model, outputs):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    z = torch.stack([cap.layers[l].activations["z"] for l in range(n_layers)], dim=1)
    return Baseline(_nll(logits, ids, mask).cpu(), _first_sinks(cap, n_layers, ids.shape[1]),
                    _mean_rows(cap, n_layers), z, outputs)


def intervened(model, ids, mask, settings, positions, edit: Intervention, base: Baseline | None = None):
    """(nll (B,T), mean rows (B,L,H,T), z at positions (B,L,H,P,D)) of one batch with ``edit`` applied. With the
    batch's ``base``line, the layers below the first edited one are replayed, not recomputed."""
    from catchtag.engine.attention import capture
    from catchtag.engine.request import ActivationRequest

    n_layers = model.config.num_hidden_layers
    first = min(edit.by_layer) if base is not None and base.layer_outputs and edit.by_layer else 0
    request = ActivationRequest(positions=positions, space="head")
    with torch.no_grad(), capture(settings, request, edit=edit) as cap, \
            replay_below(model, base.layer_outputs if first else [], first):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    if first and set(cap.layers) != set(range(first, n_layers)):  # attention modules numbered by call order
        return intervened(model, ids, mask, settings, positions, edit)
    if first:  # the replayed layers did not run: below the edit everything is the baseline's
        z = torch.cat([base.z[:, :first], torch.stack([cap.layers[l].activations["z"]
                                                       for l in range(first, n_layers)], dim=1)], dim=1)
        rows = base.mean_row.clone()
        rows[:, first:] = _mean_rows(cap, n_layers, start=first)
    else:
        z = torch.stack([cap.layers[l].activations["z"] for l in range(n_layers)], dim=1)
        rows = _mean_rows(cap, n_layers)
    return _nll(logits, ids, mask).cpu(), rows, z


def loss_change(base_nll, new_nll, s0) -> np.ndarray:
    """(B,) change in mean NLL over the predictions at or after s0 (B,); nan where there are none."""
    keep = _in_range(base_nll, s0)
    n = keep.sum(dim=1)
    d = torch.where(keep, new_nll - base_nll, torch.zeros_like(base_nll)).sum(dim=1)
    return torch.where(n > 0, d / n.clamp_min(1), torch.full_like(d, float("nan"))).numpy()


def edits_for(heads, mode: str, kind: str, dim: int, draw: int = 0, seed: int = 0) -> Intervention:
    """The Intervention that ablates ``heads`` (mode zero or mean) or applies its control (kind 'control', one
    random direction per head and draw)."""
    if mode not in ("zero", "mean"):
        raise CatchtagError(f"--mode must be zero or mean, got {mode!r}")
    edits = {}
    for i, (layer, head) in enumerate(heads):
        if kind == "ablation":
            edits[(layer, head)] = HeadEdit(f"{mode}_tag")
        else:
            edits[(layer, head)] = HeadEdit(f"control_{mode}", random_unit(dim, seed + 1000 * draw + 7919 * i))
    return Intervention(edits)


def release_rows(base: Baseline, mean_row, z, heads, n_layers: int):
    """For an ablation of ``heads`` (the earliest layer l0): per later head (l' > l0, h'), per prompt, the TV
    between its baseline and ablated mean attention rows, and the relative change of its output at the sampled
    positions. Returns a dict of (B, L, H) arrays (nan for layers <= l0)."""
    l0 = min(l for l, _ in heads)
    tv = 0.5 * (mean_row - base.mean_row).abs().sum(dim=-1)  # (B, L, H)
    dz = (z - base.z).norm(dim=-1)  # (B, L, H, P)
    nz = base.z.norm(dim=-1)
    rel = dz.sum(-1) / nz.sum(-1).clamp_min(1e-30)
    later = torch.arange(n_layers)[None, :, None] > l0
    nan = torch.full_like(tv, float("nan"))
    return {"attention_tv": torch.where(later, tv, nan).numpy(),
            "output_change": torch.where(later, rel.double(), nan.double()).numpy()}


class Attribution:
    """The first-order estimate for every head in one batch: an engine hook that adds a zero tensor with a gradient
    to each layer's (differentiable) output and keeps the tag, so that after ``loss.backward()``
    ``estimate(mode)`` gives (B, L, H) estimated changes of the mean NLL in range."""

    def __init__(self):
        self.deltas: dict[int, torch.Tensor] = {}
        self.tags: dict[int, torch.Tensor] = {}
        self.first: dict[int, torch.Tensor] = {}
        self.valid: torch.Tensor | None = None

    def __call__(self, layer, out, tag, stats):
        delta = torch.zeros_like(out, requires_grad=True)
        self.deltas[layer] = delta
        self.tags[layer] = tag.detach().to(out.dtype)
        self.first[layer] = first_sink(stats, out.shape[2], out.device)
        self.valid = stats.token_valid.to(out.device)
        return out + delta

    def estimate(self, mode: str, nll: torch.Tensor) -> np.ndarray:
        """(B, L, H): sum_i grad . (o' - o) over tokens i >= s0, over the number of predictions in range."""
        layers = sorted(self.deltas)
        est = []
        pos = torch.arange(nll.shape[1])
        predicts = ~torch.isnan(nll)
        for layer in layers:
            g = self.deltas[layer].grad  # (B, H, T, D)
            if g is None:
                raise CatchtagError("no gradient reached the attention outputs; is the model in training-free mode?")
            s0 = self.first[layer]  # (B, H)
            after = self.valid[:, None, :] & (torch.arange(g.shape[2], device=g.device)[None, None, :]
                                              >= s0[..., None])
            t = self.tags[layer] * after[..., None]
            if mode == "mean":
                n = after.sum(-1, keepdim=True).clamp_min(1)[..., None]
                d_o = (t.sum(2, keepdim=True) / n - t) * after[..., None]
            else:
                d_o = -t
            dot = (g.double() * d_o.double()).sum(dim=(-1, -2)).cpu()  # (B, H)
            n_pred = (predicts[:, None, :] & (pos[None, None, :] >= s0.cpu()[..., None])).sum(-1)
            est.append(torch.where(n_pred > 0, dot / n_pred.clamp_min(1), torch.full_like(dot, float("nan"))))
        return torch.stack(est, dim=1).numpy()


def attribution(model, ids, mask, settings, mode: str):
    """(B, L, H) first-order loss changes of ablating each head's tag, the batch's NLL (B, T) and the pass's engine
    Capture (sinks, VE): one forward and one backward pass."""
    from catchtag.engine.attention import capture

    hook = Attribution()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # gradients for the outputs only: no weight gradients to compute or keep
        p.requires_grad_(False)
    try:
        with torch.enable_grad(), capture(settings, edit=hook, differentiable=True) as cap:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            nll = _nll(logits, ids, mask)
            torch.nansum(nll).backward()
    finally:
        for p in trainable:
            p.requires_grad_(True)
    nll = nll.detach().cpu()
    return hook.estimate(mode, nll), nll, cap


def interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% interval (normal, over prompts) of per-prompt values, nan ignored."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    half = 1.96 * float(v.std(ddof=1)) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return m, m - half, m + half


__all__ = ["Attribution", "Baseline", "attribution", "baseline", "edits_for", "interval", "intervened",
           "loss_change", "release_rows", "sample_positions"]
