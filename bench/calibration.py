"""The calibration models' checks as a user meets them on a device: ablate and release on toy:average and its controls.

tests/test_toy_lm.py holds these thresholds on the CPU; this script runs the same commands as a new user types them
(``python -m catchtag ablate -m toy:average ...``, default device and dtype unless given) and applies the same
thresholds to what they write, so that a GPU run (bfloat16 by default there) is held to what the CPU tests hold:

    PYTHONPATH=src python3 bench/calibration.py                       # default device and dtype (cuda: bfloat16)
    PYTHONPATH=src python3 bench/calibration.py --dtype float32 --json out.json

The toy models train on one CPU thread on first use (catchtag's cache; about 50 s each). Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(args: list[str], env: dict) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "catchtag", *args], env=env, capture_output=True, text=True)
    return proc.returncode, (proc.stdout[-2000:] + proc.stderr[-4000:]), time.perf_counter() - t0


def checks(out: Path) -> list[tuple[str, bool, str]]:
    """(what, holds, the numbers) for every threshold of tests/test_toy_lm.py that the commands' files can show."""
    found = []
    avg = json.loads((out / "average" / "ablate" / "summary.json").read_text())["targets"][0]
    found.append(("toy:average ablate: attribution ranks the layer-1 head first", avg["heads"] == [[0, 0]],
                  f"heads {avg['heads']}"))
    found.append(("toy:average ablate: tag >= 10x its control, intervals disjoint",
                  avg["delta_nll"] >= 10 * avg["control_delta_nll"] > 0 and avg["ci"][0] > avg["control_ci"][1],
                  f"{avg['delta_nll']:.4f} [{avg['ci'][0]:.4f}, {avg['ci'][1]:.4f}] vs control "
                  f"{avg['control_delta_nll']:.4f} [{avg['control_ci'][0]:.4f}, {avg['control_ci'][1]:.4f}]"))
    cut = json.loads((out / "cut" / "ablate" / "summary.json").read_text())["targets"][0]
    found.append(("toy:average-cut ablate: the head catches, removing its tag changes nothing",
                  cut["n_prompts_tagged"] > 0 and cut["delta_nll"] == 0 and cut["control_delta_nll"] == 0,
                  f"tagged {cut['n_prompts_tagged']}, {cut['delta_nll']} vs control {cut['control_delta_nll']}"))
    every = json.loads((out / "all" / "ablate" / "summary.json").read_text())["targets"][0]
    found.append(("toy:average-all ablate: no sink at layer 1, no tag", every["n_prompts_tagged"] == 0,
                  f"tagged {every['n_prompts_tagged']}"))
    rows = {r["layer"]: r for r in json.loads((out / "release-average" / "summary.json").read_text())["rows"]}
    r = rows[1]
    found.append(("toy:average release: layer 2 reads the grouping (>= 0.9, chance <= 0.6, above its control)",
                  r["accuracy"] >= 0.9 and r["chance"] <= 0.6 and r["ci_low"] > r["control_ci_high"],
                  f"{r['accuracy']:.3f} (chance {r['chance']:.3f}), control {r['control_accuracy']:.3f}"))
    rows = {r["layer"]: r for r in json.loads((out / "release-cut" / "summary.json").read_text())["rows"]}
    inside = all(r["ci_low"] <= r["control_ci_high"] and r["control_ci_low"] <= r["ci_high"] for r in rows.values())
    found.append(("toy:average-cut release: nothing beyond the control at any depth, < 0.6 at layer 2",
                  inside and rows[1]["accuracy"] < 0.6,
                  ", ".join(f"layer {k}: {v['accuracy']:.3f} vs {v['control_accuracy']:.3f}" for k, v in rows.items())))
    two = json.loads((out / "two" / "ablate" / "summary.json").read_text())["targets"][0]
    found.append(("toy:average-two-sink ablate: a layer-1 head, tag >= 5x its control, intervals disjoint",
                  two["heads"][0][0] == 0 and two["delta_nll"] >= 5 * two["control_delta_nll"] > 0
                  and two["ci"][0] > two["control_ci"][1],
                  f"heads {two['heads']}, {two['delta_nll']:.4f} vs control {two['control_delta_nll']:.4f}"))
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="", help="passed as --device (default: the commands' own, auto)")
    ap.add_argument("--dtype", default="", help="passed as --dtype (default: the commands' own, auto)")
    ap.add_argument("--out", default="", help="folder for the outputs (default: a new temporary one)")
    ap.add_argument("--json", default="", help="write the commands and checks here")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="catchtag-calibration-"))
    if out.exists() and any(out.iterdir()):
        print(f"--out {out} is not empty: the commands would resume earlier runs. Fix: a new folder", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    extra = [*(["--device", a.device] if a.device else []), *(["--dtype", a.dtype] if a.dtype else [])]
    commands = [
        ("average", ["ablate", "-m", "toy:average", "--top", "1", "--controls", "2", "--out", str(out / "average")]),
        ("cut", ["ablate", "-m", "toy:average-cut", "--heads", "0.0", "--controls", "2", "--out", str(out / "cut")]),
        ("all", ["ablate", "-m", "toy:average-all", "--heads", "0.0", "--controls", "2", "--out", str(out / "all")]),
        ("two", ["ablate", "-m", "toy:average-two-sink", "--top", "1", "--controls", "2", "--out", str(out / "two")]),
        ("release-average", ["release", "-m", "toy:average", "--heads", "0.0", "--out", str(out / "release-average")]),
        ("release-cut", ["release", "-m", "toy:average-cut", "--heads", "0.0", "--out", str(out / "release-cut")]),
        ("scan", ["scan", "-m", "toy:average", "--out", str(out / "scan")]),
        ("report", ["report", str(out / "scan"), "--out", str(out / "report.html")]),
    ]
    results, status = [], 0
    for name, args in commands:
        rc, tail, seconds = run([*args, *(extra if args[0] != "report" else [])], env)
        results.append(dict(command=" ".join(["catchtag", *args, *extra]), rc=rc, seconds=round(seconds, 1)))
        print(f"{'ok  ' if rc == 0 else 'FAIL'} {name:<16} {seconds:6.1f} s  rc={rc}", flush=True)
        if rc != 0:
            print(tail)
            status = 1
    found = []
    if status == 0:
        found = checks(out)
        for what, holds, numbers in found:
            print(f"{'ok  ' if holds else 'FAIL'} {what}: {numbers}")
        status = 0 if all(h for _, h, _ in found) else 1
        settings = json.loads((out / "scan" / "summary.json").read_text()).get("settings", {})
        print(f"scan ran on {settings.get('device')} in {settings.get('dtype')}, backends "
              f"{'+'.join(settings.get('backends_used', []))}")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(commands=results, checks=[dict(check=w, holds=h, numbers=n)
                                                                          for w, h, n in found]), indent=1))
    print(f"{sum(h for _, h, _ in found)} of {len(found)} checks hold" if found else "commands failed")
    return status


if __name__ == "__main__":
    sys.exit(main())
