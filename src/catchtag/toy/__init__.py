"""The minimal problem of Section 7: averaging after [SEP], where catch, tag, release provably works
(Theorem 7.1, ``construct_model``) and emerges by training (``train_seeds``, ``success_table``)."""

from catchtag.toy.model import ToyAttentionModel, ToyConfig, construct_model
from catchtag.toy.task import Batch, TaskConfig, make_batch, min_length
from catchtag.toy.train import (
    RECIPES,
    SeedResults,
    TrainConfig,
    make_recipe,
    mechanism_metrics,
    recipe_model_options,
    success_table,
    train_model,
    train_seeds,
)

__all__ = [
    "Batch",
    "RECIPES",
    "SeedResults",
    "TaskConfig",
    "ToyAttentionModel",
    "ToyConfig",
    "TrainConfig",
    "construct_model",
    "make_batch",
    "make_recipe",
    "mechanism_metrics",
    "recipe_model_options",
    "min_length",
    "success_table",
    "train_model",
    "train_seeds",
]
