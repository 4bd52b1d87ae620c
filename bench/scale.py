"""Data-parallel scaling of catchtag's scan: tokens/s on 1 vs N GPUs, and a model split over GPUs.

One command on a machine with several CUDA GPUs (random weights, nothing downloaded):

    python bench/scale.py --gpus 1,2 --json scale.json     # tokens/s for each GPU count, and the ratio
    python bench/scale.py --gpus "" --check-device-map     # a model split over 2 GPUs against one GPU

Each GPU count G launches `torchrun --nproc-per-node G bench/scale.py --worker ...`. Every rank loads
`random:qwen2.5-7b` (Qwen2.5-7B-shaped, bf16, built on its GPU), warms up on one batch outside the timing
(Triton autotuning, cuDNN plans), and then all ranks run `catchtag.scan` on the same P prompts of T random
byte tokens into one run folder: the data-parallel path of `torchrun -m catchtag scan` (round-robin shards,
per-rank part files, rank 0 assembles heads.parquet). Time = wall time between barriers around the whole
scan, assembling and writing the tables included; tokens/s = P*T / time.

--check-device-map scans prompts with a tiny model on one GPU and again with its layers placed over
cuda:0 and cuda:1 (accelerate), and fails unless the rows agree (the engine computes each layer's
statistics on that layer's GPU); then it scans `random:qwen2.5-7b` with device_map="balanced" and prints
where its layers went.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def random_prompts(n: int, tokens: int, seed: int = 0):
    from catchtag.data.prompts import Prompt

    ids = torch.randint(0, 256, (n, tokens), generator=torch.Generator().manual_seed(seed))
    return [Prompt(i, row.tolist()) for i, row in enumerate(ids)]


def worker(args) -> None:
    """One torchrun rank: load, warm up, time the scan of every prompt over all ranks."""
    from catchtag import load_model, scan
    from catchtag.distributed import finish, init

    dist = init(args.device)
    net, tok = load_model(args.model, device=dist.device(args.device))
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    prompts = random_prompts(args.prompts, args.tokens)
    with torch.no_grad():
        scan(net, tok, prompts[:args.batch_size], batch_size=args.batch_size, progress=False)  # warm-up
    sync()
    dist.barrier()
    t0 = time.perf_counter()
    result = scan(net, tok, prompts, batch_size=args.batch_size, out=args.out, overwrite=True, dist=dist,
                  progress=dist.is_main, model_name=args.model, data_name=f"random {args.prompts}x{args.tokens}")
    sync()
    dist.barrier()
    seconds = time.perf_counter() - t0
    if dist.is_main:
        heads = result.heads
        row = dict(gpus=dist.world, device=torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                   model=args.model, prompts=args.prompts,
                   tokens_per_prompt=args.tokens, batch_size=args.batch_size, tokens=args.prompts * args.tokens,
                   seconds=seconds, tokens_per_s=args.prompts * args.tokens / seconds, rows=len(heads),
                   duplicated_rows=int(heads.duplicated(["prompt_id", "layer", "head"]).sum()),
                   prompts_in_table=int(heads["prompt_id"].nunique()), sinks_per_head=float(heads["n_sinks"].mean()))
        Path(args.row).write_text(json.dumps(row))
    finish(dist)


def launch(index: int, gpus: int, args, folder: Path) -> dict:
    """Run the worker under torchrun on ``gpus`` GPUs; its rank 0 writes one row of results."""
    row = folder / f"row-{gpus}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus), "--master-port",
           str(29600 + index), __file__, "--worker", "--device", args.device, "--model", args.model,
           "--prompts", str(args.prompts), "--tokens", str(args.tokens), "--batch-size", str(args.batch_size),
           "--out", str(folder / f"run-{gpus}"), "--row", str(row)]
    # NVLink multicast stays off (the lending machines' rule); the scan needs only a barrier anyway.
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    subprocess.run(cmd, env=env, check=True)
    return json.loads(row.read_text())


def compare_runs(folder: Path, gpus: list[int]) -> dict:
    """The assembled tables of the G-GPU runs against the first: same rows, same statistics."""
    import numpy as np
    import pandas as pd

    base = pd.read_parquet(folder / f"run-{gpus[0]}" / "heads.parquet")
    out = {}
    for g in gpus[1:]:
        other = pd.read_parquet(folder / f"run-{g}" / "heads.parquet")
        same_keys = base[["prompt_id", "layer", "head", "n_sinks"]].equals(
            other[["prompt_id", "layer", "head", "n_sinks"]])
        out[g] = dict(same_rows_and_sink_counts=bool(same_keys),
                      max_abs_ve_diff=float(np.nanmax(np.abs(base["ve"].to_numpy() - other["ve"].to_numpy()))))
    return out


def check_device_map() -> None:
    """Tiny model over two GPUs vs one GPU (must agree); then the 7B shape with device_map='balanced'."""
    import numpy as np

    from catchtag import load_model, scan

    texts = ["Sinks catch attention, tags mark the tokens, and later layers release them." * 3,
             "A second prompt, of another length, to pad the batch on the left or right."]
    one, tok = load_model("tiny:llama", device="cuda:0", dtype="float32")
    n = one.config.num_hidden_layers
    placement = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
    placement.update({f"model.layers.{i}": (0 if i < n // 2 + 1 else 1) for i in range(n)})
    split, _ = load_model("tiny:llama", device="cuda", dtype="float32", device_map=placement)
    a = scan(one, tok, texts, eps=0.08, min_rows=4, progress=False).heads
    b = scan(split, tok, texts, eps=0.08, min_rows=4, progress=False).heads
    devices = sorted({str(p.device) for p in split.parameters()})
    same = a[["prompt_id", "layer", "head", "n_sinks", "sink_positions"]].equals(
        b[["prompt_id", "layer", "head", "n_sinks", "sink_positions"]])
    ve = float(np.nanmax(np.abs(a["ve"] - b["ve"])))
    r2 = float(np.nanmax(np.abs(a["r2"] - b["r2"])))
    print(f"tiny:llama over {devices}: same sink sets {same}, sinks/head {a['n_sinks'].mean():.3f}, "
          f"max |VE diff| {ve:.2e}, max |R2 diff| {r2:.2e}")
    if not (same and ve < 1e-5 and r2 < 1e-5):
        raise SystemExit("device-map check FAILED: a model split over GPUs must give the rows of one GPU")

    t0 = time.perf_counter()
    big, tok = load_model("random:qwen2.5-7b", device="cuda", device_map="balanced")
    load = time.perf_counter() - t0
    spread: dict[str, int] = {}
    for name, dev in big.hf_device_map.items():
        spread[str(dev)] = spread.get(str(dev), 0) + (1 if ".layers." in name else 0)
    prompts = random_prompts(8, 1024)
    t0 = time.perf_counter()
    res = scan(big, tok, prompts, batch_size=4, progress=False)
    print(f"random:qwen2.5-7b device_map='balanced': decoder layers per device {spread}; load {load:.0f} s; "
          f"scan of 8x1024 tokens {time.perf_counter() - t0:.1f} s (first call, autotuning included); "
          f"{len(res.heads)} rows, {res.heads['layer'].nunique()} layers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,2", help="GPU counts to time, comma-separated ('' for none)")
    ap.add_argument("--model", default="random:qwen2.5-7b")
    ap.add_argument("--device", default="cuda", help="cpu: one process per count on the CPU (gloo), a dry run")
    ap.add_argument("--prompts", type=int, default=768)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--check-device-map", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench/scale.py needs CUDA GPUs (or --device cpu for a dry run)")
        print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    if args.check_device_map:
        check_device_map()
    if not gpus:
        return
    if args.device == "cuda" and max(gpus) > torch.cuda.device_count():
        raise SystemExit(f"--gpus asks for {max(gpus)} GPUs; {torch.cuda.device_count()} are visible")
    with tempfile.TemporaryDirectory(prefix="catchtag-scale-") as tmp:
        rows = [launch(i, g, args, Path(tmp)) for i, g in enumerate(gpus)]
        agreement = compare_runs(Path(tmp), sorted(set(gpus)))
    base = rows[0]["tokens_per_s"]
    print("\n| GPUs | tokens | seconds | tokens/s | vs first row | rows | duplicated rows |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base
        print(f"| {r['gpus']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s'] / 1e3:.1f}k | "
              f"{r['speedup']:.3f} | {r['rows']} | {r['duplicated_rows']} |")
    print(f"tables of each GPU count against {sorted(set(gpus))[0]}: {agreement}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, agreement=agreement), indent=1))


if __name__ == "__main__":
    main()
