"""Data-parallel scans with torchrun (gloo, 2 CPU processes): same rows as one process, resumable per shard."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from test_scan import run_cli

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
            "-m", "catchtag"]


def _args(data, out):
    return ["scan", "--model", "tiny:llama", "--data", str(data), "--out", str(out), "--eps", "0.08",
            "--min-rows", "4", "--batch-size", "1", "--no-figures"]


def test_two_ranks_match_one_process_and_resume_after_kill(tmp_path):
    data = tmp_path / "p.txt"
    data.write_text("\n".join(f"Line {i}: tags, sinks and the release of tagged tokens into the stream."
                              for i in range(24)))
    single = run_cli(*_args(data, tmp_path / "single"))
    assert single.returncode == 0, single.output

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = tmp_path / "ddp"
    proc = subprocess.Popen(TORCHRUN + _args(data, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        ranks = ({f.name.split("-")[1] for f in (out / "parts").glob("prompts-r*.parquet")}
                 if (out / "parts").exists() else set())
        if ranks == {"r0", "r1"}:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole torchrun group, mid-run
    proc.wait()
    assert not (out / "heads.parquet").exists(), "the run must be interrupted for this test to mean anything"

    resumed = subprocess.run(TORCHRUN + _args(data, out), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "24 prompts" in resumed.stdout and "2 processes" in resumed.stdout  # one summary, from rank 0

    a = pd.read_parquet(out / "heads.parquet")
    b = pd.read_parquet(tmp_path / "single" / "heads.parquet")
    assert not a.duplicated(["prompt_id", "layer", "head"]).any()
    exact = ["prompt_id", "layer", "head", "n_tokens", "n_sinks", "sink_positions", "sink_tokens"]
    pd.testing.assert_frame_equal(a[exact], b[exact])
    assert np.allclose(a["ve"], b["ve"], atol=1e-6) and np.allclose(a["r2"], b["r2"], atol=1e-6)
    parts = list((out / "parts").glob("prompts-*.parquet"))
    assert {p.name.split("-")[1] for p in parts} == {"r0", "r1"}  # both ranks wrote their shard


def test_device_map_auto_runs_the_engine(tiny_models):
    import catchtag

    model, tok = tiny_models("llama")
    mapped, _ = catchtag.load_model("tiny:llama", device_map="auto")
    texts = ["Sinks catch attention, tags mark the tokens, and later layers release them."]
    a = catchtag.scan(model, tok, texts, eps=0.08, min_rows=4, progress=False).heads
    b = catchtag.scan(mapped, tok, texts, eps=0.08, min_rows=4, progress=False).heads
    pd.testing.assert_frame_equal(a.drop(columns=["ve", "r2", "sink_scores"]),
                                  b.drop(columns=["ve", "r2", "sink_scores"]))
    assert np.allclose(a["ve"], b["ve"], atol=1e-6)


def test_failure_on_one_rank_stops_all_with_its_message(tmp_path):
    """Rank 1 fails; rank 0 would wait for it at the barrier for hours: torchrun must stop both, with the message."""
    data = tmp_path / "p.txt"
    data.write_text("\n".join(f"Line {i}: a prompt for the failing-rank test." for i in range(8)))
    cmd = TORCHRUN[:-2] + [str(Path(__file__).parent / "fail_one_rank.py")] + _args(data, tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "injected failure on rank 1" in output
    assert "exitcode  : 2" in output  # rank 1 left with the CLI's error code, not a hang or a crash
    assert time.time() - t0 < 200, "rank 0 kept waiting after rank 1 failed"
    assert not (tmp_path / "run" / "heads.parquet").exists()


def test_random_shape_models_and_device_map_names():
    """random:<shape> builds the benchmark shape (on the meta device here: no memory, no time); bad names fail
    clearly."""
    import pytest

    import catchtag
    from catchtag.errors import CatchtagError
    from catchtag.models import _device_map

    model, tok = catchtag.load_model("random:qwen2.5-7b", device="meta", dtype="bfloat16")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.hidden_size) == (28, 28, 4, 3584)
    assert 7.5e9 < sum(p.numel() for p in model.parameters()) < 7.7e9
    assert tok.model_max_length == cfg.max_position_embeddings  # prompts longer than 512 tokens are not cut
    with pytest.raises(CatchtagError, match="unknown random shape"):
        catchtag.load_model("random:qwen9")
    tiny, _ = catchtag.load_model("tiny:llama")
    assert set(_device_map(tiny, "balanced").values()) == {"cpu"}  # no GPU here: everything on the CPU
    with pytest.raises(CatchtagError, match="unknown device map"):
        _device_map(tiny, "everywhere")
