"""What a caller asks the engine for: thresholds, and which per-token activations to keep.

The engine keeps O(T) numbers per head by default; anything bigger (per-token activations, full
attention maps, hidden states) is kept only for what the request names, so memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union


from catchtag.errors import CatchtagError, check_type

Positions = Union[str, Sequence[int]]  # "last", "all", or prompt positions (0-based, padding excluded)


@dataclass(frozen=True)
class SinkSettings:
    """Sink detection and variance-explained settings (docs/method.md).

    eps: a column is a sink when its score (mean attention from the rows that can see it) exceeds eps.
    min_rows: only columns seen by at least this many rows can be sinks (late columns are noisy).
    sweep_eps: extra thresholds evaluated in the same pass (nested sink sets), for threshold sweeps.
    chunk_rows: query rows per chunk (None: chosen from a memory budget); at most one chunk of
    scores lives at a time.
    """

    eps: float = 0.2
    min_rows: int = 16
    sweep_eps: tuple[float, ...] = ()
    chunk_rows: int | None = None

    def __post_init__(self):
        check_type("eps", self.eps, (int, float), "a number in (0, 1)", 0.2)
        check_type("min_rows", self.min_rows, (int,), "a whole number >= 1", 16)
        check_type("sweep_eps", self.sweep_eps, (tuple, list), "a tuple of numbers in (0, 1)", (0.1, 0.3))
        for e in self.sweep_eps:
            check_type("sweep_eps", e, (int, float), "a tuple of numbers in (0, 1)", (0.1, 0.3))
        if self.chunk_rows is not None:
            check_type("chunk_rows", self.chunk_rows, (int,), "a whole number >= 1 or None", 256)
        for e in (self.eps, *self.sweep_eps):
            if not 0.0 < float(e) < 1.0:
                raise CatchtagError(f"eps must lie in (0, 1), got {e}. Fix: pass e.g. --eps 0.2")
        if int(self.min_rows) < 1:
            raise CatchtagError(f"min_rows must be >= 1, got {self.min_rows}")

    @property
    def all_eps(self) -> tuple[float, ...]:
        return tuple(sorted({float(self.eps), *map(float, self.sweep_eps)}))


@dataclass
class ActivationRequest:
    """Per-token outputs to keep, for probes and pictures.

    layers / heads: which (None: all). positions: "last" (last real token of each prompt), "all", or
    a list of prompt positions. space: "residual" (result, result_tag, result_nontag: through the head's
    slice of W_O), "head" (z, z_tag, z_nontag: before W_O) or "both". attention_maps: (layer, head) pairs
    whose full T x T attention (pattern) is kept. hidden_states: indices into the model's hidden states
    (resid_pre: 0 = embeddings, l = entering layer l) to keep at the requested positions.
    sink_attention: keep, for every layer and head,
    each token's attention to each of the head's sinks (A[:, sinks], O(T * K) per head), e.g. for the token
    viewer. What is kept lands in ScanResult.cache (catchtag.cache) under these names.
    """

    layers: Sequence[int] | None = None
    heads: Sequence[int] | None = None
    positions: Positions = "last"
    space: str = "residual"
    attention_maps: Sequence[tuple[int, int]] = ()
    hidden_states: Sequence[int] = ()
    sink_attention: bool = False

    def __post_init__(self):
        def ints(name, values, example):
            check_type(name, values, (list, tuple, range), "a list of whole numbers", example)
            for v in values:
                check_type(name, v, (int,), "a list of whole numbers", example)

        for name in ("layers", "heads"):
            if getattr(self, name) is not None:
                ints(name, getattr(self, name), [0, 1])
        ints("hidden_states", self.hidden_states, [1, 2])
        if not isinstance(self.positions, str):
            ints("positions", self.positions, [0, 5, 9])
        check_type("attention_maps", self.attention_maps, (list, tuple), "a list of (layer, head) pairs", [(0, 1)])
        for pair in self.attention_maps:
            check_type("attention_maps", pair, (list, tuple), "a list of (layer, head) pairs", [(0, 1)])
            if len(pair) != 2:
                raise CatchtagError(f"attention_maps must be (layer, head) pairs, got {pair!r}. Fix: e.g. "
                                    f"attention_maps=[(0, 1)]")
            ints("attention_maps", pair, [(0, 1)])
        check_type("sink_attention", self.sink_attention, (bool,), "True or False", True)
        if self.space not in ("residual", "head", "both"):
            raise CatchtagError(f"space must be residual, head or both, got {self.space!r}")
        if isinstance(self.positions, str) and self.positions not in ("last", "all"):
            raise CatchtagError(f"positions must be 'last', 'all' or a list of ints, got {self.positions!r}")

    def wants_layer(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def check(self, n_layers: int, n_heads: int | None) -> None:
        """Refuse, in one line, a layer, head or hidden state the model does not have (else nothing would be kept,
        without a word)."""
        def bad(name, values, top):
            wrong = sorted({int(v) for v in values if not 0 <= int(v) < top})
            if wrong:
                raise CatchtagError(f"ActivationRequest {name} {wrong} out of range: the model has {top} "
                                    f"({', '.join(map(str, range(min(top, 3))))}, ... {top - 1}). Fix: give "
                                    f"{name} from 0 to {top - 1}")

        bad("layers", self.layers or (), n_layers)
        bad("hidden_states", self.hidden_states, n_layers + 1)
        bad("attention_maps layers", [lay for lay, _ in self.attention_maps], n_layers)
        if n_heads:
            bad("heads", self.heads or (), n_heads)
            bad("attention_maps heads", [h for _, h in self.attention_maps], n_heads)
