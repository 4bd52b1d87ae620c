"""Steering with tags (beyond the paper): push a head's output along its mean tag difference and watch
the model's answer move.

For a selected head (layer, head), the direction is the mean head-space tag at the last token of the
train prompts with label 1 (TRUE / POSITIVE) minus that of label 0. On test prompts we add
``scale * direction`` to that head's output (before W_O) at the last token, through the engine's
``ActivationRequest(steer=...)``, and read the log-odds of the two answer tokens,
log p(label-1 answer) - log p(label-0 answer). Control: random head-space directions of the same norm.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from catchtag.measure import answer_logprobs
from catchtag.errors import CatchtagError
from catchtag.interventions.modes import DEFAULT_SCALES

__all__ = ["random_directions", "steered_logprobs", "steering_curve", "tag_direction"]


def steered_logprobs(model, tokenizer, prompts, answer_ids, *, steer: dict, batch_size: int = 8,
                     progress: bool = False) -> np.ndarray:
    """answer_logprobs with {(layer, head): head-space vector} added to those heads' outputs at the last token."""
    import torch

    from catchtag.interventions.edits import HeadEdit, Intervention

    edit = Intervention({lh: HeadEdit("add", torch.as_tensor(np.asarray(vec), dtype=torch.float32))
                         for lh, vec in steer.items()})
    edit.check(model.config.num_hidden_layers, model.config.num_attention_heads, verb="steer")
    return answer_logprobs(model, tokenizer, prompts, answer_ids, edit=edit, batch_size=batch_size,
                           progress=progress)


def tag_direction(head_tag: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean head-space tag of label 1 minus label 0. head_tag: (n_prompts, dim); labels: (n_prompts,) 0/1."""
    labels = np.asarray(labels)
    if head_tag.ndim != 2 or len(head_tag) != len(labels):
        raise CatchtagError(f"head_tag must be (n_prompts, dim) with one label per prompt, got {head_tag.shape} "
                            f"and {labels.shape}")
    if set(np.unique(labels)) != {0, 1}:
        raise CatchtagError("tag_direction needs both labels (0 and 1) among the prompts")
    return head_tag[labels == 1].mean(axis=0) - head_tag[labels == 0].mean(axis=0)


def random_directions(norm: float, dim: int, n: int, seed: int = 0) -> np.ndarray:
    """n Gaussian directions in head space, each rescaled to ``norm`` (the control)."""
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, dim))
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True) * norm


def steering_curve(model, tokenizer, prompts, labels, answer_ids, layer: int, head: int, direction: np.ndarray,
                   scales=DEFAULT_SCALES, n_random: int = 3, seed: int = 0, batch_size: int = 8,
                   progress: bool = True) -> pd.DataFrame:
    """Steer (layer, head) by scale * direction (and by random directions of the same norm) on ``prompts``.

    Returns one row per (direction kind, direction index, scale): mean log-odds of label 1 vs label 0,
    its shift from the unsteered run, the mean probability of label 1 among the two answers, and the
    accuracy of the two-way answer. labels: (n_prompts,) 0/1; answer_ids: [label-0 token, label-1 token].
    """
    labels = np.asarray(labels)
    direction = np.asarray(direction, dtype=np.float64)
    norm = float(np.linalg.norm(direction))
    if norm == 0:
        raise CatchtagError(f"the tag direction of head ({layer}, {head}) is zero (no sink tags the last token "
                            f"there); pick another head")
    base = answer_logprobs(model, tokenizer, prompts, answer_ids, batch_size=batch_size)
    base_odds = base[:, 1] - base[:, 0]
    kinds = [("tag", 0, direction)]
    kinds += [("random", i, r) for i, r in enumerate(random_directions(norm, direction.size, n_random, seed))]
    rows = []
    total = len(kinds) * sum(1 for s in scales if s != 0)
    bar = None
    if progress:
        from catchtag.progress import progress_bar

        bar = progress_bar(total=total, desc=f"steer L{layer}H{head}", unit="run")
    for kind, index, vec in kinds:
        for scale in scales:
            if scale == 0:
                lp = base
            else:
                lp = steered_logprobs(model, tokenizer, prompts, answer_ids, batch_size=batch_size,
                                      steer={(layer, head): (scale * vec).astype(np.float32)})
                if bar is not None:
                    bar.update(1)
            odds = lp[:, 1] - lp[:, 0]
            p1 = 1.0 / (1.0 + np.exp(-odds))
            rows.append({"layer": layer, "head": head, "direction": kind, "index": index, "scale": float(scale),
                         "norm": norm * abs(scale), "mean_log_odds": float(odds.mean()),
                         "shift": float((odds - base_odds).mean()),
                         "shift_sem": (float((odds - base_odds).std(ddof=1) / np.sqrt(len(odds))) if len(odds) > 1
                                       else 0.0),
                         "p_label1": float(p1.mean()), "accuracy": float(((odds > 0).astype(int) == labels).mean())})
    if bar is not None:
        bar.close()
    return pd.DataFrame(rows)
