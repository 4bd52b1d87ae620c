"""Faults a run folder must survive without losing, doubling or deleting data: a second writer, --overwrite on
folders that are not (only) catchtag's, another model's ablation into a scan, a write that fails part-way, and input
that is odd but valid (a byte-order mark, a run where no head has a sink)."""

import re
import subprocess
import sys

import pandas as pd
import pytest

import catchtag
from catchtag.errors import CatchtagError
from catchtag.runs import WriterLock
from conftest import EPS, MIN_ROWS, TEXTS

KW = dict(eps=EPS, min_rows=MIN_ROWS, progress=False, model_name="tiny:llama", data_name="tests")


def test_a_second_writer_stops_at_once(tiny_models, tmp_path):
    """While one process writes a run, another scan of the same --out stops with one line (exit 2) and the rows are
    not doubled; once the first is done, the same command resumes and adds nothing."""
    model, tok = tiny_models("llama")
    run = tmp_path / "run"
    first = catchtag.scan(model, tok, TEXTS, out=run, **KW)
    lock = WriterLock(run, "scan")  # another writer holds the run
    try:
        with pytest.raises(CatchtagError, match="being written by another catchtag process"):
            catchtag.scan(model, tok, TEXTS, out=run, **KW)
        cli = subprocess.run([sys.executable, "-m", "catchtag", "scan", "-m", "tiny:llama", "--data", "builtin:prose",
                              "--limit", "2", "--max-tokens", "48", "--out", str(run)],
                             capture_output=True, text=True, timeout=300)
        assert cli.returncode == 2 and cli.stderr.count("\n") == 1, cli.stderr
        assert "being written by another catchtag process" in cli.stderr
    finally:
        lock.release()
    again = catchtag.scan(model, tok, TEXTS, out=run, **KW)
    assert len(again.heads) == len(first.heads) and not again.heads.duplicated(["prompt_id", "layer", "head"]).any()


def test_overwrite_needs_a_run_json_catchtag_wrote(tiny_models, tmp_path):
    model, tok = tiny_models("llama")
    theirs = tmp_path / "theirs"
    (theirs / "figures").mkdir(parents=True)
    (theirs / "run.json").write_text('{"experiment": "mine"}')
    (theirs / "summary.json").write_text("{}")
    (theirs / "figures" / "plot.png").write_bytes(b"png")
    before = sorted(p.relative_to(theirs) for p in theirs.rglob("*"))
    with pytest.raises(CatchtagError, match="not a catchtag run.*not one catchtag wrote"):
        catchtag.scan(model, tok, TEXTS, out=theirs, overwrite=True, **KW)
    assert sorted(p.relative_to(theirs) for p in theirs.rglob("*")) == before


def test_overwrite_keeps_the_users_files_inside_the_run(tiny_models, tmp_path):
    """Files the user put into a run's figures/, views/ or parts/ are not catchtag's: --overwrite removes what the
    run's list says catchtag wrote, and those files (and their folders) stay."""
    model, tok = tiny_models("llama")
    run = tmp_path / "run"
    catchtag.scan(model, tok, TEXTS, out=run, **KW)
    (run / "figures").mkdir(exist_ok=True)
    (run / "figures" / "my_plot.png").write_bytes(b"mine")
    (run / "parts" / "notes.txt").write_text("mine too")
    old_parts = sorted(p.name for p in (run / "parts").iterdir() if p.name != "notes.txt")
    assert old_parts
    catchtag.scan(model, tok, TEXTS[:2], out=run, overwrite=True, **KW)
    assert (run / "figures" / "my_plot.png").read_bytes() == b"mine"
    assert (run / "parts" / "notes.txt").read_text() == "mine too"
    assert len(pd.read_parquet(run / "prompts.parquet")) == 2


def test_overwrite_says_so_before_removing_another_jobs_results(tiny_models, tmp_path):
    model, tok = tiny_models("llama")
    run = tmp_path / "run"
    catchtag.scan(model, tok, TEXTS, out=run, **KW)
    (run / "ablate").mkdir()
    (run / "ablate" / "ablation.parquet").write_bytes(b"results")
    with pytest.raises(CatchtagError, match="ablate's results"):
        catchtag.scan(model, tok, TEXTS[:2], out=run, overwrite=True, **KW)
    assert (run / "ablate" / "ablation.parquet").read_bytes() == b"results" and (run / "heads.parquet").is_file()


def test_ablate_refuses_another_models_scan_folder(tiny_models, tmp_path):
    model, tok = tiny_models("llama")
    run = tmp_path / "run"
    catchtag.scan(model, tok, TEXTS, out=run, **KW)
    from catchtag.jobs import run_ablate

    with pytest.raises(CatchtagError, match="holds a scan of tiny:llama, not of tiny:qwen3"):
        run_ablate("tiny:qwen3", out=run, limit=2, max_tokens=48, progress=False)
    assert not (run / "ablate").exists()


def test_a_write_that_fails_stops_the_scan_and_leaves_no_half_file(tiny_models, tmp_path, monkeypatch):
    """A full disk on the first write of a part: the scan stops with one line naming the folder and how to resume,
    leaves no temporary file, and the same command afterwards finishes the run with every prompt once."""
    import catchtag.runs as runs

    model, tok = tiny_models("llama")
    run = tmp_path / "run"
    calls = {"n": 0}
    original = runs.write_table

    def full_disk(table, path):
        calls["n"] += 1
        if calls["n"] == 2:  # the second batch's first file
            raise OSError(28, "No space left on device")
        return original(table, path)

    monkeypatch.setattr(runs, "write_table", full_disk)
    texts = TEXTS * 3
    with pytest.raises(CatchtagError, match="could not write to.*No space left.*resume"):
        catchtag.scan(model, tok, texts, out=run, batch_size=2, **KW)
    monkeypatch.undo()
    assert not list(run.rglob("*.tmp*"))
    done = catchtag.scan(model, tok, texts, out=run, batch_size=2, **KW)
    assert sorted(done.prompts["prompt_id"]) == list(range(len(texts)))


def test_a_byte_order_mark_is_not_text(tiny_models, tmp_path):
    """A UTF-8 file that starts with a byte-order mark gives the same prompts as the same text without it, as .txt
    and as .jsonl."""
    from catchtag.data.prompts import load_prompts

    model, tok = tiny_models("llama")
    plain, bom = tmp_path / "plain.txt", tmp_path / "bom.txt"
    plain.write_text("Hello world. A sink catches the tokens after it.\n", encoding="utf-8")
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    want = [p.input_ids for p in load_prompts(str(plain), tok, model)]
    assert [p.input_ids for p in load_prompts(str(bom), tok, model)] == want
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b'{"text": "Hello world. A sink catches the tokens after it."}\n')
    assert [p.input_ids for p in load_prompts(str(jsonl), tok, model)] == want


def test_a_report_of_a_run_without_sinks_says_so(tmp_path):
    """A tiny model at the default eps has no sink anywhere: the report renders and says why a table is empty."""
    from typer.testing import CliRunner

    from catchtag.cli import app

    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["scan", "-m", "tiny:qwen3", "--limit", "2", "--max-tokens", "64", "--out", str(run)])
    assert r.exit_code == 0, r.output
    assert pd.read_parquet(run / "heads.parquet")["n_sinks"].sum() == 0, "the test needs a run with no sink"
    r = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "report.html")])
    assert r.exit_code == 0, r.output
    assert "No head has a sink at eps 0.2" in (tmp_path / "report.html").read_text()


def test_compare_keeps_two_runs_of_the_same_model(tiny_models, tmp_path):
    """a/run and b/run of one model are two columns of the comparison, named by their folders."""
    from catchtag.analysis.compare import load_runs

    model, tok = tiny_models("llama")
    for side in ("a", "b"):
        catchtag.scan(model, tok, TEXTS, out=tmp_path / side / "run", **KW)
    runs = load_runs([tmp_path / "a" / "run", tmp_path / "b" / "run"])
    assert len(runs) == 2 and sorted(runs) == ["b/run", "tiny:llama"]
    assert len(load_runs([tmp_path / "a" / "run"] * 2)) == 2


def _cli_with_failing_scan(monkeypatch, tmp_path, error):
    """`catchtag scan` in this process with its job replaced by one that raises ``error`` after creating --out."""
    from typer.testing import CliRunner

    from catchtag.cli import app
    from catchtag.jobs.options import Job

    def failing(job, config):
        (tmp_path / "run").mkdir(exist_ok=True)
        (tmp_path / "run" / "run.json").write_text("{}")
        raise error

    monkeypatch.setattr(Job, "execute", failing)
    monkeypatch.setenv("CATCHTAG_CACHE", str(tmp_path / "cache"))
    return CliRunner().invoke(app, ["scan", "-m", "tiny:llama", "--data", "builtin:prose", "--limit", "2",
                                    "--out", str(tmp_path / "run")])


def test_an_unexpected_failure_is_one_line_and_a_log(monkeypatch, tmp_path):
    """Any exception catchtag did not foresee ends in one line naming the command and a log holding the traceback,
    exit 1, instead of a traceback."""
    r = _cli_with_failing_scan(monkeypatch, tmp_path, RuntimeError("the kernel went away\nsecond line"))
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "catchtag scan failed: RuntimeError: the kernel went away" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    logs = list((tmp_path / "cache" / "logs").glob("catchtag-scan-*.log"))
    assert len(logs) == 1 and str(logs[0]) in lines[0]
    text = logs[0].read_text()
    assert "Traceback" in text and "the kernel went away" in text and "failing" in text


@pytest.mark.parametrize("err,code,says", [
    (OSError(30, "Read-only file system", "/runs/x/heads.parquet"), 2,
     "cannot write /runs/x/heads.parquet (Read-only file system). Fix: give --out a folder you can write to"),
    (PermissionError(13, "Permission denied", "/runs/x"), 2, "cannot write /runs/x (Permission denied)"),
    (OSError(28, "No space left on device", "/runs/x/parts/p.parquet"), 1,
     "the disk is full writing /runs/x/parts/p.parquet. Fix: free some space"),
])
def test_a_folder_that_cannot_be_written_is_one_line(monkeypatch, tmp_path, err, code, says):
    r = _cli_with_failing_scan(monkeypatch, tmp_path, err)
    assert r.exit_code == code and r.stderr.count("\n") == 1 and says in r.stderr, r.stderr
    assert not (tmp_path / "cache" / "logs").exists(), "a failure the user can fix needs no log"


def test_ctrl_c_says_where_the_run_resumes(monkeypatch, tmp_path):
    r = _cli_with_failing_scan(monkeypatch, tmp_path, KeyboardInterrupt())
    assert r.exit_code == 130, r.output
    assert r.stderr.strip() == (f"interrupted: {tmp_path / 'run'} keeps every batch that was finished; rerun the "
                                f"same command to resume")



def test_characters_split_over_byte_tokens_are_shown_as_text(tiny_models, tmp_path):
    """A byte-level tokenizer splits emoji, Arabic and Hebrew characters over several tokens that each decode to
    U+FFFD; the tables (and so the viewer and the report) show the characters, and a U+FFFD in the text stays."""
    from catchtag.scan import _token_strings

    model, tok = tiny_models("llama")
    text = "sinks 😀 in مرحبا and שלום, a real \ufffd too"
    ids = tok(text)["input_ids"]
    strings = _token_strings(tok, ids)
    assert len(strings) == len(ids)
    assert sum("\ufffd" in s for s in strings) == 3, "only the U+FFFD of the text itself (3 bytes, 3 tokens)"
    assert "😀" in strings and "م" in strings and "ש" in strings
    alone = tok.batch_decode([[i] for i in ids])
    assert sum("\ufffd" in s for s in alone) > 20, "the tokenizer must split these characters for the test to mean it"
    result = catchtag.scan(model, tok, [text], out=tmp_path / "run", **KW)
    shown = list(result.prompts["tokens"].iloc[0])
    assert shown == strings and "😀" in shown


def test_overwrite_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """`scan --overwrite` on a folder that is not a catchtag run stops before loading the model (which can take
    minutes), with the same line as after it, and nothing removed."""
    import catchtag.jobs as jobs
    import catchtag.models

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(catchtag.models, "load_model", no_load)
    with pytest.raises(CatchtagError, match="--overwrite refused: .* is not a catchtag run"):
        jobs.run_scan(model="tiny:llama", data="builtin:prose", out=theirs, overwrite=True, limit=2)
    assert (theirs / "thesis.tex").read_text() == "years of work"


def test_repair_hints_name_where_the_run_is_now(tmp_path):
    """A run folder that was moved: the hint reruns the recorded command with --out where the folder is now."""
    import json

    from catchtag.runs import repair_command

    moved = tmp_path / "moved here"
    moved.mkdir()
    (moved / "run.json").write_text(json.dumps({"command": "catchtag scan -m tiny:llama --out runs/old --limit 2"}))
    assert repair_command(moved) == f"run `catchtag scan -m tiny:llama --out '{moved}' --limit 2` again"
    (moved / "run.json").write_text(json.dumps({"command": "catchtag scan -m tiny:llama --out=runs/old"}))
    assert repair_command(moved) == f"run `catchtag scan -m tiny:llama '--out={moved}'` again"


def test_a_folder_that_is_not_a_model_says_so(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a model")
    cli = subprocess.run([sys.executable, "-m", "catchtag", "scan", "-m", str(folder), "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1, cli.stderr
    assert "is a folder but not a Hugging Face model (it has no config.json)" in cli.stderr
    assert "sentencepiece" not in cli.stderr and not (tmp_path / "run").exists()



def test_a_request_for_what_the_model_lacks_is_refused(tiny_models):
    """ActivationRequest(layers=[99]) used to keep nothing without a word: a layer, head or hidden state the model
    does not have is refused in one line; what it has is kept."""
    from catchtag.engine.request import ActivationRequest

    model, tok = tiny_models("llama")
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    for request_kw, says in (({"layers": [99]}, f"layers [99] out of range: the model has {L}"),
                             ({"heads": [0, H]}, f"heads [{H}] out of range"),
                             ({"attention_maps": [(1, 0), (L, 0)]}, f"attention_maps layers [{L}] out of range"),
                             ({"hidden_states": [L, L + 1]}, f"hidden_states [{L + 1}] out of range: the model has "
                                                             f"{L + 1}")):
        with pytest.raises(CatchtagError, match=re.escape(says)):
            catchtag.scan(model, tok, TEXTS[:1], request=ActivationRequest(**request_kw), eps=EPS, min_rows=MIN_ROWS,
                          progress=False)
    kept = catchtag.scan(model, tok, TEXTS[:1], request=ActivationRequest(layers=[L - 1], hidden_states=[L]),
                         eps=EPS, min_rows=MIN_ROWS, progress=False)
    assert kept.cache is not None


def test_every_job_writes_only_its_artifacts_and_one_writer_at_a_time(tmp_path):
    """scan, ablate, release, probe and steer on a tiny model write nothing but what runs.ARTIFACTS lists for them;
    a second writer of a job's --out is refused in one line before any model loads."""
    from typer.testing import CliRunner

    from catchtag.cli import app
    from catchtag.runs import unlisted_files

    cli = CliRunner()
    low = ["--eps", str(EPS), "--min-rows", str(MIN_ROWS)]
    run = tmp_path / "run"
    commands = {
        "scan": ["scan", "-m", "tiny:llama", "--limit", "2", "--max-tokens", "48", *low, "--out", str(run)],
        "ablate": ["ablate", "-m", "tiny:llama", "--limit", "2", "--max-tokens", "48", "--top", "1", "--controls", "1",
                   *low, "--out", str(run)],
        "release": ["release", "-m", "tiny:llama", "--limit", "4", "--max-tokens", "48", "--heads", "0.1", "--folds",
                    "2", *low, "--out", str(tmp_path / "release")],
        "probe": ["probe", "-m", "tiny:llama", "--limit", "8", "--cv", "2", "--top", "1", *low, "--out",
                  str(tmp_path / "probe")],
        "steer": ["steer", "--probes", str(tmp_path / "probe"), "--heads", "1.0", "--n-prompts", "2", "--n-random",
                  "1", "--scales", "-1,0,1"],
    }
    folders = {"scan": run, "ablate": run, "release": tmp_path / "release", "probe": tmp_path / "probe",
               "steer": tmp_path / "probe" / "steer"}
    for job, args in commands.items():
        res = cli.invoke(app, args)
        assert res.exit_code == 0, (job, res.output[-2000:])
        jobs = ("scan", "ablate") if job == "ablate" else (job,)
        assert not unlisted_files(folders[job], *jobs), (job, unlisted_files(folders[job], *jobs))
        if job in ("release", "probe", "steer"):  # their lock goes with them (a scan's run keeps its own)
            assert not (folders[job] / "catchtag.lock").exists(), job
    lock = WriterLock(tmp_path / "release", "release")  # another writer holds the release folder
    try:
        before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "release").rglob("*") if p.is_file())
        res = cli.invoke(app, commands["release"])
        assert res.exit_code == 2 and "being written by another catchtag process" in res.stderr, res.output
        assert len(res.stderr.strip().splitlines()) == 1
        assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "release").rglob("*") if p.is_file()) == before
    finally:
        lock.release()


def test_a_reader_that_goes_away_is_not_a_failure():
    """`catchtag pca --help | head -8`: the reader closes the pipe while the help is still being written; catchtag
    stops without a word on stderr (it used to report the BrokenPipeError as a bug, with a log: 4 times in 5)."""
    import os

    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-m", "catchtag", "pca", "--help"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "120"})
        for _ in range(8):
            proc.stdout.readline()
        proc.stdout.close()  # the reader goes away, as head does
        err = proc.stderr.read().decode()
        proc.wait(timeout=120)
        assert "failed" not in err and "Traceback" not in err, err
