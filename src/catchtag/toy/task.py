"""The averaging task of Section 7: numbers, one [SEP] (optionally a [SEP2] after it), target read at the end.

A sequence is ``values`` (float numbers, 0 at special tokens) plus ``types`` (0 number, 1 [SEP], 2 [SEP2]).
The last token is always a number, so the prediction is read at a number position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUMBER, SEP, SEP2 = 0, 1, 2
VARIANTS = ("single", "two-sink")


@dataclass
class TaskConfig:
    """Settings of the generator (sklearn style: everything is a constructor argument)."""

    variant: str = "single"
    length: int = 16
    low: float = -1.0
    high: float = 1.0

    def __post_init__(self) -> None:
        check_task(self.variant, self.length, self.low, self.high)


@dataclass
class Batch:
    values: torch.Tensor  # (B, L) float, 0 at [SEP]/[SEP2]
    types: torch.Tensor  # (B, L) long: 0 number, 1 [SEP], 2 [SEP2]
    target: torch.Tensor  # (B,) float
    sep: torch.Tensor  # (B,) position of [SEP]
    sep2: torch.Tensor  # (B,) position of [SEP2], -1 in the single variant


def min_length(variant: str) -> int:
    """Shortest sequence that holds a number before [SEP], the specials, and a number after each special."""
    return 3 if variant == "single" else 5


def check_task(variant: str, length: int, low: float = -1.0, high: float = 1.0) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    need = min_length(variant)
    if int(length) < need:
        raise ValueError(
            f"length {length} is too short for the {variant} variant: it needs at least {need} tokens "
            f"(a number before [SEP], the special token(s), and at least one number after each)"
        )
    if not high > low:
        raise ValueError(f"value range is empty: low={low} must be below high={high}")


def make_batch(
    batch_size: int,
    length: int = 16,
    variant: str = "single",
    low: float = -1.0,
    high: float = 1.0,
    generator: torch.Generator | None = None,
    prefix_scale: float = 1.0,
) -> Batch:
    """Draw a batch. [SEP] sits uniformly in 1..L-2 (single) so there is at least one number on each side;
    in the two-sink variant [SEP2] sits uniformly after [SEP] leaving >=1 number between them and after it.

    Target: mean of the numbers after [SEP] (two-sink: that mean plus the mean strictly between [SEP] and [SEP2]).
    ``prefix_scale`` multiplies the numbers before [SEP] (which never enter the target); a training
    curriculum may start it at 0 (see ``TrainConfig.prefix_zero_steps``).
    """
    check_task(variant, length, low, high)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    L, B, g = int(length), int(batch_size), generator
    values = low + (high - low) * torch.rand(B, L, generator=g)
    pos = torch.arange(L).expand(B, L)
    if variant == "single":
        sep = torch.randint(1, L - 1, (B,), generator=g)  # 1..L-2
        sep2 = torch.full((B,), -1, dtype=torch.long)
    else:
        sep = torch.randint(1, L - 3, (B,), generator=g)  # 1..L-4
        # sep2 uniform in sep+2 .. L-2
        span = (L - 2) - (sep + 2) + 1
        sep2 = sep + 2 + (torch.rand(B, generator=g) * span).floor().long().clamp(max=span - 1)
    types = torch.zeros(B, L, dtype=torch.long)
    types[pos == sep[:, None]] = SEP
    if variant != "single":
        types[pos == sep2[:, None]] = SEP2
    values = values.masked_fill(types != NUMBER, 0.0)
    if prefix_scale != 1.0:
        values = torch.where(pos < sep[:, None], values * prefix_scale, values)
    after = (pos > sep[:, None]) & (types == NUMBER)
    target = (values * after).sum(1) / after.sum(1)
    if variant != "single":
        between = (pos > sep[:, None]) & (pos < sep2[:, None])
        target = target + (values * between).sum(1) / between.sum(1)
    return Batch(values=values, types=types, target=target, sep=sep, sep2=sep2)


def token_masks(batch: Batch) -> dict[str, torch.Tensor]:
    """Boolean (B, L) masks of the token groups the mechanism checks look at."""
    B, L = batch.types.shape
    pos = torch.arange(L).expand(B, L)
    num = batch.types == NUMBER
    after_sep = (pos > batch.sep[:, None]) & num
    out = {"after_sep": after_sep}
    if (batch.sep2 >= 0).any():
        out["between"] = (pos > batch.sep[:, None]) & (pos < batch.sep2[:, None])
        out["after_sep2"] = (pos > batch.sep2[:, None]) & num
    return out


def prefix_targets(batch: Batch, second: str = "between") -> tuple[torch.Tensor, torch.Tensor]:
    """The task's target at every position, as if the sequence ended there: (targets (B, L), valid (B, L)).

    Single: mean of the numbers after [SEP] up to and including position i, valid at numbers after [SEP].
    Two-sink: that plus the mean strictly between [SEP] and [SEP2], valid at numbers after [SEP2]. The last
    column equals ``batch.target``. Used by the dense training loss (``TrainConfig.dense_loss``).
    ``second="after-sep2"`` replaces the mean between by the mean of the numbers after [SEP2] up to i (the
    single task asked of [SEP2] too: a warm-up target of the two-sink curriculum, ``TrainConfig.sep2_warmup_steps``).
    """
    if second not in ("between", "after-sep2"):
        raise ValueError(f"second must be 'between' or 'after-sep2', got {second!r}")
    B, L = batch.types.shape
    pos = torch.arange(L).expand(B, L)
    after = (pos > batch.sep[:, None]) & (batch.types == NUMBER)
    count = after.cumsum(1).clamp_min(1)
    target = (batch.values * after).cumsum(1) / count
    valid = after
    if (batch.sep2 >= 0).any():
        after2 = after & (pos > batch.sep2[:, None])
        if second == "between":
            between = (pos > batch.sep[:, None]) & (pos < batch.sep2[:, None])
            target = target + ((batch.values * between).sum(1) / between.sum(1))[:, None]
        else:
            target = target + (batch.values * after2).cumsum(1) / after2.cumsum(1).clamp_min(1)
        valid = after2
    return target, valid
