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

import contextlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from catchtag.errors import CatchtagError
from catchtag.interventions.edits import HeadEdit, Intervention, first_sink, random_unit, tag_mean
from catchtag.interventions.modes import MODES, check_mode


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
def patched_forward(module, forward):
    """``module`` runs ``forward`` instead of its own within this block. A forward set on the instance before (the
    device hook accelerate adds under a device map) comes back afterwards."""
    before = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if before is None:
            del module.forward
        else:
            module.forward = before


@contextmanager
def replay_below(model, outputs: list, first: int):
    """Decoder layers below ``first`` return what they returned in the baseline pass instead of computing: an edit
    at layer ``first`` cannot change them, so an intervened pass costs only the layers from ``first`` on."""
    layers = decoder_layers(model)
    with contextlib.ExitStack() as stack:
        for i in range(first):
            stack.enter_context(patched_forward(layers[i], lambda *a, _out=outputs[i], **k: _out))
        yield


NLL_CHUNK_BYTES = 256 << 20  # logits computed at once: one buffer, reused, instead of the whole (B, T, vocab)


def _predicts(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions whose next token is real (they make a prediction that counts)."""
    valid = mask.bool()
    predicts = valid & torch.roll(valid, -1, dims=1)
    predicts[:, -1] = False
    return predicts


def _final_softcap(config) -> float | None:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "final_logit_softcapping", None) or None


def head_nll(head: torch.nn.Linear, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
             softcap: float | None = None, grad: bool = False):
    """Next-token NLL from the LM head's input ``hidden`` (B, T, d), in chunks of rows into one reused float32
    buffer: a float32 cross-entropy without the (B, T, vocab) logits and their gradient (400 MB each for 8 x 256
    tokens of a 49k vocabulary; allocating them anew every pass cost more than the log-softmax on the CPU).
    softcap: the model's final logit softcapping. Returns (nll (B, T) float64, nan where no prediction; with
    ``grad``, d(sum of the NLL over the predictions)/d(hidden), else None)."""
    W = head.weight.detach()
    bias = head.bias.detach() if head.bias is not None else None
    B, T, d = hidden.shape
    x = hidden.detach().reshape(B * T, d)
    target = torch.roll(ids, -1, dims=1).reshape(-1).to(x.device)
    predicts = _predicts(mask).reshape(-1).to(x.device)
    N, V = B * T, W.shape[0]
    rows = max(1, min(N, NLL_CHUNK_BYTES // (4 * V)))
    buf = torch.empty(rows, V, device=x.device, dtype=torch.float32)
    dcap = torch.empty_like(buf) if grad and softcap else None
    nll = torch.empty(N, device=x.device, dtype=torch.float32)
    g = torch.empty_like(x) if grad else None
    fast = x.dtype == torch.float32 and W.dtype == torch.float32
    for s in range(0, N, rows):
        e = min(s + rows, N)
        z, tgt = buf[:e - s], target[s:e]
        if fast:
            torch.matmul(x[s:e], W.t(), out=z)
        else:
            z.copy_(x[s:e] @ W.t())
        if bias is not None:
            z.add_(bias.float())
        if softcap:
            z.div_(softcap).tanh_()
            if dcap is not None:  # d(softcap * tanh(u / softcap))/du = 1 - tanh^2
                torch.mul(z, z, out=dcap[:e - s]).neg_().add_(1.0)
            z.mul_(softcap)
        picked = z.gather(1, tgt[:, None])[:, 0]
        top = z.amax(dim=1)
        z.sub_(top[:, None]).exp_()
        total = z.sum(dim=1)
        nll[s:e] = top + total.log() - picked
        if grad:  # d nll / d logits = softmax - one-hot, at the predictions only
            z.div_(total[:, None])
            z.scatter_add_(1, tgt[:, None], torch.full((e - s, 1), -1.0, device=z.device))
            if dcap is not None:
                z.mul_(dcap[:e - s])
            z.mul_(predicts[s:e, None])
            if fast:
                torch.matmul(z, W, out=g[s:e])
            else:
                g[s:e] = (z.to(W.dtype) @ W).to(g.dtype)
    out = torch.where(predicts, nll.double(), torch.full_like(nll, float("nan"), dtype=torch.float64))
    return out.reshape(B, T).cpu(), (g.reshape(B, T, d) if grad else None)


def forward_nll(model, ids, mask, grad: bool = False) -> torch.Tensor:
    """(B, T) next-token NLL (float64, nan where no prediction) of one forward pass of ``model``; with ``grad``,
    the gradient of their sum flows back into the pass's graph. The LM head runs on the last position only inside
    the model and in chunks here (head_nll); the model's own logits there check that nothing after the head was
    missed (a softcap is handled; anything else makes the pass run again the plain way)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return _plain_forward_nll(model, ids, mask, grad)
    kept: list = []
    own = head.forward
    with patched_forward(head, lambda x, *a, **k: (kept.append(x), own(x[:, -1:], *a, **k))[1]):
        last = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    hidden, softcap = kept[-1], _final_softcap(model.config)
    with torch.no_grad():
        mine = own(hidden[:, -1:].detach()).float()
        if softcap:
            mine = torch.tanh(mine / softcap) * softcap
        theirs = last.detach().float()
        rel = 1e-4 if hidden.dtype in (torch.float32, torch.float64) else 2e-2  # half precision rounds the head
        tol = rel * float(theirs.abs().amax()) + 1e-6
        same = mine.shape == theirs.shape and float((mine - theirs).abs().amax()) <= tol
    if not same:
        return _plain_forward_nll(model, ids, mask, grad)
    nll, g = head_nll(head, hidden, ids, mask, softcap, grad)
    if grad:
        hidden.backward(g)
    return nll


def _nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) next-token NLL at each predicting position (nan elsewhere) from whole logits, float64 out of PyTorch's
    fused float32 cross-entropy."""
    B, T, V = logits.shape
    target = torch.roll(ids, -1, dims=1)
    nll = torch.nn.functional.cross_entropy(logits.reshape(B * T, V).float(), target.reshape(-1),
                                            reduction="none").reshape(B, T).double()
    return torch.where(_predicts(mask), nll, torch.full_like(nll, float("nan")))


def _plain_forward_nll(model, ids, mask, grad: bool) -> torch.Tensor:
    """forward_nll through the model's whole logits (for heads or post-processing head_nll does not know)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    nll = _nll(logits, ids, mask)
    if grad:
        torch.nansum(nll).backward()
    return nll.detach().cpu()


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
        nll = forward_nll(model, ids, mask)
    z = torch.stack([cap.layers[l].activations["z"] for l in range(n_layers)], dim=1)
    return Baseline(nll, _first_sinks(cap, n_layers, ids.shape[1]),
                    _mean_rows(cap, n_layers), z, outputs)


def intervened(model, ids, mask, settings, positions, edit: Intervention, base: Baseline | None = None,
               release: bool = True):
    """(nll (B,T), mean rows (B,L,H,T), z at positions (B,L,H,P,D)) of one batch with ``edit`` applied. With the
    batch's ``base``line, the layers below the first edited one are replayed, not recomputed. release=False (a
    control): only the loss; the layers without an edit run the model's own attention, and rows and z are None."""
    from catchtag.engine.attention import capture
    from catchtag.engine.request import ActivationRequest

    n_layers = model.config.num_hidden_layers
    first = min(edit.by_layer) if base is not None and base.layer_outputs and edit.by_layer else 0
    request = ActivationRequest(positions=positions, space="head") if release else None
    with torch.no_grad(), capture(settings, request, edit=edit,
                                  stats_layers=None if release else set(edit.by_layer)) as cap, \
            replay_below(model, base.layer_outputs if first else [], first):
        nll = forward_nll(model, ids, mask)
    if first and set(cap.called) != set(range(first, n_layers)):  # attention modules numbered by call order
        return intervened(model, ids, mask, settings, positions, edit, release=release)
    if not release:
        return nll, None, None
    if first:  # the replayed layers did not run: below the edit everything is the baseline's
        z = torch.cat([base.z[:, :first], torch.stack([cap.layers[l].activations["z"]
                                                       for l in range(first, n_layers)], dim=1)], dim=1)
        rows = base.mean_row.clone()
        rows[:, first:] = _mean_rows(cap, n_layers, start=first)
    else:
        z = torch.stack([cap.layers[l].activations["z"] for l in range(n_layers)], dim=1)
        rows = _mean_rows(cap, n_layers)
    return nll, rows, z


def loss_change(base_nll, new_nll, s0) -> np.ndarray:
    """(B,) change in mean NLL over the predictions at or after s0 (B,); nan where there are none."""
    keep = _in_range(base_nll, s0)
    n = keep.sum(dim=1)
    d = torch.where(keep, new_nll - base_nll, torch.zeros_like(base_nll)).sum(dim=1)
    return torch.where(n > 0, d / n.clamp_min(1), torch.full_like(d, float("nan"))).numpy()




def edits_for(heads, mode: str, kind: str, dim: int, draw: int = 0, seed: int = 0,
              prompt_ids=None) -> Intervention:
    """The Intervention that ablates ``heads`` (mode: one of MODES) or applies its control (kind 'control'): a random
    direction for each head, draw and prompt (``prompt_ids`` of the batch; None: one for the whole batch), drawn
    from (seed, draw, layer, head, prompt id) so that a resumed run, or another batch size, draws the same ones.
    Over the prompts the mean control change is then an average over as many directions as prompts x draws, and
    its interval over prompts includes the spread between directions."""
    check_mode(mode)
    edits = {}
    for layer, head in heads:
        if kind == "ablation":
            edits[(layer, head)] = HeadEdit(f"{mode}_tag")
        else:
            if prompt_ids is None:
                u = random_unit(dim, [seed, draw, layer, head])
            else:
                u = np.stack([random_unit(dim, [seed, draw, layer, head, int(p)]) for p in prompt_ids])
            edits[(layer, head)] = HeadEdit(f"control_{mode}", u)
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


def tag_split(out: torch.Tensor, tag: torch.Tensor, first: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, H, 2) float64: over each head's tokens in range (i >= its first sink s0), the energy of the tag's constant
    part (its mean over those tokens, the same offset for all) and of its token-dependent part (tag - mean), each
    over the energy of the head output o there (head space, before W_O); nan where the head has no sink. A tag
    that is all constant is a bias: it carries no information about the token."""
    T = out.shape[2]
    w = (valid[:, None, :] & (torch.arange(T, device=out.device)[None, None, :] >= first[..., None]))[..., None]
    w = w.to(torch.float64)
    t = tag.double() * w  # (B, H, T, D)
    mean = tag_mean(t, w)
    total = (out.double() ** 2 * w).sum(dim=(2, 3))
    const = (mean ** 2 * w).sum(dim=(2, 3))
    varying = ((t - mean * w) ** 2).sum(dim=(2, 3))
    shares = torch.stack([const, varying], dim=-1) / total.clamp_min(1e-30)[..., None]
    has = (first < T)[..., None]
    return torch.where(has, shares, torch.full_like(shares, float("nan")))


class Attribution:
    """The first-order estimate for every head in one batch: an engine hook that adds a zero tensor with a gradient
    to each layer's (differentiable) output and keeps the tag, so that after ``loss.backward()``
    ``estimate(mode)`` gives (B, L, H) estimated changes of the mean NLL in range."""

    def __init__(self):
        self.deltas: dict[int, torch.Tensor] = {}
        self.tags: dict[int, torch.Tensor] = {}
        self.first: dict[int, torch.Tensor] = {}
        self.valid: torch.Tensor | None = None
        self.energy: dict[int, torch.Tensor] = {}  # layer -> (B, H, 2): tag_split's shares

    def __call__(self, layer, out, tag, stats):
        delta = torch.zeros_like(out, requires_grad=True)
        self.deltas[layer] = delta
        self.tags[layer] = tag.detach().to(out.dtype)
        self.first[layer] = first_sink(stats, out.shape[2], out.device)
        self.valid = stats.token_valid.to(out.device)
        self.energy[layer] = tag_split(out.detach(), self.tags[layer], self.first[layer], self.valid)
        return out + delta

    def shares(self) -> np.ndarray:
        """(B, L, H, 2): per prompt and head, the constant and the token-dependent part's energy over the head
        output's energy on the tokens in range (nan where the head has no sink)."""
        return torch.stack([self.energy[layer] for layer in sorted(self.energy)], dim=1).cpu().numpy()

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
            if mode in ("mean", "constant"):
                mean = tag_mean(t, after[..., None].to(t.dtype))
                d_o = ((mean - t) if mode == "mean" else -mean) * after[..., None]
            else:
                d_o = -t
            dot = (g.double() * d_o.double()).sum(dim=(-1, -2)).cpu()  # (B, H)
            n_pred = (predicts[:, None, :] & (pos[None, None, :] >= s0.cpu()[..., None])).sum(-1)
            est.append(torch.where(n_pred > 0, dot / n_pred.clamp_min(1), torch.full_like(dot, float("nan"))))
        return torch.stack(est, dim=1).numpy()


def attribution(model, ids, mask, settings, mode: str):
    """(B, L, H) first-order loss changes of ablating each head's tag, the batch's NLL (B, T), the pass's engine
    Capture (sinks, VE) and (B, L, H, 2) the tag's constant and token-dependent energy shares (tag_split): one
    forward and one backward pass."""
    from catchtag.engine.attention import capture

    hook = Attribution()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # gradients for the outputs only: no weight gradients to compute or keep
        p.requires_grad_(False)
    try:
        with torch.enable_grad(), capture(settings, edit=hook, differentiable=True) as cap:
            nll = forward_nll(model, ids, mask, grad=True)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return hook.estimate(mode, nll), nll, cap, hook.shares()


def _device_tensors(model, tokenizer, batch):
    from catchtag.scan import _batch_tensors

    return _batch_tensors(batch, tokenizer, next(model.parameters()).device)


ATTRIBUTION_COLUMNS = ["prompt_id", "layer", "head", "estimate", "n_sinks", "n_sinks_after_first", "ve",
                       "ve_uncentred", "constant_share", "varying_share"]


def attribution_rows(model, tokenizer, batch, settings, mode: str):
    """One batch of prompts' attribution table: per prompt, layer and head the first-order loss change of ablating
    its tag, its sinks (all, and those after the first real token), VE and the tag's constant / token-dependent
    energy shares."""
    import pandas as pd

    ids, mask = _device_tensors(model, tokenizer, batch)
    est, _, cap, shares = attribution(model, ids, mask, settings, mode)
    rows = []
    for b, p in enumerate(batch):
        for l, layer in sorted(cap.layers.items()):
            st = layer.stats
            first_real = int(st.token_valid[b].long().argmax())
            for h in range(st.sink_ok.shape[1]):
                ok = st.sink_ok[b, h]
                rows.append((p.prompt_id, l, h, float(est[b, l, h]), int(ok.sum()),
                             int((ok & (st.sink_idx[b, h] != first_real)).sum()), float(st.ve[b, h]),
                             float(st.ve_uncentred[b, h]), float(shares[b, l, h, 0]), float(shares[b, l, h, 1])))
    return pd.DataFrame(rows, columns=ATTRIBUTION_COLUMNS)


def ablation_rows(model, tokenizer, batch, settings, positions, targets, mode: str, controls: int, seed: int):
    """One batch of prompts' ablation tables: (the loss change of each target's ablation and of its controls, per
    prompt; the release map of each ablation: how much every later head's attention and output move)."""
    import pandas as pd

    n_layers = len(decoder_layers(model))
    ids, mask = _device_tensors(model, tokenizer, batch)
    base = baseline(model, ids, mask, settings, positions)
    dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    prompt_ids = [p.prompt_id for p in batch]
    rows, release = [], []
    for name, group_heads in targets:
        l0 = min(l for l, _ in group_heads)
        s0 = base.first_sink[:, [l for l, _ in group_heads], [h for _, h in group_heads]].amin(dim=1)
        for kind, draw in [("ablation", 0)] + [("control", d) for d in range(controls)]:
            edit = edits_for(group_heads, mode, kind, dim, draw, seed, prompt_ids)
            nll, mean_row, z = intervened(model, ids, mask, settings, positions, edit, base,
                                          release=kind == "ablation")
            delta = loss_change(base.nll, nll, s0)
            rows += [(pid, name, kind, draw, float(delta[b])) for b, pid in enumerate(prompt_ids)]
            if kind == "ablation":
                rel = release_rows(base, mean_row, z, group_heads, n_layers)
                n_heads = rel["attention_tv"].shape[2]
                release += [(pid, name, l, h, float(rel["attention_tv"][b, l, h]), float(rel["output_change"][b, l, h]))
                            for b, pid in enumerate(prompt_ids) for l in range(l0 + 1, n_layers)
                            for h in range(n_heads)]
    return (pd.DataFrame(rows, columns=["prompt_id", "target", "kind", "draw", "delta_nll"]),
            pd.DataFrame(release, columns=["prompt_id", "target", "layer", "head", "attention_tv", "output_change"]))


__all__ = ["MODES", "Attribution", "Baseline", "ablation_rows", "attribution", "attribution_rows", "baseline",
           "edits_for", "forward_nll", "head_nll", "intervened", "loss_change", "patched_forward", "release_rows",
           "sample_positions", "tag_split"]
