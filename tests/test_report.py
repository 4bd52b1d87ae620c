"""The HTML report and the token viewer, checked in a real headless browser (Debian's chromium via playwright).

These tests fail (never skip) when /usr/bin/chromium or playwright is missing: CI must install both
(apt-get install -y chromium; pip install playwright) and playwright must never download a browser.
"""

from __future__ import annotations

import base64
import re
import tempfile

import numpy as np
import pytest

from catchtag import scan
from catchtag.report.html import write_report
from catchtag.jobs import token_view
from catchtag.report.viewer import render_view

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
from conftest import EPS, MIN_ROWS  # noqa: E402
TEXT = ("The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.\n"
        "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about.")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def open_page(browser, path):
    """A page with every console error, page error and network request outside file:// recorded."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, errors, requests


@pytest.fixture(scope="module")
def view_page(llama, tmp_path_factory):
    net, tok = llama
    return token_view(net, tok, TEXT, tmp_path_factory.mktemp("view") / "view.html", eps=EPS, min_rows=MIN_ROWS,
                      name="tiny:llama")


def test_viewer_is_self_contained(view_page):
    page = view_page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "no CDN or network resource"
    assert "<script id=\"catchtag-data\"" in page


def test_viewer_in_browser(browser, view_page, llama, tmp_path):
    net, tok = llama
    r = scan(net, tok, [TEXT], eps=EPS, min_rows=MIN_ROWS, progress=False)
    sinks = {(row.layer, row.head): tuple(sorted(row.sink_positions)) for row in r.heads.itertuples()}
    page, errors, requests = open_page(browser, view_page)
    assert page.locator("span.t").count() == int(r.heads["n_tokens"].iloc[0])

    def shown():
        return tuple(sorted(int(s.get_attribute("data-i")) for s in page.locator("span.t.sink").all()))

    # two heads with different sinks: selecting one, then the other, changes the highlighted tokens
    (a, b) = next(((x, y) for x in sinks for y in sinks if sinks[x] and sinks[y] and sinks[x] != sinks[y]))
    for (layer, head) in (a, b):
        page.select_option("#layer", str(layer))
        page.select_option("#head", str(head))
        assert shown() == sinks[(layer, head)]
    assert shown() != sinks[a]
    # the head's VE in both forms, each named
    row = r.heads[(r.heads["layer"] == b[0]) & (r.heads["head"] == b[1])].iloc[0]
    assert f"VE centred {row['ve']:.3f}, uncentred {row['ve_uncentred']:.3f}" in page.inner_text("#info")
    # every token is coloured by the sink it attends to most: a token after the first sink has a colour
    first_sink = sinks[b][0]
    assert page.locator(f"span.t >> nth={first_sink + 1}").evaluate("e => e.style.backgroundColor") != ""
    # hover: the attention the token pays to each sink of the head
    page.hover(f"span.t >> nth={len(r.prompts['tokens'].iloc[0]) - 1}")
    tip = page.inner_text("#tip")
    assert f"sink {first_sink}" in tip
    # "all heads" of the layer: the union of that layer's sinks
    page.select_option("#head", "all")
    union = tuple(sorted({p for (l, h), s in sinks.items() if l == b[0] for p in s}))
    assert shown() == union
    # the grid picks a head too
    page.click(f"#grid td[data-l='{a[0]}'][data-h='{a[1]}']")
    assert shown() == sinks[a]
    page.screenshot(path=str(tmp_path / "viewer.png"))
    assert (tmp_path / "viewer.png").stat().st_size > 10_000
    assert errors == [] and requests == []


def synthetic_view(T=2048, L=30, H=9, seed=0):
    """View data of the size of a real 2k-token scan of a 30 x 9 model, with 1-3 sinks per head."""
    rng = np.random.default_rng(seed)
    heads = []
    for _ in range(L):
        row = []
        for _ in range(H):
            sinks = sorted({0, *rng.integers(1, T - 64, size=rng.integers(0, 3)).tolist()})
            a = rng.random((T, len(sinks))) * 0.5
            for k, s in enumerate(sinks):
                a[:s, k] = 0
            q = np.rint(a * 255).astype(np.uint8)
            row.append({"s": sinks, "sc": [0.3] * len(sinks), "ve": float(rng.random()),
                        "a": base64.b64encode(q.tobytes()).decode()})
        heads.append(row)
    tokens = [f" w{i}" if i % 17 else ".\n" for i in range(T)]
    return {"model": "synthetic", "eps": 0.2, "min_rows": 16, "n_layers": L, "n_heads": H, "tokens": tokens,
            "heads": heads, "start": [0, 0]}


def test_viewer_fast_with_2k_tokens(browser, tmp_path):
    path = tmp_path / "big.html"
    path.write_text(render_view(synthetic_view()), encoding="utf-8")
    assert path.stat().st_size < 8_000_000
    page, errors, _ = open_page(browser, path)
    assert page.locator("span.t").count() == 2048
    ms = page.evaluate("""() => {
        const t0 = performance.now();
        document.getElementById('layer').value = 'all';
        document.getElementById('head').value = 'all';
        window.catchtagView.render();
        const t1 = performance.now();
        document.getElementById('layer').value = '7';
        document.getElementById('head').value = '3';
        window.catchtagView.render();
        return [t1 - t0, performance.now() - t1];
    }""")
    assert ms[0] < 1500 and ms[1] < 300, f"render took {ms} ms"
    page.screenshot(path=str(tmp_path / "big.png"))
    assert errors == []


def test_report_in_browser(browser, runs, tmp_path, monkeypatch):
    import catchtag.models

    def no_model(*args, **kwargs):
        raise AssertionError("the report loaded a model")

    monkeypatch.setattr(catchtag.models, "load_model", no_model)  # it only renders what the runs hold
    monkeypatch.chdir(tmp_path)  # from any working directory
    out = write_report(runs, tmp_path / "report.html")
    page_text = out.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page_text), "no network resource"
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', page_text)
    # compare, sweep, taxonomy, 3 heatmaps per run (sinks, VE centred, VE uncentred), a pca picture per run, geometry
    assert len(images) == 3 + 3 * len(runs) + len(runs) + 1
    for section in ("Runs, settings and versions", "Models side by side", "Threshold sweep", "Which tokens are sinks",
                    "Release pictures", "Tag geometry", "Token viewer", "transformers"):
        assert section in page_text
    assert page_text.count("<iframe srcdoc=") == len(runs) and "Not drawn" not in page_text
    assert page_text.count("<figcaption>") == len(images)
    page, errors, requests = open_page(browser, out)
    widths = page.evaluate("() => [...document.images].map(i => i.naturalWidth)")
    assert len(widths) == len(images) and min(widths) > 100, "every embedded figure decodes"
    page.screenshot(path=str(tmp_path / "report.png"), full_page=False)
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert errors == [] and requests == []


def test_report_without_per_token(runs, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the figures are drawn before embedding
    out = write_report(runs, tmp_path / "r.html", per_token=False)
    assert "Release pictures" not in out.read_text() and "Threshold sweep" in out.read_text()
    assert list(scratch.iterdir()) == [], "the report's figure folder is removed afterwards"


def test_report_draws_what_it_can_and_says_why_not(runs, llama, tmp_path):
    """Any finished run renders: a run without per-token pictures (scanned from Python), a ScanResult from memory,
    and a run whose first prompt is too short to have a sink each get a note in the page, the rest is drawn."""
    import shutil

    from catchtag.jobs import write_views

    net, tok = llama
    bare = tmp_path / "bare"
    scan(net, tok, ["Hi", TEXT], eps=EPS, min_rows=MIN_ROWS, out=bare, progress=False, model_name="tiny:llama")
    short = tmp_path / "short"
    shutil.copytree(bare, short)
    from catchtag.data.prompts import tokenize_prompts

    write_views(net, tok, tokenize_prompts(["Hi"], tok)[0], short / "views", eps=EPS, min_rows=MIN_ROWS,
                name="tiny:llama")
    memory = scan(net, tok, [TEXT], eps=EPS, min_rows=MIN_ROWS, progress=False, model_name="tiny:llama (memory)")
    out = write_report({"bare": bare, "short": short, "memory": memory, "llama": runs[0]}, tmp_path / "r.html")
    page = out.read_text()
    assert page.count("Not drawn: the run holds no per-token pictures") == 3  # pca, geometry, viewer of 'bare'
    assert "Not drawn: this result was passed from memory" in page
    import html as html_lib
    import json

    why = json.loads((short / "views" / "views.json").read_text())["not_made"]
    assert why, "the short prompt should have nothing to picture"
    for reason in why.values():  # each picture the short prompt could not give is in the page, with its reason
        assert f"Not drawn: {html_lib.escape(reason)}" in page
    assert page.count("<iframe srcdoc=") >= 1 and "Models side by side" in page


def test_scan_result_shows_itself_in_a_notebook(runs):
    """A ScanResult as the last line of a notebook cell: its summary and the layer x head VE map, inline."""
    import base64
    import re

    from catchtag import ScanResult

    page = ScanResult.load(runs[0])._repr_html_()
    assert "catchtag ScanResult" in page and "mean_ve" in page and "3 layers" in page
    png = base64.b64decode(re.search(r"base64,([A-Za-z0-9+/=]+)", page).group(1))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_viewer_shows_right_to_left_text_in_order(browser, llama, tmp_path):
    """An Arabic prompt on a byte-level tokenizer: each token is shown as its characters (not U+FFFD) and the strip
    runs right to left, the first token rightmost; an English prompt runs left to right."""
    net, tok = llama
    arabic = "مرحبا بالعالم، هذا نص قصير"
    page_path = token_view(net, tok, arabic, tmp_path / "rtl.html", eps=EPS, min_rows=MIN_ROWS, name="tiny:llama")
    page, errors, _ = open_page(browser, page_path)
    spans = page.locator("span.t")
    texts = [s.inner_text() for s in spans.all()]
    assert not any("\ufffd" in t for t in texts) and "م" in "".join(texts)
    assert page.locator("#tokens").evaluate("e => getComputedStyle(e).direction") == "rtl"
    first, second = (spans.nth(i).bounding_box() for i in (0, 2))  # 0, 1 are the two bytes of one letter
    assert first["x"] > second["x"], "the first token must be to the right of the later one"
    english, _, _ = open_page(browser, token_view(net, tok, TEXT, tmp_path / "ltr.html", eps=EPS, min_rows=MIN_ROWS,
                                                  name="tiny:llama"))
    assert english.locator("#tokens").evaluate("e => getComputedStyle(e).direction") == "ltr"
    # the VE grid has its colour scale, in the cells' colours
    assert "linear-gradient" in english.locator("#scale").evaluate("e => e.style.background")
    assert errors == []


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: sliding-window layers, sinks leave the window
def test_generation_viewer_steps_through_the_written_text(browser, tiny_models, arch, tmp_path):
    """The viewer of a written text (catchtag.show_generation): at step k it shows the prompt and the first k written
    tokens, and each head's sinks are those a scan of exactly that text finds (a scan run here, not the tracker's
    tables); after the last step, the scan of the finished text's. The play button walks the steps."""
    import catchtag
    from catchtag.data.prompts import Prompt

    net, tok = tiny_models(arch)
    result = catchtag.generate(net, tok, TEXT[:60], max_new_tokens=24, eps=EPS, min_rows=MIN_ROWS, keep=256,
                               chat=False, progress=False)  # keep: every sink listed (gemma3's window: ~all columns)
    path = catchtag.show_generation(net, tok, result).save(tmp_path / "gen.html")
    row = result.prompts.iloc[0]
    P, ids = int(row["n_prompt_tokens"]), [int(x) for x in row["token_ids"]]
    page, errors, requests = open_page(browser, path)

    def shown():
        return tuple(sorted(int(s.get_attribute("data-i")) for s in page.locator("span.t.sink").all()))

    heads = [(0, 0), (1, 2), (2, 3)]
    for k in (0, 9, 24):
        prefix = scan(net, tok, [Prompt(0, ids[:P + k])], eps=EPS, min_rows=MIN_ROWS, progress=False).heads
        page.evaluate(f"window.catchtagView.setStep({k})")
        assert page.locator("span.t:visible").count() == P + k
        for layer, head in heads:
            page.select_option("#layer", str(layer))
            page.select_option("#head", str(head))
            want = prefix[(prefix["layer"] == layer) & (prefix["head"] == head)].iloc[0]["sink_positions"]
            assert shown() == tuple(sorted(int(p) for p in want)), (k, layer, head)
            assert f"step {k} of 24" in page.inner_text("#info")
    final = result.scan.heads
    for layer, head in heads:
        page.select_option("#layer", str(layer))
        page.select_option("#head", str(head))
        want = final[(final["layer"] == layer) & (final["head"] == head)].iloc[0]["sink_positions"]
        assert shown() == tuple(sorted(int(p) for p in want))
    # a written token is coloured by the sink it attends to most
    assert page.locator(f"span.t >> nth={P + 3}").evaluate("e => e.style.backgroundColor") != ""
    page.evaluate("window.catchtagView.setStep(5)")
    assert page.locator("span.t:visible").count() == P + 5
    page.click("#play")
    page.wait_for_function("() => document.getElementById('step').value === '24'", timeout=10_000)
    assert page.locator("span.t:visible").count() == P + 24
    # a head with more sinks than were listed says so
    page.evaluate("window.catchtagView.data.heads[0][0].ev.push([24, [0], 5])")
    page.select_option("#layer", "0")
    page.select_option("#head", "0")
    assert "(4 more not listed: raise --keep)" in page.inner_text("#info")
    page.screenshot(path=str(tmp_path / "gen.png"))
    assert errors == [] and requests == []
