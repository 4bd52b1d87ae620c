"""Probes and steering: labelled data, the probe pipeline on planted signals, steering on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from catchtag import CatchtagError, load_model
from catchtag.analysis.probes import (HeadProbes, TagProbe, answer_token_ids, few_shot_prompts, get_task,
                                      select_heads, wide_table, wilson_interval)
from catchtag.measure import answer_logprobs
from catchtag.interventions.steering import random_directions, steered_logprobs, steering_curve, tag_direction
from catchtag.data.prompts import Prompt, load_prompts, read_texts, tokenize_prompts
from catchtag.data.truth import country_capitals, statement, truth_demonstrations, truth_statements


# ---- data ------------------------------------------------------------------------------------------
def test_truth_set_is_deterministic_balanced_and_split_by_country():
    a, b = truth_statements(), truth_statements()
    pd.testing.assert_frame_equal(a, b)
    assert len(a) >= 400
    counts = a.groupby(["split", "label"]).size()
    assert counts.nunique() == 1, counts  # same count of true and false in each split
    train, test = a[a["split"] == "train"], a[a["split"] == "test"]
    assert not set(train["entity"]) & set(test["entity"])
    capital = dict(country_capitals())
    capital_split = {capital[c]: s for c, s in zip(a["entity"], a["split"])}
    for row in a.itertuples():
        assert (row.text == statement(row.entity, capital[row.entity])) == bool(row.label), row.text
        if not row.label:  # a false statement's wrong capital comes from a country of the same split
            wrong = [c for c, sp in capital_split.items() if row.text == statement(row.entity, c)]
            assert len(wrong) == 1 and capital_split[wrong[0]] == row.split, row.text
    assert "The capital of the United States is Washington D.C." in set(a["text"])
    demo_countries = {t.split(" of ")[1].split(" is ")[0] for t, _ in truth_demonstrations(4)}
    assert not demo_countries & set(a["entity"])
    assert not truth_statements(seed=1).equals(a)


def test_sentiment_set_is_balanced_deterministic_and_disjoint():
    from catchtag.data.sentiment import sentiment_sentences

    a = sentiment_sentences()
    pd.testing.assert_frame_equal(a, sentiment_sentences())
    assert len(a) == 400 and set(a["label"]) == {0, 1}
    assert a.groupby(["split", "label"]).size().nunique() == 1
    assert not set(a[a["split"] == "train"]["entity"]) & set(a[a["split"] == "test"]["entity"])
    assert a["text"].is_unique and a["text"].map(str.isascii).all()
    assert not a["text"].str.contains(r"http|@\w", regex=True).any()


def test_labelled_sets_work_as_builtin_data():
    texts, is_long = read_texts("builtin:truth")
    assert not is_long and len(texts) == len(truth_statements())
    assert texts[0].startswith("The capital of ")
    model, tok = load_model("tiny:llama")
    prompts = load_prompts("builtin:truth", tok, model, limit=5)
    assert len(prompts) == 5 and tok.decode(prompts[0].input_ids).endswith(texts[0])
    with pytest.raises(CatchtagError, match="builtin:truth"):
        read_texts("builtin:nope")


def test_few_shot_prompt_format_and_answer_tokens():
    task = get_task("truth")
    demos = truth_demonstrations(2)
    (prompt,) = few_shot_prompts(task, ["The capital of Peru is Lima."], demos)
    assert prompt == (f"{demos[0][0]} This statement is: True\n{demos[1][0]} This statement is: False\n"
                      f"The capital of Peru is Lima. This statement is:")
    _, tok = load_model("tiny:llama")
    ids = answer_token_ids(tok, task)  # byte tokenizer: ' ' is shared, so the words' first bytes
    assert ids[0] != ids[1]
    with pytest.raises(CatchtagError, match="end with"):
        get_task("truth", "{answer}: {text}")
    with pytest.raises(CatchtagError, match="unknown probe task"):
        get_task("cities")
    with pytest.raises(CatchtagError, match="shots"):
        truth_demonstrations(99)


# ---- probes on planted signals ----------------------------------------------------------------------
def _planted(n=240, layers=2, heads=3, dim=24, signal_head=(1, 2), strength=3.0, seed=0):
    """full = tag + nontag; only the tag of one head carries the label (along one fixed direction)."""
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n // 2)
    tag = rng.standard_normal((n, layers, heads, dim))
    nontag = rng.standard_normal((n, layers, heads, dim))
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    tag[:, signal_head[0], signal_head[1]] += strength * (2 * y[:, None] - 1) * direction
    return {"tag": tag, "nontag": nontag, "full": tag + nontag}, y


def _fit_and_score(acts, y, n_train):
    probes = HeadProbes(cv=4).fit({k: a[:n_train] for k, a in acts.items()}, y[:n_train], progress=False)
    return probes, probes.score_table({k: a[n_train:] for k, a in acts.items()}, y[n_train:])


def test_planted_tag_signal_is_recovered_and_selected():
    acts, y = _planted()
    probes, table = _fit_and_score(acts, y, 120)
    tag = table[table["kind"] == "tag"].set_index(["layer", "head"])["test_accuracy"]
    assert tag.loc[(1, 2)] >= 0.95
    assert tag.drop((1, 2)).max() < 0.7  # the other heads: chance
    nontag = table[table["kind"] == "nontag"].set_index(["layer", "head"])["test_accuracy"]
    assert nontag.max() < 0.7
    full = table[table["kind"] == "full"].set_index(["layer", "head"])["test_accuracy"]
    assert full.loc[(1, 2)] >= 0.8  # the full output contains the tag, plus noise
    row = table[(table["kind"] == "tag") & (table["layer"] == 1) & (table["head"] == 2)].iloc[0]
    assert row["ci_low"] <= row["test_accuracy"] <= row["ci_high"] and row["ci_low"] > 0.85
    best = select_heads(wide_table(table), top=3)
    assert (best.loc[0, "layer"], best.loc[0, "head"]) == (1, 2) and best.loc[0, "passes"]
    assert not best.loc[1:, "passes"].any()


def test_shuffled_labels_give_chance():
    acts, y = _planted()
    y_shuffled = np.random.default_rng(1).permutation(y)
    _, table = _fit_and_score(acts, y_shuffled, 120)
    assert table["test_accuracy"].max() < 0.7
    assert 0.4 < table["test_accuracy"].mean() < 0.6
    assert (table["ci_low"] < 0.5).mean() > 0.9  # chance lies inside nearly every interval


def test_constant_activations_predict_the_majority():
    X = np.zeros((20, 8))
    y = np.array([0] * 12 + [1] * 8)
    probe = TagProbe(cv=4).fit(X, y)
    assert probe.rank_ == 0 and probe.model_ is None
    assert (probe.predict(np.ones((3, 8))) == 0).all()
    assert probe.cv_accuracy_ == pytest.approx(0.6)


def test_probe_input_errors_are_clear():
    with pytest.raises(CatchtagError, match="two classes"):
        TagProbe().fit(np.ones((10, 3)), np.zeros(10))
    with pytest.raises(CatchtagError, match="too few"):
        TagProbe(cv=5).fit(np.random.default_rng(0).standard_normal((6, 3)), [0, 1, 0, 1, 0, 1])
    with pytest.raises(CatchtagError, match="lack"):
        HeadProbes().fit({"full": np.zeros((4, 1, 1, 2))}, [0, 1, 0, 1])
    with pytest.raises(CatchtagError, match="one label per prompt"):
        HeadProbes(kinds=("full",)).fit({"full": np.zeros((4, 1, 1, 2))}, [0, 1, 0])


def test_wilson_interval():
    low, high = wilson_interval(90, 100)
    assert low == pytest.approx(0.8256, abs=1e-3) and high == pytest.approx(0.9448, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0


# ---- steering on a tiny model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model("tiny:llama")
    texts = ["The capital of Peru is Lima. This statement is:", "The capital of Chad is Oslo. This statement is:",
             "abc def ghi jkl mno. This statement is:"]
    return model, tok, tokenize_prompts(texts, tok)


ANSWERS = [ord("F"), ord("T")]  # byte tokenizer: token id = byte


def test_zero_steering_changes_nothing(tiny):
    model, tok, prompts = tiny
    plain = answer_logprobs(model, tok, prompts, ANSWERS)
    zero = steered_logprobs(model, tok, prompts, ANSWERS, steer={(1, 2): np.zeros(16, dtype=np.float32)})
    np.testing.assert_allclose(zero, plain, atol=1e-5)


def test_steering_equals_adding_to_the_head_output_before_w_o(tiny):
    """The engine's steer must act exactly like adding the vector to head h's slice of o_proj's input."""
    model, tok, prompts = tiny
    layer, head, dim = 1, 2, 16
    vec = np.random.default_rng(0).standard_normal(dim).astype(np.float32) * 3
    steered = steered_logprobs(model, tok, prompts, ANSWERS, steer={(layer, head): vec}, batch_size=2)
    o_proj = model.model.layers[layer].self_attn.o_proj
    lengths = [len(p.input_ids) for p in prompts]
    state = {}

    def add(module, args):
        x = args[0].clone()
        for b, n in enumerate(state["lengths"]):
            x[b, n - 1, head * dim:(head + 1) * dim] += torch.from_numpy(vec)
        return (x,)

    handle = o_proj.register_forward_pre_hook(add)
    try:
        refs = []
        for start in range(0, len(prompts), 2):  # right padding: the last real token is at length - 1
            state["lengths"] = lengths[start:start + 2]
            refs.append(answer_logprobs(model, tok, prompts[start:start + 2], ANSWERS, batch_size=2))
    finally:
        handle.remove()
    np.testing.assert_allclose(steered, np.concatenate(refs), atol=1e-4)
    assert np.abs(steered - answer_logprobs(model, tok, prompts, ANSWERS)).max() > 1e-3


def test_steering_along_the_log_odds_gradient_moves_the_answer_the_expected_way(tiny):
    model, tok, prompts = tiny
    layer, head, dim = 2, 1, 16
    o_proj = model.model.layers[layer].self_attn.o_proj
    grads = []

    def keep(module, args):
        args[0].retain_grad()
        grads.append(args[0])

    handle = o_proj.register_forward_pre_hook(keep)
    ids = torch.tensor([prompts[0].input_ids])
    logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, -1], -1)
    (logp[ANSWERS[1]] - logp[ANSWERS[0]]).backward()
    handle.remove()
    direction = grads[0].grad[0, -1, head * dim:(head + 1) * dim].detach().numpy().astype(np.float64)
    model.zero_grad()
    curve = steering_curve(model, tok, prompts[:1], np.array([1]), ANSWERS, layer, head, direction,
                           scales=(-0.5, 0.0, 0.5), n_random=2, progress=False)
    tag = curve[curve["direction"] == "tag"].set_index("scale")["shift"]
    assert tag[0.5] > 0 > tag[-0.5] and tag[0.0] == 0
    assert set(curve[curve["direction"] == "random"]["norm"].round(6)) == {round(0.5 * np.linalg.norm(direction), 6), 0}


def test_tag_direction_and_random_controls():
    tags = np.array([[1.0, 0], [3.0, 0], [0, 2.0], [0, 4.0]])
    np.testing.assert_allclose(tag_direction(tags, np.array([1, 1, 0, 0])), [2.0, -3.0])
    r = random_directions(2.5, 7, 4, seed=0)
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), 2.5)
    with pytest.raises(CatchtagError, match="both labels"):
        tag_direction(tags, np.array([1, 1, 1, 1]))
    with pytest.raises(CatchtagError, match="cannot steer"):
        model, tok = load_model("tiny:llama")
        steered_logprobs(model, tok, [Prompt(0, [1, 2, 3])], ANSWERS, steer={(9, 0): np.zeros(16)})


# ---- the commands, end to end on a tiny model ----------------------------------------------------------
def test_probe_and_steer_commands_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from catchtag.cli import app

    runner = CliRunner()
    out = tmp_path / "probe"
    args = ["probe", "--model", "tiny:llama", "--task", "truth", "--out", str(out), "--shots", "0", "--limit", "24",
            "--eps", "0.05", "--cv", "3", "--top", "1"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 12 and summary["n_test"] == 12 and summary["n_probes"] == 3 * 3 * 4
    assert (out / "probe_heatmap.png").stat().st_size > 1000 and (out / "heads.csv").is_file()
    table = pd.read_parquet(out / "probes.parquet")
    assert set(table["kind"]) == {"full", "tag", "nontag"} and table["test_accuracy"].between(0, 1).all()
    assert "model's own 0-shot test accuracy" in res.output

    res = runner.invoke(app, ["steer", "--probes", str(out), "--scales", "-1,1", "--n-random", "1"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "steer" / "steering.json").read_text())
    assert report["scales"] == [-1.0, 0.0, 1.0]
    rows = pd.read_parquet(out / "steer" / "steering.parquet")
    assert len(rows) == len(report["heads"]) * 2 * 3
    assert (rows[rows["scale"] == 0]["shift"] == 0).all()

    bad = runner.invoke(app, ["probe", "--model", "tiny:llama", "--task", "cities", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown probe task" in bad.output
    bad = runner.invoke(app, ["steer", "--probes", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "not a finished probe run" in bad.output
    bad = runner.invoke(app, ["steer", "--probes", str(out), "--heads", "3-1"])
    assert bad.exit_code == 2 and "LAYER.HEAD" in bad.output
