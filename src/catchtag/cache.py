"""ActivationCache: the per-token arrays a scan kept, under the field's names (TransformerLens's vocabulary).

Names, for head h of layer l at the kept positions:
  z, z_tag, z_nontag                    the head's output before W_O (head space), its tag and the rest;
  result, result_tag, result_nontag     the same written into the residual stream (through the head's rows of W_O);
  resid_pre                             the residual stream entering layer l (the model's hidden_states[l]; l equal
                                        to the number of layers: its last hidden state, after the final norm in
                                        Hugging Face models);
  pattern                               the head's full attention (T, T) on one prompt;
  sink_attention                        each token's attention to each of the head's sinks (T, n_sinks), columns in
                                        the order of that head's sink_positions in ``ScanResult.heads``.
Only what the scan's ActivationRequest named is there.

    cache["result_tag", 20]                      # (n_prompts, n_heads_kept, n_positions, d_model)
    cache.get("z", layer=3, head=1, pos=-1)      # (n_prompts, d_head) at each prompt's last kept position
    cache.get("pattern", layer=3, head=1, prompt=0)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from catchtag.errors import CatchtagError

HEAD_SPACE = ("z", "z_tag", "z_nontag")
RESIDUAL = ("result", "result_tag", "result_nontag")
PER_HEAD = HEAD_SPACE + RESIDUAL


@dataclass
class ActivationCache:
    """arrays: name -> (n_prompts, n_layers_kept, n_heads_kept, n_positions, dim), prompts in ``prompt_ids`` order;
    positions (n_prompts, n_positions): the prompt position of each kept slot (-1: none for that prompt);
    resid_pre: layer -> (n_prompts, n_positions, d_model); pattern / sink_attention: (prompt_id, layer, head) ->
    array."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    positions: np.ndarray | None = None
    resid_pre: dict[int, np.ndarray] = field(default_factory=dict)
    pattern: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict)
    sink_attention: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return ([n for n in PER_HEAD if n in self.arrays] + (["resid_pre"] if self.resid_pre else [])
                + (["pattern"] if self.pattern else []) + (["sink_attention"] if self.sink_attention else []))

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __bool__(self) -> bool:
        return bool(self.names)

    def __repr__(self) -> str:
        return (f"ActivationCache(names={self.names}, prompts={len(self.prompt_ids)}, layers={self.layers}, "
                f"heads={self.heads}, positions={None if self.positions is None else self.positions.shape[1]})")

    def __getitem__(self, key):
        """cache[name, layer]: the per-head arrays of one layer (n_prompts, n_heads_kept, n_positions, dim), or
        resid_pre of that layer (n_prompts, n_positions, d_model)."""
        if not (isinstance(key, tuple) and len(key) == 2):
            raise CatchtagError(f"index the cache with (name, layer), e.g. cache['result_tag', 3]; got {key!r}")
        name, layer = key
        if name == "resid_pre":
            return self._resid(layer)
        if name in ("pattern", "sink_attention"):
            raise CatchtagError(f"{name} is kept per prompt and head: use cache.get({name!r}, layer=, head=, "
                                f"prompt=)")
        return self._array(name)[:, self._layer_index(layer)]

    def get(self, name: str, layer: int, head: int | None = None, pos: int | None = None,
            prompt: int | None = None) -> np.ndarray:
        """One slice by name: head (a model head index), pos (a prompt position; negative counts from each prompt's
        last kept position, -1 the last), prompt (a prompt_id). Unnamed axes are kept."""
        if name in ("pattern", "sink_attention"):
            store = getattr(self, name)
            if head is None or prompt is None:
                raise CatchtagError(f"{name} needs head= and prompt=")
            if (prompt, layer, head) not in store:
                raise CatchtagError(f"no {name} kept for prompt {prompt}, layer {layer}, head {head}. Kept: "
                                    f"{sorted(store)[:6]}{' ...' if len(store) > 6 else ''}")
            return store[(prompt, layer, head)]
        x = self[name, layer]  # (n, nh, P, d) or (n, P, d) for resid_pre
        per_head = name != "resid_pre"
        if head is not None:
            if not per_head:
                raise CatchtagError("resid_pre has no head axis")
            if head not in self.heads:
                raise CatchtagError(f"head {head} was not kept (kept heads: {self.heads})")
            x = x[:, self.heads.index(head)]
        rows = slice(None)
        if prompt is not None:
            if prompt not in self.prompt_ids:
                raise CatchtagError(f"prompt {prompt} is not in the cache")
            rows = [self.prompt_ids.index(prompt)]
        x = x[rows]
        if pos is not None:
            slots = self._slots(pos)[rows]  # (n,)
            if (slots < 0).any():
                raise CatchtagError(f"position {pos} was not kept for every prompt asked for")
            p_axis = 1 if (head is not None or not per_head) else 2
            x = np.take_along_axis(x, slots.reshape((-1,) + (1,) * (x.ndim - 1)), axis=p_axis).squeeze(p_axis)
        return x[0] if prompt is not None else x

    # ---- helpers ---------------------------------------------------------------------------------------
    def _array(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            raise CatchtagError(f"{name!r} was not kept by this scan (kept: {self.names or 'nothing'}). Scan with "
                                f"an ActivationRequest that asks for it (space='head' for z*, 'residual' for "
                                f"result*, 'both')")
        return self.arrays[name]

    def _layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise CatchtagError(f"layer {layer} was not kept (kept layers: {self.layers})")
        return self.layers.index(layer)

    def _resid(self, layer: int) -> np.ndarray:
        if layer not in self.resid_pre:
            raise CatchtagError(f"resid_pre of layer {layer} was not kept (kept: {sorted(self.resid_pre)}); ask for "
                                f"ActivationRequest(hidden_states=[{layer}])")
        return self.resid_pre[layer]

    def _slots(self, pos: int) -> np.ndarray:
        """Per prompt, the kept slot holding prompt position ``pos`` (-1 where none)."""
        if self.positions is None:
            raise CatchtagError("this cache kept no positions")
        p = self.positions
        if pos < 0:  # the pos-th kept slot from the end, per prompt
            out = np.full(len(p), -1)
            for i, row in enumerate(p):
                kept = np.flatnonzero(row >= 0)
                if len(kept) >= -pos:
                    out[i] = kept[pos]
            return out
        hit = p == pos
        return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
