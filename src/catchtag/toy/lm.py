"""Language models with a known answer: the averaging problem as tokens, for calibrating catchtag's instruments.

``catchtag.toy`` studies the minimal problem in its own two-layer model. Here the same problem is a text that any
command reads: a Hugging Face ``LlamaForCausalLM`` (2 layers, 1 head each, the ordinary attention classes) over a
word-level vocabulary of 23 tokens, trained on one CPU thread in about a minute, cached after the first use:

    <bos> 4 7 1 ... [SEP] 9 2 5 ... ? =5

Numbers 0-9 are tokens, 13 to 20 of them on each side of [SEP]; after the query token ``?`` comes the answer
``=k``, the mean of the numbers after [SEP] rounded half up. The prediction made at ``?`` needs catch, tag,
release: layer 1 makes [SEP] a sink for the tokens after it (its value is the tag), and the layer-2 head at ``?``
averages only the numbers that carry the tag. (An answer after every number, the running mean, would let the
model carry the mean forward from the previous answer instead; one answer per text leaves no such shortcut.)

Four models (``toy:NAME``), each with its data set as ``builtin:NAME`` (the cut model uses ``average``'s):
- ``average``: the task above (the positive control);
- ``average-all``: the same texts with the mean of every number as the answer, [SEP] ignored: the same
  architecture on a task that needs no tag (a negative control);
- ``average-cut``: ``average`` with the layer-1 head's write into the residual stream (its output projection) set
  to zero: it still catches at [SEP], but its tag reaches nothing (a negative control);
- ``average-two-sink``: a second separator [SEP2] after [SEP]; the answer is the mean of the two means, of the
  numbers after [SEP] and of those between [SEP] and [SEP2]. 2 heads per layer: the problem needs two tags, one
  per separator (each layer-1 head its own sink), and a token after [SEP2] carries both.

    <bos> 4 7 ... [SEP] 9 2 ... [SEP2] 5 0 ... ? =4
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catchtag.errors import CatchtagError

DIGITS = 10
SEGMENT = (13, 20)  # numbers before and after [SEP]: rows that see [SEP] >= 16, the default min_rows
SPECIAL = ["<pad>", "<bos>", "[SEP]", "?"]
VOCAB = SPECIAL + [str(k) for k in range(DIGITS)] + [f"={k}" for k in range(DIGITS)]
PAD, BOS, SEP, QUERY = 0, 1, 2, 3
NUMBER0, ANSWER0 = len(SPECIAL), len(SPECIAL) + DIGITS
SEP2 = len(VOCAB)  # only in the two-sink task's vocabulary (the others keep theirs, so their weights stay the same)
TWO_SINK = "average-two-sink"


def vocab(task: str) -> list[str]:
    """The task's words, by token id."""
    return VOCAB + ["[SEP2]"] if task == TWO_SINK else VOCAB
VERSION = 2  # bump when the task, the architecture or the training changes: the cache keys on it (2: one thread)


@dataclass(frozen=True)
class ToyLM:
    """One named synthetic model: its task (what the answer tokens hold) and whether the layer-1 write is cut."""

    name: str
    task: str  # "average" (mean after [SEP]) or "average-all" (mean of every number)
    cut: bool
    description: str


TOY_LMS = {m.name: m for m in (
    ToyLM("average", "average", False,
          "positive control: averaging after [SEP] as tokens; layer 1 catches at [SEP], layer 2 reads the tag"),
    ToyLM("average-all", "average-all", False,
          "negative control: the same model trained on the running mean of every number (needs no tag)"),
    ToyLM("average-cut", "average", True,
          "negative control: toy:average with the layer-1 head's output projection zeroed (catch, no tag)"),
    ToyLM(TWO_SINK, TWO_SINK, False,
          "two sinks: [SEP] and [SEP2], the mean of two means; 2 heads per layer, each layer-1 head its own sink"),
)}
TASK_DATA = {"average": "builtin:average", "average-all": "builtin:average-all", TWO_SINK: f"builtin:{TWO_SINK}"}


def _answer(numbers: list[int]) -> int:
    return math.floor(sum(numbers) / len(numbers) + 0.5)


def sample_ids(rng: np.random.Generator, task: str) -> list[int]:
    """One sequence of token ids (<bos> first) of ``task``."""
    if task == TWO_SINK:
        before, middle, after = (int(rng.integers(SEGMENT[0], SEGMENT[1] + 1)) for _ in range(3))
        numbers = [int(x) for x in rng.integers(0, DIGITS, before + middle + after)]
        both = numbers[before:]
        answer = math.floor((sum(both) / len(both) + sum(both[:middle]) / middle) / 2 + 0.5)
        return [BOS, *(NUMBER0 + x for x in numbers[:before]), SEP, *(NUMBER0 + x for x in both[:middle]), SEP2,
                *(NUMBER0 + x for x in both[middle:]), QUERY, ANSWER0 + answer]
    before, after = (int(rng.integers(SEGMENT[0], SEGMENT[1] + 1)) for _ in range(2))
    numbers = [int(x) for x in rng.integers(0, DIGITS, before + after)]
    answer = _answer(numbers[before:] if task == "average" else numbers)
    return [BOS, *(NUMBER0 + x for x in numbers[:before]), SEP, *(NUMBER0 + x for x in numbers[before:]), QUERY,
            ANSWER0 + answer]


def task_texts(task: str, n: int = 256, seed: int = 0) -> list[str]:
    """``n`` prompts of ``task`` as text (without <bos>: the tokenizer adds it), seeded: the builtin data set."""
    if task not in TASK_DATA:
        raise CatchtagError(f"unknown toy task {task!r}. Fix: one of {', '.join(TASK_DATA)}")
    rng = np.random.default_rng([seed, 1 + list(TASK_DATA).index(task)])
    words = vocab(task)
    return [" ".join(words[i] for i in sample_ids(rng, task)[1:]) for _ in range(n)]


def toy_tokenizer(task: str = "average"):
    """The word-level tokenizer of the task's vocabulary (built in code); it adds <bos> like a Llama tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab(task))}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>", unk_token="<pad>",
                                   model_max_length=_max_length(task))


def _max_length(task: str) -> int:
    return 5 + 3 * SEGMENT[1] if task == TWO_SINK else 4 + 2 * SEGMENT[1]


def toy_config(task: str = "average"):
    """2 layers of width 64; one head of 64 per layer, two of 32 for the two-sink task."""
    from transformers import LlamaConfig

    heads = 2 if task == TWO_SINK else 1
    return LlamaConfig(vocab_size=len(vocab(task)), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=heads, num_key_value_heads=heads, head_dim=64 // heads,
                       max_position_embeddings=_max_length(task), tie_word_embeddings=False,
                       bos_token_id=BOS, eos_token_id=None, pad_token_id=PAD)


def _pad(seqs: list[list[int]]):
    import torch

    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), PAD)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, :len(s)] = 1
    return ids, mask


def train(task: str, seed: int = 0, steps: int = 1000, batch_size: int = 64, lr: float = 3e-3, progress=None):
    """A toy LM trained on ``task`` from a seeded initialisation on seeded batches (AdamW, warm-up then cosine
    decay): the ordinary next-token loss over every token plus the loss of the answer alone (one token in 40 would
    otherwise teach it slowly). ``progress``: a callable(step, loss) or None.

    Trains on one CPU thread: with more, PyTorch splits sums by the thread count, and the last-digit differences
    grow over 1000 steps into other weights (8 threads against 1: weights apart by up to 0.35), so a model would
    depend on the machine's core count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(task, seed, steps, batch_size, lr, progress)
    finally:
        torch.set_num_threads(threads)


def _train(task, seed, steps, batch_size, lr, progress):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(toy_config(task))
    rng = np.random.default_rng([seed, 7])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        ids, mask = _pad([sample_ids(rng, task) for _ in range(batch_size)])
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
        answer = ids[:, :-1] == QUERY
        loss = nll[target != -100].mean() + nll[answer].mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress is not None:
            progress(step, loss.item())
    return model.eval()


def cut_layer1(model) -> None:
    """Zero the layer-1 head's output projection: its attention and tag stay, its write is gone."""
    import torch

    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()


def build(name: str, cache: Path, progress: bool = True) -> Path:
    """The folder of ``toy:NAME`` under ``cache`` (catchtag's cache folder, models.cache_dir()): a Hugging Face model
    folder with its tokenizer, trained and saved on first use."""
    if name not in TOY_LMS:
        raise CatchtagError(f"unknown toy model {name!r}. Fix: one of {', '.join('toy:' + n for n in TOY_LMS)}")
    folder = Path(cache) / "toy" / f"{name}-v{VERSION}"
    if (folder / "config.json").is_file():
        return folder
    spec = TOY_LMS[name]
    if spec.cut:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(build("average", cache, progress), attn_implementation="eager")
        cut_layer1(model)
    else:
        bar = None
        if progress:
            from catchtag.progress import progress_bar

            bar = progress_bar(total=1000, desc=f"training toy:{name} (once; cached)", unit="step")
        started = time.perf_counter()
        model = train(spec.task, progress=(lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")))
                      if bar is not None else None)
        if bar is not None:
            bar.close()
        model.config.catchtag_training_seconds = round(time.perf_counter() - started, 1)
    model.config.catchtag_toy = name
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # our own unfinished build
    model.save_pretrained(tmp)
    toy_tokenizer(spec.task).save_pretrained(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first: keep its folder
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _attend(model, ids, mask):
    """One pass of a toy model with its attention kept: (attentions, accuracy of the answer predicted at ``?``)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    rows = ids == QUERY
    target = torch.roll(ids, -1, dims=1)
    return [a.float() for a in out.attentions], float((out.logits.argmax(-1) == target)[rows].float().mean())


def mechanism(model, ids, mask) -> dict:
    """How the model solves its task on a batch (eager attention, no catchtag): answer accuracy, the layer-1
    head's attention from tokens after [SEP] to [SEP] (``catch``) and from tokens before [SEP] to <bos>, and the
    share of the layer-2 head's attention at ``?`` that lands on the numbers after [SEP] (``read``) against the
    numbers before it (``read_before``)."""
    import torch

    attentions, accuracy = _attend(model, ids, mask)
    pos = torch.arange(ids.shape[1])
    sep = (ids == SEP).long().argmax(dim=1)
    real = mask.bool()
    after = real & (pos[None] > sep[:, None])
    before = real & (pos[None] < sep[:, None]) & (pos[None] > 0)
    number = (ids >= NUMBER0) & (ids < ANSWER0)
    a1, a2 = attentions[0][:, 0], attentions[1][:, 0]
    to_sep = a1.gather(2, sep[:, None, None].expand(-1, ids.shape[1], 1))[..., 0]
    rows = ids == QUERY
    return {"accuracy": accuracy,
            "catch": float(to_sep[after].mean()), "before_to_bos": float(a1[:, :, 0][before].mean()),
            "read": float((a2 * (number & after)[:, None, :]).sum(-1)[rows].mean()),
            "read_before": float((a2 * (number & before)[:, None, :]).sum(-1)[rows].mean())}


def mechanism_two_sink(model, ids, mask) -> dict:
    """How the two-sink model solves its task: answer accuracy; per layer-1 head, the attention from the numbers
    between [SEP] and [SEP2] to [SEP] (``catch_sep``) and from the numbers after [SEP2] to [SEP2] (``catch_sep2``);
    per layer-2 head, the share of its attention at ``?`` on the numbers between the separators (``read_middle``)
    and after [SEP2] (``read_last``)."""
    import torch

    attentions, accuracy = _attend(model, ids, mask)
    pos = torch.arange(ids.shape[1])
    sep, sep2 = ((ids == t).long().argmax(dim=1) for t in (SEP, SEP2))
    real = mask.bool()
    number = (ids >= NUMBER0) & (ids < ANSWER0)
    middle = real & number & (pos[None] > sep[:, None]) & (pos[None] < sep2[:, None])
    last = real & number & (pos[None] > sep2[:, None])
    a1, a2 = attentions  # (B, heads, T, T)
    rows = ids == QUERY

    def to(col, attn):  # (B, heads, T): attention of every row to the column col[b]
        return attn.gather(3, col[:, None, None, None].expand(-1, attn.shape[1], attn.shape[2], 1))[..., 0]

    heads = range(a1.shape[1])
    return {"accuracy": accuracy,
            "catch_sep": [float(to(sep, a1)[:, h][middle].mean()) for h in heads],
            "catch_sep2": [float(to(sep2, a1)[:, h][last].mean()) for h in heads],
            "read_middle": [float((a2[:, h] * middle[:, None, :]).sum(-1)[rows].mean()) for h in heads],
            "read_last": [float((a2[:, h] * last[:, None, :]).sum(-1)[rows].mean()) for h in heads]}


def eval_batch(task: str, n: int = 256, seed: int = 1):
    rng = np.random.default_rng([seed, 99])
    return _pad([sample_ids(rng, task) for _ in range(n)])


__all__ = ["TASK_DATA", "TOY_LMS", "ToyLM", "build", "cut_layer1", "eval_batch", "mechanism", "mechanism_two_sink",
           "sample_ids", "task_texts", "toy_config", "toy_tokenizer", "train", "vocab"]
