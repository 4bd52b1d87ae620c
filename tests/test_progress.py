"""Progress output suits a terminal and a log: plain lines, no carriage returns, when stderr is not a terminal."""

import io

from catchtag import progress
from catchtag.progress import progress_bar


def test_a_log_gets_plain_lines(monkeypatch):
    log = io.StringIO()  # not a terminal
    clock = iter([0.0, 0.0, 10.0, 40.0, 40.0, 50.0, 80.0])  # start, its line, 3 updates (a line at 40), close
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    bar = progress_bar(total=4, desc="scan", unit="prompt", stream=log)
    for _ in range(3):
        bar.update(1)
    bar.set_postfix(loss="0.125")
    bar.close()
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0] == "scan: 0/4 prompt (0%), 0 s · started"
    assert lines[1] == "scan: 2/4 prompt (50%), 40 s", "a line at most every LINE_SECONDS, not one per update"
    assert lines[-1] == "scan: 3/4 prompt (75%), 80 s · loss=0.125 · done"
    assert len(lines) == 3


def test_iterating_reports_every_item_and_ends_once():
    log = io.StringIO()
    assert list(progress_bar(range(5), desc="layers", unit="layer", stream=log)) == [0, 1, 2, 3, 4]
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("layers: 0/5 layer") and lines[-1].startswith("layers: 5/5 layer (100%)")
    assert lines[-1].endswith("done") and len(lines) == 2


def test_a_terminal_gets_tqdm():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = progress_bar(total=2, desc="scan", stream=Terminal())
    assert type(bar).__module__.startswith("tqdm")
    bar.close()



def test_a_command_in_a_pipe_writes_no_bar(tiny_models, tmp_path):
    """`catchtag scan` of a saved model with stderr to a pipe: plain progress lines and no carriage return. (The
    libraries' own bars, off in a pipe through TQDM_DISABLE, show only on real models: checked by hand.)"""
    import os
    import subprocess
    import sys

    model, tok = tiny_models("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    cli = subprocess.run([sys.executable, "-m", "catchtag", "scan", "-m", str(tmp_path / "model"), "--data",
                          "builtin:prose", "--limit", "2", "--max-tokens", "32", "--out", str(tmp_path / "run"),
                          "--no-figures", "--no-views"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "CATCHTAG_CACHE": str(tmp_path / "cache")})
    assert cli.returncode == 0, cli.stderr
    assert "\r" not in cli.stderr, cli.stderr
    assert "scan: 0/2 prompt (0%)" in cli.stderr and "scan: 2/2 prompt (100%)" in cli.stderr
