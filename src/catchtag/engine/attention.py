"""catchtag's attention function, registered through transformers' AttentionInterface.

One function serves every architecture that dispatches attention through the interface. Outside a
``capture`` it is plain SDPA (logits unchanged, same speed); inside one it computes the same attention
output plus the per-head catch/tag statistics of ``engine.stats`` and hands them to the capture.
"""

from __future__ import annotations

import contextlib
import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from catchtag.engine.arch import head_output_projection
from catchtag.engine.positions import first_real, last_real
from catchtag.engine.request import ActivationRequest, SinkSettings
from catchtag.engine.stats import HeadStats
from catchtag.errors import CatchtagError

ATTN_NAME = "catchtag"
WORKING_ARCHITECTURES = "llama, mistral, qwen2, qwen3, gemma2/3, phi3, olmo2, gpt2, gpt_neox and other models " \
                        "whose attention goes through transformers' AttentionInterface"


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
            self.layers, counts = _records_to_cpu(on_device, counts)  # the one wait for the GPU
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


def catchtag_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """The registered attention function (same contract as transformers' sdpa/eager functions)."""
    cap = _ACTIVE.get()
    if cap is None and softcap is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[2] != key.shape[2]:
        raise CatchtagError("catchtag analyses whole prompts in one forward pass; generation with a KV cache "
                            "is not supported inside a scan (run the model with use_cache=False)")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    settings = cap.settings if cap is not None else SinkSettings()
    request = cap.request if cap is not None else None
    layer = cap.layer_index(module) if cap is not None else -1
    if cap is not None:
        cap.called.append(layer)
        if cap.stats_layers is not None and layer not in cap.stats_layers:
            out = _plain_attention(module, query, key, value, attention_mask, dropout, scaling, softcap, **kwargs)
            return out.transpose(1, 2).contiguous(), None
    keep_maps = [h for (lay, h) in (request.attention_maps if request else ()) if lay == layer]

    from catchtag.engine.backends import layer_statistics  # picks the fastest path for this device

    wants_sink_attention = request is not None and request.sink_attention
    grad_out = None
    if cap is not None and cap.differentiable:
        # a first-order attribution needs d(loss)/d(out) through every later layer: the output comes from PyTorch's
        # differentiable attention, the statistics (sinks, tags) from the engine on detached inputs
        grad_out = _plain_attention(module, query, key, value, attention_mask, dropout, scaling, softcap, **kwargs)
        query, key, value = query.detach(), key.detach(), value.detach()
    with torch.no_grad() if grad_out is not None else contextlib.nullcontext():
        out, tag, stats, maps = layer_statistics(query, key, value, attention_mask, scaling, softcap, settings,
                                                 keep_maps=keep_maps, backend=cap.backend if cap else "torch",
                                                 sink_attention=wants_sink_attention, capture=cap)
    if cap is not None:
        if not wants_sink_attention:
            stats.sink_attn = None  # O(T*K) per head, kept only when asked for
        record = LayerRecord(stats=stats, attention_maps=maps)  # on the device until Capture.finish
        pos = request_positions(request, stats.token_valid) if request is not None and request.wants_layer(layer) \
            else None
        if request is not None and request.wants_layer(layer):
            H = query.shape[1]
            heads = list(request.heads) if request.heads is not None else list(range(H))
            z = _gather_tokens(out, heads, pos).float()  # the triton backend keeps out in the model dtype
            z_tag = _gather_tokens(tag, heads, pos).float()
            acts = {}  # TransformerLens's names: z (head space), result (the head's write into the residual stream)
            if request.space in ("head", "both"):
                acts.update(z=z, z_tag=z_tag, z_nontag=z - z_tag)
            if request.space in ("residual", "both"):
                w = head_output_projection(module, H, out.shape[-1])[heads].float()  # (nh, D, hidden)
                result = torch.einsum("bhpd,hdk->bhpk", z, w)
                result_tag = torch.einsum("bhpd,hdk->bhpk", z_tag, w)
                acts.update(result=result, result_tag=result_tag, result_nontag=result - result_tag)
            record.heads, record.positions = heads, pos
            record.activations = acts
        if grad_out is not None:
            out = grad_out
        if cap.edit is not None:  # an intervention (catchtag.interventions) changes chosen heads' outputs, in place;
            out = cap.edit(layer, out, tag, stats)  # everything recorded above saw the output before it
        cap.layers[layer] = record
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _plain_attention(module, query, key, value, mask, dropout, scaling, softcap, **kwargs) -> torch.Tensor:
    """The attention output (B,H,T,D) from transformers' own functions (SDPA; eager when the logits are
    softcapped, which SDPA cannot do): differentiable, and as fast as the model without catchtag."""
    if softcap is None:
        out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    else:
        import sys

        eager = sys.modules[type(module).__module__].eager_attention_forward
        out, _ = eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, softcap=softcap, **kwargs)
    return out.transpose(1, 2)


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


def enable(model) -> None:
    """Switch a loaded model to catchtag's attention function, or say clearly why it cannot be."""
    register()
    if not getattr(model, "_supports_attention_backend", False):
        raise CatchtagError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface, so "
            f"catchtag cannot hook it. Architectures that work: {WORKING_ARCHITECTURES}"
        )
    model.set_attn_implementation(ATTN_NAME)
