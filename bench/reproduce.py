"""Rerun the commands behind the numbers in the docs and say which numbers moved.

Each entry of ``results/manifest.json`` names the doc that quotes its numbers, the commands (``{out}`` is a fresh
folder per entry) and the small files the commands write that hold those numbers, stored under ``results/<entry>/``
as measured. Rerunning compares every number of each stored file with the new one (JSON: every numeric leaf; CSV:
every numeric cell) and prints those that moved by more than the entry's tolerance. Times, versions, paths and
figure lists are not compared.

    python bench/reproduce.py --list                     # the entries, their docs and how long each took
    python bench/reproduce.py toy-two-sink               # rerun one entry (or several)
    python bench/reproduce.py --all                      # everything (hours on 2 CPU cores: the real models)
    python bench/reproduce.py --store toy-two-sink       # rerun and store the new files as the reference

`make reproduce` runs ``--all``; exit code 1 when a number moved.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
SKIP_KEYS = {"seconds", "versions", "figures", "wall_seconds", "load_seconds", "command", "out", "folder"}


def numbers(obj, prefix=""):
    """Every numeric leaf of a JSON value as {path: number}, without the keys that hold times or versions."""
    found = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key not in SKIP_KEYS and not key.endswith("_seconds"):
                found.update(numbers(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            found.update(numbers(value, f"{prefix}[{i}]"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        found[prefix] = float(obj)
    return found


def csv_numbers(text: str) -> dict:
    """Every numeric cell of a CSV as {"row i.column": number}, without the columns that hold times."""
    found = {}
    for i, row in enumerate(csv.DictReader(io.StringIO(text))):
        for key, value in row.items():
            if key in SKIP_KEYS or key.endswith("_seconds") or key.startswith("sec_"):
                continue
            try:
                found[f"row {i}.{key}"] = float(value)
            except (TypeError, ValueError):
                continue
    return found


def read_numbers(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    return csv_numbers(text) if path.suffix == ".csv" else numbers(json.loads(text))


def moved(old: dict, new: dict, rel: float, abs_tol: float) -> list[str]:
    """What differs between two {path: number} tables beyond the tolerance, one line each."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a is None or b is None:
            lines.append(f"{key}: {'missing' if a is None else a} -> {'missing' if b is None else b}")
        elif not (math.isclose(a, b, rel_tol=rel, abs_tol=abs_tol) or (math.isnan(a) and math.isnan(b))):
            lines.append(f"{key}: {a:.6g} -> {b:.6g}")
    return lines


def run_entry(name: str, entry: dict, store: bool) -> list[str]:
    """Run one entry's commands in a fresh folder; the lines that moved (or [] when none did)."""
    work = Path(tempfile.mkdtemp(prefix=f"reproduce-{name}-"))
    out = work / "out"
    started = time.perf_counter()
    try:
        for command in entry["commands"]:
            args = [a.replace("{out}", str(out)) for a in shlex.split(command)]
            if args[0] == "catchtag":
                args = [sys.executable, "-m", "catchtag", *args[1:]]
            print(f"[{name}] {command}", flush=True)
            done = subprocess.run(args, cwd=work, capture_output=True, text=True)
            if done.returncode != 0:
                return [f"command failed ({done.returncode}): {command}: {done.stderr.strip().splitlines()[-1:]}"]
        lines = []
        for stored, produced in entry["files"].items():
            new_file = out / produced
            ref = RESULTS / name / stored
            if not new_file.is_file():
                lines.append(f"{produced}: not written")
                continue
            if not store and not ref.is_file():
                lines.append(f"{stored}: no stored reference yet (run `python bench/reproduce.py --store {name}`)")
                continue
            if store:
                ref.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(new_file, ref)
                continue
            lines += [f"{stored}: {line}" for line in moved(read_numbers(ref), read_numbers(new_file),
                                                             entry.get("rel", 1e-3), entry.get("abs", 1e-4))]
        print(f"[{name}] {time.perf_counter() - started:.0f} s", flush=True)
        return lines
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("entries", nargs="*", help="entries of results/manifest.json to rerun")
    ap.add_argument("--all", action="store_true", help="rerun every entry")
    ap.add_argument("--list", action="store_true", help="list the entries")
    ap.add_argument("--store", action="store_true", help="store the new files as the reference (after a change "
                                                         "that is meant to move the numbers; say so in the docs)")
    a = ap.parse_args()
    manifest = json.loads((RESULTS / "manifest.json").read_text())
    if a.list or not (a.entries or a.all):
        for name, entry in manifest.items():
            print(f"{name:28s} {entry['doc']:24s} about {entry.get('minutes', '?')} min on 2 CPU cores")
        return 0
    names = list(manifest) if a.all else a.entries
    unknown = [n for n in names if n not in manifest]
    if unknown:
        print(f"error: unknown entries {unknown}; see --list", file=sys.stderr)
        return 2
    report = {name: run_entry(name, manifest[name], a.store) for name in names}
    for name, lines in report.items():
        doc = manifest[name]["doc"]
        print(f"{name} ({doc}): " + (("stored" if not lines else f"{len(lines)} problem(s)") if a.store else
                                      "no number moved" if not lines else f"{len(lines)} number(s) moved"))
        for line in lines[:40]:
            print(f"    {line}")
    return 1 if any(report.values()) and not a.store else 0


if __name__ == "__main__":
    sys.exit(main())
