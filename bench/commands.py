"""Every catchtag command end to end on one device with tiny random models; exits 1 on the first failure.

Run it on a CUDA machine after every engine change (and record the date and device in docs/benchmarks.md):

    PYTHONPATH=src python3 bench/commands.py                 # --device cuda (the default here)
    PYTHONPATH=src python3 bench/commands.py --device cpu    # the same list on the CPU

Each command runs as a new user would type it (``python -m catchtag ...``) into a fresh folder; a command passes
when it exits 0 and writes what it promises. On CUDA the scans must also say that the triton backend ran. Probe
and steer need the builtin:truth data (the countryinfo package).
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

LOW = ["--eps", "0.03", "--min-rows", "4"]  # random weights: low eps so that there are sinks to analyse


def commands(out: Path, device: str, model: str) -> list[tuple[str, list[str], list[str]]]:
    """(name, arguments, files that must exist afterwards)."""
    dev = ["--device", device]
    one = ["--max-tokens", "64", *LOW, *dev]
    return [
        ("scan", ["scan", "-m", model, "--limit", "8", "--batch-size", "4", "--out", str(out / "scan"), *one,
                  "--sweep", "0.05,0.3"], ["scan/heads.parquet", "scan/summary.json", "scan/views/views.json"]),
        ("scan-2", ["scan", "-m", "tiny:qwen3", "--limit", "8", "--out", str(out / "scan2"), *one],
         ["scan2/heads.parquet"]),
        ("scan-window", ["scan", "-m", "tiny:mistral", "--limit", "6", "--out", str(out / "scan3"), *one],
         ["scan3/heads.parquet"]),
        # the families beyond the classic decoder (docs/models.md): learned sinks, softcap, gated, hybrid
        *[(f"scan-{arch}", ["scan", "-m", f"tiny:{arch}", "--limit", "4", "--out", str(out / f"scan-{arch}"), *one],
           [f"scan-{arch}/heads.parquet"]) for arch in ("gpt_oss", "gemma2", "qwen3_next", "jamba")],
        ("scan-auto", ["scan", "-m", model, "--limit", "4", "--max-tokens", "48", *LOW, "--out", str(out / "scan4")],
         ["scan4/summary.json"]),
        ("sweep", ["sweep", "-m", model, "-m", "tiny:qwen3", "--limit", "4", "--max-tokens", "64",
                   "--out", str(out / "sweep"), *dev], ["sweep/sweep.png"]),
        ("pca", ["pca", "-m", model, "--layer", "1", "--head", "0", "--deeper", "2", "--out", str(out / "pca"), *one],
         ["pca"]),
        ("geometry", ["geometry", "-m", model, "--out", str(out / "geometry"), *one], ["geometry"]),
        ("view", ["view", "-m", model, "--out", str(out / "view.html"), *one], ["view.html"]),
        ("compare", ["compare", str(out / "scan"), str(out / "scan2"), "--out", str(out / "compare")], ["compare"]),
        ("taxonomy", ["taxonomy", str(out / "scan"), "--out", str(out / "taxonomy")], ["taxonomy"]),
        ("report", ["report", str(out / "scan"), str(out / "scan2"), "--out", str(out / "report.html")],
         ["report.html"]),  # loads no model: draws the scans' views/
        ("probe", ["probe", "-m", model, "--task", "truth", "--limit", "48", "--batch-size", "16", "--cv", "3",
                   "--top", "4", "--out", str(out / "probe"), *LOW, *dev], ["probe"]),
        ("steer", ["steer", "--probes", str(out / "probe"), "--top", "2", "--n-prompts", "8", "--n-random", "2",
                   "--out", str(out / "steer"), *dev], ["steer"]),
        ("toy", ["toy", "construct", "--out", str(out / "toy")], ["toy"]),
        ("ablate", ["ablate", "-m", model, "--limit", "8", "--max-tokens", "64", "--top", "3", "--controls", "2",
                    "--out", str(out / "scan"), *LOW, *dev], ["scan/ablate/summary.json", "scan/ablate/release.png"]),
        ("report-ablate", ["report", str(out / "scan"), "--out", str(out / "report2.html")], ["report2.html"]),
        ("release", ["release", "-m", model, "--limit", "6", "--max-tokens", "64", "--heads", "0.1,1.2", "--folds",
                     "3", "--out", str(out / "release"), *LOW, *dev], ["release/release_decoding.csv"]),
        ("generate", ["generate", "-m", model, "--out", str(out / "gen"), "--limit", "3", "--max-tokens", "24",
                      "--max-new-tokens", "24", "--dtype", "float32", *LOW, *dev],
         ["gen/steps.parquet", "gen/scan/heads.parquet", "gen/view.html"]),
        # the default dtype (bfloat16 on a GPU): reported, not required to match (see the check below)
        ("generate-auto", ["generate", "-m", model, "--out", str(out / "gen_auto"), "--limit", "3", "--max-tokens",
                           "24", "--max-new-tokens", "24", *LOW, *dev], ["gen_auto/steps.parquet"]),
        ("generate-window", ["generate", "-m", "tiny:gemma3", "--out", str(out / "gen2"), "--prompt",
                             "Once upon a time there was a", "--max-new-tokens", "40", "--sample", "--tracker-ve",
                             "--dtype", "float32", *LOW, *dev],
         ["gen2/final.parquet", "gen2/generation.html"]),
        ("view-generation", ["view", "--generation", str(out / "gen"), "--prompt", "2", "--out",
                             str(out / "gen_view.html")], ["gen_view.html"]),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="tiny:llama")
    ap.add_argument("--out", default="", help="folder for the outputs (default: a new temporary one)")
    ap.add_argument("--json", default="", help="write the per-command results here")
    ap.add_argument("--only", default="", help="run only the commands whose names start with one of these "
                    "(comma-separated, e.g. generate,view-generation)")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="catchtag-commands-"))
    if out.exists() and any(out.iterdir()):  # a scan would resume there and run nothing, so nothing would be checked
        print(f"--out {out} is not empty: the commands would resume earlier runs. Fix: a new folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    results, failed = [], None
    only = tuple(x for x in a.only.split(",") if x)
    for name, args, promised in commands(out, a.device, a.model):
        if only and not name.startswith(only):
            continue
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "catchtag", *args], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        missing = [p for p in promised if not (out / p).exists()]
        note = ""
        if proc.returncode == 0 and name.startswith("scan"):
            settings = json.loads((out / args[args.index("--out") + 1] / "summary.json").read_text())["settings"]
            note = f"device {settings['device']}, backends {'+'.join(settings.get('backends_used', []))}"
            if a.device.startswith("cuda") and "triton" not in settings.get("backends_used", []):
                missing.append("the triton backend did not run")
        if proc.returncode == 0 and name.startswith("generate"):  # the tracker's last state against the scan
            check = json.loads((Path(args[args.index("--out") + 1]) / "summary.json").read_text())["check"]
            note = f"same sinks {check['same_sinks']:.3f}, VE diff {check['max_abs_ve_diff']}"
            # in float32 the step-by-step state must equal the scan; in bfloat16 the model's own keys differ between
            # one-token steps and one pass over the text, so columns near eps may fall either side
            exact = a.device == "cpu" or "float32" in args
            if not check["same_lengths"] or (exact and check["same_sinks"] != 1.0):
                missing.append("the tracker's last state differs from the scan")
        ok = proc.returncode == 0 and not missing
        results.append(dict(command=name, ok=ok, seconds=round(seconds, 1), rc=proc.returncode, note=note))
        print(f"{'ok  ' if ok else 'FAIL'} {name:<12} {seconds:6.1f} s  rc={proc.returncode}  {note}", flush=True)
        if not ok:
            failed = name
            print(" ".join(["catchtag", *args]))
            print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
            if missing:
                print("missing:", missing)
            break
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print(f"{sum(r['ok'] for r in results)} passed, {int(failed is not None)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
