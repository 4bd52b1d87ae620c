"""True/false factual statements for probes: "The capital of X is Y." from the ``countryinfo`` package.

Source: PyPI ``countryinfo`` (MIT licence), its bundled per-country JSON table (name, capital). Nothing is
downloaded. Every country gives one true statement (its own capital) and one false one (the capital of
another country of the same split), so the set is balanced by construction. Countries, not statements,
are split into train and test: no country, and no capital, appears in both splits. A few well-known
countries are held out of both splits and used only for the few-shot demonstrations.
"""

from __future__ import annotations

import random
from functools import lru_cache

import pandas as pd

from catchtag.errors import CatchtagError

TRUTH_COLUMNS = ["text", "label", "split", "entity", "answer"]
#: countries kept out of both splits: the few-shot demonstrations use them (true, false, false, true ...)
DEMO_COUNTRIES = ("France", "Japan", "Italy", "Egypt", "Germany", "Kenya")
TRUTH_LABELS = ("FALSE", "TRUE")  # label 0, label 1


_NEEDS_THE = ("Republic", "United", "Islands", "Kingdom", "States", "Emirates")
_NEEDS_THE_NAMES = {"Netherlands", "Philippines", "Maldives", "Comoros", "Seychelles", "Isle of Man", "Holy See"}


def _the(name: str) -> str:
    """Country names read 'the Bahamas', 'the United States' inside a sentence."""
    if name.startswith("The "):
        return "the " + name[4:]
    if name in _NEEDS_THE_NAMES or any(word in name.split() for word in _NEEDS_THE):
        return "the " + name
    return name


@lru_cache(maxsize=1)
def country_capitals() -> tuple[tuple[str, str], ...]:
    """(country, capital) pairs from countryinfo, cleaned: one capital per country, no capital shared by two
    entries (nor two spellings of one: George Town / Georgetown), no capital equal to its country's name (e.g.
    Singapore), no names with commas, slashes or parentheses. Sorted by country."""
    try:
        from countryinfo import all_countries
    except ImportError:
        raise CatchtagError("builtin:truth needs the countryinfo package. Fix: pip install countryinfo") from None
    rows = []
    for country in all_countries():
        info = country.info()
        name, capital = info.get("name"), info.get("capital")
        if not isinstance(name, str) or not isinstance(capital, str) or not capital.strip():
            continue
        if any(ch in name + capital for ch in ",/()") or capital.strip() == name.strip():
            continue
        rows.append((name.strip(), capital.strip()))
    def key(capital: str) -> str:  # 'George Town' ~ 'Georgetown', 'City of Victoria' ~ 'Victoria'
        return capital.lower().replace("city of ", "").replace(" ", "").replace("-", "")

    counts: dict[str, int] = {}
    for _, capital in rows:
        counts[key(capital)] = counts.get(key(capital), 0) + 1
    return tuple(sorted((n, c) for n, c in rows if counts[key(c)] == 1))


def statement(country: str, capital: str) -> str:
    end = "" if capital.endswith(".") else "."
    return f"The capital of {_the(country)} is {capital}{end}"


def truth_statements(seed: int = 0, test_share: float = 0.5) -> pd.DataFrame:
    """The labelled truth set: columns text, label (1 true, 0 false), split (train/test), entity (the
    country the statement is about), answer (TRUE/FALSE). Deterministic for a seed; balanced in each split."""
    if not 0.0 < test_share < 1.0:
        raise CatchtagError(f"test_share must lie in (0, 1), got {test_share}")
    pairs = [p for p in country_capitals() if p[0] not in DEMO_COUNTRIES]
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    n_test = int(round(len(pairs) * test_share))
    split_of = {i: ("test" if k < n_test else "train") for k, i in enumerate(order)}
    rows = []
    for split in ("train", "test"):
        members = [i for i in range(len(pairs)) if split_of[i] == split]
        # a cyclic shift of a shuffled order is a derangement: each country gets another member's capital
        perm = members[:]
        rng.shuffle(perm)
        for k, a in enumerate(perm):
            country, capital = pairs[a]
            wrong = pairs[perm[(k + 1) % len(perm)]][1]
            rows.append((statement(country, capital), 1, split, country, "TRUE"))
            rows.append((statement(country, wrong), 0, split, country, "FALSE"))
    frame = pd.DataFrame(rows, columns=TRUTH_COLUMNS)
    return frame.sort_values(["split", "entity", "label"], ascending=[False, True, False], ignore_index=True)


def truth_demonstrations(n_shots: int = 2) -> list[tuple[str, int]]:
    """Few-shot examples from the held-out demo countries: (statement, label), alternating true/false
    in the order true, false, false, true, true, false (so the last demonstration does not always match)."""
    table = dict(country_capitals())
    demos = [c for c in DEMO_COUNTRIES if c in table]
    if n_shots < 0 or n_shots > len(demos):
        raise CatchtagError(f"--shots must lie in 0..{len(demos)} for the truth task, got {n_shots}")
    pattern = [1, 0, 0, 1, 1, 0]
    out = []
    for k in range(n_shots):
        country = demos[k]
        if pattern[k]:
            out.append((statement(country, table[country]), 1))
        else:
            other = demos[(k + 2) % len(demos)]
            out.append((statement(country, table[other]), 0))
    return out
