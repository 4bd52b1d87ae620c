"""The run folder (catchtag.runs) and the activation cache: everything a run holds loads back, broken files are
named with the command that repairs them, a resumed scan redoes a broken batch without losing or duplicating rows."""

import json

import numpy as np
import pandas as pd
import pytest

import catchtag
from catchtag.engine.request import ActivationRequest
from catchtag.errors import CatchtagError
from catchtag.result import ScanResult
from conftest import EPS, MIN_ROWS, TEXTS

REQUEST = ActivationRequest(layers=[0, 1], heads=[0, 2], positions="all", space="both", hidden_states=[1],
                            attention_maps=[(1, 2)], sink_attention=True)


def _scan(model, tok, out=None, texts=TEXTS, **kw):
    return catchtag.scan(model, tok, texts, eps=EPS, min_rows=MIN_ROWS, batch_size=2, request=REQUEST, out=out,
                         progress=False, model_name="tiny:llama", data_name="tests", **kw)


def _same_cache(a, b):
    assert a.names == b.names and a.layers == b.layers and a.heads == b.heads and a.prompt_ids == b.prompt_ids
    for name in a.arrays:
        np.testing.assert_allclose(a.arrays[name], b.arrays[name], atol=1e-6)
    np.testing.assert_array_equal(a.positions, b.positions)
    for layer in a.resid_pre:
        np.testing.assert_allclose(a.resid_pre[layer], b.resid_pre[layer], atol=1e-6)
    for kind in ("pattern", "sink_attention"):
        assert set(getattr(a, kind)) == set(getattr(b, kind)) and getattr(a, kind)
        for key, arr in getattr(a, kind).items():
            np.testing.assert_allclose(arr, getattr(b, kind)[key], atol=1e-6)


def test_a_run_loads_back_everything_it_holds(llama, tmp_path):
    model, tok = llama
    memory = _scan(model, tok)
    saved = _scan(model, tok, out=tmp_path / "run")
    loaded = ScanResult.load(tmp_path / "run")
    pd.testing.assert_frame_equal(loaded.heads, saved.heads)
    assert loaded.settings["model"] == "tiny:llama" and loaded.settings["eps"] == EPS
    _same_cache(loaded.cache, saved.cache)
    _same_cache(loaded.cache, memory.cache)
    # a result saved from memory (no parts) round-trips through activations.npz
    memory.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "activations.npz").is_file()
    _same_cache(ScanResult.load(tmp_path / "saved").cache, memory.cache)


def test_cache_names_and_slices(llama):
    model, tok = llama
    r = _scan(model, tok)
    c = r.cache
    assert set(c.names) == {"z", "z_tag", "z_nontag", "result", "result_tag", "result_nontag", "resid_pre",
                            "pattern", "sink_attention"}
    n_tok = r.prompts.set_index("prompt_id")["n_tokens"]
    z = c["z", 1]  # (prompts, heads kept, positions, d_head)
    assert z.shape[:2] == (len(TEXTS), 2)
    np.testing.assert_allclose(c["z_tag", 1] + c["z_nontag", 1], z, atol=1e-5)
    for i, pid in enumerate(c.prompt_ids):
        last = int(n_tok[pid]) - 1
        np.testing.assert_array_equal(c.get("z", layer=1, head=2, pos=-1)[i], z[i, 1, last])
        np.testing.assert_array_equal(c.get("result", layer=0, head=0, pos=3, prompt=pid), c["result", 0][i, 0, 3])
        assert c.get("pattern", layer=1, head=2, prompt=pid).shape == (n_tok[pid], n_tok[pid])
    assert c.get("resid_pre", layer=1, pos=0).shape == (len(TEXTS), model.config.hidden_size)
    for bad, match in ((lambda: c["z", 3], "layer 3 was not kept"), (lambda: c.get("z", layer=1, head=1),
                       "head 1 was not kept"), (lambda: c["pattern", 1], "per prompt and head"),
                       (lambda: c.get("pattern", layer=0, head=0, prompt=0), "no pattern kept"),
                       (lambda: c["z"], r"\(name, layer\)")):
        with pytest.raises(CatchtagError, match=match):
            bad()


def test_a_broken_part_is_named_and_a_resumed_scan_redoes_it(llama, tmp_path):
    model, tok = llama
    texts = TEXTS * 2
    run = tmp_path / "run"
    whole = _scan(model, tok, out=run, texts=texts)
    parts = sorted((run / "parts").glob("heads-*.parquet"))
    assert len(parts) == 3
    parts[1].write_bytes(b"not parquet")  # a disk error in one batch
    (run / "heads.parquet").unlink()  # and the finished table gone
    with pytest.raises(CatchtagError,
                       match="not a finished catchtag run: it was started.*Fix: run the scan that made it again"):
        ScanResult.load(run)
    with pytest.warns(UserWarning, match="broken or missing: that batch will be scanned again"):
        again = _scan(model, tok, out=run, texts=texts)
    pd.testing.assert_frame_equal(again.heads.drop(columns=["ve", "r2", "ve_uncentred", "sink_scores"]),
                                  whole.heads.drop(columns=["ve", "r2", "ve_uncentred", "sink_scores"]))
    assert np.allclose(again.heads["ve"], whole.heads["ve"], atol=1e-5)
    assert sorted(again.prompts["prompt_id"]) == list(range(len(texts)))  # nothing lost, nothing twice
    # a broken final table: the message names it and the command that rebuilds it
    (run / "heads.parquet").write_bytes(b"garbage")
    with pytest.raises(CatchtagError, match=r"heads.parquet is broken.*Fix: run .* again.*: it rebuilds"):
        ScanResult.load(run)
    # a broken part seen by a load: named, with the command
    from catchtag.runs import read_parts

    sorted((run / "parts").glob("prompts-*.parquet"))[0].write_bytes(b"x")
    with pytest.raises(CatchtagError, match=r"prompts-.*broken.*Fix: run"):
        read_parts(run)


def test_run_json_keeps_the_command_and_ignores_it_for_resume(llama, tmp_path, monkeypatch):
    model, tok = llama
    monkeypatch.setattr("sys.argv", ["catchtag", "scan", "--out", str(tmp_path / "run")])
    _scan(model, tok, out=tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["command"] == f"catchtag scan --out {tmp_path / 'run'}"
    monkeypatch.setattr("sys.argv", ["catchtag", "scan", "--out", "./" + str(tmp_path / "run")])
    _scan(model, tok, out=tmp_path / "run")  # another spelling of the command: the same run, resumed
    assert json.loads((tmp_path / "run" / "run.json").read_text())["command"] == manifest["command"]


def test_a_summary_owns_its_file(tmp_path):
    """A job's summary is typed: written to its own file under --out, read back as the same object (keys another
    version wrote are kept), a mapping for callers (a field the job did not fill is absent, None stays None), and a
    missing or broken file is one line naming the command that makes it."""
    from catchtag.summaries import AblateSummary, ScanSummary, SteerSummary

    s = AblateSummary(model="tiny:llama", mode="mean", group=None, targets=[{"target": "1.0"}])
    assert s.write(tmp_path) == tmp_path / "ablate" / "summary.json"
    back = AblateSummary.read(tmp_path)
    assert back == s and back["group"] is None and "figures" not in back and back.get("figures") is None
    assert list(json.loads((tmp_path / "ablate" / "summary.json").read_text())) == ["model", "mode", "group",
                                                                                      "targets"]
    (tmp_path / "summary.json").write_text(json.dumps({"model": "m", "from_the_future": 1}))
    old = ScanSummary.read(tmp_path)
    assert old["model"] == "m" and old["from_the_future"] == 1 and dict(old) == {"model": "m", "from_the_future": 1}
    with pytest.raises(KeyError):
        old["result"]
    with pytest.raises(CatchtagError, match="has no steering.json.*Fix: run `catchtag steer"):
        SteerSummary.read(tmp_path)
    (tmp_path / "steering.json").write_bytes(b"\xff not json")
    with pytest.raises(CatchtagError, match="not readable JSON"):
        SteerSummary.read(tmp_path)


def test_a_writer_lock_can_leave_no_file(tmp_path):
    """A job's lock refuses a second writer; released with remove=True it leaves the folder as the job wrote it, and
    the next writer locks a new file. A lock on a file that a finishing writer has just removed is not a lock: the
    next one takes the file at the path."""
    import fcntl

    from catchtag.runs import WriterLock

    first = WriterLock(tmp_path / "out", "pca")
    with pytest.raises(CatchtagError, match="being written by another catchtag process"):
        WriterLock(tmp_path / "out", "pca")
    stale = open(first.path, "a")  # a writer that opened the file just before the first one finished
    first.release(remove=True)
    assert not first.path.exists() and (tmp_path / "out").is_dir()
    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # it gets the old, removed file...
    second = WriterLock(tmp_path / "out", "pca")  # ...which does not keep the next writer out of the folder
    assert second._holds_the_path() and second.path.exists()
    stale.close()
    second.release(remove=True)
    mine = tmp_path / "theirs"
    mine.mkdir()
    (mine / "catchtag.lock").write_text("a file of the user's that happens to have this name")
    WriterLock(mine, "pca").release(remove=True)  # a file the lock did not create is never removed
    assert (mine / "catchtag.lock").read_text().startswith("a file of the user's")
