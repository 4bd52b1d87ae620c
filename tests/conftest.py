import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox", "phi3", "olmo2", "gemma3"]


@pytest.fixture(scope="session")
def tiny_models():
    """tiny:<arch> models built once per session (random weights, no download)."""
    from catchtag.models import load_model

    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = load_model(f"tiny:{arch}", dtype="float32")
        return cache[arch]

    return get


def padded_batch(lengths, sides, T=None, seed=0, vocab=256):
    """Random token ids with the given real lengths, each padded on its side ('left' or 'right')."""
    g = torch.Generator().manual_seed(seed)
    T = T or max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, (n, side) in enumerate(zip(lengths, sides)):
        if side == "left":
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
        ids[b][mask[b] == 0] = 258  # the tiny tokenizer's <pad>
    return ids, mask
