"""What each job found, as one typed object per job that owns its file: the fields the job's summary holds, where the
file lives under --out (runs.ARTIFACTS lists it), how it is written (atomically, once, at the end of the job) and
read back (by the report, by steer, by a script). A summary is also a read-only mapping (``summary["result"]``),
the form the job functions return; a field a job did not fill (figures with --no-figures) is absent, not None."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from catchtag.errors import CatchtagError


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()  # a field the job did not fill: left out of the file and of the mapping


@dataclass
class Summary(Mapping):
    """The base: ``file`` is the summary's path under the job's --out; ``extra`` keeps keys of a file written by
    another catchtag version, so reading and writing one back loses nothing."""

    file: ClassVar[str] = "summary.json"
    job: ClassVar[str] = ""
    extra: dict = field(default_factory=dict, repr=False)

    def _names(self) -> list[str]:
        return [f.name for f in fields(self) if f.name != "extra" and getattr(self, f.name) is not MISSING]

    def __getitem__(self, key: str):
        if key != "extra" and key in self._names():
            return getattr(self, key)
        if key in self.extra:
            return self.extra[key]
        raise KeyError(key)

    def __iter__(self):
        yield from self._names()
        yield from self.extra

    def __len__(self) -> int:
        return len(self._names()) + len(self.extra)

    def to_json(self) -> dict:
        return {k: self[k] for k in self}

    def write(self, out: str | Path) -> Path:
        from catchtag.runs import write_json

        return write_json(Path(out) / self.file, self.to_json())

    @classmethod
    def from_json(cls, data: dict) -> "Summary":
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def read(cls, out: str | Path) -> "Summary":
        """The summary in OUT, or one line saying it is missing or unreadable and what makes it again."""
        path = Path(out) / cls.file
        if not path.is_file():
            raise CatchtagError(f"{Path(out)} has no {cls.file}: it is not a finished `catchtag {cls.job}` run. Fix: "
                                f"run `catchtag {cls.job} --out {out}` first")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise CatchtagError(f"{path} is not readable JSON. Fix: run `catchtag {cls.job} --out {out}` again") \
                from None
        if not isinstance(data, dict):
            raise CatchtagError(f"{path} is not a catchtag summary. Fix: run `catchtag {cls.job} --out {out}` again")
        return cls.from_json(data)


@dataclass
class ScanSummary(Summary):
    """`catchtag scan`: what ran (model, its class, data, settings, versions), what it found (result: the headline
    numbers), how long it took, what was cut, the figures and views it wrote."""

    job: ClassVar[str] = "scan"
    model: str = MISSING
    model_class: str = MISSING
    data: str = MISSING
    settings: dict = MISSING
    versions: dict = MISSING
    result: dict = MISSING
    seconds: float = MISSING
    load_seconds: float = MISSING
    truncated: dict = MISSING
    figures: list = MISSING
    views: dict = MISSING
    wall_seconds: float = MISSING


@dataclass
class AblateSummary(Summary):
    """`catchtag ablate` (OUT/ablate/summary.json): per target the loss change with its interval beside its
    control's, the first-order estimate, VE and the tag-or-bias split; the rank correlation of estimate and change."""

    file: ClassVar[str] = "ablate/summary.json"
    job: ClassVar[str] = "ablate"
    model: str = MISSING
    data: str = MISSING
    n_prompts: int = MISSING
    mode: str = MISSING
    controls: int = MISSING
    eps: float = MISSING
    min_rows: int = MISSING
    group: str | None = MISSING
    targets: list = MISSING
    attribution_vs_real_rank_correlation: dict | None = MISSING
    seconds: dict = MISSING
    versions: dict = MISSING
    figures: list = MISSING


@dataclass
class ReleaseSummary(Summary):
    """`catchtag release`: the heads decoded and, per head and deeper layer, the decoding accuracy beside its
    control's and each one's chance (rows)."""

    job: ClassVar[str] = "release"
    model: str = MISSING
    data: str = MISSING
    n_prompts: int = MISSING
    level: float = MISSING
    eps: float = MISSING
    min_rows: int = MISSING
    folds: int = MISSING
    heads: list = MISSING
    rows: list = MISSING
    seconds: float = MISSING
    versions: dict = MISSING
    figure: str = MISSING


@dataclass
class ProbeSummary(Summary):
    """`catchtag probe`: its settings, the model's own few-shot accuracy, the best and mean probe of each kind, the
    selected heads and the published numbers beside them."""

    job: ClassVar[str] = "probe"
    model: str = MISSING
    task: str = MISSING
    template: str = MISSING
    shots: int = MISSING
    eps: float = MISSING
    min_rows: int = MISSING
    limit: int | None = MISSING
    cv: int = MISSING
    seed: int = MISSING
    labels: list = MISSING
    answer_token_ids: list = MISSING
    n_prompts: int = MISSING
    n_train: int = MISSING
    n_test: int = MISSING
    mean_prompt_tokens: float = MISSING
    example_prompt: str = MISSING
    model_accuracy: dict = MISSING
    best_test_accuracy: dict = MISSING
    mean_test_accuracy: dict = MISSING
    selection: dict = MISSING
    selected_heads: list = MISSING
    published: dict = MISSING
    seconds: dict = MISSING
    n_probes: int = MISSING
    figures: list = MISSING


@dataclass
class SteerSummary(Summary):
    """`catchtag steer` (steering.json): the heads steered, their directions, and per head, direction and scale the
    shift of the answer's log-odds (rows)."""

    file: ClassVar[str] = "steering.json"
    job: ClassVar[str] = "steer"
    model: str = MISSING
    task: str = MISSING
    probes: str = MISSING
    heads: list = MISSING
    scales: list = MISSING
    n_random: int = MISSING
    n_test_prompts: int = MISSING
    directions: dict = MISSING
    seconds: float = MISSING
    rows: list = MISSING
    figures: list = MISSING
    out: str = MISSING


@dataclass
class GenerateSummary(Summary):
    """`catchtag generate`: what ran (model, data or prompt, the generation options, the sink rule), what came out
    (prompts, new tokens, how the texts ended), the tracker's last state against a scan of the finished texts
    (check), timings and the files written."""

    job: ClassVar[str] = "generate"
    model: str = MISSING
    data: str | None = MISSING
    n_prompts: int = MISSING
    new_tokens: int = MISSING
    ended: dict = MISSING
    generation: dict = MISSING
    eps: float = MISSING
    min_rows: int = MISSING
    check: dict = MISSING
    result: dict = MISSING
    seconds: dict = MISSING
    figures: list = MISSING
    versions: dict = MISSING
