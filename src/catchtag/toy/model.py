"""The 2-layer attention-only model and the explicit weights of Theorem 7.1.

Residual stream coordinates: 0 = number, 1 = tag of [SEP], (2 = tag of [SEP2] in the two-sink variant),
last = output coordinate. The paper draws the 2-D (number, tag) picture; we add one output coordinate
because the prediction is read at the last *number* token and the residual stream would otherwise carry
that token's own number into the prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from catchtag.toy.task import NUMBER, SEP, SEP2, VARIANTS


@dataclass
class ToyConfig:
    """Model settings. ``n_heads``/``d_model`` default by variant (single: 1 head, d=3; two-sink: 2 heads, d=4)."""

    variant: str = "single"
    n_heads: int | None = None
    head_dim: int = 3
    d_model: int | None = None
    init_tag: float = 10.0
    init_tag2: float | None = None  # two-sink: initial [SEP2] tag (None: init_tag)
    learn_tag: bool = True
    qk_norm: bool = False  # RMS-normalise q and k per head, then a learnable gain (recipe option)
    qk_gain: float | tuple[float, ...] = 1.0  # initial gain when qk_norm is on; a tuple: one per head
    qk_norm_layers: tuple[int, ...] | None = None  # which layers (0 = first) qk_norm applies to; None: all
    qk_gain_fixed: bool | None = None  # True: the qk_norm gain stays at its initial value (None/False: learned)
    init_std: float | None = None  # None: PyTorch default Linear init

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.n_heads is None:
            self.n_heads = 1 if self.variant == "single" else 2
        if self.d_model is None:
            self.d_model = 3 if self.variant == "single" else 4
        if self.n_heads < 1 or self.head_dim < 1:
            raise ValueError("n_heads and head_dim must be >= 1")
        if isinstance(self.qk_gain, (tuple, list)):
            self.qk_gain = tuple(float(g) for g in self.qk_gain)
            if len(self.qk_gain) != self.n_heads:
                raise ValueError(f"qk_gain has {len(self.qk_gain)} values for {self.n_heads} heads; give one per head")
        if self.qk_norm_layers is not None:
            self.qk_norm_layers = tuple(int(i) for i in self.qk_norm_layers)
            if any(i not in (0, 1) for i in self.qk_norm_layers):
                raise ValueError(f"qk_norm_layers must hold layer indices 0 and/or 1, got {self.qk_norm_layers}")
        if self.d_model < (3 if self.variant == "single" else 4):
            raise ValueError(f"d_model={self.d_model} too small for the {self.variant} variant")


class CausalAttention(nn.Module):
    """One multi-head causal attention layer (q, k, v with bias so a query can be constant; output projection)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, qk_norm: bool = False,
                 qk_gain: float | tuple[float, ...] = 1.0, learn_gain: bool = True):
        super().__init__()
        self.h, self.dh = n_heads, head_dim
        self.q = nn.Linear(d_model, n_heads * head_dim)
        self.k = nn.Linear(d_model, n_heads * head_dim)
        self.v = nn.Linear(d_model, n_heads * head_dim)
        self.o = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.qk_norm = qk_norm
        if qk_norm:
            gains = qk_gain if isinstance(qk_gain, tuple) else (float(qk_gain),) * n_heads
            self.gain = nn.Parameter(torch.tensor(gains, dtype=torch.float32), requires_grad=learn_gain)
        self.temperature = 1.0  # multiplies scores; a schedule may change it during training

    def forward(self, x: torch.Tensor, value_scale: torch.Tensor | None = None,
                bias_only: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``value_scale`` (B, L): multiplies each token's value (a training curriculum's knob; None = 1).
        ``bias_only`` (B, L) bool: these tokens' value is the value bias alone, what a token whose residual
        stream is zero writes (the tag-removal ablation)."""
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(B, L, self.h, self.dh).transpose(1, 2)
        v = self.v(x)
        if value_scale is not None:
            v = v * value_scale[..., None]
        if bias_only is not None:
            v = torch.where(bias_only[..., None], self.v.bias, v)
        v = v.view(B, L, self.h, self.dh).transpose(1, 2)
        if self.qk_norm:
            q = q / q.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
            k = k / k.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
            s = (q @ k.transpose(-1, -2)) * self.gain.view(1, -1, 1, 1)
        else:
            s = (q @ k.transpose(-1, -2)) / math.sqrt(self.dh)
        s = s * self.temperature
        mask = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)
        a = s.masked_fill(mask, float("-inf")).softmax(-1)  # (B, H, L, L)
        out = (a @ v).transpose(1, 2).reshape(B, L, self.h * self.dh)
        return self.o(out), a


class ToyAttentionModel(nn.Module):
    """Embed (number, tag), two residual attention layers, linear read-out at the last position."""

    def __init__(self, config: ToyConfig | None = None, **kwargs):
        super().__init__()
        self.config = config = config or ToyConfig(**kwargs)
        d = config.d_model
        self.n_tags = 1 if config.variant == "single" else 2
        tags = [config.init_tag, config.init_tag if config.init_tag2 is None else config.init_tag2][: self.n_tags]
        self.tag = nn.Parameter(torch.tensor(tags, dtype=torch.float32), requires_grad=config.learn_tag)
        self.layers = nn.ModuleList(
            [CausalAttention(d, config.n_heads, config.head_dim,
                             config.qk_norm and (config.qk_norm_layers is None or i in config.qk_norm_layers),
                             config.qk_gain, not config.qk_gain_fixed) for i in range(2)]
        )
        self.readout = nn.Linear(d, 1)
        if config.init_std is not None:
            for p in list(self.layers.parameters()) + list(self.readout.parameters()):
                if p.dim() >= 1 and p is not getattr(self.layers[0], "gain", None) and p is not getattr(
                    self.layers[1], "gain", None
                ):
                    nn.init.normal_(p, std=config.init_std)

    def embed(self, values: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        B, L = values.shape
        x = values.new_zeros(B, L, self.config.d_model)
        x[..., 0] = values * (types == NUMBER)
        x[..., 1] = (types == SEP).float() * self.tag[0]
        if self.n_tags == 2:
            x[..., 2] = (types == SEP2).float() * self.tag[1]
        return x

    def set_temperature(self, t: float, layers: tuple[int, ...] | None = None) -> None:
        """Multiply the attention scores of ``layers`` (None: all) by ``t``; the others by 1."""
        for i, layer in enumerate(self.layers):
            layer.temperature = float(t) if layers is None or i in layers else 1.0

    @torch.no_grad()
    def fold_temperature(self) -> None:
        """Move each layer's score multiplier into its weights (the qk_norm gain, else the query), then set it
        to 1: the same function, with no schedule state left outside the parameters."""
        for layer in self.layers:
            t, layer.temperature = layer.temperature, 1.0
            if t == 1.0:
                continue
            if layer.qk_norm:
                layer.gain.mul_(t)
            else:
                layer.q.weight.mul_(t)
                layer.q.bias.mul_(t)

    def forward(self, values: torch.Tensor, types: torch.Tensor, return_all: bool = False,
                special_value_scale: dict[tuple[int, int], float] | None = None, tag_removed: tuple[int, ...] = ()):
        """Prediction (B,) at the last position; with ``return_all`` also the residual states and attentions.

        ``special_value_scale`` maps (layer index, token type) to a factor on that token's value in that layer,
        attention unchanged: ``{(1, SEP): 0.0, (1, SEP2): 0.0}`` lets layer 2 read nothing from the special
        tokens (recipe ``hidden-sep`` starts training so). ``tag_removed`` lists special token types whose
        layer-1 value is cut to the value bias, the part every token writes: what is left of the tag-removal
        ablation once the sink writes nothing of its own (zeroing the whole value would also take away the
        bias from the tokens that attend to the sink, which marks them in a new way)."""
        x = self.embed(values, types)
        states, attns = [x], []
        scales: list[torch.Tensor | None] = [None] * len(self.layers)
        for (li, kind), factor in (special_value_scale or {}).items():
            if factor != 1.0:
                base = scales[li] if scales[li] is not None else torch.ones_like(values)
                scales[li] = torch.where(types == kind, float(factor), base)
        removed = torch.isin(types, torch.tensor(tag_removed, dtype=types.dtype)) if tag_removed else None
        for i, (layer, scale) in enumerate(zip(self.layers, scales)):
            dx, a = layer(x, scale, removed if i == 0 else None)
            x = x + dx
            states.append(x)
            attns.append(a)
        y = self.readout(x[:, -1]).squeeze(-1)
        if return_all:
            return y, {"states": states, "attn": attns, "every_position": self.readout(x).squeeze(-1)}
        return y


@torch.no_grad()
def construct_model(tag: float = 10.0, variant: str = "single", gamma: float = 1.0, tag2: float | None = None):
    """Explicit weights of Theorem 7.1 (our restatement), exact in the limit of a large tag value.

    Layer 1 (catch, tag): a constant query meets keys equal to the tag coordinate, so every token after
    [SEP] gives [SEP] weight e^tag / (e^tag + #numbers) -> 1 and copies -tag into its tag coordinate
    ([SEP] copies it onto itself and cancels). Layer 2 (release): the last token's constant query scores
    tokens by -tag, so it spreads uniformly over the tagged tokens and copies their numbers to the output.
    Two-sink: head A as above; head B catches at [SEP2] (coordinate 2) and [SEP2] avoids [SEP] in head A;
    layer-2 head B keeps only tokens tagged by [SEP] but not by [SEP2] (between), head A all after [SEP].
    """
    t1 = float(tag)
    t2 = float(tag if tag2 is None else tag2)
    cfg = ToyConfig(variant=variant, init_tag=t1, head_dim=3)
    m = ToyAttentionModel(cfg)
    for p in m.parameters():
        p.zero_()
    m.tag[0] = t1
    s = math.sqrt(cfg.head_dim)  # undo the 1/sqrt(dh) score scaling
    out = cfg.d_model - 1
    l1, l2 = m.layers
    # layer 1, head 0 (rows 0..2 of q/k/v): catch at [SEP]
    l1.q.bias[0] = s
    l1.k.weight[0, 1] = 1.0
    l1.v.weight[0, 1] = 1.0
    l1.o.weight[1, 0] = -1.0
    # layer 2, head 0: release, average the tagged numbers
    l2.q.bias[0] = s * gamma
    l2.k.weight[0, 1] = -1.0
    l2.v.weight[0, 0] = 1.0
    l2.o.weight[out, 0] = 1.0
    if variant == "two-sink":
        m.tag[1] = t2
        l1.q.weight[0, 2] = -2 * s / t2  # [SEP2] queries away from [SEP] in head A
        # layer 1, head B (rows 3..5): catch at [SEP2]
        l1.q.bias[3] = s
        l1.k.weight[3, 2] = 1.0
        l1.v.weight[3, 2] = 1.0
        l1.o.weight[2, 3] = -1.0
        # layer 2, head B: tagged by [SEP] (tag1=-t1) but not by [SEP2] (tag2=-t2) -> between
        l2.q.bias[3] = s * gamma
        l2.k.weight[3, 1] = -1.0
        l2.k.weight[3, 2] = 2 * t1 / t2
        l2.v.weight[3, 0] = 1.0
        l2.o.weight[out, 3] = 1.0
    m.readout.weight[0, out] = 1.0
    return m
