"""catchtag's attention function, registered through transformers' AttentionInterface.

One function serves every architecture that dispatches attention through the interface. Outside a
``capture`` it is plain SDPA (logits unchanged, same speed); inside one it computes the same attention
output plus the per-head catch/tag statistics of ``engine.stats`` and hands them to the capture.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from catchtag.engine.arch import head_output_projection, is_gated, output_projection
from catchtag.engine.decode import active_tracker
from catchtag.engine.positions import first_real, last_real
from catchtag.engine.request import ActivationRequest, SinkSettings
from catchtag.engine.stats import HeadStats
from catchtag.errors import CatchtagError

ATTN_NAME = "catchtag"


@dataclass
class LayerRecord:
    """What one layer hands back for one forward pass (on the model's device during it, on the CPU after)."""

    stats: HeadStats
    heads: list[int] = field(default_factory=list)  # heads of the per-token activations below
    positions: torch.Tensor | None = None  # (B,P) absolute positions of the activations (-1: none)
    activations: dict[str, torch.Tensor] = field(default_factory=dict)  # z*, result* -> (B, nh, P, dim)
    attention_maps: dict[int, torch.Tensor] = field(default_factory=dict)  # head -> (B,T,T)


class SinkCapExceeded(Exception):
    """A head had more candidate sinks than the pass's column cap: run the forward again with ``needed``."""

    def __init__(self, needed: int):
        super().__init__(f"a head has {needed} candidate sinks, more than the sink pass's cap")
        self.needed = needed


class Capture:
    """Collects LayerRecords during one forward pass of a model (see ``capture``).

    While the pass runs, records stay on the model's device and nothing waits for the GPU: the sink pass takes
    ``sink_cap`` columns per head (None: it counts them, one host synchronisation per layer), the triton
    backend's K x K moments wait in ``pending``, and ``finish`` completes them for all layers at once, checks the
    cap and moves every record to the CPU in one go."""

    def __init__(self, settings: SinkSettings, request: ActivationRequest | None = None, backend: str = "auto",
                 sink_cap: int | None = None, k_hint: int | None = None, edit=None, differentiable: bool = False,
                 stats_layers=None):
        self.settings = settings
        # the layers whose statistics the pass needs (None: all); the others run the model's plain attention
        self.stats_layers = None if stats_layers is None else frozenset(int(x) for x in stats_layers)
        self.called: list[int] = []  # the layer index of every attention call, in order
        self.differentiable = differentiable  # outputs from differentiable attention (attribution's gradients)
        self.edit = edit  # edit(layer, out (B,H,T,D), tag, stats) -> out: the hook interventions use
        self.k_hint = k_hint  # most candidates of any head in the last pass (finish's guess; None: the cap)
        self.request = request
        self.backend = backend
        self.sink_cap = sink_cap
        self.layers: dict[int, LayerRecord] = {}
        self.pending: list = []  # (HeadStats, SinkMoments) of the triton backend, finished in finish()
        self.mask_structures: dict = {}  # mask tensor -> backends.mask_structure, read once per pass
        self.mask_infos: dict = {}  # mask (and min_rows) -> backends.MaskInfo, made once per pass
        self.writes: dict = {}  # id(attention module) -> what its output projection's pre-hook records and edits
        self.write_checks: list = []  # (layer, class, device bool): a module not known to gate changed its output
        self.backends_used: set[str] = set()
        self._order: dict[int, int] = {}

    def layer_index(self, module) -> int:
        idx = getattr(module, "layer_idx", None)
        if idx is None:  # modules without layer_idx: number them in call order
            idx = self._order.setdefault(id(module), len(self._order))
        return int(idx)

    def finish(self) -> None:
        """Finish the deferred statistics, check the sink cap (SinkCapExceeded) and move the records to the CPU.

        Nothing waits for the GPU before every step is queued: the moments are finished for ``k_hint`` candidates
        (the last pass's count; the cap when there is none), the candidate counts travel to the host with the
        records, and the one wait comes last. Only when a head had more candidates than the hint are the moments
        finished again, with the count."""
        from catchtag.engine.moments import finish_moments

        self._check_unreached_writes()
        checks = [c for _, _, c in self.write_checks]
        counts = [m.n_candidates for _, m in self.pending if m.n_candidates is not None]
        guess = None
        if counts and self.sink_cap is not None:
            guess = min(self.sink_cap, self.k_hint or self.sink_cap)
            by_device: dict = {}  # under a device map the layers' counts live on several GPUs
            for c in counts:
                by_device.setdefault(c.device, []).append(c)
            counts = [torch.stack(cs).amax() for cs in by_device.values()]
        if self.pending:
            finish_moments(self.pending, self.settings, k_used=guess)
        on_device = self.layers
        if self.layers:  # on the CPU too, so the tests go through the same reassembly
            self.layers, got = _records_to_cpu(on_device, counts + checks)  # the one wait for the GPU
            counts, checks = got[:len(counts)], got[len(counts):]
        self._check_changed_writes(checks)
        if guess is not None:
            needed = max(int(c) for c in counts)
            if needed > self.sink_cap:
                raise SinkCapExceeded(needed)
            if needed > guess:  # rare: more candidates than the last pass; finish again with all of them
                finish_moments(self.pending, self.settings, k_used=needed)
                self.layers, _ = _records_to_cpu(on_device)
            self.k_hint = needed
        self.pending = []
        self.mask_structures, self.mask_infos = {}, {}

    def _check_unreached_writes(self) -> None:
        """Every head write the pass recorded or edited reached its output projection."""
        if self.writes:
            layers = sorted(w[0] for w in self.writes.values())
            self.writes = {}
            raise CatchtagError(f"the attention output of layer(s) {layers} never reached an output projection "
                                f"catchtag knows, so their activations or edits would be wrong. Fix: see "
                                f"docs/models.md for the architectures that work")

    def _check_changed_writes(self, changed) -> None:
        """A module not known to gate (engine.arch.GATED) handed its attention output to the output projection
        unchanged (``changed``: the write checks, on the CPU, read with the records' one wait)."""
        bad = [(layer, cls) for (layer, cls, _), c in zip(self.write_checks, changed) if bool(c)]
        self.write_checks = []
        if bad:
            raise CatchtagError(f"{bad[0][1]} changes the attention output of layer {bad[0][0]} before its output "
                                f"projection (a gate or norm catchtag does not know), so the head's write into the "
                                f"residual stream would be wrong. Fix: see docs/models.md for the architectures "
                                f"that work")


_ACTIVE: contextvars.ContextVar[Capture | None] = contextvars.ContextVar("catchtag_capture", default=None)


@contextmanager
def capture(settings: SinkSettings, request: ActivationRequest | None = None, backend: str = "auto",
            sink_cap: int | None = None, k_hint: int | None = None, edit=None, differentiable: bool = False,
            stats_layers=None):
    """Within this block, forward passes of an enabled model record statistics into the yielded Capture.

    sink_cap: see Capture; with a cap, leaving the block raises SinkCapExceeded when a head had more candidate
    sinks than the cap (``captured_forward`` runs the pass again with a larger one). edit: a callable
    (layer, out, tag, stats) -> out that changes head outputs in the pass (catchtag.interventions).
    stats_layers: the layers that need statistics (None: all); the others run the model's own attention, at its
    speed, and record nothing (an intervention's control needs the edited layers only)."""
    cap = Capture(settings, request, backend, sink_cap, k_hint, edit, differentiable, stats_layers)
    token = _ACTIVE.set(cap)
    try:
        yield cap
    finally:
        _ACTIVE.reset(token)
    cap.finish()


DEFAULT_SINK_CAP = 16  # columns per head the sink pass takes without counting (the kernel pads to 16 anyway)


def captured_forward(forward, settings: SinkSettings, request: ActivationRequest | None = None,
                     backend: str = "auto", sink_cap: int | None = DEFAULT_SINK_CAP, meanwhile=None,
                     k_hint: int | None = None):
    """(Capture, forward()'s result) of one forward pass inside ``capture``, with no host synchronisation per layer:
    if a head had more candidate sinks than ``sink_cap``, the pass runs again with a cap that holds them (beyond
    the kernel's limit, with the counting pass). The Capture's sink_cap is the one to start from next time.
    meanwhile: called once, after forward() has queued its GPU work and before the statistics are collected, so
    host work (the previous batch's tables) overlaps the pass. k_hint: the last pass's Capture.k_hint (the most
    candidates of any head), so finish queues the right amount of work before it waits."""
    from catchtag.engine.moments import MAX_SINKS

    while True:
        try:
            with capture(settings, request, backend, sink_cap, k_hint) as cap:
                result = forward()
                if meanwhile is not None:
                    meanwhile, work = None, meanwhile
                    work()
            return cap, result
        except SinkCapExceeded as exc:
            k_hint = exc.needed
            sink_cap = 1 << (exc.needed - 1).bit_length()
            if sink_cap > MAX_SINKS:
                sink_cap = None


def request_positions(request: ActivationRequest, token_valid: torch.Tensor) -> torch.Tensor:
    """Absolute positions (B,P) the request names for each prompt (-1 where a prompt has none)."""
    B, T = token_valid.shape
    dev = token_valid.device
    if request.positions == "last":
        last = last_real(token_valid)
        return last[:, None]
    if request.positions == "all":
        first = first_real(token_valid)
        length = token_valid.sum(dim=-1)
        pos = first[:, None] + torch.arange(T, device=dev)[None, :]
        return torch.where(torch.arange(T, device=dev)[None, :] < length[:, None], pos, torch.full_like(pos, -1))
    wanted = torch.as_tensor(list(request.positions), device=dev, dtype=torch.long)
    first = first_real(token_valid)
    length = token_valid.sum(dim=-1)
    pos = first[:, None] + wanted[None, :]
    return torch.where((wanted[None, :] >= 0) & (wanted[None, :] < length[:, None]), pos, torch.full_like(pos, -1))


def _gather_tokens(x: torch.Tensor, heads: list[int], pos: torch.Tensor) -> torch.Tensor:
    """x (B,H,T,D) -> (B,nh,P,D) at positions pos (B,P); -1 positions give zeros."""
    sub = x[:, heads]
    idx = pos.clamp_min(0)[:, None, :, None].expand(sub.shape[0], sub.shape[1], pos.shape[1], sub.shape[-1])
    got = sub.gather(2, idx)
    return got * (pos >= 0)[:, None, :, None]


# Keyword arguments a model may pass to its attention function that change nothing catchtag computes (the mask
# already carries the sliding window; the others are bookkeeping). Any other argument with a value makes the layer
# refuse (``_check_kwargs``): catchtag never returns statistics of an attention it did not compute exactly.
_INERT_KWARGS = frozenset({"position_ids", "use_cache", "output_router_logits", "output_attentions", "logits_to_keep",
                           "sliding_window", "cache_position", "output_hidden_states", "is_causal", "layer_idx",
                           "token_type_ids", "return_dict"})
_TAKEN_KWARGS = frozenset({"s_aux", "sinks"})  # learned sink logits


def _check_kwargs(module, kwargs) -> None:
    for name, value in kwargs.items():
        if value is None or name in _INERT_KWARGS or name in _TAKEN_KWARGS:
            continue
        if name == "indices":  # DeepSeek sparse attention, when it does not fold its selection into an eager mask
            raise CatchtagError(f"{type(module).__name__} selects the keys each query attends to with an indexer "
                                f"(sparse attention) that reads the mask format of eager and SDPA attention only; "
                                f"under catchtag it would select other keys. Fix: see docs/models.md")
        if name == "dropout" and (not value or not module.training):
            continue
        raise CatchtagError(f"{type(module).__name__} passes {name}= to its attention function, which catchtag does "
                            f"not take into account; refusing rather than returning statistics that differ from the "
                            f"model's own attention. Fix: see docs/models.md for the architectures that work")
    if kwargs.get("is_causal") is False or (kwargs.get("is_causal") is None and getattr(module, "is_causal", True)
                                            is False):
        raise CatchtagError(f"{type(module).__name__} attends in both directions (an encoder): catch, tag and release "
                            f"are defined for causal attention. Fix: use a decoder model (docs/models.md)")


def sink_logits(kwargs, query) -> torch.Tensor | None:
    """The learned sink logits a model passes (gpt-oss and relatives: ``s_aux``, one per head; per row: ``sinks``),
    as a float32 tensor broadcastable to (B,H,T), or None. The softmax runs over the real columns plus one virtual
    column with this logit and no value (docs/method.md: catch without a tag)."""
    s = kwargs.get("s_aux")
    if s is None:
        s = kwargs.get("sinks")
    if s is None:
        return None
    B, H, T, _ = query.shape
    s = s.float()
    if s.dim() == 1:  # (H,)
        return s.reshape(1, H, 1)
    return s.reshape(s.shape[0], H, -1)[..., :T] if s.numel() != H else s.reshape(1, H, 1)


def catchtag_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """The registered attention function (same contract as transformers' sdpa/eager functions)."""
    cap = _ACTIVE.get()
    _check_kwargs(module, dict(kwargs, dropout=dropout))
    sinks = sink_logits(kwargs, query)
    tracker = active_tracker()
    if tracker is not None and cap is None:  # generation with a KV cache (engine.decode)
        out = tracker.attend(module, query, key, value, attention_mask,
                             query.shape[-1] ** -0.5 if scaling is None else scaling, softcap, sinks)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None
    plain_kwargs = {k: v for k, v in kwargs.items() if k not in _TAKEN_KWARGS}
    if cap is None and softcap is None and sinks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **plain_kwargs)
    if query.shape[2] != key.shape[2]:
        if cap is None:
            out = _plain_attention(module, query, key, value, attention_mask, dropout, scaling, softcap, sinks,
                                   **plain_kwargs)
            return out.transpose(1, 2).contiguous(), None
        raise CatchtagError(f"{type(module).__name__} attends from {query.shape[2]} queries to {key.shape[2]} keys: "
                            f"catchtag analyses a whole prompt in one forward pass with every token as both (no KV "
                            f"cache, no compressed or extra memory). Fix: run the model with use_cache=False, or see "
                            f"docs/models.md for the architectures that work")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    settings = cap.settings if cap is not None else SinkSettings()
    request = cap.request if cap is not None else None
    layer = cap.layer_index(module) if cap is not None else -1
    if cap is not None:
        cap.called.append(layer)
        if cap.stats_layers is not None and layer not in cap.stats_layers:
            out = _plain_attention(module, query, key, value, attention_mask, dropout, scaling, softcap, sinks,
                                   **plain_kwargs)
            return out.transpose(1, 2).contiguous(), None
    keep_maps = [h for (lay, h) in (request.attention_maps if request else ()) if lay == layer]

    from catchtag.engine.backends import layer_statistics  # picks the fastest path for this device

    wants_sink_attention = request is not None and request.sink_attention
    grad_out = None
    if cap is not None and cap.differentiable:
        # a first-order attribution needs d(loss)/d(out) through every later layer: the output comes from PyTorch's
        # differentiable attention, the statistics (sinks, tags) from the engine on detached inputs
        grad_out = _plain_attention(module, query, key, value, attention_mask, dropout, scaling, softcap, sinks,
                                    **plain_kwargs)
        query, key, value = query.detach(), key.detach(), value.detach()
    with torch.no_grad() if grad_out is not None else contextlib.nullcontext():
        out, tag, stats, maps = layer_statistics(query, key, value, attention_mask, scaling, softcap, settings,
                                                 keep_maps=keep_maps, backend=cap.backend if cap else "torch",
                                                 sink_attention=wants_sink_attention, capture=cap, sinks=sinks)
    if cap is not None:
        if not wants_sink_attention:
            stats.sink_attn = None  # O(T*K) per head, kept only when asked for
        record = LayerRecord(stats=stats, attention_maps=maps)  # on the device until Capture.finish
        if grad_out is not None:
            out = grad_out
        cap.layers[layer] = record
        wants = request is not None and request.wants_layer(layer)
        if wants or cap.edit is not None:
            # the head's write into the residual stream (result, and the edits) is taken at the output projection's
            # input, where a gate or norm the model applies after attention (Qwen3-Next, Qwen3.5, ...) has acted
            writes = _watch_write(module, cap)
            if writes is None:  # no output projection known: head space only, edits here
                if wants:
                    _record_activations(record, module, request, stats, out, tag, None, layer)
                if cap.edit is not None:
                    out = cap.edit(layer, out, tag, stats)
            else:
                writes[id(module)] = (layer, out, tag, stats, wants)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _record_activations(record, module, request, stats, out, tag, gate, layer) -> None:
    """The requested per-token activations of one layer: z, z_tag, z_nontag (head space, before any gate) and
    result, result_tag, result_nontag (the head's write into the residual stream, through the gate when the model
    has one: W_O (g * o))."""
    H = out.shape[1]
    pos = request_positions(request, stats.token_valid)
    heads = list(request.heads) if request.heads is not None else list(range(H))
    z = _gather_tokens(out, heads, pos).float()  # the triton backend keeps out in the model dtype
    z_tag = _gather_tokens(tag, heads, pos).float()
    acts = {}  # TransformerLens's names: z (head space), result (the head's write into the residual stream)
    if request.space in ("head", "both"):
        acts.update(z=z, z_tag=z_tag, z_nontag=z - z_tag)
    if request.space in ("residual", "both"):
        w = head_output_projection(module, H, out.shape[-1])[heads].float()  # (nh, D, hidden)
        g = _gather_tokens(gate, heads, pos).float() if gate is not None else 1.0
        result = torch.einsum("bhpd,hdk->bhpk", z * g, w)
        result_tag = torch.einsum("bhpd,hdk->bhpk", z_tag * g, w)
        acts.update(result=result, result_tag=result_tag, result_nontag=result - result_tag)
    record.heads, record.positions = heads, pos
    record.activations = acts


def _watch_write(module, cap) -> dict | None:
    """The capture's pending writes, with a pre-hook on ``module``'s output projection installed once (None when the
    module has no output projection catchtag knows)."""
    hooked = getattr(module, "_catchtag_write_hook", None)
    if hooked is None:
        proj = output_projection(module)
        if proj is None:
            module._catchtag_write_hook = False
            return None
        proj.register_forward_pre_hook(functools.partial(_write_hook, module))
        module._catchtag_write_hook = hooked = True
    return cap.writes if hooked else None


def _write_hook(module, proj, args):
    """At the output projection's input x (B,T,H*Dv): x = g * o for a gated head (g = 1 without a gate, where x is o
    itself). Records the activations of the head's write and applies the capture's edit to x, with the tag through
    the same gate; a module not known to gate (engine.arch.GATED) must hand o over unchanged."""
    cap = _ACTIVE.get()
    if cap is None or id(module) not in cap.writes:
        return None
    layer, out, tag, stats, wants = cap.writes.pop(id(module))
    x = args[0]
    B, T = x.shape[:2]
    H, Dv = out.shape[1], out.shape[-1]
    if x.shape[-1] != H * Dv:
        raise CatchtagError(f"{type(module).__name__}: the output projection's input has {x.shape[-1]} features, not "
                            f"{H} heads x {Dv}; catchtag cannot split it into heads")
    xh = x.reshape(B, T, H, Dv).transpose(1, 2)  # (B,H,T,Dv)
    gate = None
    if is_gated(module):
        o = out.to(x.dtype)
        gate = torch.where(o != 0, xh / torch.where(o != 0, o, torch.ones((), dtype=o.dtype, device=o.device)),
                           torch.zeros((), dtype=o.dtype, device=o.device))
    else:
        cap.write_checks.append((layer, type(module).__name__, (xh != out.to(x.dtype)).any()))
    if wants:
        _record_activations(cap.layers[layer], module, cap.request, stats, out, tag, gate, layer)
    if cap.edit is None:
        return None
    gated_tag = tag if gate is None else tag.to(gate.dtype) * gate
    edited = cap.edit(layer, xh.clone(), gated_tag, stats)
    return (edited.transpose(1, 2).reshape(x.shape).to(x.dtype), *args[1:])


def _plain_attention(module, query, key, value, mask, dropout, scaling, softcap, sinks=None, **kwargs) -> torch.Tensor:
    """The attention output (B,H,T,D) as the model computes it: transformers' SDPA where it serves (no softcap, no
    learned sinks), else the plain softmax with both (engine.stats.softmax_attention): differentiable, and as fast as
    the model without catchtag where SDPA serves."""
    if softcap is None and sinks is None:
        out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
        return out.transpose(1, 2)
    from catchtag.engine.stats import softmax_attention

    return softmax_attention(query, key, value, mask, scaling, softcap, sinks)


def _records_to_cpu(layers: dict[int, LayerRecord], extra: list[torch.Tensor] = ()):
    """Every record's tensors on the CPU, with few copies: each statistic is stacked over the layers (one copy per
    field, not per layer and field); the copies are queued and waited for once. ``extra`` tensors travel with
    them. Returns (records, extra on the CPU)."""
    order = sorted(layers)
    fields = list(vars(layers[order[0]].stats))
    stats = {layer: {} for layer in order}
    seen: dict[int, torch.Tensor] = {}  # tensors shared by layers (token_valid, row counts) copied once

    gpus: set = set()  # every GPU a copy was queued on (several under a device map)

    def host(x):
        if x is None or x.device.type == "cpu":
            return x
        if id(x) not in seen:
            if x.is_cuda:
                gpus.add(x.device)
            seen[id(x)] = x.to("cpu", non_blocking=True)
        return seen[id(x)]

    for name in fields:
        got = [getattr(layers[layer].stats, name) for layer in order]
        shared = all(x is got[0] for x in got)
        stackable = (not shared and all(x is not None for x in got) and len(got) > 1
                     and len({(x.shape, x.dtype, x.device) for x in got}) == 1)
        if stackable:
            for layer, x in zip(order, host(torch.stack(got)).unbind(0)):
                stats[layer][name] = x
        else:
            for layer, x in zip(order, got):
                stats[layer][name] = host(x)
    out = {layer: LayerRecord(stats=HeadStats(**stats[layer]), heads=layers[layer].heads,
                              positions=host(layers[layer].positions),
                              activations={k: host(v) for k, v in layers[layer].activations.items()},
                              attention_maps={h: host(m) for h, m in layers[layer].attention_maps.items()})
           for layer in order}
    extra = [host(x) for x in extra]
    for gpu in gpus:
        torch.cuda.synchronize(gpu)  # the copies above were queued without waiting
    return out, extra


def catchtag_mask(*args, **kwargs):
    """Boolean (B,1,T,T) masks as for SDPA (None for plain causal): padding, causal and sliding windows."""
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register the attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, catchtag_attention)
    AttentionMaskInterface.register(ATTN_NAME, catchtag_mask)


def enable(model, verified_only: bool = True) -> None:
    """Switch a loaded model to catchtag's attention function, or say in one line why it cannot be.

    Every causal-LM model type of the installed transformers has a status in catchtag's coverage matrix
    (docs/models.md): those that reach parity with the model's own eager attention are switched; the others are
    refused with the reason. A model type the matrix does not know (a newer transformers, remote code) is switched
    only after a quick check of its logits against its own eager attention (``self_check``).
    verified_only=False skips the matrix (the coverage check itself uses it to test every type)."""
    from catchtag.engine.arch import model_type_status

    register()
    model = unwrap(model)
    if verified_only:
        status = model_type_status(model)
        if status is not None and status["status"] != "parity":
            raise CatchtagError(f"{model.config.model_type} ({type(model).__name__}) is not supported: "
                                f"{status['reason']}. Fix: see docs/models.md for the model types that work")
        if status is None:
            self_check(model)
    model.set_attn_implementation(ATTN_NAME)


def unwrap(model):
    """The transformers model inside a wrapper (a PEFT model's get_base_model()), else the model itself."""
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def is_enabled(model) -> bool:
    """Whether ``model`` runs catchtag's attention function."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == ATTN_NAME


def self_check(model, tokens: int = 24) -> None:
    """For a model type the coverage matrix does not know: its logits on a few random tokens with catchtag's
    attention (inside a capture) against its own eager attention, and at least one layer captured; refuses in one
    line when they differ."""
    config = model.config
    previous = config._attn_implementation
    device = model.get_input_embeddings().weight.device
    vocab = int(getattr(config.get_text_config(), "vocab_size", 0) or 100)
    ids = torch.randint(0, max(2, vocab), (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.no_grad():
            model.set_attn_implementation("eager")
            want = model(input_ids=ids, use_cache=False).logits.float()
            model.set_attn_implementation(ATTN_NAME)
            with capture(SinkSettings(min_rows=1)) as cap:
                got = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        model.set_attn_implementation(previous)
    name = f"{config.model_type} ({type(model).__name__})"
    if not cap.layers:
        raise CatchtagError(f"{name} computes attention in its own code, not through transformers' "
                            f"AttentionInterface, so catchtag cannot see it. Fix: see docs/models.md")
    dtype = next(model.parameters()).dtype
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    diff = float((got - want).abs().max() / want.abs().max().clamp_min(1e-9))
    if not diff <= tol:
        raise CatchtagError(f"{name} is not in catchtag's coverage matrix and its logits with catchtag differ from "
                            f"its own eager attention by {diff:.1e} (relative), so catchtag refuses it. Fix: see "
                            f"docs/models.md for the model types that work")
