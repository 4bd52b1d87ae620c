"""Architecture quirks in one table: where each attention module keeps its output projection, and which modules
multiply their attention output by a gate before it.

The head's slice of the output projection (W_O^h) maps a head's output into the residual stream.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import torch

from catchtag.errors import CatchtagError

# where attention modules keep their output projection (the first that exists); a weight stored (in, out), like
# GPT-2's Conv1D, is told apart from nn.Linear's (out, in) by the module's class
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense", "c_proj", "Wo")

# Attention modules (class names) that multiply their attention output o elementwise by a gate g before the output
# projection (Qwen3-Next, Qwen3.5: a sigmoid of a query-side projection). The head's write into the residual stream
# is W_O (g * o): catchtag reads g * o at the projection's input and g = (g * o) / o. Any other module must hand o
# over unchanged (the engine checks it on every pass). Filled from the coverage matrix (docs/models.md).
GATED = frozenset({
    "Qwen3NextAttention", "Qwen3_5Attention", "Qwen3_5MoeAttention",  # sigmoid of a query-side projection
    "HYV4Attention", "MiniCPM5MoeAttention", "HrmTextAttention", "AfmoeAttention", "BeamAttention",  # sigmoid gates
    "Lfm3Attention", "BailingHybridAttention",  # one sigmoid gate per head
    "LagunaAttention",  # a softplus gate (per head or per channel)
    "BitNetAttention",  # a sub-layer RMS norm: a per-token factor on every channel, which acts as a gate here
})


def output_projection(module: torch.nn.Module) -> torch.nn.Module | None:
    """The attention module's output projection (a module with a 2-D weight), or None."""
    for attr in OUTPUT_PROJECTIONS:
        proj = getattr(module, attr, None)
        if proj is not None and getattr(getattr(proj, "weight", None), "dim", lambda: 0)() == 2:
            return proj
    return None


def is_gated(module: torch.nn.Module) -> bool:
    return type(module).__name__ in GATED


def head_output_projection(module: torch.nn.Module, n_heads: int, head_dim: int) -> torch.Tensor:
    """W_O of an attention module as a (n_heads, head_dim, hidden) tensor: residual = o_h @ W[h]."""
    proj = output_projection(module)
    if proj is not None:
        weight = proj.weight if type(proj).__name__ == "Conv1D" else proj.weight.T  # (n_heads * head_dim, hidden)
        if weight.shape[0] == n_heads * head_dim:
            return weight.reshape(n_heads, head_dim, weight.shape[1])
    raise CatchtagError(f"catchtag does not know the output projection of {type(module).__name__}, so it cannot "
                        f"give the heads' writes into the residual stream (result). Fix: ask for head-space "
                        f"activations (space='head'), or see docs/models.md")


@functools.lru_cache(maxsize=1)
def model_types() -> dict:
    """The coverage matrix: model type -> {"status": "parity" | "refused", "reason": ..., "families": [...]}, as
    written by ``python -m catchtag.coverage`` (engine/model_types.json; docs/models.md shows it)."""
    return json.loads(resources.files("catchtag.engine").joinpath("model_types.json").read_text())["model_types"]


def model_type_status(model) -> dict | None:
    """This model's row of the coverage matrix (None: a model type the matrix does not know)."""
    return model_types().get(getattr(model.config, "model_type", None))


_PATTERN_KEYS = ("layer_types", "layers_block_type", "block_types", "layer_block_types")


def layer_kinds(config, n_layers: int) -> dict[int, str]:
    """What each decoder layer is, by the config's layer pattern where it has one (hybrids: "mamba",
    "linear_attention", "conv", ...); empty when the config names none."""
    text = config.get_text_config()
    for key in _PATTERN_KEYS:
        seq = getattr(text, key, None)
        if isinstance(seq, (list, tuple)) and len(seq) == n_layers:
            return {i: str(kind) for i, kind in enumerate(seq)}
    pattern = getattr(text, "hybrid_override_pattern", None)
    if isinstance(pattern, str) and len(pattern) == n_layers:
        names = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
        return {i: names.get(c, c) for i, c in enumerate(pattern)}
    return {}
