"""The coverage matrix on CUDA, one model type per attention family, the statistics from the triton backend.

    python bench/coverage_cuda.py                 # the families below; --json FILE keeps the rows

Each type goes through catchtag.coverage.check on the GPU in float32 with backend="auto" (the triton kernels
wherever they serve the layer's mask; the torch path for other masks): logits against the model's own eager
attention on the GPU, statistics and the heads' writes against the float64 reference, and a scan. The row says
which backends computed the statistics. Fails (exit 1) when a type recorded as parity does not reach it here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

FAMILIES = {  # family -> model type
    "plain": "llama", "sliding window": "mistral", "softcap": "gemma2", "learned sinks": "gpt_oss",
    "learned sinks (sliding)": "granite_swa", "MLA": "deepseek_v3", "gated": "qwen3_next", "gated (hybrid)":
    "qwen3_5_text", "hybrid (mamba)": "jamba", "hybrid (mamba, falcon)": "falcon_h1", "ALiBi": "bloom",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", default="", help="only these families, comma-separated (default: all)")
    a = ap.parse_args()
    from catchtag import coverage
    from catchtag.engine.arch import model_types

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    recorded = model_types()
    rows, bad = [], []
    for family, model_type in FAMILIES.items():
        if a.families and family not in a.families.split(","):
            continue
        row = coverage.check(model_type, seed=a.seed, device="cuda")
        want = recorded[model_type]["status"]
        rows.append(dict(family=family, model_type=model_type, status=row.status, recorded=want, reason=row.reason,
                         logits_rel=row.logits_rel, backends=row.backends))
        print(json.dumps(rows[-1]), flush=True)
        if want == "parity" and row.status != "parity":
            bad.append(model_type)
    print("| family | model type | status on CUDA | backends | logits rel. diff |\n|---|---|---|---|---|")
    for r in rows:
        rel = f"{r['logits_rel']:.1e}" if r["logits_rel"] is not None else "-"
        print(f"| {r['family']} | `{r['model_type']}` | {r['status']} | {', '.join(r['backends'])} | {rel} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if bad:
        sys.exit(f"not at parity on CUDA: {bad}")


if __name__ == "__main__":
    main()
