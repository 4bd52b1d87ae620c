"""Sinks while the model writes (engine.decode, catchtag.generation, `catchtag generate`): the tracker's state after
the last step against the float64 reference on the final texts, a step's sinks against the reference on the prefix,
greedy tokens against the model without catchtag, across architectures, padding, sliding windows (with sinks that
leave the window), learned sinks, a hybrid model and a static cache; the command end to end, resumed, refused."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from catchtag.data.prompts import Prompt
from catchtag.engine.reference import reference_scan
from catchtag.engine.request import SinkSettings
from catchtag.generation import generate, generation_config, track_generation
from catchtag.scan import _batch_tensors
from catchtag.tiny import tiny_config, tiny_tokenizer

from conftest import EPS, MIN_ROWS

SETTINGS = SinkSettings(eps=EPS, min_rows=MIN_ROWS, sweep_eps=(0.1,))
TEXTS = ["The quick brown fox jumps over the lazy dog, again and again.", "Hello there"]


def _model(arch: str, **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).eval()


def _prompts(tok, texts=TEXTS):
    return [Prompt(i, tok(t)["input_ids"], t) for i, t in enumerate(texts)]


def _plain(model, prompts, new: int, pad: int, cache=None):
    """The model's own greedy tokens (SDPA where the model has it, else eager), without catchtag."""
    ids, mask = _batch_tensors(prompts, None, "cpu", left=True, pad=pad)
    try:
        model.set_attn_implementation("sdpa")
    except ValueError:
        model.set_attn_implementation("eager")
    config = generation_config(model, new - 1, pad_token_id=pad)
    if cache:
        config.cache_implementation = cache
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]


@pytest.mark.parametrize("arch,cache", [("llama", None), ("gemma3", None), ("gpt_oss", None), ("qwen2", None),
                                        ("gpt2", None), ("qwen3_next", None), ("llama", "static"),
                                        ("gemma3", "static")])
def test_the_last_state_equals_the_reference_on_the_final_texts(arch, cache):
    """After 40 greedy steps of a left-padded batch: every column score, the sinks at two thresholds and both VE forms
    of the tracker equal the float64 eager reference run on each finished text alone; the tokens equal the model's
    own. gemma3 and gpt_oss slide a 12/24-token window over texts of 51 and 101 positions, so sinks leave the cache."""
    tok = tiny_tokenizer()
    model = _model(arch)
    prompts = _prompts(tok)
    n_new = 40
    want_tokens = _plain(model, prompts, n_new, tok.pad_token_id, cache)
    gen = dict(max_new_tokens=n_new, greedy=True)
    if cache:
        model.generation_config.cache_implementation = cache
    tracker, seqs, pads, T0, _ = track_generation(model, tok, prompts, SETTINGS, gen)
    assert torch.equal(seqs[:, T0:T0 + n_new], want_tokens[:, :n_new])
    model.set_attn_implementation("eager")
    checked = 0
    for b in range(len(prompts)):
        ids = seqs[b:b + 1, pads[b]:T0 + n_new]
        for e_i, eps in enumerate(SETTINGS.all_eps):
            rows, _ = reference_scan(model, ids, torch.ones_like(ids), eps=eps, min_rows=MIN_ROWS)
            for r in rows:
                got = tracker.final_stats(r["layer"])
                scores = got["col_scores"][b, r["head"]].numpy()[pads[b]:]
                assert np.array_equal(np.isnan(scores), np.isnan(r["scores"]))
                np.testing.assert_allclose(scores, r["scores"], atol=2e-6, equal_nan=True)
                score_order = np.argsort(-np.nan_to_num(scores, nan=-1))
                sinks = sorted(int(p) for p in score_order[:int(got["n_sinks"][b, r["head"], e_i])])
                assert sinks == r["sinks"], (arch, r["layer"], r["head"], eps)
                assert abs(float(got["ve"][b, r["head"], e_i]) - r["ve"]) < 1e-5
                assert abs(float(got["ve_uncentred"][b, r["head"], e_i]) - r["ve_uncentred"]) < 1e-5
                checked += 1
    assert checked >= 2 * len(prompts) * 2  # prompts x thresholds x at least two heads
    if arch == "gemma3":  # the window really dropped sink columns whose values the tracker had to keep
        assert max(int(st.evicted_n.max()) for st in tracker.layers.values() if st.evicted_n is not None) > 0
        full = [i for i, kind in enumerate(model.config.layer_types) if kind == "full_attention"]
        assert full and all(tracker.layers[i].evicted_v is None for i in full)  # room only where a window drops
    if arch == "llama":  # no window: no room is made for dropped values
        assert all(st.evicted_v is None for st in tracker.layers.values())


def test_a_steps_sinks_are_the_references_on_the_prefix(monkeypatch):
    """The sinks listed at step k (with their scores) are what the float64 reference finds on the text up to and
    including the token written at step k; n_sinks counts them all (the records moved to the host every 5 steps on
    the way, as a long generation on a GPU moves them)."""
    import catchtag.generation
    from catchtag.engine.decode import SinkTracker

    monkeypatch.setattr(catchtag.generation, "OFFLOAD_STEPS", 5)
    init = SinkTracker.__init__

    def on_a_device(self, *args, **kwargs):  # move the records in blocks as on a GPU
        init(self, *args, **kwargs)
        self.host_devices = ()

    monkeypatch.setattr(SinkTracker, "__init__", on_a_device)
    tok = tiny_tokenizer()
    model = _model("llama")
    result = generate(model, tok, TEXTS, max_new_tokens=24, eps=EPS, min_rows=MIN_ROWS, keep=64, chat=False,
                      progress=False, scan_final=False)
    model.set_attn_implementation("eager")
    for pid, step in ((0, 0), (0, 9), (1, 5), (1, 24)):
        row = result.prompts.iloc[pid]
        n_prompt = int(row["n_prompt_tokens"])
        ids = torch.tensor([list(row["token_ids"])[:n_prompt + step]])
        rows, _ = reference_scan(model, ids, torch.ones_like(ids), eps=EPS, min_rows=MIN_ROWS)
        listed = result.sinks[(result.sinks["prompt_id"] == pid) & (result.sinks["step"] == step)]
        counted = result.steps[(result.steps["prompt_id"] == pid) & (result.steps["step"] == step)]
        assert len(counted) == len(rows)
        for r in rows:
            here = listed[(listed["layer"] == r["layer"]) & (listed["head"] == r["head"])]
            assert sorted(here["position"]) == r["sinks"], (pid, step, r["layer"], r["head"])
            np.testing.assert_allclose(here.sort_values("position")["score"], [r["scores"][p] for p in r["sinks"]],
                                       atol=2e-6)
            n = counted[(counted["layer"] == r["layer"]) & (counted["head"] == r["head"])]["n_sinks"]
            assert int(n.iloc[0]) == len(r["sinks"])


def test_a_sequence_that_ends_adds_no_rows_and_matches_its_scan():
    """With the model's end token set to a token it writes early, that sequence ends there (the end token kept, its
    row counted, nothing after it); the other goes on. The tracker's last state equals a scan of each finished
    text, and the per-step tables stop where the text does."""
    tok = tiny_tokenizer()
    model = _model("llama")
    first = _plain(model, _prompts(tok), 8, tok.pad_token_id)
    model.generation_config.eos_token_id = int(first[1, 3])  # prompt 1's 4th token (not in prompt 0's first 4)
    result = generate(model, tok, TEXTS, max_new_tokens=30, eps=EPS, min_rows=MIN_ROWS, chat=False, progress=False,
                      tracker_ve=True)
    ended = result.prompts.set_index("prompt_id")
    assert ended.loc[1, "ended"] == "eos" and ended.loc[1, "n_new_tokens"] <= 4
    assert list(ended.loc[1, "token_ids"])[-1] == int(first[1, 3])
    assert int(result.steps[result.steps["prompt_id"] == 1]["step"].max()) == ended.loc[1, "n_new_tokens"]
    assert result.check["same_sinks"] == 1.0 and result.check["same_lengths"]
    assert result.check["max_abs_ve_diff"] < 1e-5


def test_without_its_own_ve_the_tracker_keeps_no_gram_and_the_scan_gives_the_ve():
    """generate()'s default with a scan of the finished texts: the tracker keeps no Gram matrix (its memory stays
    O(layers x heads x T)), its last state still has the scan's sinks, its VE is NaN and the check says the VE was
    not compared (NaN), not 0; the scan's VE is there."""
    tok = tiny_tokenizer()
    model = _model("llama")
    result = generate(model, tok, TEXTS, max_new_tokens=20, eps=EPS, min_rows=MIN_ROWS, chat=False, progress=False)
    assert result.final["ve"].isna().all() and result.final["ve_uncentred"].isna().all()
    assert result.check["same_sinks"] == 1.0 and result.check["same_lengths"]
    assert np.isnan(result.check["max_abs_ve_diff"]) and np.isnan(result.check["max_abs_ve_uncentred_diff"])
    assert result.scan.heads["ve"].notna().all() and (result.scan.heads["n_sinks"] > 0).any()
    gen = dict(max_new_tokens=5, greedy=True)
    for ve in (False, True):
        tracker = track_generation(model, tok, _prompts(tok), SETTINGS, gen, ve=ve)[0]
        assert all((st.gram is not None) == ve and (st.out_sum is not None) == ve for st in tracker.layers.values())
        assert ve or not any(st.pending for st in tracker.layers.values())
    # a sliding window drops sink columns: without the tracker's VE the sinks still equal the scan's
    gemma = _model("gemma3")
    result = generate(gemma, tok, TEXTS, max_new_tokens=40, eps=EPS, min_rows=MIN_ROWS, chat=False, progress=False)
    assert result.check["same_sinks"] == 1.0 and result.final["ve"].isna().all()
    tracker = track_generation(gemma, tok, _prompts(tok), SETTINGS, dict(max_new_tokens=40), ve=False)[0]
    assert any(st.first_key > 0 for st in tracker.layers.values())  # the window did drop columns


def test_a_static_cache_is_not_compiled_under_the_tracker(monkeypatch):
    """transformers compiles a static cache's forward on its own (on a GPU; here forced on the CPU as its tests do):
    the tracker's host state cannot live in a compiled graph (on CUDA inductor failed on the Triton step), so
    catchtag's generation decodes eagerly, with the same tokens as the model's own compiled-or-not generate()."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import CompileConfig

    tok = tiny_tokenizer()
    model = _model("llama")
    compiled = []
    monkeypatch.setattr(type(model), "get_compiled_call", lambda self, config: compiled.append(config) or self.__call__)
    config = CompileConfig()
    config._compile_all_devices = True
    model.generation_config = GenerationConfig(cache_implementation="static", compile_config=config)
    want = _plain(model, _prompts(tok), 8, tok.pad_token_id, "static")
    assert compiled  # the model's own generate() would compile here
    compiled.clear()
    tracker, seqs, pads, T0, _ = track_generation(model, tok, _prompts(tok), SETTINGS, dict(max_new_tokens=8))
    assert not compiled and torch.equal(seqs[:, T0:T0 + 8], want[:, :8])


def test_the_tracker_refuses_what_it_cannot_follow():
    """A pass adding several tokens to a filled cache (assisted or chunked decoding) is refused in one line."""
    from catchtag.engine.decode import SinkTracker, tracking
    from catchtag.errors import CatchtagError
    from catchtag.scan import using_catchtag

    tok = tiny_tokenizer()
    model = _model("llama")
    ids = torch.tensor([tok("Hello there, general")["input_ids"]])
    with using_catchtag(model), torch.no_grad():
        out = model(input_ids=ids[:, :10], use_cache=True)
        with tracking(SinkTracker(SETTINGS, capacity=64)), pytest.raises(CatchtagError, match="one token per step|"
                                                                          "whole prompt"):
            model(input_ids=ids[:, 10:], past_key_values=out.past_key_values, use_cache=True)


def test_generate_command_end_to_end_resumes_and_refuses(tmp_path):
    """`catchtag generate` on a tiny model: its tables, the scan of the finished texts, the page; nothing else in
    --out; run again it redoes nothing and doubles no row; a lost batch is redone; bad input is one line, exit 2."""
    from typer.testing import CliRunner

    from catchtag.cli import app
    from catchtag.runs import unlisted_files

    cli = CliRunner()
    out = tmp_path / "gen"
    args = ["generate", "-m", "tiny:llama", "--limit", "3", "--max-tokens", "24", "--max-new-tokens", "12",
            "--batch-size", "2", "--eps", str(EPS), "--min-rows", str(MIN_ROWS), "--out", str(out)]
    res = cli.invoke(app, args)
    assert res.exit_code == 0, res.output[-2000:]
    assert "same sinks in 100.0%" in res.output
    assert not unlisted_files(out, "generate"), unlisted_files(out, "generate")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_prompts"] == 3 and summary["check"]["same_sinks"] == 1.0
    steps = pd.read_parquet(out / "steps.parquet")
    assert not steps.duplicated(["prompt_id", "step", "layer", "head"]).any()
    page = (out / "generation.html").read_text()
    assert "<img" in page and 'href="view.html"' in page
    view = (out / "view.html").read_text()  # the token viewer of the first text, with the step slider
    assert 'id="step"' in view and 'max="12"' in view and '"steps":{"prompt":' in view
    res = cli.invoke(app, ["report", str(out), "--out", str(tmp_path / "report.html")])
    assert res.exit_code == 0, res.output[-2000:]
    page = (tmp_path / "report.html").read_text()
    assert "While the model writes" in page and page.count("<img") >= 3
    assert "Token viewer of prompt 0" in page and "&lt;input type=&quot;range&quot; id=&quot;step&quot;" in page
    assert "the VE from the scan (the tracker kept none" in page  # not "VE within nan"
    res = cli.invoke(app, args[:-1] + [str(tmp_path / "gen_ve"), "--limit", "1", "--tracker-ve"])
    assert res.exit_code == 0 and "VE within " in res.output, res.output[-2000:]
    checked = json.loads((tmp_path / "gen_ve" / "summary.json").read_text())["check"]
    assert checked["same_sinks"] == 1.0 and checked["max_abs_ve_diff"] < 1e-5
    assert "VE within" in (tmp_path / "gen_ve" / "generation.html").read_text()
    res = cli.invoke(app, ["view", "--generation", str(out), "--prompt", "2", "--out", str(tmp_path / "v2.html")])
    assert res.exit_code == 0 and "12 written, step by step" in res.output, res.output[-2000:]
    assert 'max="12"' in (tmp_path / "v2.html").read_text() and "prompt 2" in (tmp_path / "v2.html").read_text()
    (out / "parts" / "steps-00001.parquet").unlink()  # an interrupted run lost its last batch
    res = cli.invoke(app, args)
    assert res.exit_code == 0, res.output[-2000:]
    again = pd.read_parquet(out / "steps.parquet")
    pd.testing.assert_frame_equal(again, steps)
    for bad, words in ((["--max-new-tokens", "0"], "--max-new-tokens"), (["--chat", "maybe"], "--chat"),
                       (["--prompt", " "], "--prompt is empty"), (["--top-p", "1.5"], "--top-p")):
        res = cli.invoke(app, args[:1] + ["-m", "tiny:llama", "--out", str(tmp_path / "bad"), *bad])
        assert res.exit_code == 2 and words in res.stderr, (bad, res.output)
        assert len(res.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()
    res = cli.invoke(app, ["generate", "-m", "tiny:llama", "--chat", "on", "--prompt", "Hi", "--out",
                           str(tmp_path / "chat")])
    assert res.exit_code == 2 and "no chat template" in res.stderr


def test_generate_in_python_returns_the_text_and_samples_reproducibly():
    """catchtag.generate returns the written texts; sampling with a seed gives the same text twice."""
    import catchtag

    tok = tiny_tokenizer()
    model = _model("llama")
    one = catchtag.generate(model, tok, "Once upon a time", max_new_tokens=10, greedy=False, seed=3, chat=False,
                            eps=EPS, min_rows=MIN_ROWS, progress=False, scan_final=False)
    two = catchtag.generate(model, tok, "Once upon a time", max_new_tokens=10, greedy=False, seed=3, chat=False,
                            eps=EPS, min_rows=MIN_ROWS, progress=False, scan_final=False)
    assert one.texts == two.texts and len(one.texts[0]) > 0
    assert set(one.steps["step"]) == set(range(0, 11))
    with pytest.raises(catchtag.CatchtagError, match="max_new_tokens"):
        catchtag.generate(model, tok, "Hi", max_new_tokens=0)
    # the step-by-step viewer needs the scan of the finished text, and a prompt the result has
    with pytest.raises(catchtag.CatchtagError, match="scan_final=True"):
        catchtag.show_generation(model, tok, one)
    with pytest.raises(catchtag.CatchtagError, match="no prompt_id 7"):
        catchtag.show_generation(model, tok, catchtag.generate(model, tok, "Hi there", max_new_tokens=3, chat=False,
                                                               eps=EPS, min_rows=2, progress=False), prompt_id=7)


def test_the_page_colours_written_tokens_by_their_sink_and_names_it():
    """coloured_tokens_html: each written token takes the colour of its tagging sink; the legend names every sink by
    its token, a written one too; a token no sink caught stays white."""
    from catchtag.report.generation import coloured_tokens_html

    rows = [(1, 3, " cat", 0), (2, 4, " the", 0), (3, 5, " dog", 4), (4, 6, " ran", -1)]  # step, position, token, sink
    steps = pd.DataFrame([{"prompt_id": 0, "step": k, "position": p, "token": t, "layer": 1, "head": 0, "n_sinks": 1,
                           "caught": 0.5, "tag_share": 0.1, "explained": 0.1, "tagging_sink": s}
                          for k, p, t, s in rows])
    page = coloured_tokens_html(steps, 0, 1, 0, ["<s>", " A", " big"])
    assert "sink at 0: &lt;s&gt;" in page and "sink at 4:  the" in page
    assert page.count("background:#ffffff") == 1 and "step 3: caught 0.50 by the sink at 4" in page
