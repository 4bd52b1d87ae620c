"""The Python API with arguments of the wrong type or out of range: one CatchtagError naming the argument (and a fix),
never a raw TypeError, KeyError, AttributeError or IndexError from deep inside."""

import pytest

import catchtag
from catchtag import ActivationRequest
from catchtag.errors import CatchtagError
from conftest import EPS, MIN_ROWS

TEXT = "The cat sat on the mat and looked at the dog for a while."


@pytest.fixture(scope="module")
def llama():
    net, tok = catchtag.load_model("tiny:llama", device="cpu")
    result = catchtag.scan(net, tok, [TEXT] * 2, eps=EPS, min_rows=MIN_ROWS, progress=False,
                           request=ActivationRequest(layers=[1], positions="all", attention_maps=[(1, 0)]))
    return net, tok, result


def _scan(llama, **kw):
    net, tok, _ = llama
    args = {"texts": [TEXT], "progress": False, **kw}
    return catchtag.scan(args.pop("model", net), args.pop("tokenizer", tok), args.pop("texts"), **args)


CASES = [  # (what, call, words the message must hold)
    ("scan texts=5", lambda m: _scan(m, texts=5), "texts must be"),
    ("scan texts=[1, 2]", lambda m: _scan(m, texts=[1, 2]), "texts must be"),
    ("scan eps=None", lambda m: _scan(m, eps=None), "eps must be"),
    ("scan eps='0.2'", lambda m: _scan(m, eps="0.2"), "eps must be"),
    ("scan min_rows=2.5", lambda m: _scan(m, min_rows=2.5), "min_rows must be"),
    ("scan batch_size='8'", lambda m: _scan(m, batch_size="8"), "batch_size must be"),
    ("scan max_tokens=-1", lambda m: _scan(m, max_tokens=-1), "max_tokens must be"),
    ("scan sweep_eps=0.1", lambda m: _scan(m, sweep_eps=0.1), "sweep_eps must be"),
    ("scan request=dict", lambda m: _scan(m, request={"layers": [1]}), "request must be an ActivationRequest"),
    ("scan model=str", lambda m: _scan(m, model="tiny:llama"), "model must be a loaded model"),
    ("scan tokenizer=None", lambda m: _scan(m, tokenizer=None), "tokenizer must be"),
    ("request layers=5", lambda m: ActivationRequest(layers=5), "layers must be"),
    ("request positions=[1.5]", lambda m: ActivationRequest(positions=[1.5]), "positions must be"),
    ("request attention_maps=[1]", lambda m: ActivationRequest(attention_maps=[1]), "attention_maps must be"),
    ("request attention_maps=[(1, 2, 3)]", lambda m: ActivationRequest(attention_maps=[(1, 2, 3)]),
     "attention_maps must be"),
    ("request sink_attention='yes'", lambda m: ActivationRequest(sink_attention="yes"), "sink_attention must be"),
    ("request layers=[99] in a scan", lambda m: _scan(m, request=ActivationRequest(layers=[99])), "out of range"),
    ("head_means('nope')", lambda m: m[2].head_means("nope"), "no numeric column 'nope'"),
    ("cache['z', 99]", lambda m: m[2].cache["z", 99], "was not kept"),
    ("cache['z']", lambda m: m[2].cache["z"], "index the cache with (name, layer)"),
    ("load_model(123)", lambda m: catchtag.load_model(123), "a model is a name or a path"),
    ("compare_runs([123])", lambda m: catchtag.compare_runs([123]), "a run is a folder"),
    ("sink_taxonomy(None)", lambda m: catchtag.sink_taxonomy(None), "expected a ScanResult"),
    ("answer_logprobs answer_ids='x'", lambda m: catchtag.answer_logprobs(m[0], m[1], [TEXT], "x"),
     "answer_ids must be"),
    ("pca_picture text=123", lambda m: catchtag.pca_picture(m[0], m[1], 123), "expected one prompt"),
    ("run_scan eps='x'", lambda m: catchtag.run_scan("tiny:llama", out="unused", eps="x"), "eps must be a number"),
    ("run_scan limit=1.5", lambda m: catchtag.run_scan("tiny:llama", out="unused", limit=1.5),
     "limit must be a whole number"),
    ("run_scan figures='no'", lambda m: catchtag.run_scan("tiny:llama", out="unused", figures="no"),
     "figures must be True or False"),
    ("run_scan bogus=1", lambda m: catchtag.run_scan("tiny:llama", out="unused", bogus=1), "has no setting bogus"),
    ("run_scan 4 positional", lambda m: catchtag.run_scan("tiny:llama", "builtin:prose", "unused", 0.2),
     "takes at most 3 settings by position"),
    ("run_ablate heads=[(1,)]", lambda m: catchtag.jobs.run_ablate("tiny:llama", out="unused", heads=[(1,)]),
     "--heads must look like LAYER.HEAD"),
    ("run_compare without runs", lambda m: catchtag.jobs.run_compare(), "compare needs runs"),
]


@pytest.mark.parametrize("what, call, words", CASES, ids=[c[0] for c in CASES])
def test_wrong_types_are_one_catchtag_error(llama, what, call, words, tmp_path, monkeypatch):
    import catchtag.jobs  # noqa: F401  (catchtag.jobs.run_ablate in the table)

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CatchtagError) as err:
        call(llama)
    message = str(err.value)
    assert words in message, message
    assert len(message.splitlines()) == 1, message
    assert not (tmp_path / "unused").exists(), "a refused job left its --out behind"
