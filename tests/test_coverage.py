"""The coverage matrix: every causal-LM model type of the installed transformers, held to its own eager attention and
the float64 reference (catchtag.coverage), against the statuses recorded in engine/model_types.json (docs/models.md).

A type recorded as parity that no longer reaches it fails here; a type recorded as refused must be refused by
``enable`` in one line with its reason. Fresh random inputs and weights every run (the seed is printed)."""

import random

import pytest
import torch

from catchtag import coverage
from catchtag.engine.arch import model_types
from catchtag.errors import CatchtagError
from catchtag.tiny import causal_lm_types

MATRIX = model_types()


def test_every_model_type_of_transformers_has_a_status():
    missing = sorted(set(causal_lm_types()) - set(MATRIX))
    assert not missing, f"model types with no status: {missing}. Run `python -m catchtag.coverage --write`"
    parity = [t for t, row in MATRIX.items() if row["status"] == "parity"]
    assert len(parity) >= 95
    for t, row in MATRIX.items():
        assert row["status"] in ("parity", "refused")
        assert row["status"] == "parity" or row["reason"], f"{t} is refused without a reason"


@pytest.mark.parametrize("model_type", sorted(MATRIX))
def test_model_type_keeps_its_status(model_type):
    seed = random.randrange(1 << 30)
    print(f"seed={seed}")
    row = coverage.check(model_type, seed=seed)
    recorded = MATRIX[model_type]["status"]
    if recorded == "parity":
        assert row.status == "parity", f"{model_type} regressed (seed {seed}): {row.reason}"


@pytest.mark.parametrize("model_type", sorted(t for t, row in MATRIX.items() if row["status"] == "refused"))
def test_refused_types_are_refused_in_one_line(model_type):
    from catchtag.engine.attention import enable

    try:
        model, _ = coverage._build(model_type, seed=0)
    except Exception:  # noqa: BLE001  (no tiny model of this type: a stand-in whose config names the type)
        model, _ = coverage._build("llama", seed=0)
        model.config.model_type = model_type
    with pytest.raises(CatchtagError) as err:
        enable(model)
    message = str(err.value)
    assert "\n" not in message and "Fix:" in message
    assert MATRIX[model_type]["reason"] in message


def test_the_check_can_fail(monkeypatch):
    """Learned sinks dropped, a gate not read, an unknown keyword taken as inert: each makes its family fail."""
    import catchtag.engine.attention as attention
    import catchtag.engine.arch as arch

    assert coverage.check("gpt_oss", seed=1).status == "parity"
    monkeypatch.setattr(attention, "sink_logits", lambda kwargs, query: None)
    row = coverage.check("gpt_oss", seed=1)
    assert row.status == "refused" and "differ" in row.reason
    monkeypatch.undo()
    monkeypatch.setattr(arch, "GATED", frozenset())
    row = coverage.check("qwen3_next", seed=1)
    assert row.status == "refused" and "before its output projection" in row.reason
    monkeypatch.undo()
    monkeypatch.setattr(attention, "_INERT_KWARGS", attention._INERT_KWARGS | {"position_bias"})
    assert coverage.check("inkling_text", seed=1).status == "refused"


def test_a_column_that_ties_with_eps_may_fall_either_side(monkeypatch):
    """laguna at seed 682019731: a column's score is 0.08000002 in the float64 reference, eps 0.08; float32 puts it
    just below. A tie within TIE_TOL is no difference; with no tolerance the check refuses."""
    assert coverage.check("laguna", seed=682019731).status == "parity"
    monkeypatch.setattr(coverage, "TIE_TOL", 0.0)
    row = coverage.check("laguna", seed=682019731)
    assert row.status == "refused" and "differ from the reference's" in row.reason


def test_an_moe_routing_flip_draws_other_inputs(monkeypatch):
    """kolibri1 (384 experts, 4 per token) at seed 1071546537: float32 rounding sends one token to other experts with
    catchtag than in the eager pass, and that token and every later one differ by 5e-2. The check draws other inputs
    (same weights) and compares one whose routing agrees; with one draw allowed the flip is what it sees."""
    from types import SimpleNamespace

    assert coverage.check("kolibri1", seed=1071546537).status == "parity"
    monkeypatch.setattr(coverage, "ROUTE_DRAWS", 1)
    row = coverage.check("kolibri1", seed=1071546537)
    assert row.status == "refused" and "differ" in row.reason
    # what counts as a flip: another top-k set at a real token, in any layer
    text = SimpleNamespace(num_experts_per_tok=2)
    valid = torch.ones(2, 3, dtype=torch.bool)
    valid[1, 0] = False  # padding
    logits = torch.tensor([[4.0, 3.0, 1.0, 0.0]]).repeat(6, 1)
    flipped = logits.clone()
    flipped[3] = torch.tensor([4.0, 1.0, 3.0, 0.0])  # sequence 1, position 0: padding
    same = SimpleNamespace(router_logits=(logits, logits))
    assert not coverage.route_differs(same, same, valid, text)
    assert not coverage.route_differs(SimpleNamespace(router_logits=(logits, flipped)), same, valid, text)
    flipped[4] = torch.tensor([4.0, 1.0, 3.0, 0.0])  # sequence 1, position 1: a real token
    assert coverage.route_differs(SimpleNamespace(router_logits=(logits, flipped)), same, valid, text)
    assert not coverage.route_differs(SimpleNamespace(router_logits=None), same, valid, text)


def test_a_model_type_the_matrix_does_not_know_is_checked_on_load(monkeypatch):
    """enable() runs the self-check for a type with no status: a model whose attention catchtag computes passes, one
    that computes attention in its own code is refused in one line."""
    import catchtag.engine.arch as arch
    from catchtag.engine.attention import enable, is_enabled

    monkeypatch.setattr(arch, "model_types", lambda: {})
    model, _ = coverage._build("llama", seed=0)
    enable(model)
    assert is_enabled(model)
    model, _ = coverage._build("gpt_neo", seed=0)
    with pytest.raises(CatchtagError, match="own code"):
        enable(model)


def test_learned_sink_share_is_reported_per_head():
    """gpt-oss: the heads table carries each head's learned sink share, equal to the float64 reference's."""
    from catchtag.engine.reference import reference_scan
    from catchtag.scan import scan
    from catchtag.tiny import tiny_tokenizer

    model, _ = coverage._build("gpt_oss", seed=random.randrange(1 << 30))
    with torch.no_grad():
        model.model.layers[0].self_attn.sinks.add_(25.0)  # a sink that takes nearly all the attention
    tok = tiny_tokenizer()
    texts = ["Attention sinks catch the attention of later tokens."]
    result = scan(model, tok, texts, eps=0.08, min_rows=4, progress=False)
    assert "learned_sink" in result.heads
    ids = torch.tensor([tok(texts[0])["input_ids"]])
    ref, _ = reference_scan(model, ids, torch.ones_like(ids), eps=0.08, min_rows=4)
    for r in ref:
        got = result.heads.query(f"layer == {r['layer']} and head == {r['head']}")["learned_sink"].item()
        assert abs(got - r["learned_sink"]) < 1e-5
    assert result.heads.query("layer == 0")["learned_sink"].min() > 0.9
    assert result.settings["attention_layers"] == list(range(model.config.num_hidden_layers))


def test_hybrid_layers_are_named_in_the_summary():
    from catchtag.scan import scan
    from catchtag.tiny import tiny_tokenizer

    model, _ = coverage._build("qwen3_next", seed=0)
    result = scan(model, tiny_tokenizer(), ["A hybrid of attention and linear attention layers."], eps=0.08, min_rows=4,
                  progress=False)
    attention_layers = result.settings["attention_layers"]
    assert attention_layers and set(result.heads["layer"]) == set(attention_layers)
    others = result.settings["other_layers"]
    assert others and all(kind == "linear_attention" for kind in others.values())
    assert set(map(int, others)) | set(attention_layers) == set(range(model.config.num_hidden_layers))
