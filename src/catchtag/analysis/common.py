"""Small helpers the analyses share: one prompt in, one head's row out, a mean with its interval over prompts."""

from __future__ import annotations

import numpy as np

from catchtag.data.prompts import Prompt
from catchtag.errors import CatchtagError


def one_prompt(text) -> list:
    """A single prompt (a string or a ``Prompt``) as the list ``scan`` takes."""
    if isinstance(text, Prompt):
        return [text]
    if isinstance(text, str):
        if not text.strip():
            raise CatchtagError("the text is empty. Give the prompt some text (--text '...' or --text-file F)")
        return [text]
    raise CatchtagError(f"expected one prompt (a string), got {type(text).__name__}")


def head_row(result, layer: int, head: int, prompt_id: int | None = None):
    """The heads-table row of (layer, head) on one prompt (the first one by default)."""
    h = result.heads
    if prompt_id is None:
        prompt_id = int(h["prompt_id"].iloc[0])
    rows = h[(h["prompt_id"] == prompt_id) & (h["layer"] == layer) & (h["head"] == head)]
    if rows.empty:
        raise CatchtagError(f"no head ({layer}, {head}) in this scan: the model has {result.n_layers} layers x "
                            f"{result.n_heads} heads (0-based). Fix: pick --layer / --head in range")
    return rows.iloc[0]


def mean_interval(values) -> tuple[float, float, float]:
    """Mean and 95% interval (normal: mean ± 1.96 standard errors) of per-prompt values, nan ignored; the
    interval is nan with fewer than two values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    half = 1.96 * float(v.std(ddof=1)) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return m, m - half, m + half
