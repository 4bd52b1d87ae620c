"""The instruments on models with a known answer (catchtag.toy.lm): toy:average, where catch, tag, release is the
computation, and two negative controls, toy:average-all (a task that needs no tag) and toy:average-cut (the layer-1
head catches but writes nothing). Each model is trained here from its seed, in a cache of this module's own."""

import numpy as np
import pytest

from catchtag.errors import CatchtagError


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    """A fresh model cache: the models are trained here (about 50 s each), not read from the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CATCHTAG_CACHE", str(tmp_path_factory.mktemp("toy-cache")))
    yield
    mp.undo()


def _mechanism(name):
    from transformers import LlamaForCausalLM

    from catchtag.models import cache_dir
    from catchtag.toy import lm

    model = LlamaForCausalLM.from_pretrained(lm.build(name, cache_dir(), progress=False),
                                             attn_implementation="eager").eval()
    return lm.mechanism(model, *lm.eval_batch(lm.TOY_LMS[name].task))


def test_the_positive_control_solves_its_task_by_catch_tag_release(toy_cache):
    m = _mechanism("average")
    assert m["accuracy"] >= 0.9  # the rounded mean after [SEP], on held-out texts
    assert m["catch"] >= 0.3  # tokens after [SEP] attend to [SEP] at layer 1 (the rest: mostly to <bos>)
    assert m["before_to_bos"] >= 0.5  # tokens before it attend to <bos>
    assert m["read"] >= 0.5 and m["read"] >= 5 * m["read_before"]  # '?' averages the numbers after [SEP]


def test_the_negative_controls_do_without_it(toy_cache):
    every = _mechanism("average-all")
    assert every["accuracy"] >= 0.9 and every["catch"] < 0.1  # solved, and [SEP] is no sink at layer 1
    cut = _mechanism("average-cut")
    positive = _mechanism("average")
    assert cut["catch"] == pytest.approx(positive["catch"])  # the same catch...
    assert cut["accuracy"] < 0.6  # ...whose tag reaches nothing: the task fails


def test_builtin_data_is_the_default_for_toy_models():
    from catchtag.data.prompts import read_texts
    from catchtag.models import default_data

    assert default_data("toy:average") == default_data("toy:average-cut") == "builtin:average"
    assert default_data("toy:average-all") == "builtin:average-all"
    assert default_data("toy:average-two-sink") == "builtin:average-two-sink"
    two = read_texts("builtin:average-two-sink")[0][0].split()
    middle = [int(w) for w in two[two.index("[SEP]") + 1:two.index("[SEP2]")]]
    both = middle + [int(w) for w in two[two.index("[SEP2]") + 1:two.index("?")]]
    assert two[-1] == f"={int(np.floor((np.mean(both) + np.mean(middle)) / 2 + 0.5))}"
    assert default_data("smollm2-135m") == "builtin:prose"
    texts, long = read_texts("builtin:average")
    assert not long and len(texts) == 256 and texts == read_texts("builtin:average")[0]  # seeded
    words = texts[0].split()
    numbers = [int(w) for w in words[words.index("[SEP]") + 1:words.index("?")]]
    assert words[-1] == f"={int(np.floor(np.mean(numbers) + 0.5))}"


def _ablate(name, tmp_path, **kw):
    from catchtag.jobs import run_ablate

    return run_ablate(f"toy:{name}", out=tmp_path / name, controls=2, figures=False, progress=False, **kw)


def test_ablate_sees_the_tag_where_it_is_and_nothing_where_it_is_not(toy_cache, tmp_path):
    s = _ablate("average", tmp_path, top=1)  # default settings: --mode mean, the head chosen by attribution
    (row,) = s["targets"]
    assert row["heads"] == [[0, 0]]  # the first-order estimate ranks the layer-1 head first
    assert row["delta_nll"] >= 10 * row["control_delta_nll"] > 0
    assert row["ci"][0] > row["control_ci"][1]  # disjoint 95% intervals
    import pandas as pd

    split = pd.read_csv(tmp_path / "average" / "ablate" / "tag_or_bias.csv").set_index(["layer", "head"])
    assert split.loc[(0, 0), "prompt_dependent"] == 1  # [SEP] is a sink on every prompt...
    assert split.loc[(0, 0), "varying_share"] > split.loc[(0, 0), "constant_share"]  # ...and the tag varies
    assert row["varying_share"] == pytest.approx(split.loc[(0, 0), "varying_share"], abs=1e-4)  # csv: 4 digits
    zero = _ablate("average", tmp_path / "zero", heads=[(0, 0)], mode="zero")["targets"][0]
    assert zero["delta_nll"] >= 10 * zero["control_delta_nll"] and zero["ci"][0] > zero["control_ci"][1]

    cut = _ablate("average-cut", tmp_path, heads=[(0, 0)])["targets"][0]
    assert cut["n_prompts_tagged"] == 32  # the head still catches on every prompt...
    assert cut["delta_nll"] == 0 and cut["control_delta_nll"] == 0  # ...and removing its tag changes nothing
    from catchtag.jobs import run_ablate

    last = run_ablate("toy:average-all", out=tmp_path / "last", top=1, controls=1, progress=False)  # figures on
    assert last["targets"][0]["heads"] == [[1, 0]] and len(last["figures"]) == 2  # a last-layer target draws too
    every = _ablate("average-all", tmp_path, heads=[(0, 0)])["targets"][0]
    assert every["n_prompts_tagged"] == 0  # no sink at layer 1, so no tag to remove


def _release(name, tmp_path):
    from catchtag.jobs import run_release

    s = run_release(f"toy:{name}", out=tmp_path / f"release-{name}", heads=[(0, 0)], figures=False)
    return {r["layer"]: r for r in s["rows"]}


def test_release_reads_the_grouping_only_where_the_tag_is_written(toy_cache, tmp_path):
    rows = _release("average", tmp_path)
    at2 = rows[1]  # the residual stream entering layer 2 (index 1), which its head reads
    assert at2["accuracy"] >= 0.9 and at2["chance"] <= 0.6
    assert at2["ci_low"] > at2["control_ci_high"]  # above the position-keeping control too
    cut = _release("average-cut", tmp_path)
    for r in cut.values():  # catch without a written tag: nothing beyond the control at any depth
        assert r["ci_low"] <= r["control_ci_high"] and r["control_ci_low"] <= r["ci_high"]
    assert cut[1]["accuracy"] < 0.6
    with pytest.raises(CatchtagError, match="fewer than two sink groups"):
        _release("average-all", tmp_path)  # no catch at layer 1: no grouping to read


def test_two_sinks_train_and_ablate_sees_their_head(toy_cache, tmp_path):
    """toy:average-two-sink (the mean of two means: after [SEP], and between [SEP] and [SEP2]) is solved with two
    sinks at layer 1 and a layer-2 read that weights the numbers between the separators more, as the answer does
    (ideally 3:1 for equal segments); ablate finds the head that holds both sinks and sees its tag beyond control."""
    from transformers import LlamaForCausalLM

    from catchtag.models import cache_dir
    from catchtag.toy import lm

    model = LlamaForCausalLM.from_pretrained(lm.build(lm.TWO_SINK, cache_dir(), progress=False),
                                             attn_implementation="eager").eval()
    m = lm.mechanism_two_sink(model, *lm.eval_batch(lm.TWO_SINK))
    assert m["accuracy"] >= 0.9
    assert max(m["catch_sep"]) >= 0.5 and max(m["catch_sep2"]) >= 0.3  # both separators are sinks at layer 1
    assert sum(m["read_middle"]) >= 3 * sum(m["read_last"])
    s = _ablate(lm.TWO_SINK, tmp_path, top=1)
    (row,) = s["targets"]
    catcher = int(np.argmax(m["catch_sep"]))
    assert row["heads"] == [[0, catcher]]  # the head that catches at both separators
    assert row["delta_nll"] >= 5 * row["control_delta_nll"] > 0 and row["ci"][0] > row["control_ci"][1]


def test_toy_names_are_listed_and_unknown_ones_refused():
    from catchtag.models import available_models, load_model
    names = {r["name"] for r in available_models()}
    assert {"toy:average", "toy:average-all", "toy:average-cut", "toy:average-two-sink"} <= names
    with pytest.raises(CatchtagError, match="unknown toy model"):
        load_model("toy:nope")


def test_training_does_not_depend_on_the_thread_count():
    """PyTorch splits sums by the thread count; a model trained with 4 threads would differ in the last digits after
    a few steps (and by up to 0.35 after the full 1000), so training runs on one thread whatever the caller set."""
    import torch

    from catchtag.toy import lm

    before = torch.get_num_threads()
    weights = {}
    try:
        for n in (1, 4):
            torch.set_num_threads(n)
            model = lm.train("average", steps=30)
            assert torch.get_num_threads() == n  # the caller's setting is restored
            weights[n] = torch.cat([p.detach().flatten() for p in model.parameters()])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(weights[1], weights[4])
