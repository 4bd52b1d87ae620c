"""Interventions: change chosen heads' outputs inside one forward pass, through the engine's hook.

The engine computes each layer's attention output o (head space, before W_O), its sinks and its tag, then calls
the capture's ``edit``: an ``Intervention`` changes o there, before W_O, so everything downstream (later layers'
attention included) sees the changed head while the model's own attention mask and every other head stay as they
are. Tags are computed inside the intervened pass: when several heads are changed at once, a later head's tag comes
from its own, already changed, input.

Edits of head h on one prompt, for the tokens i at or after the head's first sink s0 on that prompt (the tokens
whose tag can be nonzero; with no sink, nothing changes):
  zero_tag         o_i <- o_i - tag_i
  mean_tag         o_i <- o_i - tag_i + mean_{j >= s0} tag_j       (the mean over the same prompt's tokens)
  constant_tag     o_i <- o_i - mean_{j >= s0} tag_j               (the constant part removed, the rest kept)
  control          o_i <- o_i - |r_i| u, with r_i the component the matching ablation removes (tag_i for zero,
                   tag_i - mean for mean, the mean for constant) and u a random unit direction of head space (one
                   for the whole batch, or one per prompt): the same energy per token, in a direction that carries
                   no tag
  add              o_i <- o_i + vector at the last real token (steering)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from catchtag.engine.positions import last_real
from catchtag.errors import CatchtagError

KINDS = ("zero_tag", "mean_tag", "constant_tag", "control_zero", "control_mean", "control_constant", "add")


@dataclass
class HeadEdit:
    """One head's edit. kind: one of KINDS; vector: the head-space vector of ``add`` (dim,), or the unit direction
    of a control: (dim,) for every prompt, or (B, dim) one per prompt of the batch."""

    kind: str
    vector: np.ndarray | torch.Tensor | None = None
    scale: float = 1.0  # the fraction of the ablation applied (a finite-difference check of the attribution)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise CatchtagError(f"unknown edit {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.kind.startswith("control") or self.kind == "add":
            if self.vector is None:
                raise CatchtagError(f"the {self.kind} edit needs a vector")


def first_sink(stats, T: int, device=None) -> torch.Tensor:
    """(B, H) position of each head's first sink on each prompt (T where the head has none): the tokens at or after
    it are the ones whose tag can be nonzero."""
    idx, ok = stats.sink_idx.to(device), stats.sink_ok.to(device)
    if idx.shape[-1] == 0:
        return torch.full(ok.shape[:2], T, dtype=torch.long, device=idx.device)
    return torch.where(ok, idx, torch.full_like(idx, T)).amin(dim=-1)


def tag_mean(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(..., 1, D): the mean of the tags ``t`` (..., T, D), zero outside the range, over the tokens in range ``w``
    (..., T, 1): the tag's constant part (what every tagged token gets alike; the rest, t - mean, is its
    token-dependent part)."""
    return t.sum(dim=-2, keepdim=True) / w.sum(dim=-2, keepdim=True).clamp_min(1)


class Intervention:
    """{(layer, head): HeadEdit} applied in a forward pass (the engine calls it as the capture's ``edit``)."""

    def __init__(self, edits: dict[tuple[int, int], HeadEdit]):
        self.edits = {(int(l), int(h)): e for (l, h), e in edits.items()}
        self.by_layer: dict[int, list[tuple[int, HeadEdit]]] = {}
        for (l, h), e in self.edits.items():
            self.by_layer.setdefault(l, []).append((h, e))

    def check(self, n_layers: int, n_heads: int, verb: str = "intervene on") -> None:
        for l, h in self.edits:
            if not (0 <= l < n_layers and 0 <= h < n_heads):
                raise CatchtagError(f"cannot {verb} head ({l}, {h}): the model has {n_layers} layers x "
                                    f"{n_heads} heads (0-based)")

    def __call__(self, layer, out, tag, stats):
        edits = self.by_layer.get(layer)
        if not edits:
            return out
        valid = stats.token_valid.to(out.device)  # (B,T)
        T = out.shape[2]
        pos = torch.arange(T, device=out.device)
        first = None
        for h, e in edits:
            if e.kind == "add":
                vec = torch.as_tensor(e.vector, device=out.device, dtype=out.dtype)
                last = last_real(valid)
                out[torch.arange(out.shape[0], device=out.device), h, last] += vec
                continue
            if first is None:
                first = first_sink(stats, T, out.device)
            s0 = first[:, h]
            after = valid & (pos[None, :] >= s0[:, None])  # (B,T): tokens whose tag can be nonzero
            w = after[..., None].to(out.dtype)
            t = tag[:, h].to(out.dtype) * w  # (B,T,D)
            removed = t
            if e.kind in ("mean_tag", "control_mean"):  # the token-dependent part
                removed = (t - tag_mean(t, w)) * w
            elif e.kind in ("constant_tag", "control_constant"):  # the constant part
                removed = tag_mean(t, w) * w
            if e.kind.startswith("control"):
                u = torch.as_tensor(e.vector, device=out.device, dtype=out.dtype)
                u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-30)
                u = u[:, None, :] if u.dim() == 2 else u  # one direction per prompt: (B, 1, D)
                out[:, h] -= e.scale * removed.norm(dim=-1, keepdim=True) * u
            else:
                out[:, h] -= e.scale * removed
        return out


def random_unit(dim: int, seed) -> np.ndarray:
    """A random unit direction of head space (the control's), reproducible from ``seed`` (an int, or a list of ints:
    numpy's SeedSequence keeps each combination's stream independent)."""
    v = np.random.default_rng(seed).standard_normal(dim)
    return v / np.linalg.norm(v)


@contextmanager
def intervene(edits: dict[tuple[int, int], HeadEdit] | Intervention, settings=None, backend: str = "auto"):
    """Within this block, forward passes of an enabled model run with ``edits`` applied (sinks and tags at
    ``settings``: eps, min_rows). Yields the engine Capture (its statistics are of the intervened pass)."""
    from catchtag.engine.attention import capture
    from catchtag.engine.request import SinkSettings

    edit = edits if isinstance(edits, Intervention) else Intervention(edits)
    with capture(settings or SinkSettings(), backend=backend, edit=edit) as cap:
        yield cap
