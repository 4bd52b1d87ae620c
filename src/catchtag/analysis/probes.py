"""Probes (docs/probes.md): do the tags carry the answer?

Few-shot prompts end where the model must answer ("... This statement is:"). At that last token every
(layer, head) gives three residual-stream activations: full (W_O^h o), tag-only (W_O^h tag) and non-tag
(W_O^h (o - tag)). For each we train an L2 logistic-regression probe on the train split, with its
regularisation chosen by cross-validation on the train split only, and report its test accuracy with a
95% Wilson interval. Heads are *selected* on train-split cross-validation accuracy (tag high, non-tag
low), so their test numbers are not inflated by the selection.

A probe here is scikit-learn style: settings in the constructor, learned state in attributes ending
with ``_``. Implementation note: the L2-regularised solution lies in the span of the centred training
points, so ``TagProbe`` fits in that span (an exact change of basis, not a lossy PCA) which keeps 810
probes per model cheap on a CPU.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from catchtag.errors import CatchtagError

KINDS = ("full", "tag", "nontag")  # probe kinds: the residual-stream activations they read (CACHE_NAME)
CACHE_NAME = {"full": "result", "tag": "result_tag", "nontag": "result_nontag"}
DEFAULT_CS = tuple(np.logspace(-3, 3, 7))



# ---------------------------------------------------------------------------------------------------
# tasks: labelled data + few-shot template
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeTask:
    """A labelled task: where its data comes from, how a prompt looks, and the two answer words."""

    name: str
    labels: tuple[str, str]  # answer word for label 0, label 1
    template: str  # one example: must contain {text} and end with {answer}
    separator: str = "\n"


TASKS = {
    "truth": ProbeTask("truth", ("False", "True"), "{text} This statement is: {answer}"),
    "sentiment": ProbeTask("sentiment", ("negative", "positive"), "Tweet: {text}\nSentiment: {answer}"),
}


def get_task(name: str, template: str | None = None) -> ProbeTask:
    if name not in TASKS:
        raise CatchtagError(f"unknown probe task {name!r}. Choose one of: {', '.join(TASKS)}")
    task = TASKS[name]
    if template is not None:
        template = template.replace("\\n", "\n")
        if "{text}" not in template or not template.rstrip().endswith("{answer}"):
            raise CatchtagError(f"a probe template must contain {{text}} and end with {{answer}}, got {template!r}. "
                                f"Example: '{TASKS[name].template}'")
        task = ProbeTask(task.name, task.labels, template, task.separator)
    return task


def task_frame(task: str) -> pd.DataFrame:
    """The labelled set of a task (text, label, split, entity, answer)."""
    from catchtag.data.prompts import labelled_set

    return labelled_set(task)


def demonstrations(task: str, shots: int) -> list[tuple[str, int]]:
    if task == "truth":
        from catchtag.data.truth import truth_demonstrations

        return truth_demonstrations(shots)
    from catchtag.data.sentiment import sentiment_demonstrations

    return sentiment_demonstrations(shots)


def few_shot_prompts(task: ProbeTask, texts: Sequence[str], demos: Sequence[tuple[str, int]]) -> list[str]:
    """Prompts of the form demo_1 SEP demo_2 ... SEP query, the query being the template cut before {answer}."""
    head, _ = task.template.rsplit("{answer}", 1)
    prefix = "".join(task.template.format(text=t, answer=task.labels[y]) + task.separator for t, y in demos)
    return [prefix + head.format(text=t).rstrip() for t in texts]


def answer_token_ids(tokenizer, task: ProbeTask) -> list[int]:
    """The first token of ' ANSWER' for each label (after a space, as it follows 'is:' in the prompt); if both
    answers share that token (byte-level tokenizers), the first token of the bare word."""
    ids = []
    for lead in (" ", ""):  # byte-level tokenizers make ' ' its own token: then use the word's first token
        ids = []
        for word in task.labels:
            toks = tokenizer(lead + word, add_special_tokens=False)["input_ids"]
            if not toks:
                raise CatchtagError(f"the tokenizer gives no token for {word!r}")
            ids.append(int(toks[0]))
        if ids[0] != ids[1]:
            break
    if ids[0] == ids[1]:
        raise CatchtagError(f"the answers {task.labels} start with the same token for this tokenizer; use a "
                            f"template whose answers differ in their first token")
    return ids


# ---------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------
def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for an accuracy of correct/n."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


# ---------------------------------------------------------------------------------------------------
# estimators
# ---------------------------------------------------------------------------------------------------
class TagProbe:
    """L2 logistic regression on one set of activations, C chosen by stratified k-fold CV on the train data.

    Parameters: Cs (inverse regularisation strengths tried), cv (folds), seed, max_iter.
    Learned: mean_ (dim,), basis_ (dim, r) orthonormal basis of the centred train span, scale_ (RMS norm),
    model_ (the fitted LogisticRegressionCV, or None when the train activations are constant),
    C_, cv_accuracy_ (mean CV accuracy at C_), majority_ (class predicted when constant).
    """

    def __init__(self, Cs: Sequence[float] = DEFAULT_CS, cv: int = 5, seed: int = 0, max_iter: int = 200,
                 solver: str = "newton-cholesky"):
        self.solver = solver
        self.Cs = Cs
        self.cv = cv
        self.seed = seed
        self.max_iter = max_iter

    def _project(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) - self.mean_) @ self.basis_ / self.scale_

    def fit(self, X, y) -> "TagProbe":
        from sklearn.linear_model import LogisticRegressionCV
        from sklearn.model_selection import StratifiedKFold

        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y).astype(int)
        if X.ndim != 2 or len(X) != len(y):
            raise CatchtagError(f"a probe needs X (n, dim) and y (n,), got {X.shape} and {y.shape}")
        classes, counts = np.unique(y, return_counts=True)
        if len(classes) != 2:
            raise CatchtagError(f"a probe needs two classes in its train labels, got {classes.tolist()}")
        if counts.min() < self.cv:
            raise CatchtagError(f"too few train examples for {self.cv}-fold CV ({counts.min()} in the smaller class)")
        self.majority_ = int(classes[np.argmax(counts)])
        self.mean_ = X.mean(axis=0)
        centred = X - self.mean_
        u, s, vt = np.linalg.svd(centred, full_matrices=False)
        keep = s > s[0] * 1e-6 if s.size and s[0] > 0 else np.zeros_like(s, dtype=bool)
        self.basis_ = vt[keep].T
        self.rank_ = int(keep.sum())
        if self.rank_ == 0:  # constant activations (e.g. no sink tags this token): nothing to learn
            self.scale_, self.model_, self.C_ = 1.0, None, float("nan")
            self.cv_accuracy_ = float(counts.max() / counts.sum())
            return self
        self.scale_ = float(np.sqrt((centred ** 2).sum(axis=1).mean()))
        folds = StratifiedKFold(n_splits=self.cv, shuffle=True, random_state=self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings at extreme C
            self.model_ = LogisticRegressionCV(Cs=list(self.Cs), cv=folds, scoring="accuracy",
                                               max_iter=self.max_iter, solver=self.solver).fit(self._project(X), y)
        self.C_ = float(self.model_.C_[0])
        scores = np.asarray(self.model_.scores_[1])  # (folds, Cs)
        self.cv_accuracy_ = float(scores.mean(axis=0)[list(self.model_.Cs_).index(self.model_.C_[0])])
        return self

    def predict(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if self.model_ is None:
            return np.full(len(X), self.majority_)
        return self.model_.predict(self._project(X))

    def score(self, X, y) -> float:
        return float((self.predict(X) == np.asarray(y)).mean())


class HeadProbes:
    """One TagProbe per (activation kind, layer, head).

    Parameters: kinds (which activations: full, tag, nontag), Cs, cv, seed.
    fit(activations, y): activations maps kind -> (n_prompts, n_layers, n_heads, dim) (the last token);
    learned: probes_ {(kind, layer_index, head_index): TagProbe}, cv_accuracy_ {kind: (n_layers, n_heads)}.
    score_table(activations, y): one row per (kind, layer, head) with test accuracy and its Wilson CI.
    """

    def __init__(self, kinds: Sequence[str] = KINDS, Cs: Sequence[float] = DEFAULT_CS, cv: int = 5, seed: int = 0):
        self.kinds = tuple(kinds)
        self.Cs = Cs
        self.cv = cv
        self.seed = seed

    def _check(self, activations: dict, y) -> tuple[int, int]:
        missing = [k for k in self.kinds if k not in activations]
        if missing:
            raise CatchtagError(f"activations lack {missing}; scan with ActivationRequest(space='residual' or 'both')")
        shape = activations[self.kinds[0]].shape
        if len(shape) != 4 or shape[0] != len(y):
            raise CatchtagError(f"activations must be (n_prompts, n_layers, n_heads, dim) with one label per prompt, "
                                f"got {shape} and {len(y)} labels")
        return shape[1], shape[2]

    def fit(self, activations: dict, y, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
            progress: bool = True) -> "HeadProbes":
        y = np.asarray(y).astype(int)
        n_layers, n_heads = self._check(activations, y)
        self.layers_ = list(layers) if layers is not None else list(range(n_layers))
        self.heads_ = list(heads) if heads is not None else list(range(n_heads))
        self.probes_: dict[tuple[str, int, int], TagProbe] = {}
        self.cv_accuracy_ = {k: np.zeros((n_layers, n_heads)) for k in self.kinds}
        jobs = [(k, li, hi) for k in self.kinds for li in range(n_layers) for hi in range(n_heads)]
        if progress:
            from catchtag.progress import progress_bar

            jobs = progress_bar(jobs, desc="probes", unit="probe")
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):  # hundreds of tiny fits: threaded BLAS only adds overhead (30x on 2 cores)
            for kind, li, hi in jobs:
                probe = TagProbe(self.Cs, self.cv, self.seed).fit(activations[kind][:, li, hi], y)
                self.probes_[(kind, li, hi)] = probe
                self.cv_accuracy_[kind][li, hi] = probe.cv_accuracy_
        return self

    def score_table(self, activations: dict, y) -> pd.DataFrame:
        y = np.asarray(y).astype(int)
        self._check(activations, y)
        rows = []
        for (kind, li, hi), probe in self.probes_.items():
            correct = int((probe.predict(activations[kind][:, li, hi]) == y).sum())
            low, high = wilson_interval(correct, len(y))
            rows.append({"kind": kind, "layer": self.layers_[li], "head": self.heads_[hi],
                         "test_accuracy": correct / len(y), "ci_low": low, "ci_high": high,
                         "cv_accuracy": probe.cv_accuracy_, "C": probe.C_, "rank": probe.rank_,
                         "n_test": len(y)})
        return pd.DataFrame(rows)


def wide_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (layer, head): test accuracy, CI and CV accuracy of each kind side by side."""
    wide = table.pivot_table(index=["layer", "head"], columns="kind",
                             values=["test_accuracy", "ci_low", "ci_high", "cv_accuracy"])
    wide.columns = [f"{kind}_{stat}" for stat, kind in wide.columns]
    return wide.reset_index()


def select_heads(wide: pd.DataFrame, top: int = 5, min_tag: float = 0.7, max_nontag: float = 0.65) -> pd.DataFrame:
    """Heads whose tag probe is high and non-tag probe low, judged on train-split CV accuracy only.

    Ranks by tag CV accuracy minus non-tag CV accuracy among heads with tag CV >= min_tag and non-tag CV
    <= max_nontag; ``passes`` says whether a head met both bars (if fewer than ``top`` do, the best of the
    rest fill the list, marked passes=False)."""
    wide = wide.assign(gap=wide["tag_cv_accuracy"] - wide["nontag_cv_accuracy"],
                       passes=(wide["tag_cv_accuracy"] >= min_tag) & (wide["nontag_cv_accuracy"] <= max_nontag))
    return wide.sort_values(["passes", "gap", "tag_cv_accuracy"], ascending=False).head(top).reset_index(drop=True)


def selected_heads_markdown(summary: dict) -> str:
    """The selected heads' test accuracies (95% Wilson CI) next to the published numbers, as a Markdown table."""
    lines = ["| head (layer.head) | tag | non-tag | full | tag CV (train) | non-tag CV (train) | passes |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["selected_heads"]:
        def cell(kind):
            return (f"{100 * r[f'{kind}_test_accuracy']:.1f}% "
                    f"[{100 * r[f'{kind}_ci_low']:.0f}, {100 * r[f'{kind}_ci_high']:.0f}]")
        lines.append(f"| {r['layer']}.{r['head']} | {cell('tag')} | {cell('nontag')} | {cell('full')} | "
                     f"{100 * r['tag_cv_accuracy']:.1f}% | {100 * r['nontag_cv_accuracy']:.1f}% | "
                     f"{'yes' if r['passes'] else 'no'} |")
    m = summary["model_accuracy"]
    lines.append("")
    lines.append(f"Model's own {summary['shots']}-shot accuracy on the test split: {100 * m['test']:.1f}% "
                 f"[{100 * m['test_ci'][0]:.0f}, {100 * m['test_ci'][1]:.0f}]; {summary['n_test']} test prompts.")
    lines.append(f"Published: {summary['published']}.")
    return "\n".join(lines) + "\n"


def probe_table(cache, heads: pd.DataFrame, frame: pd.DataFrame, cv: int = 5, seed: int = 0):
    """Fit the three probes of every head on the train split's last-token activations and score them on the test
    split: (the long table, one row per head and kind; the wide table, one row per head), each with the head's mean
    sinks and its tag's mean share of the output norm."""
    labels = frame["label"].to_numpy()
    train = (frame["split"] == "train").to_numpy()
    test = ~train
    acts = {k: np.stack([cache.get(CACHE_NAME[k], layer=l, pos=-1) for l in cache.layers], axis=1) for k in KINDS}
    probes = HeadProbes(KINDS, cv=cv, seed=seed).fit({k: a[train] for k, a in acts.items()}, labels[train],
                                                     layers=cache.layers, heads=cache.heads)
    table = probes.score_table({k: a[test] for k, a in acts.items()}, labels[test])
    sinks = heads.groupby(["layer", "head"]).agg(mean_sinks=("n_sinks", "mean")).reset_index()
    tag_norm = np.linalg.norm(np.stack([cache.get("z_tag", layer=l, pos=-1) for l in cache.layers], 1), axis=-1)
    full_norm = np.linalg.norm(np.stack([cache.get("z", layer=l, pos=-1) for l in cache.layers], 1), axis=-1)
    share = pd.DataFrame([{"layer": l, "head": h, "tag_share_of_output_norm": float(
        (tag_norm[:, li, hi] / np.maximum(full_norm[:, li, hi], 1e-12)).mean())}
        for li, l in enumerate(cache.layers) for hi, h in enumerate(cache.heads)])
    table = table.merge(sinks, on=["layer", "head"], how="left").merge(share, on=["layer", "head"], how="left")
    wide = wide_table(table).merge(sinks, on=["layer", "head"]).merge(share, on=["layer", "head"])
    return table, wide


def probe_summary(settings: dict, inputs: dict, table: pd.DataFrame, selected: pd.DataFrame,
                  model_answers: pd.DataFrame, answer_mass: np.ndarray, seconds: dict, *, top: int, min_tag: float,
                  max_nontag: float) -> dict:
    """What a probe run found, as its summary.json holds it: the model's own few-shot accuracy, the best and mean
    probe of each kind, the selected heads and the published numbers to set beside them."""
    from catchtag.published import PROBES

    frame = inputs["frame"]
    test = (frame["split"] != "train").to_numpy()
    n_test = int(test.sum())
    correct = int((model_answers["predicted"].to_numpy() == frame["label"].to_numpy()[test]).sum())

    def best(kind):
        row = table[table["kind"] == kind].sort_values("test_accuracy", ascending=False).iloc[0]
        return {"layer": int(row["layer"]), "head": int(row["head"]), "test_accuracy": float(row["test_accuracy"]),
                "ci": [float(row["ci_low"]), float(row["ci_high"])]}

    return {
        **settings, "labels": list(inputs["task"].labels), "answer_token_ids": inputs["answer_ids"],
        "n_prompts": len(frame), "n_train": len(frame) - n_test, "n_test": n_test,
        "mean_prompt_tokens": float(np.mean([len(p.input_ids) for p in inputs["prompts"]])),
        "example_prompt": inputs["texts"][0],
        "model_accuracy": {"test": correct / n_test, "test_ci": list(wilson_interval(correct, n_test)),
                           "share_predicting_label1": float(model_answers["predicted"].mean()),
                           "mean_answer_mass": float(answer_mass.mean())},
        "best_test_accuracy": {k: best(k) for k in KINDS},
        "mean_test_accuracy": {k: float(table[table["kind"] == k]["test_accuracy"].mean()) for k in KINDS},
        "selection": {"top": top, "min_tag_cv": min_tag, "max_nontag_cv": max_nontag, "on": "train-split CV accuracy"},
        "selected_heads": selected.to_dict(orient="records"),
        "published": PROBES[settings["task"]],
        "seconds": seconds,
        "n_probes": len(table),
    }
