"""Tiny random models of any causal-LM type transformers ships, for parity tests (``tiny:<model_type>``).

A curated few (TINY_ARCHS) keep the sizes the tests were written for; every other model type gets its default
config shrunk by one generic rule set (``shrink``): widths, heads, experts and layer counts made small while each kind
of layer in the model's pattern is kept, so a hybrid keeps an attention layer and a model with sliding and global
layers keeps both. TINY_OVERRIDES is the short table for the configs the rule set cannot shrink alone. Random weights
have no *real* sinks: these models are for comparing catchtag with a model's own output, not for science.
"""

from __future__ import annotations

from catchtag.errors import CatchtagError

TINY_VOCAB = 260  # 256 byte tokens + bos/eos/pad/unk, see tiny_tokenizer()
_TOKEN_IDS = dict(bos_token_id=256, eos_token_id=257, pad_token_id=258)
_TINY_COMMON = dict(vocab_size=TINY_VOCAB, **_TOKEN_IDS)
TINY_LAYERS = 4  # layers of a shrunk model, unless its pattern needs more kinds of layer

# The curated tiny models (config class name -> overrides), sized for the engine tests: sizes are small so a forward
# pass takes milliseconds; initializer_range is raised so random attention is peaked enough to produce sinks at test
# thresholds.
TINY_ARCHS: dict[str, dict] = {
    "llama": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512),
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512),
    "qwen3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
    "mistral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=1, sliding_window=24, max_position_embeddings=512),
    "phi3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, original_max_position_embeddings=512),
    "olmo2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512),
    "gemma3_text": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=16, sliding_window=12, max_position_embeddings=512,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                        query_pre_attn_scalar=16),
    "gpt2": dict(n_embd=64, n_layer=3, n_head=4, n_positions=512),
    "gpt_neox": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                     max_position_embeddings=512, use_parallel_residual=True),
}
TINY_ALIASES = {"gemma3": "gemma3_text", "neox": "gpt_neox"}

# Where the generic rules are not enough: model type -> settings applied after shrinking (the short table).
TINY_OVERRIDES: dict[str, dict] = {
    # default configs that leave a size the model needs unset
    "ministral": dict(head_dim=16), "hunyuan_v1_dense": dict(head_dim=16), "hunyuan_v1_moe": dict(head_dim=16),
    "nemotron": dict(num_key_value_heads=2),
    "deepseek_v2": dict(n_routed_experts=4, num_experts_per_tok=4, n_shared_experts=1),
    "dots1": dict(n_routed_experts=4, num_experts_per_tok=4, n_shared_experts=1),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "full_attention"]),
    "gemma4_assistant": dict(hidden_size_per_layer_input=0),
    "gemma3n_text": dict(num_kv_shared_layers=0, activation_sparsity_pattern=None),
    "kolibri1_1": dict(index_num_heads=2, index_topk=8),
    "longcat_flash": dict(head_dim=8),  # its rotary part is head_dim wide: qk_rope_head_dim
    "zaya": dict(num_experts_per_tok=1, num_experts=1),  # top-1 routing only: one expert, so it cannot flip
    # hybrids whose default config has no attention layer
    "bamba": dict(attn_layer_indices=[1, 3]),
    "granitemoehybrid": dict(layer_types=["mamba", "attention", "mamba", "attention"]),
}

# config key -> tiny value, for keys the default config sets (None stays None: the model derives it)
_WIDTHS = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "model_dim", "embed_dim", "dim", "word_embed_proj_dim",
                     "embedding_size", "hidden_dim"), 64),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "decoder_ffn_dim",
                     "encoder_ffn_dim", "mlp_dim", "intermediate_dim"), 96),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
                     "moe_shared_expert_intermediate_size", "dense_intermediate_size", "expert_dim",
                     "intermediate_size_mlp", "moe_ffn_hidden_size"), 32),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "attention_heads", "num_query_heads"), 4),
    **dict.fromkeys(("head_dim", "kv_channels", "attention_head_size", "swa_head_dim"), 16),
    # multi-head latent attention
    "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "qk_head_dim": 24,
    "rotary_dim": 8, "rotary_emb_base_dim": 8,
    # experts
    **dict.fromkeys(("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", "n_experts",
                     "num_experts_total"), 4),
    # every expert chosen for every token: the routing cannot flip between two passes that round differently,
    # so a comparison with the model's own attention sees the attention, not a discontinuous top-k
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "moe_k",
                     "num_experts_per_token"), 4),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    **dict.fromkeys(("n_group", "topk_group"), 1),
    # state-space and linear-attention layers
    **dict.fromkeys(("mamba_d_state", "ssm_state_size", "state_size", "d_state"), 16),
    **dict.fromkeys(("mamba_n_heads", "mamba_num_heads", "n_mamba_heads_total"), 8),
    **dict.fromkeys(("mamba_d_head", "mamba_head_dim", "mamba_headdim"), 16),
    **dict.fromkeys(("mamba_n_groups", "n_groups", "mamba_ngroups"), 1),
    "mamba_d_ssm": 128, "mamba_dt_rank": 8, "mamba_chunk_size": 16, "chunk_size": 16, "time_step_rank": 8,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "attention_hidden_size": 128, "attention_head_dim": 32,
    # positions and windows
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length",
                     "seq_length", "original_max_position_embeddings"), 512),
    **dict.fromkeys(("sliding_window", "sliding_window_size", "attention_chunk_size", "window_size"), 24),
    **dict.fromkeys(("attn_layer_period", "expert_layer_period"), 2),
    **dict.fromkeys(("attn_layer_offset", "expert_layer_offset"), 1),
    "num_dense_layers": 1, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0,
    # sparse attention: a selection smaller than the check's prompts, so it selects
    "index_topk": 8, "index_n_heads": 2, "index_head_dim": 16, "indexer_n_heads": 2, "indexer_head_dim": 16,
    "indexer_kv_heads": 1, "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": TINY_VOCAB,
}
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "num_decoder_layers")


def _pattern(seq, n0: int, n: int):
    """A layer pattern (list or string of length n0) cut to about n layers that keeps every kind it has: the first
    n layers, then the first layer of each kind not yet among them."""
    kept = list(range(min(n, n0)))
    seen = {repr(seq[i]) for i in kept}
    for i in range(n0):
        if repr(seq[i]) not in seen:
            seen.add(repr(seq[i]))
            kept.append(i)
    return kept


def _shrink_widths(d: dict) -> dict:
    """A per-layer settings dict (gemma4's per_layer_config) with the width rules applied."""
    return {k: (_WIDTHS[k] if k in _WIDTHS and isinstance(v, int) and not isinstance(v, bool) else v)
            for k, v in d.items()}


def _given(config) -> set[str]:
    """The keys a config class sets by default (not None): the others it derives from them in its own __init__
    (head_dim from the widths, the KV heads from the heads, ...), so a shrunk config must leave them to it."""
    import dataclasses

    if not dataclasses.is_dataclass(config):
        return set(config.to_dict())
    return {f.name for f in dataclasses.fields(config) if f.default is not None
            and f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def _shrink_dict(config, n_layers: int) -> dict:
    """The generic rule set on one config (sub-configs recursively), as the dict to build the tiny one from."""
    d = config.to_dict()
    given = _given(config)
    heads0 = next((d[k] for k in ("num_attention_heads", "n_head", "num_heads") if isinstance(d.get(k), int)), None)
    for key, value in list(d.items()):
        try:
            sub = getattr(config, key, None)
        except Exception:  # noqa: BLE001  (per-layer attributes refuse a global read: gemma4's head_dim)
            sub = None
        if hasattr(sub, "to_dict") and hasattr(sub, "model_type"):  # a sub-config (text_config, vision_config, ...)
            d[key] = _shrink_dict(sub, n_layers)
        elif key in _WIDTHS and isinstance(value, int) and not isinstance(value, bool):
            if key not in given:
                del d[key]  # derived: the config derives it again from the shrunk sizes
            elif key in ("num_experts_per_tok", "moe_topk", "top_k"):
                d[key] = _WIDTHS[key]
            else:
                d[key] = _WIDTHS[key]
    if "vocab_size" in d and isinstance(d["vocab_size"], int):
        d["vocab_size"] = TINY_VOCAB
        for key in list(d):
            if key.endswith("_token_id") and isinstance(d[key], int) and d[key] >= TINY_VOCAB:
                d[key] = _TOKEN_IDS.get(key, TINY_VOCAB - 1)
            elif key.endswith("_token_id") and isinstance(d[key], list):
                d[key] = [i if i < TINY_VOCAB else TINY_VOCAB - 1 for i in d[key]]
    heads = next((d[k] for k in ("num_attention_heads", "n_head", "num_heads") if isinstance(d.get(k), int)), None)
    for key in ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num", "num_query_groups",
                "swa_num_key_value_heads"):
        if isinstance(d.get(key), int) and key in given:  # keep the model's kind: one KV head, MHA, or groups
            d[key] = 1 if d[key] == 1 else (heads or 4) if d[key] == heads0 else 2
        elif key in d and key not in given and isinstance(d[key], int):
            del d[key]
    if isinstance(d.get("swa_num_attention_heads"), int):
        d["swa_num_attention_heads"] = heads or 4
    n0 = next((d[k] for k in _LAYER_KEYS if isinstance(d.get(k), int)), None)
    if n0:
        kept = list(range(min(n_layers, n0)))
        patterns = [k for k, v in d.items() if isinstance(v, (list, str)) and len(v) == n0 and n0 > 1
                    and k not in ("architectures",)]
        for key in patterns:
            kept = sorted(set(kept) | set(_pattern(d[key], n0, n_layers)))
        for key in patterns:
            seq = d[key]
            d[key] = "".join(seq[i] for i in kept) if isinstance(seq, str) else [seq[i] for i in kept]
        for key in _LAYER_KEYS:
            if isinstance(d.get(key), int):
                d[key] = len(kept)
        remap = {old: new for new, old in enumerate(kept)}
        for key, value in list(d.items()):  # layer indices (lists of ints, dicts keyed by layer)
            if key.endswith(("layer_ids", "layer_indices", "layers_idx", "_layers")) and isinstance(value, list) \
                    and value and all(isinstance(i, int) for i in value):
                got = [remap[i] for i in value if i in remap]
                d[key] = got or [len(kept) - 1]
            elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
                width = max(len(str(k)) for k in value)  # per-layer settings keyed "05": keep the key's form
                d[key] = {(remap[int(k)] if isinstance(k, int) else str(remap[int(k)]).zfill(width)):
                          (_shrink_widths(v) if isinstance(v, dict) else v)
                          for k, v in value.items() if int(k) in remap}
    for key in ("model_type", "transformers_version", "architectures", "_name_or_path"):
        d.pop(key, None)
    return d


def shrink(config, n_layers: int = TINY_LAYERS):
    """A tiny copy of ``config`` (a transformers config) by the generic rules, then TINY_OVERRIDES."""
    d = _shrink_dict(config, n_layers)
    d.update(initializer_range=0.2, tie_word_embeddings=False, use_cache=False)
    d.update(TINY_OVERRIDES.get(config.model_type, {}))
    return type(config)(**d)


def causal_lm_types() -> list[str]:
    """Every model type transformers maps to a causal-LM class, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(arch: str, **overrides):
    """Config of the tiny random model ``tiny:<arch>``: a curated one (TINY_ARCHS), else any causal-LM model type of
    the installed transformers, shrunk from its default config."""
    from transformers import AutoConfig

    arch = TINY_ALIASES.get(arch, arch)
    if arch in TINY_ARCHS:
        kwargs = dict(_TINY_COMMON, initializer_range=0.2, tie_word_embeddings=False)
        kwargs.update(TINY_ARCHS[arch])
        kwargs.update(overrides)
        return AutoConfig.for_model(arch, **kwargs)
    if arch not in causal_lm_types():
        raise CatchtagError(f"unknown tiny architecture {arch!r}. Fix: use a causal-LM model type of transformers "
                            f"(see docs/models.md), e.g. {', '.join(sorted(TINY_ARCHS))}")
    config = shrink(AutoConfig.for_model(arch))
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_tokenizer(max_length: int = 512):
    """A byte-level tokenizer built in code (no download): 256 byte tokens + <bos> <eos> <pad> <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({"<bos>": 256, "<eos>": 257, "<pad>": 258, "<unk>": 259})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=max_length,
    )


def padded_batch(lengths, sides, T=None, seed=0, vocab=256):
    """Random token ids (B,T) and their attention mask for parity checks: prompt b has lengths[b] real tokens, padded
    on sides[b] ('left' or 'right') with the tiny tokenizer's <pad> (258)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    T = T or max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, (n, side) in enumerate(zip(lengths, sides)):
        if side == "left":
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
        ids[b][mask[b] == 0] = _TOKEN_IDS["pad_token_id"]
    return ids, mask
