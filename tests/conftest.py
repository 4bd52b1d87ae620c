import os

import pytest
import torch

from catchtag.tiny import padded_batch  # noqa: F401  (the tests' padded random batches)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox", "phi3", "olmo2", "gemma3"]

# analyses and reports on tiny random models: random weights have no real sinks at eps 0.2, so a low eps and
# min_rows 4 make sure there are sinks to analyse
EPS, MIN_ROWS = 0.03, 4
TEXTS = ["The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.",
         "In the beginning the Universe was created; this has made a lot of people very angry.",
         "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about."]


# `make test-fast` leaves these out (-m "not slow"): the docs' command blocks, model training, real models, several
# processes, a notebook kernel, and the few single tests above 20 s. CI and `make test` run everything.
SLOW_MODULES = {"test_docs.py", "test_toy_lm.py", "test_real_model.py", "test_distributed.py", "test_notebook.py"}
SLOW_TESTS = {"test_a_capped_sink_pass_gives_the_exact_result_and_reruns_past_its_cap"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_MODULES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_models():
    """tiny:<arch> models built once per session (random weights, no download)."""
    from catchtag.models import load_model

    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = load_model(f"tiny:{arch}", dtype="float32")
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def llama(tiny_models):
    """tiny:llama (model, tokenizer), shared by the analysis and report tests."""
    return tiny_models("llama")


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Two tiny models (llama, qwen3) scanned on TEXTS with the 12-eps sweep, as run folders."""
    from catchtag import load_model, scan
    from catchtag.analysis.sweep import SWEEP_EPS
    from catchtag.data.prompts import tokenize_prompts
    from catchtag.jobs import write_views

    folder = tmp_path_factory.mktemp("runs")
    out = []
    for arch in ("llama", "qwen3"):
        net, tok = load_model(f"tiny:{arch}")
        prompts = tokenize_prompts(TEXTS, tok)
        scan(net, tok, prompts, eps=EPS, min_rows=MIN_ROWS, sweep_eps=SWEEP_EPS, out=folder / arch, progress=False,
             model_name=f"tiny:{arch}", data_name="tests")
        # what `catchtag scan` keeps for the report: the per-token pictures of the first prompt
        write_views(net, tok, prompts[0], folder / arch / "views", eps=EPS, min_rows=MIN_ROWS, name=f"tiny:{arch}")
        out.append(folder / arch)
    return out
