"""The minimal problem of Section 7: averaging after [SEP], where catch, tag, release provably works
(Theorem 7.1, ``construct_model``) and emerges by training (``train_seeds``, ``success_table``).

Names are imported on first use (PEP 562), so that ``catchtag toy --help`` does not load torch."""

from catchtag.lazy import lazy_exports

_LAZY = {
    "ToyAttentionModel": "catchtag.toy.model", "ToyConfig": "catchtag.toy.model",
    "construct_model": "catchtag.toy.model",
    "Batch": "catchtag.toy.task", "TaskConfig": "catchtag.toy.task", "make_batch": "catchtag.toy.task",
    "min_length": "catchtag.toy.task",
    **{name: "catchtag.toy.train" for name in ("RECIPES", "SeedResults", "TrainConfig", "make_recipe",
                                               "mechanism_metrics", "recipe_model_options", "success_table",
                                               "train_model", "train_seeds")},
}
__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
