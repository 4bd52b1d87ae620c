"""Every command with bad input: exit code 2, one line on stderr naming the problem and the fix, no traceback, and
no file written or changed outside what the command owns."""

import os
from pathlib import Path

import pytest

from conftest import EPS, MIN_ROWS

M = ["--model", "tiny:llama"]
LOW = ["--eps", str(EPS), "--min-rows", str(MIN_ROWS)]


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A folder with one finished run, an unfinished run, a plain file, a plain folder and a non-UTF-8 file."""
    from catchtag import load_model, scan

    root = tmp_path_factory.mktemp("cli")
    net, tok = load_model("tiny:llama", device="cpu")
    scan(net, tok, ["The cat sat on the mat and looked at the dog for a while."] * 2, eps=EPS, min_rows=MIN_ROWS,
         out=root / "run", progress=False, model_name="tiny:llama", data_name="tests")
    (root / "unfinished").mkdir()
    (root / "unfinished" / "run.json").write_text("{}")
    (root / "file.txt").write_text("a file\n")
    (root / "folder").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "thesis.tex").write_text("years of work")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (root / "prompts.txt").write_text("The cat sat on the mat and looked at the dog for a while.\n")
    return root


CASES = [
    # scan
    (["scan", *M, "--out", "{file.txt}"], "is a file, not a folder"),
    (["scan", *M, "--out", "{new}", "--device", "gpu"], "unknown device 'gpu'"),
    (["scan", *M, "--out", "{new}", "--max-tokens", "-3"], "--max-tokens must be >= 0"),
    (["scan", *M, "--out", "{new}", "--chunk", "0"], "--chunk must be"),
    (["scan", *M, "--out", "{new}", "--limit", "0"], "--limit must be"),
    (["scan", *M, "--out", "{new}", "--batch-size", "0"], "--batch-size must be"),
    (["scan", *M, "--out", "{new}", "--min-rows", "0"], "min_rows must be"),
    (["scan", *M, "--out", "{new}", "--sweep", "0.1,abc"], "bad value"),
    (["scan", *M, "--out", "{new}", "--data", "{latin1.txt}"], "UTF-8"),
    (["scan", *M, "--out", "{notes}", "--overwrite"], "not a catchtag run"),
    (["scan", *M, "--out", "{run}", "--eps", "0.3"], "other settings"),
    # per-prompt analyses
    (["view", *M, *LOW, "--layer", "99", "--head", "0", "--out", "{new}.html"], "--layer 99 is out of range"),
    (["view", *M, *LOW, "--layer", "0", "--head", "9", "--out", "{new}.html"], "--head 9 is out of range"),
    (["view", *M, *LOW, "--out", "{folder}"], "is a folder"),
    (["pca", *M, *LOW, "--layer", "7", "--head", "0", "--out", "{new}"], "--layer 7 is out of range"),
    (["pca", *M, *LOW, "--deeper", "12", "--out", "{new}"], "--deeper 12 is out of range"),
    (["geometry", *M, *LOW, "--text-file", "{missing.txt}", "--out", "{new}"], "does not exist"),
    (["pca", *M, *LOW, "--prompt", "100000", "--out", "{new}"], "out of range"),
    # runs
    (["report", "{unfinished}", "--out", "{new}.html"], "not a finished catchtag run"),
    (["report", "{run}", "--out", "{folder}"], "is a folder"),
    (["compare", "{folder}", "--out", "{new}"], "not a finished catchtag run"),
    (["taxonomy", "{unfinished}", "--out", "{new}"], "not a finished catchtag run"),
    (["sweep", *M, "--device", "cuda:7", "--out", "{new}"], "cuda"),
    # probes
    (["probe", *M, "--task", "nonsense", "--out", "{new}"], "nonsense"),
    (["steer", "--probes", "{missing}", "--out", "{new}"], "missing"),
    (["steer", "--probes", "{folder}", "--out", "{new}"], "folder"),
    (["steer", "--probes", "{run}", "--out", "{new}"], "probe"),
]


def _fill(args, root: Path, new: Path):
    out = []
    for a in args:
        if a.startswith("{new}"):
            a = str(new) + a[len("{new}"):]
        elif a.startswith("{") and a.endswith("}"):
            a = str(root / a[1:-1])
        out.append(a)
    return out


def _snapshot(root: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_input_gives_one_line_and_exit_2(place, args, message, tmp_path):
    from typer.testing import CliRunner

    from catchtag.cli import app

    new = tmp_path / "new"
    before = _snapshot(place)
    result = CliRunner().invoke(app, _fill(args, place, new), env={**os.environ, "COLUMNS": "200"})
    err = result.stderr.strip()
    assert result.exit_code == 2, (result.exit_code, result.stdout[-1500:], err[-1500:], result.exception)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert message in err, err
    assert _snapshot(place) == before, "a bad command changed files it does not own"
    assert not new.with_suffix(".html").exists()
    assert not (new / "heads.parquet").exists()
