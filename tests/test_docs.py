"""Every code block of README.md and docs/*.md is run here, or marked as not run.

One test per block, id ``FILE:LINE`` (the line of the opening fence, or the first line of an indented block).

Marker: an HTML comment on the line just before the block's first line (its opening fence, or its first indented
line):

    <!-- docs-test: skip (why it is not run) -->
    <!-- docs-test: run (OLD => NEW; OLD2 => NEW2) -->
    <!-- docs-test: run as NAME (...) -->          other blocks of the same file may run after it
    <!-- docs-test: run after NAME[,NAME] (...) -->  first run block NAME (with its own substitutions), same folder

A block without a marker is run as it is. ``(OLD => NEW; ...)`` are plain-text substitutions applied in order to
the block before it runs (every occurrence; each must occur, so a marker cannot go stale silently; neither side
may hold ``;`` or ``=>``); they exist to make a block cheap: tiny random models (``tiny:llama``, ``tiny:gemma3``,
...; with ``--eps 0.03 --min-rows 4`` where a command needs sinks, which random weights lack at eps 0.2) and small
``--limit`` / ``--max-tokens`` / seeds / steps, not to change what a command does.

- ```python / ```py blocks run in a fresh interpreter (``exec`` in a fresh namespace), in a temporary folder.
- Shell blocks (```bash / ```sh / ```shell, bare ``` fences and indented blocks) run under bash (``set -euo
  pipefail``; variables, loops, ``\\`` continuations and ``VAR=value`` prefixes work) in a temporary folder where
  ``catchtag`` is the only command: each ``catchtag ARGS`` runs what ``python -m catchtag ARGS`` runs
  (``catchtag.cli.main()`` with that argv; the commands of one block share one interpreter, so torch is imported
  once per block, not per command) and must exit 0. Any other command (``make``,
  ``pip``, ``torchrun``, ``python bench/...``) fails the test: mark such a block ``skip``, as for commands that need
  a GPU (``--device cuda``) or hours of CPU.
- A fence in any other language (```text, ```json, ...) must be marked skip: unmarked, or marked run, it fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from markdown_it import MarkdownIt  # comes with typer (through rich)

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_LANGS = {"python", "py"}
SHELL_LANGS = {"bash", "sh", "shell", ""}  # "": a bare fence or an indented block
TIMEOUT_S = 300

MARKER = re.compile(r"^\s*<!--\s*docs-test:(.*?)-->\s*$")
SKIP = re.compile(r"skip\s*\((.+)\)")
RUN = re.compile(r"run(?:\s+as\s+(?P<name>[\w.-]+))?(?:\s+after\s+(?P<after>[\w.-]+(?:\s*,\s*[\w.-]+)*))?"
                 r"(?:\s*\((?P<subs>.*)\))?")


@dataclass
class Block:
    file: str  # relative to the repository root
    line: int  # 1-based line of the fence / first indented line
    lang: str
    text: str
    marker: str | None  # the text after "docs-test:", None without a marker
    action: str = "run"  # run or skip
    reason: str = ""
    name: str | None = None
    after: list[str] = field(default_factory=list)
    subs: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None  # a bad marker: the test fails with this

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def _parse_marker(block: Block) -> None:
    if block.marker is None:
        return
    body = block.marker.strip()
    if m := SKIP.fullmatch(body):
        block.action, block.reason = "skip", m.group(1).strip()
        return
    m = RUN.fullmatch(body)
    if not m:
        block.error = f"bad marker {body!r}: use 'skip (reason)' or 'run [as NAME] [after NAME] [(OLD => NEW; ...)]'"
        return
    block.name = m.group("name")
    block.after = [a.strip() for a in (m.group("after") or "").split(",") if a.strip()]
    for part in (m.group("subs") or "").split(";"):
        if not part.strip():
            continue
        if part.count("=>") != 1:
            block.error = f"bad substitution {part.strip()!r}: write OLD => NEW"
            return
        old, new = (s.strip() for s in part.split("=>"))
        if not old:
            block.error = f"bad substitution {part.strip()!r}: OLD is empty"
            return
        block.subs.append((old, new))


def collect_blocks(path: Path) -> tuple[list[Block], list[str]]:
    """The code blocks of one Markdown file, and the problems with its markers (markers attached to no block)."""
    source = path.read_text(encoding="utf-8")
    lines = source.split("\n")
    rel = path.relative_to(ROOT).as_posix()
    blocks, starts = [], set()
    for tok in MarkdownIt("commonmark").parse(source):
        if tok.type not in ("fence", "code_block"):
            continue
        start = tok.map[0]  # 0-based
        starts.add(start)
        lang = tok.info.strip().split()[0].lower() if tok.type == "fence" and tok.info.strip() else ""
        m = MARKER.match(lines[start - 1]) if start > 0 else None
        block = Block(rel, start + 1, lang, tok.content, m.group(1) if m else None)
        _parse_marker(block)
        blocks.append(block)
    problems = [f"{rel}:{i + 1}: a docs-test marker must be on the line just before a code block"
                for i, line in enumerate(lines) if MARKER.match(line) and i + 1 not in starts]
    names = [b.name for b in blocks if b.name]
    problems += [f"{rel}: block name {n!r} used twice" for n in set(names) if names.count(n) > 1]
    return blocks, problems


BLOCKS: list[Block] = []
PROBLEMS: list[str] = []
for _doc in DOCS:
    _blocks, _problems = collect_blocks(_doc)
    BLOCKS += _blocks
    PROBLEMS += _problems


def test_markers_belong_to_blocks():
    assert not PROBLEMS, "\n".join(PROBLEMS)


def test_blocks_found():
    """The collection itself works: README's Python example and a shell block are among the blocks."""
    ids = {b.id: b for b in BLOCKS}
    assert any(b.file == "README.md" and b.lang == "python" for b in BLOCKS), sorted(ids)
    assert any(b.file.startswith("docs/") and b.lang == "" for b in BLOCKS), sorted(ids)


def _substituted(block: Block) -> str:
    text = block.text
    for old, new in block.subs:
        if old not in text:
            pytest.fail(f"{block.id}: substitution {old!r} => {new!r}: {old!r} does not occur in the block")
        text = text.replace(old, new)
    return text


# bash runs the block once with `catchtag` as a function that only records its arguments and the environment
# (PATH is an empty folder: any other command is "not found" and fails); the driver then runs what was recorded
_SHELL_PRELUDE = r"""set -euo pipefail
command_not_found_handle() {
  printf 'docs-test: `%s` is not a catchtag command: mark the block <!-- docs-test: skip (reason) -->\n' "$1" >&2
  return 127
}
catchtag() {
  _docs_test_n=$((${_docs_test_n:-0} + 1))
  local f="$DOCS_TEST_REC/$(printf '%04d' "$_docs_test_n")"
  printf '%s\0' "$@" > "$f.argv"
  local v
  for v in $(compgen -e); do printf '%s=%s\0' "$v" "${!v}"; done > "$f.env"
}
"""

_DRIVER = r"""
import json, os, shlex, sys
steps = json.load(open(sys.argv[1]))
for step in steps:
    if step["kind"] == "python":
        print(f"--- {step['where']}: python", flush=True)
        exec(compile(step["code"], step["where"], "exec"), {"__name__": "__main__"})
        continue
    argv, env = step["argv"], step["env"]
    print(f"--- {step['where']}: catchtag {shlex.join(argv)}", flush=True)
    saved = dict(os.environ)
    os.environ.update(env)
    sys.argv = ["catchtag", *argv]
    code = 0
    try:
        from catchtag.cli import main
        main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    sys.stdout.flush()
    if code != 0:
        print(f"docs-test: `catchtag {shlex.join(argv)}` ({step['where']}) exited with {code}", file=sys.stderr)
        sys.exit(code)
"""


def _shell_steps(block: Block, text: str, cwd: Path, env: dict) -> list[dict]:
    rec = Path(tempfile.mkdtemp(prefix=".docs-test-rec-", dir=cwd))
    empty = cwd / ".docs-test-empty-path"
    empty.mkdir(exist_ok=True)
    base = {k: env[k] for k in ("HOME", "LANG", "LC_ALL", "TMPDIR") if k in env}
    script = _SHELL_PRELUDE + text
    done = subprocess.run(["/bin/bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**base, "PATH": str(empty), "DOCS_TEST_REC": str(rec)})
    if done.returncode != 0:
        pytest.fail(f"{block.id}: the block fails in bash (exit {done.returncode}):\n{done.stderr}{done.stdout}")
    outer = set(base) | {"PATH", "DOCS_TEST_REC", "PWD", "SHLVL", "OLDPWD", "_"}
    steps = []
    for argv_file in sorted(rec.glob("*.argv")):
        argv = argv_file.read_text().split("\0")[:-1]
        pairs = (p.split("=", 1) for p in argv_file.with_suffix(".env").read_text().split("\0")[:-1])
        extra = {k: v for k, v in pairs if k not in outer}
        steps.append({"kind": "catchtag", "argv": argv, "env": extra, "where": block.id})
    if not steps:
        pytest.fail(f"{block.id}: a shell block with no catchtag command: mark it skip")
    return steps


def _steps(block: Block, cwd: Path, env: dict, seen: tuple = ()) -> list[dict]:
    steps = []
    for name in block.after:
        found = [b for b in BLOCKS if b.file == block.file and b.name == name]
        if not found:
            pytest.fail(f"{block.id}: 'after {name}': no block of {block.file} is marked 'run as {name}'")
        if name in seen:
            pytest.fail(f"{block.id}: 'after {name}' makes a cycle")
        steps += _steps(found[0], cwd, env, seen + (name,))
    text = _substituted(block)
    if block.lang in PYTHON_LANGS:
        steps.append({"kind": "python", "code": text, "where": block.id})
    else:
        steps += _shell_steps(block, text, cwd, env)
    return steps


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_block(block: Block, tmp_path: Path):
    if block.error:
        pytest.fail(f"{block.id}: {block.error}")
    if block.action == "skip":
        pytest.skip(f"{block.id}: {block.reason}")
    if block.lang not in PYTHON_LANGS | SHELL_LANGS:
        how = "a run marker cannot run it" if block.marker else "add <!-- docs-test: skip (reason) --> above it"
        pytest.fail(f"{block.id}: a ```{block.lang} block is neither Python nor shell: {how}")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    steps = _steps(block, tmp_path, env)
    (tmp_path / ".docs-test-steps.json").write_text(json.dumps(steps))
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path / ".docs-test-steps.json")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, (f"{block.id} failed (exit {done.returncode}); output:\n"
                                  f"{done.stdout[-6000:]}\n{done.stderr[-6000:]}")
