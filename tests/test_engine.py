"""The engine against the eager float64 reference, on every tiny architecture, with padding on both sides."""

import copy
import random

import numpy as np
import pytest
import torch

from catchtag.engine.attention import capture
from catchtag.engine.reference import reference_scan
from catchtag.engine.request import ActivationRequest, SinkSettings
from catchtag.errors import CatchtagError

from conftest import ARCHS, padded_batch

TOL = 1e-4


def _run_engine(model, ids, mask, settings, request=None, edit=None):
    with torch.no_grad(), capture(settings, request, edit=edit) as cap:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return cap, logits


def _compare(cap, ref_rows, check_acts=True):
    n_sinks = 0
    for r in ref_rows:
        rec = cap.layers[r["layer"]]
        st, b, h = rec.stats, r["prompt"], r["head"]
        valid = st.token_valid[b]
        scores = st.col_scores[b, h][valid].numpy()
        assert np.array_equal(np.isnan(scores), np.isnan(r["scores"])), "eligible columns differ"
        if np.isfinite(scores).any():
            assert np.nanmax(np.abs(scores - r["scores"])) < TOL
        first = int(valid.float().argmax())
        sinks = sorted((st.sink_idx[b, h][st.sink_ok[b, h]] - first).tolist())
        assert sinks == r["sinks"], f"layer {r['layer']} prompt {b} head {h}"
        n_sinks += len(sinks)
        assert abs(float(st.ve[b, h]) - r["ve"]) < TOL
        assert abs(float(st.r2[b, h]) - r["r2"]) < TOL
        assert abs(float(st.ve_uncentred[b, h]) - r["ve_uncentred"]) < TOL
        if check_acts:
            acts = rec.activations
            scale = max(1.0, np.abs(r["result"]).max())
            for name in ("result", "result_tag", "result_nontag"):
                assert np.abs(acts[name][b, h, 0].numpy() - r[name]).max() < TOL * scale, name
    return n_sinks


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_matches_reference(tiny_models, arch):
    model, _ = tiny_models(arch)
    seed = random.randrange(1 << 30)  # fresh inputs every run
    print(f"seed={seed}")  # shown by pytest on failure
    lengths, sides = [37, 29, 44, 18], ["right", "right", "left", "left"]
    ids, mask = padded_batch(lengths, sides, T=44, seed=seed)
    for b in range(len(lengths)):  # the same token twice at the start: sink values equal up to rounding
        first = int(mask[b].argmax())
        ids[b, first + 1] = ids[b, first]
    settings = SinkSettings(eps=0.08, min_rows=4, chunk_rows=7)  # odd chunks cross padding and windows
    cap, logits = _run_engine(model, ids, mask, settings, ActivationRequest(positions="last"))
    ref_rows, ref_logits = reference_scan(model, ids, mask, eps=0.08, min_rows=4)
    valid = mask.bool()
    assert (logits - ref_logits.float())[valid].abs().max() < TOL, f"seed {seed}"
    n_sinks = _compare(cap, ref_rows)
    assert n_sinks > 0, "the test must exercise sinks"
    for _layer, rec in cap.layers.items():  # padding is never a row, a column, or a sink
        st = rec.stats
        assert torch.equal(st.token_valid, valid)
        assert torch.isnan(st.col_scores[~valid[:, None, :].expand_as(st.col_scores)]).all()
        for b in range(len(lengths)):
            assert valid[b][st.sink_idx[b][st.sink_ok[b]]].all()


def test_chunk_size_does_not_change_results(tiny_models):
    model, _ = tiny_models("gemma3")
    ids, mask = padded_batch([40, 33], ["right", "left"], seed=3)
    base, _ = _run_engine(model, ids, mask, SinkSettings(eps=0.08, min_rows=4, chunk_rows=1))
    other, _ = _run_engine(model, ids, mask, SinkSettings(eps=0.08, min_rows=4, chunk_rows=64))
    for layer in base.layers:
        a, b = base.layers[layer].stats, other.layers[layer].stats
        assert torch.equal(a.sink_idx[a.sink_ok], b.sink_idx[b.sink_ok])
        torch.testing.assert_close(a.ve, b.ve, atol=1e-5, rtol=0)


def test_logits_unchanged_outside_and_inside_capture(tiny_models):
    from transformers import AutoModelForCausalLM

    model, _ = tiny_models("llama")
    ids, mask = padded_batch([30, 22], ["right", "right"], seed=5)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    eager.eval()
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=mask).logits
        plain = model(input_ids=ids, attention_mask=mask).logits  # outside a capture: SDPA
    _, inside = _run_engine(model, ids, mask, SinkSettings(eps=0.1, min_rows=4))
    valid = mask.bool()
    assert (plain - want)[valid].abs().max() < TOL
    assert (inside - want)[valid].abs().max() < TOL


def test_batched_equals_alone(tiny_models):
    """A prompt's statistics do not depend on its batch neighbours or the padding side."""
    model, _ = tiny_models("qwen2")
    ids, mask = padded_batch([35, 20], ["left", "left"], seed=11)
    s = SinkSettings(eps=0.08, min_rows=4)
    batched, _ = _run_engine(model, ids, mask, s)
    alone, _ = _run_engine(model, ids[1:, -20:], mask[1:, -20:], s)
    for layer in batched.layers:
        a, b = batched.layers[layer].stats, alone.layers[layer].stats
        torch.testing.assert_close(a.col_scores[1][:, -20:], b.col_scores[0], atol=1e-5, rtol=0, equal_nan=True)
        torch.testing.assert_close(a.ve[1], b.ve[0], atol=1e-5, rtol=0)


def test_sweep_nested_and_main_eps_consistent(tiny_models):
    model, _ = tiny_models("mistral")
    ids, mask = padded_batch([40, 40], ["right", "right"], seed=2)
    cap, _ = _run_engine(model, ids, mask, SinkSettings(eps=0.1, min_rows=4, sweep_eps=(0.03, 0.05, 0.2, 0.4)))
    eps = SinkSettings(eps=0.1, sweep_eps=(0.03, 0.05, 0.2, 0.4)).all_eps
    for _layer, rec in cap.layers.items():
        st = rec.stats
        assert (st.sweep_n_sinks[..., :-1] >= st.sweep_n_sinks[..., 1:]).all(), "fewer sinks at higher eps"
        main = eps.index(0.1)
        torch.testing.assert_close(st.sweep_ve[..., main], st.ve)
        torch.testing.assert_close(st.sweep_ve_uncentred[..., main], st.ve_uncentred)
        assert torch.equal(st.sweep_n_sinks[..., main], st.sink_ok.sum(-1))
    for e in eps:  # each sweep column equals a separate scan at that eps
        single, _ = _run_engine(model, ids, mask, SinkSettings(eps=e, min_rows=4))
        for layer in cap.layers:
            torch.testing.assert_close(cap.layers[layer].stats.sweep_ve[..., eps.index(e)],
                                       single.layers[layer].stats.ve, atol=1e-5, rtol=0)
            torch.testing.assert_close(cap.layers[layer].stats.sweep_ve_uncentred[..., eps.index(e)],
                                       single.layers[layer].stats.ve_uncentred, atol=1e-5, rtol=0)


def test_attention_maps_and_all_positions(tiny_models):
    model, _ = tiny_models("gpt2")
    ids, mask = padded_batch([30, 24], ["right", "left"], T=30, seed=8)
    req = ActivationRequest(layers=[1], heads=[0, 2], positions="all", space="both", attention_maps=[(1, 2)])
    cap, _ = _run_engine(model, ids, mask, SinkSettings(eps=0.08, min_rows=4), req)
    rec = cap.layers[1]
    assert set(rec.attention_maps) == {2}
    assert rec.activations["result"].shape[:3] == (2, 2, 30)
    assert not cap.layers[0].activations  # only the requested layer keeps per-token data
    # rows of the kept map sum to 1 on real tokens, and it matches eager attention
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    eager.eval()
    with torch.no_grad():
        att = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[1][:, 2]
    valid = mask.bool()
    for b in range(2):
        v = valid[b]
        torch.testing.assert_close(rec.attention_maps[2][b][v][:, v], att[b][v][:, v].float(), atol=1e-5, rtol=0)
    # positions: right-padded prompt 1 has 24 real tokens at the end (left padding)
    assert (rec.positions[1] >= 0).sum() == 24
    # head-space and residual-space activations agree through W_O
    from catchtag.engine.arch import head_output_projection

    attn = model.transformer.h[1].attn
    w = head_output_projection(attn, 4, 16)
    torch.testing.assert_close(torch.einsum("pd,dk->pk", rec.activations["z_tag"][0, 1], w[2].float()),
                               rec.activations["result_tag"][0, 1], atol=1e-5, rtol=0)


def test_steering_adds_vector_at_head(tiny_models):
    model, _ = tiny_models("llama")
    ids, mask = padded_batch([25, 25], ["right", "right"], seed=4)
    s = SinkSettings(eps=0.1, min_rows=4)
    _, base = _run_engine(model, ids, mask, s)
    from catchtag.interventions.edits import HeadEdit, Intervention

    zero = Intervention({(1, 2): HeadEdit("add", torch.zeros(16))})
    _, same = _run_engine(model, ids, mask, s, edit=zero)
    torch.testing.assert_close(same, base)
    push = Intervention({(1, 2): HeadEdit("add", torch.randn(16, generator=torch.Generator().manual_seed(0)) * 5)})
    _, moved = _run_engine(model, ids, mask, s, edit=push)
    assert (moved[:, -1] - base[:, -1]).abs().max() > 1e-3  # the last token moves
    torch.testing.assert_close(moved[:, :-1], base[:, :-1])  # causal: earlier tokens do not


def test_bad_settings_are_refused():
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(CatchtagError, match="eps must lie in"):
            SinkSettings(eps=bad)
    with pytest.raises(CatchtagError, match="min_rows"):
        SinkSettings(min_rows=0)
    with pytest.raises(CatchtagError, match="positions"):
        ActivationRequest(positions="middle")


def test_model_without_attention_interface_is_refused(tiny_models):
    """A model whose attention runs in its own code (BLOOM's ALiBi) is refused in one line, by load_model too."""
    from catchtag.coverage import _build
    from catchtag.engine.attention import enable
    from catchtag.models import load_model

    model, _ = _build("bloom", seed=0)
    with pytest.raises(CatchtagError, match="AttentionInterface"):
        enable(model)
    with pytest.raises(CatchtagError, match="AttentionInterface"):
        load_model("tiny:bloom")


def test_one_span_rule_in_all_three_places():
    """The torch path (stats._span_basis), the fast path (moments._gram_schmidt) and the float64 reference
    (reference._orth) build the sink-value span by one rule, also where an SVD cut would differ: a set nearly
    dependent as a whole (16 values in 16 dimensions, smallest singular value ~1e-6 of the largest) while no value
    is close to the span of the others, plus a repeated value (the same token at two positions)."""
    from catchtag.engine.moments import _gram_schmidt, score_order
    from catchtag.engine.reference import _orth
    from catchtag.engine.stats import _span_basis

    seed = random.randrange(1 << 30)
    rng = np.random.default_rng(seed)
    K = D = 16
    u, _ = np.linalg.qr(rng.standard_normal((K, K)))
    w, _ = np.linalg.qr(rng.standard_normal((D, D)))
    values = (u * np.logspace(0, -6, K)) @ w.T  # nearly dependent as a whole
    values[5] = values[2] * (1 + 1e-9)  # the same token twice, up to rounding
    scores = rng.uniform(0.2, 1.0, K)
    rtol = 1e-5
    svd_rank = int((np.linalg.svd(values, compute_uv=False) > rtol * np.linalg.norm(values, 2)).sum())
    ref = _orth(values, scores, rtol)  # (D, r) orthonormal columns
    assert ref.shape[1] != svd_rank, f"seed {seed}: this set does not separate the two rules"
    v = torch.from_numpy(values)[None]
    s = torch.from_numpy(scores)[None]
    order = score_order(s)
    fast = _gram_schmidt(v.gather(-2, order[..., None].expand(1, K, D)), rtol)[0].numpy()
    q_fast = v.gather(-2, order[..., None].expand(1, K, D))[0].numpy().T @ fast  # (D, K), zero columns dropped
    q_torch = values.T @ _span_basis(v, s, rtol)[0].numpy()
    x = rng.standard_normal((50, D))  # outputs: the projections onto each basis must agree
    want = ((x @ ref) ** 2).sum()
    for got in (q_fast, q_torch):
        assert abs(((x @ got) ** 2).sum() - want) < 1e-8 * want, f"seed {seed}"
        kept = np.linalg.norm(got, axis=0) > 0.5
        assert kept.sum() == ref.shape[1], f"seed {seed}"


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "qwen3"])
def test_interventions_match_a_hand_built_float64_reference(tiny_models, arch):
    """Tag zero- and mean-ablation, their random-direction controls, and a whole layer at once (tags recomputed
    inside the intervened pass), through the engine's hook, give the logits of eager attention in float64 with the
    same edit made by hand (engine/reference.py), on padded prompts (left and right)."""
    from catchtag.engine.reference import reference_edited_logits
    from catchtag.interventions.edits import HeadEdit, intervene, random_unit

    model, _ = tiny_models(arch)
    seed = random.randrange(1 << 30)
    ids, mask = padded_batch([30, 22], ["right", "left"], T=30, seed=seed)
    settings = SinkSettings(eps=0.08, min_rows=4)
    H = model.config.num_attention_heads
    D = model.config.hidden_size // H if not hasattr(model.config, "head_dim") or model.config.head_dim is None \
        else model.config.head_dim
    u = random_unit(D, seed)
    cases = {"zero": {(1, 0): "zero_tag"}, "mean": {(1, 1): "mean_tag"}, "control": {(1, 0): "control_zero"},
             "control_mean": {(0, 1): "control_mean"}, "layer": {(1, h): "zero_tag" for h in range(H - 1)},
             "two_layers": {(0, 0): "mean_tag", (1, 0): "zero_tag"}}
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    valid = mask.bool()
    for name, kinds in cases.items():
        edits = {lh: HeadEdit(k, u if k.startswith("control") else None) for lh, k in kinds.items()}
        with torch.no_grad(), intervene(edits, settings, backend="torch"):
            got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        want = reference_edited_logits(model, ids, mask, {lh: (k, u) for lh, k in kinds.items()}, eps=0.08,
                                       min_rows=4)
        # relative to the logits' size. The group leaves one head of the layer alone: with every head's tag removed,
        # a token that attends only to sinks (the first) gets an attention output of float32 rounding noise, which
        # gemma3's norm after attention scales up to ~1e-3 in the logits (float32 against float64, not an error
        # of the edit); the group code path is the same for any number of heads
        tol = TOL * max(1.0, float(want[valid].abs().max()))
        assert (got.double() - want)[valid].abs().max() < tol, f"seed {seed}: {arch} {name}"
        if name in ("zero", "layer"):
            assert (got - plain)[valid].abs().max() > 20 * tol, f"seed {seed}: {name} changed too little to test"


def test_a_control_removes_the_same_energy_as_its_ablation():
    """The control takes away, at every token, a vector of the same norm as what the ablation takes away."""
    from catchtag.engine.stats import HeadStats
    from catchtag.interventions.edits import HeadEdit, Intervention, random_unit

    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    B, H, T, D = 2, 3, 12, 8
    out, tag = torch.randn(B, H, T, D, generator=g, dtype=torch.float64), torch.randn(B, H, T, D, generator=g,
                                                                                      dtype=torch.float64)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :3] = False
    idx = torch.tensor([[[2, 5]] * H, [[4, 7]] * H])
    ok = torch.ones(B, H, 2, dtype=torch.bool)
    z = torch.zeros(B, H)
    stats = HeadStats(torch.zeros(B, H, T), torch.zeros(B, T), valid, idx, ok, z, z, z, torch.zeros(B, H, 1),
                      torch.zeros(B, H, 1), torch.zeros(B, H, 1), torch.zeros(B, H, 1))
    u = random_unit(D, 0)
    per_prompt = np.stack([random_unit(D, [0, b]) for b in range(B)])  # one direction per prompt
    for ablation, control in (("zero_tag", "control_zero"), ("mean_tag", "control_mean")):
        a = Intervention({(0, 1): HeadEdit(ablation)})(0, out.clone(), tag, stats) - out
        c = Intervention({(0, 1): HeadEdit(control, u)})(0, out.clone(), tag, stats) - out
        torch.testing.assert_close(a.norm(dim=-1), c.norm(dim=-1))
        cp = Intervention({(0, 1): HeadEdit(control, per_prompt)})(0, out.clone(), tag, stats) - out
        torch.testing.assert_close(a.norm(dim=-1), cp.norm(dim=-1))
        for b in range(B):  # each prompt's change lies along its own direction
            moved = cp[b, 1][cp[b, 1].norm(dim=-1) > 0]
            cos = (moved @ torch.as_tensor(per_prompt[b])) / moved.norm(dim=-1)
            torch.testing.assert_close(cos.abs(), torch.ones_like(cos))
        assert a[:, [0, 2]].abs().max() == 0 and c[:, [0, 2]].abs().max() == 0  # other heads untouched
        assert a[0, 1, :2].abs().max() == 0 and a[1, 1, :4].abs().max() == 0  # before the first sink: untouched
        assert a[:, 1].abs().max() > 0
