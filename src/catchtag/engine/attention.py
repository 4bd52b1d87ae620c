"""catchtag's attention function, registered through transformers' AttentionInterface.

One function serves every architecture that dispatches attention through the interface. Outside a
``capture`` it is plain SDPA (logits unchanged, same speed); inside one it computes the same attention
output plus the per-head catch/tag statistics of ``engine.stats`` and hands them to the capture.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from catchtag.engine.arch import head_output_projection
from catchtag.engine.request import ActivationRequest, SinkSettings
from catchtag.engine.stats import HeadStats
from catchtag.errors import CatchtagError

ATTN_NAME = "catchtag"
WORKING_ARCHITECTURES = "llama, mistral, qwen2, qwen3, gemma2/3, phi3, olmo2, gpt2, gpt_neox and other models " \
                        "whose attention goes through transformers' AttentionInterface"


@dataclass
class LayerRecord:
    """What one layer hands back for one forward pass (tensors on the CPU)."""

    stats: HeadStats
    heads: list[int] = field(default_factory=list)  # heads of the per-token activations below
    positions: torch.Tensor | None = None  # (B,P) absolute positions of the activations (-1: none)
    activations: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, nh, P, dim)
    attention_maps: dict[int, torch.Tensor] = field(default_factory=dict)  # head -> (B,T,T)


class Capture:
    """Collects LayerRecords during one forward pass of a model (see ``capture``)."""

    def __init__(self, settings: SinkSettings, request: ActivationRequest | None = None, backend: str = "auto"):
        self.settings = settings
        self.request = request
        self.backend = backend
        self.layers: dict[int, LayerRecord] = {}
        self._order: dict[int, int] = {}

    def layer_index(self, module) -> int:
        idx = getattr(module, "layer_idx", None)
        if idx is None:  # modules without layer_idx: number them in call order
            idx = self._order.setdefault(id(module), len(self._order))
        return int(idx)


_ACTIVE: contextvars.ContextVar[Capture | None] = contextvars.ContextVar("catchtag_capture", default=None)


@contextmanager
def capture(settings: SinkSettings, request: ActivationRequest | None = None, backend: str = "auto"):
    """Within this block, forward passes of an enabled model record statistics into the yielded Capture."""
    cap = Capture(settings, request, backend)
    token = _ACTIVE.set(cap)
    try:
        yield cap
    finally:
        _ACTIVE.reset(token)


def request_positions(request: ActivationRequest, token_valid: torch.Tensor) -> torch.Tensor:
    """Absolute positions (B,P) the request names for each prompt (-1 where a prompt has none)."""
    B, T = token_valid.shape
    dev = token_valid.device
    if request.positions == "last":
        last = T - 1 - token_valid.flip(-1).float().argmax(dim=-1)
        return last[:, None]
    if request.positions == "all":
        first = token_valid.float().argmax(dim=-1)
        length = token_valid.sum(dim=-1)
        pos = first[:, None] + torch.arange(T, device=dev)[None, :]
        return torch.where(torch.arange(T, device=dev)[None, :] < length[:, None], pos, torch.full_like(pos, -1))
    wanted = torch.as_tensor(list(request.positions), device=dev, dtype=torch.long)
    first = token_valid.float().argmax(dim=-1)
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
    keep_maps = [h for (lay, h) in (request.attention_maps if request else ()) if lay == layer]

    from catchtag.engine.backends import layer_statistics  # picks the fastest path for this device

    out, tag, stats, maps = layer_statistics(query, key, value, attention_mask, scaling, softcap, settings,
                                             keep_maps=keep_maps, backend=cap.backend if cap else "torch")
    if cap is not None:
        if request is None or not request.sink_attention:
            stats.sink_attn = None  # O(T*K) per head, kept only when asked for
        record = LayerRecord(stats=_to_cpu(stats), attention_maps={h: m.cpu() for h, m in maps.items()})
        uses_positions = request is not None and (request.wants_layer(layer)
                                                  or any(lay == layer for lay, _ in request.steer or {}))
        pos = request_positions(request, stats.token_valid) if uses_positions else None
        if request is not None and request.wants_layer(layer):
            H = query.shape[1]
            heads = list(request.heads) if request.heads is not None else list(range(H))
            full = _gather_tokens(out, heads, pos).float()  # the triton backend keeps out in the model dtype
            tag_t = _gather_tokens(tag, heads, pos).float()
            acts = {}
            if request.space in ("head", "both"):
                acts.update(head_full=full, head_tag=tag_t, head_nontag=full - tag_t)
            if request.space in ("residual", "both"):
                w = head_output_projection(module, H, out.shape[-1])[heads].float()  # (nh, D, hidden)
                full_r = torch.einsum("bhpd,hdk->bhpk", full, w)
                tag_r = torch.einsum("bhpd,hdk->bhpk", tag_t, w)
                acts.update(full=full_r, tag=tag_r, nontag=full_r - tag_r)
            record.heads, record.positions = heads, pos.cpu()
            record.activations = {k: v.cpu() for k, v in acts.items()}
        if request is not None and request.steer:
            for (lay, h), vec in request.steer.items():
                if lay == layer:
                    add = vec.to(out.device, out.dtype)[None, None, :].expand(out.shape[0], pos.shape[1], -1)
                    idx = pos.clamp_min(0)[:, :, None].expand_as(add)
                    out[:, h].scatter_add_(1, idx, add * (pos >= 0)[:, :, None])
        cap.layers[layer] = record
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _to_cpu(stats: HeadStats) -> HeadStats:
    return HeadStats(**{k: (v.cpu() if v is not None else None) for k, v in vars(stats).items()})


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
