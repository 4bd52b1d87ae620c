"""Screen toy-problem training recipes: many (variant, recipe, seed) jobs in one process pool.

`catchtag toy train` runs one cell at a time; this script keeps every core busy over a whole grid of
cells (used for docs/toy.md on a 16-core machine). Each finished seed is appended to OUT/rows.jsonl
(cell name, settings, the per-seed row of `catchtag.toy.train`); rerunning skips finished (cell, seed)
pairs. Usage:

    PYTHONPATH=src python bench/toy_recipes.py OUT --workers 16 \\
        --cell "hs-single:variant=single;recipe=hidden-sep;seeds=range(20)" \\
        --cell "paper-tag1:variant=single;recipe=paper;init_tag=1.0;seeds=range(10)"

Cell keys: variant, recipe, seeds (a Python expression), any `ToyConfig` field (init_tag, n_heads,
qk_norm, qk_gain) and any `TrainConfig` field (steps, hide_sep_steps, hide_sep_ramp, lr, ...).
"""

from __future__ import annotations

import argparse
import ast
import json
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, fields
from pathlib import Path

import pandas as pd

from catchtag.toy import TaskConfig, ToyConfig, make_recipe, recipe_model_options
from catchtag.toy.train import SeedResults, _train_one, read_rows, run_id, summarize

MODEL_FIELDS = {f.name for f in fields(ToyConfig)} - {"variant"}


def parse_cell(spec: str) -> tuple[str, ToyConfig, object, TaskConfig, list[int]]:
    name, _, body = spec.partition(":")
    kv = {}
    for item in filter(None, (s.strip() for s in body.split(";"))):
        k, _, v = item.partition("=")
        kv[k.strip()] = v.strip()
    variant = kv.pop("variant", "single")
    recipe = kv.pop("recipe", "paper")
    seeds = list(eval(kv.pop("seeds", "range(10)"), {"range": range}))
    length = int(kv.pop("length", "16"))
    model_kw, train_kw = dict(recipe_model_options(recipe)), {}
    for k, v in kv.items():
        val = ast.literal_eval(v)
        (model_kw if k in MODEL_FIELDS else train_kw)[k] = val
    return name, ToyConfig(variant, **model_kw), make_recipe(recipe, **train_kw), TaskConfig(variant, length), seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--cell", action="append", required=True, help="NAME:key=value;key=value")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--save-models", action="store_true", help="keep each trained model: OUT/models/CELL/seedN.pt")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "rows.jsonl"
    done = {(r["cell"], r["run_id"], r["seed"]) for r in read_rows(path)}
    cells, jobs = {}, []
    for spec in args.cell:
        name, mc, tc, task, seeds = parse_cell(spec)
        rid = run_id(mc, tc, task)
        cells[name] = {"run_id": rid, "model": asdict(mc), "train": asdict(tc), "task": asdict(task), "seeds": seeds}
        model_dir = str(args.out / "models" / name) if args.save_models else None
        jobs += [(name, rid, (mc, tc, task, s, model_dir)) for s in seeds if (name, rid, s) not in done]
    (args.out / "cells.json").write_text(json.dumps(cells, indent=1, default=list))
    # longest first (steps x sequence work), so the pool does not end on one slow straggler
    jobs.sort(key=lambda j: -j[2][1].steps * (2 if j[2][0].variant == "two-sink" else 1))
    t0 = time.time()
    print(f"{len(jobs)} seeds to train in {len(cells)} cells", flush=True)
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as ex:
        futs = {ex.submit(_train_one, job): (name, rid) for name, rid, job in jobs}
        for i, f in enumerate(as_completed(futs), 1):
            name, rid = futs[f]
            row = {"cell": name, "run_id": rid, **f.result()}
            with path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"[{i}/{len(jobs)} {time.time() - t0:.0f}s] {name} seed {row['seed']}: r2 {row['r2']:.3f} "
                  f"sink {row['sink_mass']:.2f} mechanism {row['mechanism']}", flush=True)
    rows = [r for r in read_rows(path) if r["cell"] in cells and r["run_id"] == cells[r["cell"]]["run_id"]]
    print(f"\n{'cell':28s} seeds success verified tag_verified median_r2")
    for name, c in cells.items():
        rs = pd.DataFrame([r for r in rows if r["cell"] == name and r["seed"] in c["seeds"]])
        s = summarize(SeedResults(c["run_id"], rs))
        print(f"{name:28s} {s['seeds']:5d} {s['success']:7d} {s['verified']:8d} {s['tag_verified']:12d} "
              f"{s['median_r2']:.4f}")


if __name__ == "__main__":
    main()
