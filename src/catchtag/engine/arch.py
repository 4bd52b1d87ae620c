"""Architecture quirks in one table: where each attention module keeps its output projection.

The head's slice of the output projection (W_O^h) maps a head's output into the residual stream.
"""

from __future__ import annotations

import torch

# attribute name -> True when the weight is stored (in, out) like GPT-2's Conv1D, False for nn.Linear (out, in)
OUTPUT_PROJECTIONS = (("o_proj", False), ("out_proj", False), ("dense", False), ("c_proj", True))


def head_output_projection(module: torch.nn.Module, n_heads: int, head_dim: int) -> torch.Tensor:
    """W_O of an attention module as a (n_heads, head_dim, hidden) tensor: residual = o_h @ W[h]."""
    for attr, transposed in OUTPUT_PROJECTIONS:
        proj = getattr(module, attr, None)
        if proj is not None and hasattr(proj, "weight"):
            weight = proj.weight if transposed else proj.weight.T  # (n_heads * head_dim, hidden)
            if weight.shape[0] != n_heads * head_dim:
                continue
            return weight.reshape(n_heads, head_dim, weight.shape[1])
    raise NotImplementedError(
        f"catchtag does not know the output projection of {type(module).__name__}; add it to OUTPUT_PROJECTIONS"
    )
