"""Analyses on tiny random models: pca pictures, model comparison, threshold sweep, sink taxonomy, tag geometry.

Random weights have no real sinks at eps 0.2, so these tests use a low eps (0.03) and min_rows 4: the point is
that every number an analysis reports matches the engine's tables and a direct recomputation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import catchtag
from catchtag import ActivationRequest, CatchtagError, scan
from catchtag.analysis.compare import compare_runs
from catchtag.measure import tag_geometry
from catchtag.analysis.pca import choose_head, to_rgb, top_components
from catchtag.measure import pca_picture
from catchtag.analysis.sweep import SWEEP_EPS, sweep_table
from catchtag.analysis.taxonomy import kind_shares, sink_rows, sink_taxonomy, token_kind
from catchtag.scan import _decoder
from catchtag.cli import app

from conftest import EPS, MIN_ROWS, TEXTS  # noqa: E402

TEXT = " ".join(TEXTS)


def test_sink_attention_request_matches_attention_maps(llama):
    net, tok = llama
    r = scan(net, tok, [TEXT], eps=EPS, min_rows=MIN_ROWS, progress=False,
             request=ActivationRequest(layers=[], sink_attention=True, attention_maps=[(1, 2), (2, 0)]))
    assert len(r.cache.sink_attention) == r.n_layers * r.n_heads
    for layer, head in [(1, 2), (2, 0)]:
        row = r.heads[(r.heads["layer"] == layer) & (r.heads["head"] == head)].iloc[0]
        A = r.cache.get("pattern", layer=layer, head=head, prompt=0)
        got = r.cache.get("sink_attention", layer=layer, head=head, prompt=0)
        assert got.shape == (row["n_tokens"], row["n_sinks"])
        np.testing.assert_allclose(got, A[:, list(row["sink_positions"])], atol=1e-5)


def test_top_components_recover_planted_directions():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(16, 3)))[0]
    raw = rng.normal(size=(200, 3))
    coords = np.linalg.qr(raw - raw.mean(axis=0))[0] * np.array([10.0, 5.0, 2.0]) * np.sqrt(200)  # uncorrelated
    x = coords @ basis.T + 0.01 * rng.normal(size=(200, 16))
    pcs, explained = top_components(x)
    assert explained[0] > explained[1] > explained[2] and explained.sum() > 0.99
    for k in range(3):  # each PC is the planted coordinate up to sign
        assert abs(np.corrcoef(pcs[:, k], coords[:, k])[0, 1]) > 0.999
    rgb = to_rgb(pcs)
    assert rgb.min() >= 0 and rgb.max() <= 1 and rgb.shape == (200, 3)


def test_pca_picture_default_head_and_consistency(llama):
    net, tok = llama
    pic = pca_picture(net, tok, TEXT, eps=EPS, min_rows=MIN_ROWS)
    first = scan(net, tok, [TEXT], eps=EPS, min_rows=MIN_ROWS, progress=False)
    assert (pic.layer, pic.head) == choose_head(first)
    assert any(s > 0 for s in pic.sinks), "the default head has a sink beyond the first token"
    h = first.heads
    chosen_ve = h[(h["layer"] == pic.layer) & (h["head"] == pic.head)]["ve"].iloc[0]
    beyond = h[h["sink_positions"].apply(lambda p: any(x > 0 for x in p))]
    assert chosen_ve == pytest.approx(beyond["ve"].max()) and pic.ve == pytest.approx(chosen_ve, abs=1e-5)
    T = len(pic.tokens)
    assert pic.head_rgb.shape == (T, 3) and pic.deeper_rgb.shape == (T, 3)
    assert 0 <= pic.head_rgb.min() and pic.head_rgb.max() <= 1
    np.testing.assert_allclose(pic.attention.sum(axis=1), 1, atol=1e-4)
    np.testing.assert_allclose(pic.sink_attention, pic.attention[:, pic.sinks], atol=1e-5)
    strongest = pic.sink_attention.argmax(axis=1)
    tagged = pic.sink_attention.max(axis=1) >= pic.tag_level
    assert (pic.tagged_by[tagged] == strongest[tagged]).all() and (pic.tagged_by[~tagged] == -1).all()
    assert pic.deeper == min(net.config.num_hidden_layers - 1, pic.layer + 4)


def test_pca_picture_explicit_head_and_errors(llama):
    net, tok = llama
    pic = pca_picture(net, tok, TEXT, layer=0, head=1, deeper=2, eps=EPS, min_rows=MIN_ROWS)
    assert (pic.layer, pic.head, pic.deeper) == (0, 1, 2)
    with pytest.raises(CatchtagError, match="out of range"):
        pca_picture(net, tok, TEXT, layer=9, head=0)
    with pytest.raises(CatchtagError, match="both"):
        pca_picture(net, tok, TEXT, layer=1)
    with pytest.raises(CatchtagError, match="deeper"):
        pca_picture(net, tok, TEXT, layer=2, head=0, deeper=1)


def test_compare_matches_tables(runs):
    cmp = compare_runs(runs)
    assert list(cmp.summary["run"]) == ["tiny:llama", "tiny:qwen3"]
    for path, row in zip(runs, cmp.summary.itertuples()):
        h = catchtag.ScanResult.load(path).heads
        assert row.mean_sinks_per_head == pytest.approx(h["n_sinks"].mean())
        assert row._14 == pytest.approx((h["ve"] > 0.3).mean())  # share_ve_above_0.3
        assert row.share_heads_with_sink == pytest.approx((h["n_sinks"] > 0).mean())
    per_layer = cmp.per_layer[cmp.per_layer["run"] == "tiny:llama"]
    assert per_layer["depth"].min() == 0 and per_layer["depth"].max() == 1
    h = catchtag.ScanResult.load(runs[0]).heads
    assert per_layer["ve"].to_numpy() == pytest.approx(h.groupby("layer")["ve"].mean().to_numpy())
    # both forms of VE, each named for what it is
    assert per_layer["ve_uncentred"].to_numpy() == pytest.approx(h.groupby("layer")["ve_uncentred"].mean().to_numpy())
    row = cmp.summary.iloc[0]
    assert row["mean_ve_uncentred"] == pytest.approx(h["ve_uncentred"].mean())
    assert row["mean_ve_uncentred_heads_with_sink"] == pytest.approx(h.loc[h["n_sinks"] > 0, "ve_uncentred"].mean())
    assert row["mean_ve_uncentred"] != pytest.approx(row["mean_ve"])


def test_sweep_one_pass_and_consistent(llama, tmp_path):
    net, tok = llama
    calls = []
    hook = _decoder(net).register_forward_hook(lambda *a: calls.append(1))  # what scan() calls
    try:
        r = scan(net, tok, TEXTS, eps=0.2, min_rows=MIN_ROWS, sweep_eps=SWEEP_EPS, batch_size=8, progress=False)
    finally:
        hook.remove()
    assert len(calls) == 1, "all 12 thresholds come from one forward pass"
    table = sweep_table(r)
    assert list(table["eps"]) == list(SWEEP_EPS)
    assert (np.diff(table["mean_sinks_per_head"]) <= 1e-12).all(), "sink sets are nested: fewer sinks as eps grows"
    at_main = table[table["eps"] == 0.2].iloc[0]
    assert at_main["mean_sinks_per_head"] == pytest.approx(r.heads["n_sinks"].mean())
    assert at_main["mean_ve"] == pytest.approx(r.heads["ve"].mean(), abs=1e-6)
    # the uncentred form too, at every threshold (it equals the main scan's at the main eps)
    assert at_main["mean_ve_uncentred"] == pytest.approx(r.heads["ve_uncentred"].mean(), abs=1e-6)
    assert table["mean_ve_uncentred"].notna().all() and (table["mean_ve_uncentred"] != table["mean_ve"]).any()
    without = scan(net, tok, TEXTS, eps=0.2, min_rows=MIN_ROWS, progress=False)
    with pytest.raises(CatchtagError, match="--sweep"):
        sweep_table(without)


def test_token_kinds():
    assert token_kind("<bos>", 0) == "first"
    assert token_kind(".", 5) == "punctuation" and token_kind(" ,", 5) == "punctuation"
    assert token_kind("\n\n", 3) == "whitespace" and token_kind(" ", 3) == "whitespace"
    assert token_kind(" the", 3) == "function word" and token_kind("Of", 3) == "function word"
    assert token_kind(" Paris", 3) == "other"


def test_taxonomy_counts(runs):
    r = catchtag.ScanResult.load(runs[0])
    table = sink_taxonomy(r)
    total = int(r.heads["n_sinks"].sum())
    assert table["count"].sum() == total and len(sink_rows(r)) == total
    top = table.iloc[0]
    rows = sink_rows(r)
    mine = rows[(rows["token"] == top["token"]) & ((rows["kind"] == "first") == (top["kind"] == "first"))]
    assert len(mine) == top["count"] and mine["ve"].mean() == pytest.approx(top["mean_ve"])
    assert top["n_heads"] == len(mine[["layer", "head"]].drop_duplicates())
    kinds = kind_shares(r)
    assert kinds["count"].sum() == total and kinds["share"].sum() == pytest.approx(1)
    assert kinds.loc[kinds["kind"] != "first", "share_beyond_first"].sum() == pytest.approx(1)


def test_geometry_matches_direct_computation(llama):
    net, tok = llama
    g = tag_geometry(net, tok, TEXT, n_positions=12, max_pairs=500, eps=EPS, min_rows=MIN_ROWS)
    assert set(g.pairs["kind"]) == {"different layers", "same layer, different heads", "same head, different sinks"}
    assert g.pairs["cosine"].between(-1 - 1e-9, 1 + 1e-9).all()
    assert (g.pairs.groupby("kind").size() <= 500).all()
    same_head = g.pairs[g.pairs["kind"] == "same head, different sinks"]
    assert (same_head["a"].str[:2] == same_head["b"].str[:2]).all()
    assert (g.pairs[g.pairs["kind"] == "different layers"].apply(lambda r: r["a"][0] != r["b"][0], axis=1)).all()
    # recompute one tag-vs-token cosine from a plain scan with the same request
    row = g.tag_vs_token.iloc[len(g.tag_vs_token) // 2]
    layer, head, pos = int(row["layer"]), int(row["head"]), int(row["position"])
    r = scan(net, tok, [TEXT], eps=EPS, min_rows=MIN_ROWS, progress=False,
             request=ActivationRequest(layers=[layer], heads=[head], positions=[pos], space="residual",
                                       hidden_states=[layer]))
    tag = r.cache.get("result_tag", layer=layer, head=head, pos=pos)[0]
    token = r.cache.get("resid_pre", layer=layer, pos=pos)[0]
    cos = tag @ token / np.linalg.norm(tag) / np.linalg.norm(token)
    assert row["cosine"] == pytest.approx(cos, abs=1e-4)
    summary = g.summary()
    json.dumps(summary)
    assert "tag_vs_token" in summary


def test_per_sink_tag_directions_recover_the_tags(llama):
    """The per-sink directions U (least squares) rebuild every sampled tag: tag_i = sum_k A_ik U_k."""
    net, tok = llama
    from catchtag.analysis.geometry import sample_positions

    g = tag_geometry(net, tok, TEXT, n_positions=16, eps=EPS, min_rows=MIN_ROWS)
    assert g.n_tags >= 3
    layer, head, sink = g.pairs.iloc[0]["a"]
    pos = sample_positions(len(tok(TEXT)["input_ids"]), 16)
    assert pos == g.positions
    r = scan(net, tok, [TEXT], eps=EPS, min_rows=MIN_ROWS, progress=False,
             request=ActivationRequest(layers=[layer], heads=[head], positions=pos, space="residual",
                                       sink_attention=True))
    tags = r.cache["result_tag", layer][0, 0].astype(np.float64)
    A = r.cache.get("sink_attention", layer=layer, head=head, prompt=0)[pos].astype(np.float64)
    U = np.linalg.lstsq(A, tags, rcond=None)[0]
    np.testing.assert_allclose(A @ U, tags, atol=1e-4 * np.abs(tags).max())


def test_cli_analyses(runs, tmp_path):
    cli = CliRunner()
    res = cli.invoke(app, ["compare", *map(str, runs), "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    res = cli.invoke(app, ["sweep", *map(str, runs), "--out", str(tmp_path / "sweep")])
    assert res.exit_code == 0, res.output
    assert "eps 0.03" in res.output and (tmp_path / "sweep" / "sweep.png").is_file()
    res = cli.invoke(app, ["taxonomy", *map(str, runs), "--out", str(tmp_path / "tax")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "tax" / "taxonomy.png").is_file()
    res = cli.invoke(app, ["pca", "--model", "tiny:llama", "--text", TEXT, "--eps", str(EPS), "--min-rows", "4",
                           "--out", str(tmp_path / "pca")])
    assert res.exit_code == 0, res.output
    assert list((tmp_path / "pca").glob("pca_L*H*.png"))
    res = cli.invoke(app, ["geometry", "--model", "tiny:llama", "--text", TEXT, "--eps", str(EPS), "--min-rows", "4",
                           "--n-positions", "8", "--out", str(tmp_path / "geo")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "geo" / "geometry.json").read_text())["n_positions"] == 8
    from catchtag.runs import unlisted_files

    for job, folder in (("compare", "cmp"), ("sweep", "sweep"), ("taxonomy", "tax"), ("pca", "pca"),
                        ("geometry", "geo")):  # each writes only what runs.ARTIFACTS lists for it
        assert not unlisted_files(tmp_path / folder, job), (job, unlisted_files(tmp_path / folder, job))
    res = cli.invoke(app, ["pca", "--model", "tiny:llama", "--text", TEXT, "--layer", "7", "--head", "0"])
    assert res.exit_code == 2 and "out of range" in res.output
    res = cli.invoke(app, ["sweep", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--model" in res.output


def test_sweep_cli_scans_in_one_pass(tmp_path):
    res = CliRunner().invoke(app, ["sweep", "--model", "tiny:llama", "--data", "builtin:prose", "--limit", "2",
                                   "--max-tokens", "64", "--out", str(tmp_path / "sw")])
    assert res.exit_code == 0, res.output
    r = catchtag.ScanResult.load(tmp_path / "sw" / "scan-tiny_llama")
    assert sorted(r.sweep["eps"].unique()) == list(SWEEP_EPS)
    from catchtag.runs import unlisted_files

    assert not unlisted_files(tmp_path / "sw", "sweep")
