"""Every command with bad input: exit code 2, one line on stderr naming the problem and the fix, no traceback, and
no file written or changed outside what the command owns (a new --out is not even created).

CASES is the table; ABC_CASES adds a non-number for every numeric option of every command (found from the commands
themselves), and test_the_table_covers_every_command checks that the table keeps up with the CLI: each numeric
option has a bad value, each --device the three unknown devices, each --out one of the wrong kind."""

import inspect
import os
import shutil
import typing
from pathlib import Path

import pytest

from conftest import EPS, MIN_ROWS

M = ["--model", "tiny:llama"]
LOW = ["--eps", str(EPS), "--min-rows", str(MIN_ROWS)]
TEXT = ["--text", "The cat sat on the mat and looked at the dog for a while."]
DEVICES = [("gpu", "unknown device 'gpu'"), ("tpu", "unknown device 'tpu'"), ("cuda:7", "cuda:7")]


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A folder with one finished run, unfinished and corrupt runs, a probe folder without its summary, plain and
    broken data files, a plain file and a plain folder."""
    from catchtag import load_model, scan

    root = tmp_path_factory.mktemp("cli")
    net, tok = load_model("tiny:llama", device="cpu")
    scan(net, tok, ["The cat sat on the mat and looked at the dog for a while."] * 2, eps=EPS, min_rows=MIN_ROWS,
         out=root / "run", progress=False, model_name="tiny:llama", data_name="tests")
    (root / "unfinished").mkdir()
    (root / "unfinished" / "run.json").write_text("{}")
    for name in ("badheads", "badsummary"):
        shutil.copytree(root / "run", root / name)
    (root / "badheads" / "heads.parquet").write_bytes(b"PAR1 this is not parquet \x00\x01\x02")
    (root / "badsummary" / "summary.json").write_bytes(b"{\"settings\": [oops \xff")
    (root / "badparts" / "parts").mkdir(parents=True)  # started, with a garbage batch file, no heads.parquet
    shutil.copy(root / "run" / "run.json", root / "badparts" / "run.json")
    (root / "badparts" / "parts" / "heads-r0-00000.parquet").write_bytes(b"garbage")
    (root / "badparts" / "parts" / "prompts-r0-00000.parquet").write_bytes(b"garbage")
    (root / "probe_nosummary" / "scan").mkdir(parents=True)  # a probe run that never finished
    (root / "probe_nosummary" / "scan" / "run.json").write_text("{}")
    (root / "probe_badsummary").mkdir()
    (root / "probe_badsummary" / "summary.json").write_bytes(b"\xff\xfe not json")
    (root / "file.txt").write_text("a file\n")
    (root / "folder").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "thesis.tex").write_text("years of work")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (root / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("  \n\n \n")
    (root / "empty.jsonl").write_text("")
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    (root / "notext.jsonl").write_text('{"prompt": "no text field here"}\n')
    (root / "prompts.txt").write_text("The cat sat on the mat and looked at the dog for a while.\n")
    from catchtag.jobs import run_generate

    run_generate("tiny:llama", root / "gen", prompt="The cat sat on the mat.", max_new_tokens=3, eps=EPS,
                 min_rows=MIN_ROWS, figures=False, progress=False)
    return root


# bad --data (a file of prompts) and --text-file (one prompt): (value, what the one line must say)
BAD_DATA = [("{missing.txt}", "does not exist"), ("{empty.txt}", "is empty"), ("{blank.txt}", "is empty"),
            ("{empty.jsonl}", "holds no prompts"), ("{latin1.txt}", "not UTF-8"), ("{latin1.jsonl}", "not UTF-8"),
            ("{bad.jsonl}", "not valid JSON"), ("{notext.jsonl}", "no string 'text' field"),
            ("{folder}", "is a folder"), ("builtin:nothing", "unknown built-in data")]
BAD_TEXT_FILE = [("{missing.txt}", "does not exist"), ("{empty.txt}", "is empty"), ("{blank.txt}", "is empty"),
                 ("{latin1.txt}", "not UTF-8"), ("{folder}", "is a folder")]
# runs that report, compare, taxonomy and sweep refuse
BAD_RUNS = [("{unfinished}", "not a finished catchtag run"), ("{badheads}", "heads.parquet is broken"),
            ("{badsummary}", "summary.json is broken"), ("{badparts}", "not a finished catchtag run"),
            ("{folder}", "not a finished catchtag run"), ("{missing}", "not a folder"),
            ("{file.txt}", "not a folder")]
# where a folder --out is wanted: a file, and a path under a file
FILE_AS_FOLDER = [("{file.txt}", "is a file, not a folder"), ("{file.txt}/sub", "is a file, not a folder")]
# where an HTML file --out is wanted: a folder, and a path under a file
FOLDER_AS_FILE = [("{folder}", "is a folder"), ("{file.txt}/page.html", "is a file, not a folder")]

ONE_PROMPT = {"pca": [*M, *LOW, *TEXT], "geometry": [*M, *LOW, *TEXT], "view": [*M, *LOW, *TEXT]}

CASES = [
    # ---- scan
    *[(["scan", *M, "--out", out], msg) for out, msg in FILE_AS_FOLDER],
    *[(["scan", *M, "--out", "{new}", "--device", d], msg) for d, msg in DEVICES],
    (["scan", *M, "--out", "{new}", "--eps", "0"], "eps must lie in (0, 1)"),
    (["scan", *M, "--out", "{new}", "--eps", "1.5"], "eps must lie in (0, 1)"),
    (["scan", *M, "--out", "{new}", "--eps", "nan"], "eps must lie in (0, 1)"),
    (["scan", *M, "--out", "{new}", "--min-rows", "0"], "--min-rows must be >= 1"),
    (["scan", *M, "--out", "{new}", "--max-tokens", "-3"], "--max-tokens must be >= 0"),
    (["scan", *M, "--out", "{new}", "--chunk", "0"], "--chunk must be"),
    (["scan", *M, "--out", "{new}", "--limit", "0"], "--limit must be"),
    (["scan", *M, "--out", "{new}", "--limit", "-2"], "--limit must be"),
    (["scan", *M, "--out", "{new}", "--batch-size", "0"], "--batch-size must be"),
    (["scan", *M, "--out", "{new}", "--sweep", "0.1,abc"], "--sweep must be comma-separated numbers"),
    (["scan", *M, "--out", "{new}", "--sweep", "0.1,2"], "--sweep must lie in (0, 1)"),
    (["scan", *M, "--out", "{new}", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["scan", *M, "--out", "{new}", "--device-map", "nowhere"], "unknown device map 'nowhere'"),
    (["scan", "--model", "no-such-model", "--out", "{new}"], "unknown model 'no-such-model'"),
    *[(["scan", *M, "--out", "{new}", "--data", d], msg) for d, msg in BAD_DATA],
    (["scan", *M, "--out", "{notes}", "--overwrite"], "not a catchtag run"),
    (["scan", *M, "--out", "{notes}"], "not a catchtag run"),
    (["scan", *M, "--out", "{run}", "--eps", "0.3"], "other settings"),
    (["scan", *M], "Missing option '--out'"),
    (["scan", *M, "--out", "{new}", "--no-such-flag"], "No such option: --no-such-flag"),
    # ---- ablate
    *[(["ablate", *M, "--out", out], msg) for out, msg in FILE_AS_FOLDER],
    *[(["ablate", *M, "--out", "{new}", "--device", d], msg) for d, msg in DEVICES],
    (["ablate", *M, "--out", "{new}", "--top", "0"], "--top must be >= 1"),
    (["ablate", *M, "--out", "{new}", "--controls", "-1"], "--controls must be >= 0"),
    (["ablate", *M, "--out", "{new}", "--eps", "0"], "eps must lie in (0, 1)"),
    (["ablate", *M, "--out", "{new}", "--min-rows", "0"], "--min-rows must be >= 1"),
    (["ablate", *M, "--out", "{new}", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["ablate", *M, "--out", "{new}", "--limit", "0"], "--limit must be >= 1"),
    (["ablate", *M, "--out", "{new}", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["ablate", *M, "--out", "{new}", "--seed", "-1"], "--seed must be >= 0"),
    (["ablate", *M, "--out", "{new}", "--mode", "half"], "--mode must be mean, zero or constant"),
    (["ablate", *M, "--out", "{new}", "--group", "heads"], "--group must be layer or all"),
    (["ablate", *M, "--out", "{new}", "--heads", "3"], "--heads must look like LAYER.HEAD"),
    (["ablate", *M, "--out", "{new}", "--heads", "1.1,0.2,1.1"], "--heads names 1.1 more than once"),
    (["ablate", *M, "--out", "{new}", "--heads", "9.0", *LOW, "--limit", "2"], "--heads 9.0 is out of range"),
    (["ablate", *M, "--out", "{new}", "--dtype", "float8"], "unknown dtype 'float8'"),
    *[(["ablate", *M, "--out", "{new}", "--data", d], msg) for d, msg in BAD_DATA[:6]],
    # ---- generate
    *[(["generate", *M, "--out", out], msg) for out, msg in FILE_AS_FOLDER],
    *[(["generate", *M, "--out", "{new}", "--device", d], msg) for d, msg in DEVICES],
    (["generate", *M, "--out", "{new}", "--limit", "0"], "--limit must be >= 1"),
    (["generate", *M, "--out", "{new}", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["generate", *M, "--out", "{new}", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["generate", *M, "--out", "{new}", "--temperature", "0"], "--temperature must lie in (0, 100)"),
    (["generate", *M, "--out", "{new}", "--top-p", "1.5"], "--top-p must lie in (0, 1]"),
    (["generate", *M, "--out", "{new}", "--top-k", "0"], "--top-k must be >= 1"),
    (["generate", *M, "--out", "{new}", "--seed", "-1"], "--seed must be >= 0"),
    (["generate", *M, "--out", "{new}", "--eps", "1"], "eps must lie in (0, 1)"),
    (["generate", *M, "--out", "{new}", "--min-rows", "0"], "--min-rows must be >= 1"),
    (["generate", *M, "--out", "{new}", "--keep", "0"], "--keep must be >= 1"),
    (["generate", *M, "--out", "{new}", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["generate", *M, "--out", "{new}", "--chat", "yes"], "--chat must be auto or on or off"),
    (["generate", *M, "--out", "{new}", "--prompt", "  "], "--prompt is empty"),
    (["generate", *M, "--out", "{new}", "--chat", "on", "--prompt", "Hi"], "has no chat template"),
    (["generate", *M, "--out", "{new}", "--dtype", "float8"], "unknown dtype 'float8'"),
    *[(["generate", *M, "--out", "{new}", "--data", d], msg) for d, msg in BAD_DATA[:6]],
    # ---- release
    *[(["release", *M, "--out", out], msg) for out, msg in FILE_AS_FOLDER],
    *[(["release", *M, "--out", "{new}", "--device", d], msg) for d, msg in DEVICES],
    (["release", *M, "--out", "{new}", "--top", "0"], "--top must be >= 1"),
    (["release", *M, "--out", "{new}", "--level", "1.5"], "--level must lie in"),
    (["release", *M, "--out", "{new}", "--eps", "0"], "eps must lie in (0, 1)"),
    (["release", *M, "--out", "{new}", "--min-rows", "0"], "--min-rows must be >= 1"),
    (["release", *M, "--out", "{new}", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["release", *M, "--out", "{new}", "--limit", "0"], "--limit must be >= 1"),
    (["release", *M, "--out", "{new}", "--limit", "3"], "fewer prompts than --folds"),
    (["release", *M, "--out", "{new}", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["release", *M, "--out", "{new}", "--folds", "1"], "--folds must be >= 2"),
    (["release", *M, "--out", "{new}", "--seed", "-1"], "--seed must be >= 0"),
    (["release", *M, "--out", "{new}", "--heads", "x"], "--heads must look like LAYER.HEAD"),
    (["release", *M, "--out", "{new}", "--heads", "2.0", "--limit", "5"], "--heads 2.0 is out of range"),
    (["release", *M, "--out", "{new}", "--dtype", "float8"], "unknown dtype 'float8'"),
    *[(["release", *M, "--out", "{new}", "--data", d], msg) for d, msg in BAD_DATA[:6]],
    # ---- sweep: of runs, or scanning --model
    *[(["sweep", run, "--out", "{new}"], msg) for run, msg in BAD_RUNS],
    (["sweep", "{run}", "--out", "{new}"], "no threshold sweep"),
    (["sweep", "--out", "{new}"], "give run folders"),
    *[(["sweep", "{run}", "--out", out], msg) for out, msg in FILE_AS_FOLDER],
    (["sweep", *M, "--out", "{file.txt}"], "is a file, not a folder"),
    *[(["sweep", *M, "--out", "{new}", "--device", d], msg) for d, msg in DEVICES],
    (["sweep", *M, "--out", "{new}", "--max-tokens", "-1"], "--max-tokens must be >= 0"),
    (["sweep", *M, "--out", "{new}", "--limit", "0"], "--limit must be"),
    (["sweep", *M, "--out", "{new}", "--batch-size", "0"], "--batch-size must be"),
    (["sweep", *M, "--out", "{new}", "--eps", "1.5"], "--eps must lie in (0, 1)"),
    (["sweep", *M, "--out", "{new}", "--min-rows", "0"], "--min-rows must be >= 1"),
    (["sweep", *M, "--out", "{new}", "--dtype", "float8"], "--dtype"),
    *[(["sweep", *M, "--out", "{new}", "--data", d], msg) for d, msg in BAD_DATA[:6]],
    # ---- pca, geometry, view: one prompt through a model
    (["pca", *M, *LOW, *TEXT, "--layer", "99", "--head", "0", "--out", "{new}"], "--layer 99 is out of range"),
    (["pca", *M, *LOW, *TEXT, "--layer", "-1", "--head", "0", "--out", "{new}"], "--layer -1 is out of range"),
    (["pca", *M, *LOW, *TEXT, "--layer", "0", "--head", "9", "--out", "{new}"], "--head 9 is out of range"),
    (["pca", *M, *LOW, *TEXT, "--layer", "0", "--head", "-1", "--out", "{new}"], "--head -1 is out of range"),
    (["pca", *M, *LOW, *TEXT, "--head", "0", "--out", "{new}"], "give both --layer and --head"),
    (["pca", *M, *LOW, *TEXT, "--deeper", "12", "--out", "{new}"], "--deeper 12 is out of range"),
    (["pca", *M, *LOW, "--prompt", "100000", "--out", "{new}"], "--prompt 100000 is out of range"),
    (["pca", *M, *LOW, "--prompt", "-1", "--out", "{new}"], "--prompt must be >= 0"),
    (["pca", *M, *LOW, *TEXT, "--max-tokens", "-1", "--out", "{new}"], "--max-tokens must be >= 0"),
    (["pca", *M, *TEXT, "--eps", "0", "--out", "{new}"], "eps must lie in (0, 1)"),
    (["pca", *M, *TEXT, "--min-rows", "0", "--out", "{new}"], "--min-rows must be >= 1"),
    (["pca", *M, *LOW, *TEXT, "--tag-level", "0", "--out", "{new}"], "--tag-level must lie in (0, 1)"),
    (["pca", *M, *LOW, *TEXT, "--tag-level", "1.5", "--out", "{new}"], "--tag-level must lie in (0, 1)"),
    (["geometry", *M, *LOW, *TEXT, "--n-positions", "0", "--out", "{new}"], "--n-positions must be >= 1"),
    (["geometry", *M, *LOW, *TEXT, "--max-pairs", "-5", "--out", "{new}"], "--max-pairs must be >= 1"),
    (["geometry", *M, *LOW, "--prompt", "-1", "--out", "{new}"], "--prompt must be >= 0"),
    (["geometry", *M, *LOW, "--prompt", "100000", "--out", "{new}"], "--prompt 100000 is out of range"),
    (["geometry", *M, *LOW, *TEXT, "--max-tokens", "-1", "--out", "{new}"], "--max-tokens must be >= 0"),
    (["geometry", *M, *TEXT, "--eps", "1", "--out", "{new}"], "eps must lie in (0, 1)"),
    (["geometry", *M, *TEXT, "--min-rows", "-1", "--out", "{new}"], "--min-rows must be >= 1"),
    (["view", *M, *LOW, *TEXT, "--layer", "99", "--head", "0", "--out", "{new}.html"], "--layer 99 is out of range"),
    (["view", *M, *LOW, *TEXT, "--layer", "0", "--head", "9", "--out", "{new}.html"], "--head 9 is out of range"),
    (["view", *M, *LOW, *TEXT, "--layer", "0", "--out", "{new}.html"], "give both --layer and --head"),
    (["view", *M, *LOW, "--prompt", "-1", "--out", "{new}.html"], "--prompt must be >= 0"),
    (["view", *M, *LOW, "--prompt", "100000", "--out", "{new}.html"], "--prompt 100000 is out of range"),
    (["view", *M, *LOW, *TEXT, "--max-tokens", "-1", "--out", "{new}.html"], "--max-tokens must be >= 0"),
    (["view", *M, *TEXT, "--eps", "-0.2", "--out", "{new}.html"], "eps must lie in (0, 1)"),
    (["view", *M, *TEXT, "--min-rows", "0", "--out", "{new}.html"], "--min-rows must be >= 1"),
    (["view", "--generation", "{folder}", "--out", "{new}.html"], "is not a finished `catchtag generate` folder"),
    (["view", "--generation", "{run}", "--out", "{new}.html"], "is not a finished `catchtag generate` folder"),
    (["view", "--generation", "{gen}", *TEXT, "--out", "{new}.html"], "--text, --text-file and --data do not apply"),
    (["view", "--generation", "{gen}", "-m", "tiny:qwen2", "--out", "{new}.html"], "was written by tiny:llama"),
    (["view", "--generation", "{gen}", "--prompt", "5", "--out", "{new}.html"], "the run wrote texts for prompts [0]"),
    (["view", "--generation", "{gen}", "--eps", "0.3", "--out", "{new}.html"], "found its sinks with --eps"),
    *[([cmd, *M, *LOW, "--text-file", f, "--out", "{new}"], msg) for cmd in ("pca", "geometry")
      for f, msg in BAD_TEXT_FILE],
    *[(["view", *M, *LOW, "--text-file", f, "--out", "{new}.html"], msg) for f, msg in BAD_TEXT_FILE],
    *[([cmd, *M, *LOW, "--data", d, "--out", "{new}"], msg) for cmd in ("pca", "geometry") for d, msg in BAD_DATA],
    *[(["view", *M, *LOW, "--data", d, "--out", "{new}.html"], msg) for d, msg in BAD_DATA],
    *[([cmd, *M, *TEXT, "--text-file", "{prompts.txt}", "--out", "{new}"], "not both") for cmd in ("pca", "geometry")],
    (["pca", "--model", "no-such-model", *TEXT, "--out", "{new}"], "unknown model 'no-such-model'"),
    *[([cmd, *ONE_PROMPT[cmd], "--out", out], msg) for cmd in ("pca", "geometry") for out, msg in FILE_AS_FOLDER],
    *[(["view", *ONE_PROMPT["view"], "--out", out], msg) for out, msg in FOLDER_AS_FILE],
    *[([cmd, *ONE_PROMPT[cmd], "--device", d, "--out", "{new}"], msg) for cmd in ("pca", "geometry")
      for d, msg in DEVICES],
    *[(["view", *ONE_PROMPT["view"], "--device", d, "--out", "{new}.html"], msg) for d, msg in DEVICES],
    # ---- compare, taxonomy, report: finished runs only
    *[([cmd, run, "--out", "{new}"], msg) for cmd in ("compare", "taxonomy") for run, msg in BAD_RUNS],
    *[(["compare", "{run}", run, "--out", "{new}"], msg) for run, msg in BAD_RUNS[:3]],  # the second run is bad
    *[(["taxonomy", "{run}", run, "--out", "{new}"], msg) for run, msg in BAD_RUNS[:3]],
    *[(["report", run, "--out", "{new}.html"], msg) for run, msg in BAD_RUNS],
    *[(["report", "{run}", run, "--out", "{new}.html"], msg) for run, msg in BAD_RUNS[:3]],
    *[([cmd, "{run}", "--out", out], msg) for cmd in ("compare", "taxonomy") for out, msg in FILE_AS_FOLDER],
    *[(["report", "{run}", "--out", out], msg) for out, msg in FOLDER_AS_FILE],
    (["compare", "{run}", "--ve-level", "-0.1", "--out", "{new}"], "--ve-level must lie in [0, 1)"),
    (["compare", "{run}", "--ve-level", "1", "--out", "{new}"], "--ve-level must lie in [0, 1)"),
    (["taxonomy", "{run}", "--top", "0", "--out", "{new}"], "--top must be >= 1"),
    (["taxonomy", "{run}", "--top", "-3", "--out", "{new}"], "--top must be >= 1"),
    (["compare", "--out", "{new}"], "Missing argument"),
    (["report", "--out", "{new}.html"], "Missing argument"),
    # ---- probe
    (["probe", *M, "--task", "nonsense", "--out", "{new}"], "unknown probe task 'nonsense'"),
    (["probe", *M, "--template", "no placeholders", "--out", "{new}"], "must contain {text}"),
    (["probe", *M, "--shots", "-1", "--out", "{new}"], "--shots must lie in"),
    (["probe", *M, "--shots", "99", "--out", "{new}"], "--shots must lie in"),
    (["probe", *M, "--eps", "0", "--out", "{new}"], "eps must lie in (0, 1)"),
    (["probe", *M, "--min-rows", "0", "--out", "{new}"], "--min-rows must be >= 1"),
    (["probe", *M, "--limit", "3", "--out", "{new}"], "--limit 3 leaves too few prompts"),
    (["probe", *M, "--limit", "-1", "--out", "{new}"], "--limit must be >= 1"),
    (["probe", *M, "--batch-size", "0", "--out", "{new}"], "--batch-size must be >= 1"),
    (["probe", *M, "--cv", "1", "--out", "{new}"], "--cv must be >= 2"),
    (["probe", *M, "--top", "0", "--out", "{new}"], "--top must be >= 1"),
    (["probe", *M, "--seed", "-1", "--out", "{new}"], "--seed must be >= 0"),
    (["probe", *M, "--dtype", "float8", "--out", "{new}"], "unknown dtype 'float8'"),
    (["probe", "--model", "no-such-model", "--out", "{new}"], "unknown model 'no-such-model'"),
    *[(["probe", *M, "--out", out], msg) for out, msg in FILE_AS_FOLDER],
    *[(["probe", *M, "--out", "{new}", "--device", d], msg) for d, msg in DEVICES],
    # ---- steer
    (["steer", "--probes", "{missing}", "--out", "{new}"], "not a finished probe run"),
    (["steer", "--probes", "{folder}", "--out", "{new}"], "not a finished probe run"),
    (["steer", "--probes", "{file.txt}", "--out", "{new}"], "not a finished probe run"),
    (["steer", "--probes", "{run}", "--out", "{new}"], "not a finished probe run"),
    (["steer", "--probes", "{probe_nosummary}", "--out", "{new}"], "not a finished probe run"),
    (["steer", "--probes", "{probe_badsummary}", "--out", "{new}"], "not a finished probe run"),
    (["steer", "--probes", "{probe_nosummary}"], "not a finished probe run"),  # default --out PROBES/steer
    (["steer", "--probes", "{folder}", "--top", "0", "--out", "{new}"], "--top must be >= 1"),
    (["steer", "--probes", "{folder}", "--n-random", "-1", "--out", "{new}"], "--n-random must be >= 0"),
    (["steer", "--probes", "{folder}", "--n-prompts", "1", "--out", "{new}"], "--n-prompts must be"),
    (["steer", "--probes", "{folder}", "--n-prompts", "-4", "--out", "{new}"], "--n-prompts must be"),
    (["steer", "--probes", "{folder}", "--seed", "-1", "--out", "{new}"], "--seed must be >= 0"),
    (["steer", "--probes", "{folder}", "--batch-size", "0", "--out", "{new}"], "--batch-size must be >= 1"),
    (["steer", "--probes", "{folder}", "--scales", "1,x", "--out", "{new}"], "--scales must be comma-separated"),
    (["steer", "--probes", "{folder}", "--scales", "1,inf", "--out", "{new}"], "--scales must be comma-separated"),
    (["steer", "--probes", "{folder}", "--heads", "3", "--out", "{new}"], "--heads must look like"),
    (["steer", "--probes", "{folder}", "--heads", "-1.0", "--out", "{new}"], "--heads must look like"),
    *[(["steer", "--probes", "{folder}", "--out", out], msg) for out, msg in FILE_AS_FOLDER],
    *[(["steer", "--probes", "{folder}", "--out", "{new}", "--device", d], msg) for d, msg in DEVICES],
    (["steer", "--out", "{new}"], "Missing option '--probes'"),
    # ---- toy
    (["toy", "construct", "--variant", "three", "--out", "{new}"], "unknown variant 'three'"),
    (["toy", "construct", "--length", "2", "--out", "{new}"], "--length 2 is too short"),
    (["toy", "construct", "--length", "-16", "--out", "{new}"], "--length -16 is too short"),
    (["toy", "construct", "--eval-size", "0", "--out", "{new}"], "--eval-size must be >= 1"),
    (["toy", "construct", "--show-tag", "nan", "--out", "{new}"], "--show-tag must be a finite number"),
    (["toy", "construct", "--tags", "1,abc", "--out", "{new}"], "--tags must be comma-separated numbers"),
    (["toy", "construct", "--tags", ",", "--out", "{new}"], "--tags must be comma-separated numbers"),
    *[(["toy", "construct", "--out", out], msg) for out, msg in FILE_AS_FOLDER],
    (["toy", "train", "--seeds", "0", "--out", "{new}"], "--seeds must be >= 1"),
    (["toy", "train", "--init-tag", "inf", "--out", "{new}"], "--init-tag must be a finite number"),
    (["toy", "train", "--heads", "-1", "--out", "{new}"], "--heads must be >= 0"),
    (["toy", "train", "--steps", "-1", "--out", "{new}"], "--steps must be >= 0"),
    (["toy", "train", "--length", "1", "--out", "{new}"], "--length 1 is too short"),
    (["toy", "train", "--threshold", "1.5", "--out", "{new}"], "--threshold must lie in (0, 1]"),
    (["toy", "train", "--threshold", "0", "--out", "{new}"], "--threshold must lie in (0, 1]"),
    (["toy", "train", "--workers", "-1", "--out", "{new}"], "--workers must be >= 0"),
    (["toy", "train", "--figures", "-1", "--out", "{new}"], "--figures must be >= 0"),
    (["toy", "train", "--recipe", "magic", "--out", "{new}"], "unknown recipe 'magic'"),
    (["toy", "train", "--variant", "three", "--out", "{new}"], "unknown variant 'three'"),
    *[(["toy", "train", "--out", out], msg) for out, msg in FILE_AS_FOLDER],
    (["toy", "table", "--seeds", "-2", "--out", "{new}"], "--seeds must be >= 1"),
    (["toy", "table", "--steps", "-1", "--out", "{new}"], "--steps must be >= 0"),
    (["toy", "table", "--length", "3", "--out", "{new}"], "--length 3 is too short"),
    (["toy", "table", "--workers", "-1", "--out", "{new}"], "--workers must be >= 0"),
    (["toy", "table", "--init-tags", "1,x", "--out", "{new}"], "--init-tags must be comma-separated numbers"),
    (["toy", "table", "--recipe", "magic", "--out", "{new}"], "unknown recipe 'magic'"),
    *[(["toy", "table", "--out", out], msg) for out, msg in FILE_AS_FOLDER],
    (["toy", "nonsense"], "No such command 'nonsense'"),
    # ---- models, and the program itself
    (["models", "extra"], "unexpected extra argument"),
    (["models", "--all"], "No such option: --all"),
    (["nonsense"], "No such command 'nonsense'"),
]


# ---- a non-number for every numeric option of every command ------------------------------------------------------
def _commands():
    """{command path: {option: int or float}} for every command, read from the functions the CLI registers."""
    from catchtag.cli import app

    def walk(typer_app, path):
        for info in typer_app.registered_commands:
            yield (*path, info.name or info.callback.__name__.replace("_", "-")), info.callback
        for group in typer_app.registered_groups:
            yield from walk(group.typer_instance, (*path, group.name))

    table = {}
    for path, fn in walk(app, ()):
        hints = typing.get_type_hints(fn)
        options = {}
        for name, param in inspect.signature(fn).parameters.items():
            decls = getattr(param.default, "param_decls", None) or ()
            flag = next((d for d in decls if d.startswith("--")), "--" + name.replace("_", "-"))
            kinds = {hints[name], *typing.get_args(hints[name])}
            options[flag] = next((k for k in (int, float) if k in kinds), None)
        table[path] = options
    return table


# what each command needs besides the option under test (so that the bad number is the only thing wrong)
NEEDS = {("scan",): [*M, "--out", "{new}"], ("probe",): [*M, "--out", "{new}"], ("steer",): ["--probes", "{folder}"],
         ("compare",): ["{run}"], ("taxonomy",): ["{run}"], ("report",): ["{run}"], ("sweep",): ["{run}"]}
ABC_CASES = [([*path, *NEEDS.get(path, []), flag, "abc"], f"Invalid value for '{flag}'")
             for path, options in _commands().items() for flag, kind in options.items() if kind]


def _fill(args, root: Path, new: Path):
    out = []
    for a in args:
        if a.startswith("{new}"):
            a = str(new) + a[len("{new}"):]
        elif a.startswith("{"):
            name, rest = a[1:].split("}", 1)
            a = str(root / name) + rest
        out.append(a)
    return out


def _snapshot(root: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _id(case) -> str:
    args = case[0]
    words = [a for a in args if a not in M and a not in LOW and a not in TEXT]
    return " ".join(words)


@pytest.mark.parametrize("args, message", CASES + ABC_CASES, ids=[_id(c) for c in CASES + ABC_CASES])
def test_bad_input_gives_one_line_and_exit_2(place, args, message, tmp_path, monkeypatch):
    import torch
    from typer.testing import CliRunner

    from catchtag.cli import app

    if "cuda:7" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    work = tmp_path / "work"  # the command runs here: a default output would land in it
    work.mkdir()
    monkeypatch.chdir(work)
    new = tmp_path / "new"
    before = _snapshot(place)
    result = CliRunner().invoke(app, _fill(args, place, new), env={**os.environ, "COLUMNS": "200"})
    err = result.stderr.strip()
    assert result.exit_code == 2, (result.exit_code, result.stdout[-1500:], err[-1500:], result.exception)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "Fix" in err, err
    assert message in err, err
    assert _snapshot(place) == before, "a bad command changed files it does not own"
    assert not new.exists() and not new.with_suffix(".html").exists(), "a bad command left a half-written --out"
    assert not any(work.iterdir()), "a bad command wrote into the working folder"


def test_the_table_covers_every_command():
    """Each numeric option has a bad value other than a non-number, each --device the three unknown devices, each
    --out one of the wrong kind; every command has cases."""
    missing = []
    for path, options in _commands().items():
        n = len(path)
        mine = [args[n:] for args, _ in CASES if tuple(args[:n]) == path]
        if not mine:
            missing.append(f"{' '.join(path)}: no case")
        for flag, kind in options.items():
            if kind and not any(flag in args for args in mine):
                missing.append(f"{' '.join(path)} {flag}: no bad value")
        if "--device" in options:
            for device, _ in DEVICES:
                if not any(args[i:i + 2] == ["--device", device] for args in mine for i in range(len(args))):
                    missing.append(f"{' '.join(path)} --device {device}: no case")
        if "--out" in options:
            wrong = [v for v, _ in FILE_AS_FOLDER + FOLDER_AS_FILE]
            if not any(args[i] == "--out" and args[i + 1] in wrong for args in mine for i in range(len(args) - 1)):
                missing.append(f"{' '.join(path)} --out: no case of the wrong kind")
    assert not missing, missing
