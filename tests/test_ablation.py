"""Release, causally: the first-order attribution against finite differences of real interventions, and the
ablate command end to end (tables, intervals, controls, release map, resume, bad input)."""

import json
import random

import numpy as np
import pandas as pd
import pytest
import torch

from catchtag.engine.request import SinkSettings
from conftest import EPS, MIN_ROWS, padded_batch


@pytest.mark.parametrize("arch,mode", [("llama", "mean"), ("gpt2", "zero"), ("qwen3", "zero"), ("llama", "constant")])
def test_attribution_matches_a_finite_difference(tiny_models, arch, mode):
    """d(mean NLL over tagged tokens)/d(fraction of the ablation applied) at 0, by central differences of real
    intervened passes (float64 model), equals the first-order attribution, head by head and prompt by prompt."""
    import copy

    from catchtag.interventions import ablation as ab
    from catchtag.interventions.edits import HeadEdit, Intervention

    model, _ = tiny_models(arch)
    model = copy.deepcopy(model).double()
    seed = random.randrange(1 << 30)
    ids, mask = padded_batch([30, 24], ["right", "left"], T=30, seed=seed)
    settings = SinkSettings(eps=0.08, min_rows=4)
    est, nll, _, _ = ab.attribution(model, ids, mask, settings, mode)
    base = ab.baseline(model, ids, mask, settings, ab.sample_positions(24))
    # the same pass (the engine's own attention computes in float32 even for a float64 model)
    torch.testing.assert_close(nll, base.nll, equal_nan=True, atol=1e-5, rtol=1e-6)
    checked = 0
    for layer, head in [(0, 1), (1, 0), (1, 2)]:
        s0 = base.first_sink[:, layer, head]

        def central(step):
            got = []
            for sign in (1, -1):
                edit = Intervention({(layer, head): HeadEdit(f"{mode}_tag", scale=sign * step)})
                new, _, _ = ab.intervened(model, ids, mask, settings, ab.sample_positions(24), edit)
                got.append(ab.loss_change(base.nll, new, s0))
            return (got[0] - got[1]) / (2 * step)

        # Richardson's extrapolation of two central differences cancels their step^2 error, which alone reached 2%
        # at step 0.02 (seed 464118907, qwen3 L0H1: fd 0.02147 at 0.02, 0.02183 at 0.01, 0.02190 at 0.005, the
        # attribution 0.02194)
        fd = (4 * central(0.01) - central(0.02)) / 3
        for b in range(2):
            if np.isfinite(fd[b]):
                # central differences of passes whose attention rounds in float32: ~1e-4 of noise in fd
                assert est[b, layer, head] == pytest.approx(fd[b], rel=0.02, abs=3e-4), \
                    f"seed {seed}: {arch} L{layer}H{head} prompt {b}"
                checked += abs(fd[b]) > 1e-4
    assert checked >= 2, f"seed {seed}: too few heads with an effect to check"


def test_tag_split_is_the_constant_and_token_dependent_energy_of_the_tag():
    """tag_split against a plain loop: over the tokens at or after each head's first sink, n |mean|^2 and
    sum |tag - mean|^2 over sum |o|^2; nan for a head without a sink; the two add up to the tag's energy share."""
    from catchtag.interventions.ablation import tag_split

    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    B, H, T, D = 3, 2, 9, 4
    out, tag = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    first = torch.tensor([[0, 3], [5, T], [2, 5]])  # a sink is a real token
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[2, 6:] = False
    got = tag_split(out, tag, first, valid)
    for b in range(B):
        for h in range(H):
            keep = [i for i in range(T) if i >= first[b, h] and valid[b, i]]
            if first[b, h] == T:
                assert torch.isnan(got[b, h]).all()
                continue
            t, o = tag[b, h, keep].double(), out[b, h, keep].double()
            m = t.mean(0)
            energy = (o ** 2).sum()
            want = [len(keep) * (m ** 2).sum() / energy, ((t - m) ** 2).sum() / energy]
            torch.testing.assert_close(got[b, h], torch.stack(want))
            torch.testing.assert_close(got[b, h].sum(), (t ** 2).sum() / energy)


def test_ablate_command_end_to_end(tmp_path):
    """The command as a user runs it: tables, summary with intervals and controls, figures, the release map only
    for later layers, a resume that recomputes nothing, and groups."""
    from catchtag.cli import app
    from typer.testing import CliRunner

    out = tmp_path / "run"
    scan = ["scan", "-m", "tiny:llama", "--out", str(out), "--eps", str(EPS), "--min-rows", str(MIN_ROWS),
            "--limit", "6", "--max-tokens", "48", "--no-views"]
    assert CliRunner().invoke(app, scan).exit_code == 0  # ablate adds its folder to a scan's run
    args = ["ablate", "-m", "tiny:llama", "--out", str(out), "--eps", str(EPS), "--min-rows", str(MIN_ROWS),
            "--limit", "6", "--max-tokens", "48", "--top", "3", "--controls", "2", "--batch-size", "4"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    folder = out / "ablate"
    s = json.loads((folder / "summary.json").read_text())
    assert len(s["targets"]) == 3 and s["attribution_vs_real_rank_correlation"]["n_heads"] == 3
    for t in s["targets"]:
        assert t["ci"][0] <= t["delta_nll"] <= t["ci"][1] and np.isfinite(t["control_delta_nll"])
    table = pd.read_parquet(folder / "ablation.parquet")
    assert set(table["kind"]) == {"ablation", "control"} and table["prompt_id"].nunique() == 6
    assert len(table[table["kind"] == "control"]) == 2 * len(table[table["kind"] == "ablation"])
    release = pd.read_parquet(folder / "release.parquet")
    for t in s["targets"]:
        layer = t["heads"][0][0]
        assert (release[release["target"] == t["target"]]["layer"] > layer).all()
    attrib = pd.read_parquet(folder / "attribution.parquet")
    assert len(attrib) == 6 * 3 * 4  # prompts x layers x heads of tiny:llama
    assert (folder / "ablation.png").stat().st_size > 5000 and (folder / "release.png").stat().st_size > 5000
    from catchtag.report.html import write_report

    page = write_report([out], tmp_path / "report.html").read_text()
    assert "Release, causally" in page and "No run holds interventions" not in page
    assert all(t["target"] in page for t in s["targets"])
    stamp = {p.name: p.stat().st_mtime_ns for p in (folder / "parts").iterdir()}
    r = CliRunner().invoke(app, args)  # resume: every batch is done, nothing is recomputed
    assert r.exit_code == 0, r.output
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "parts").iterdir()} == stamp
    r = CliRunner().invoke(app, [*args[:4], str(tmp_path / "grouped"), *args[5:], "--group", "layer"])
    assert r.exit_code == 0, r.output
    g = json.loads((tmp_path / "grouped" / "ablate" / "summary.json").read_text())
    assert [t["target"] for t in g["targets"]] == [f"layer {l}" for l in range(3)]
    r = CliRunner().invoke(app, [*args[:4], str(tmp_path / "none"), "--eps", "0.99", "--limit", "2"])
    assert r.exit_code == 2 and "nothing to ablate" in r.stderr and "Fix" in r.stderr


@pytest.mark.parametrize("softcap,bias", [(None, False), (3.0, True)])
def test_chunked_nll_and_its_gradient_match_pytorch_cross_entropy(monkeypatch, softcap, bias):
    """head_nll (chunks of rows into one reused buffer, the gradient by hand) equals PyTorch's cross-entropy of the
    whole logits and its autograd gradient, softcap and bias included, over several chunks."""
    from catchtag.interventions import ablation as ab

    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    B, T, d, V = 3, 11, 8, 37
    head = torch.nn.Linear(d, V, bias=bias).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, d, generator=g, dtype=torch.float64))
    hidden = torch.randn(B, T, d, generator=g, dtype=torch.float64).float()
    head = head.float()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    monkeypatch.setattr(ab, "NLL_CHUNK_BYTES", 4 * V * 4)  # 4 rows a chunk: the 33 rows take 9 chunks
    nll, grad = ab.head_nll(head, hidden, ids, mask, softcap, grad=True)
    h = hidden.clone().requires_grad_(True)
    logits = head(h)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ref = ab._nll(logits, ids, mask)
    torch.nansum(ref).backward()
    torch.testing.assert_close(nll, ref.detach(), equal_nan=True, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, h.grad, atol=1e-5, rtol=1e-4)
    # no prediction (the last position; padding and the token before it), no gradient
    assert torch.isnan(nll).sum() == 1 + (4 + 1) + (1 + 4) and grad[2, 6:].abs().max() == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_forward_nll_equals_the_models_own_logits(tiny_models, arch):
    """forward_nll gives the NLL of the model's own logits: plainly, with a final softcap, and (by running again
    the plain way) when something after the LM head changes the logits in a way it does not know."""
    import copy

    from catchtag.interventions import ablation as ab

    model, _ = tiny_models(arch)
    model = copy.deepcopy(model)
    ids, mask = padded_batch([30, 24], ["right", "left"], T=30, seed=random.randrange(1 << 30))
    calls = []
    counter = model.register_forward_pre_hook(lambda m, a: calls.append(1))

    def passes(f):  # forward_nll's result and how many forward passes it took (1: the chunked path)
        calls.clear()
        return f(), len(calls)

    with torch.no_grad():
        plain = ab._plain_forward_nll(model, ids, mask, grad=False)
        got, n = passes(lambda: ab.forward_nll(model, ids, mask))
        torch.testing.assert_close(got, plain, equal_nan=True, atol=1e-5, rtol=1e-5)
        assert n == 1
        if arch == "gemma3":
            model.config.final_logit_softcapping = 2.0
            capped = ab._plain_forward_nll(model, ids, mask, grad=False)
            assert (capped - plain).nan_to_num().abs().max() > 1e-3
            got, n = passes(lambda: ab.forward_nll(model, ids, mask))
            torch.testing.assert_close(got, capped, equal_nan=True, atol=1e-5, rtol=1e-5)
            assert n == 1
        handle = model.register_forward_hook(lambda m, a, out: out.__setitem__("logits", out.logits * 1.7) or out)
        try:
            scaled = ab._plain_forward_nll(model, ids, mask, grad=False)
            assert (scaled - plain).nan_to_num().abs().max() > 1e-3
            got, n = passes(lambda: ab.forward_nll(model, ids, mask))
            torch.testing.assert_close(got, scaled, equal_nan=True, atol=1e-5, rtol=1e-5)
            assert n == 2  # the check saw the difference and ran the plain way
        finally:
            handle.remove()
            counter.remove()


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "gpt_neox"])
def test_replaying_the_layers_below_an_edit_changes_nothing(tiny_models, arch):
    """An intervened pass that replays the baseline's layer outputs below the first edited layer gives the same
    loss, attention rows and outputs as one that recomputes every layer; so does a control's pass, which runs the
    engine at the edited layers only."""
    from catchtag.interventions import ablation as ab
    from catchtag.interventions.edits import HeadEdit, Intervention

    model, _ = tiny_models(arch)
    ids, mask = padded_batch([30, 24], ["right", "left"], T=30, seed=random.randrange(1 << 30))
    settings = SinkSettings(eps=0.08, min_rows=4)
    positions = ab.sample_positions(24)
    base = ab.baseline(model, ids, mask, settings, positions)
    for edits in ({(2, 1): HeadEdit("zero_tag")}, {(1, 0): HeadEdit("mean_tag"), (2, 0): HeadEdit("zero_tag")}):
        edit = Intervention(edits)
        full = ab.intervened(model, ids, mask, settings, positions, edit)
        fast = ab.intervened(model, ids, mask, settings, positions, edit, base)
        for a, b in zip(full, fast):
            torch.testing.assert_close(a, b, equal_nan=True, atol=1e-5, rtol=1e-5)
        # a control's pass: the engine only at the edited layers, the model's own attention elsewhere
        light = ab.intervened(model, ids, mask, settings, positions, edit, base, release=False)
        torch.testing.assert_close(light[0], full[0], equal_nan=True, atol=1e-5, rtol=1e-5)
        assert light[1] is None and light[2] is None
        assert (full[0] - base.nll).nan_to_num().abs().max() > 0, "the edit changed nothing"


def test_decoding_finds_a_planted_grouping_and_the_control_does_not():
    """decode_by_depth reads groups that one layer's features carry linearly (and not those of another layer); the
    control, which takes each token's group from another prompt at the same position, reads only what position
    gives, well below the real grouping, and stays at its chance where the features carry nothing."""
    from catchtag.analysis.release import decode_by_depth, sink_groups

    rng = np.random.default_rng(random.randrange(1 << 30))
    groups, carries, blind = [], [], []
    for _ in range(12):
        T = int(rng.integers(40, 60))
        split = int(rng.integers(8, T - 8))  # where the second sink takes over: it differs between prompts
        g = np.where(np.arange(T) < split, 0, 1)
        g[[0, split]] = -1  # the sinks themselves are left out
        groups.append(g)
        signal = np.where(g[:, None] == 1, 1.0, -1.0) * np.eye(8)[0]
        carries.append(signal + 0.5 * rng.standard_normal((T, 8)))
        blind.append(rng.standard_normal((T, 8)))
    t = decode_by_depth(groups, {1: carries, 2: blind}, folds=4, seed=1).set_index("layer")
    assert t.loc[1, "accuracy"] > 0.9 and t.loc[1, "ci_low"] > t.loc[1, "control_ci_high"]
    assert abs(t.loc[2, "accuracy"] - t.loc[2, "chance"]) < 0.2
    # the control keeps position, which tells the groups apart in part (one split per prompt): over 200 seeds it read
    # 0.87 at most, never closer than 0.11 to the real accuracy (an absolute bound of 0.85 failed about 1 seed in 40)
    assert t.loc[1, "control_accuracy"] < t.loc[1, "accuracy"] - 0.05
    # each label set has its own chance: the control's tokens are those in play at the same position in both prompts
    assert (t["control_n_tokens"] <= t["n_tokens"]).all() and (t["control_n_tokens"] < t["n_tokens"]).any()
    assert abs(t.loc[2, "control_accuracy"] - t.loc[2, "control_chance"]) < 0.2
    assert t["control_chance"].between(0.5, 1).all()  # two groups: the larger holds at least half
    # groups from attention to the sinks: the sink attended most, in position order, from the level up
    a = np.array([[0.9, 0.0], [0.6, 0.3], [0.2, 0.7], [0.05, 0.04], [0.3, 0.5]])
    assert sink_groups(a, [3, 0], level=0.1).tolist() == [-1, 1, 0, -1, 0]


def test_release_command_end_to_end(tmp_path):
    from catchtag.cli import app
    from typer.testing import CliRunner

    out = tmp_path / "rel"
    r = CliRunner().invoke(app, ["release", "-m", "tiny:llama", "--out", str(out), "--eps", str(EPS), "--min-rows",
                                 str(MIN_ROWS), "--limit", "6", "--max-tokens", "48", "--heads", "0.1,1.2",
                                 "--folds", "3"])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(out / "release_decoding.csv")
    assert sorted(table.groupby(["source_layer", "head"])["layer"].apply(list).tolist()) == [[1, 2, 3], [2, 3]]
    assert table["accuracy"].between(0, 1).all() and table["control_accuracy"].between(0, 1).all()
    assert (out / "release_decoding.png").stat().st_size > 5000
    assert json.loads((out / "summary.json").read_text())["heads"] == [[0, 1], [1, 2]]
