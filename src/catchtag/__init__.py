"""catchtag: attention sinks and the catch, tag, release mechanism in Hugging Face causal LMs.

Most users need two calls: ``load_model`` and ``scan``; each analysis is one function here.
"""

__version__ = "0.1.0"

from catchtag.errors import CatchtagError
from catchtag.lazy import lazy_exports

# Imported on first use, so that `import catchtag` and `catchtag --help` do not load torch and transformers.
_LAZY = {
    "ActivationRequest": "catchtag.engine.request", "SinkSettings": "catchtag.engine.request",
    "available_models": "catchtag.models", "load_model": "catchtag.models",
    "ScanResult": "catchtag.result", "scan": "catchtag.scan", "run_scan": "catchtag.jobs",
    "generate": "catchtag.generation", "GenerationResult": "catchtag.generation", "run_generate": "catchtag.jobs",
    "compare_runs": "catchtag.analysis.compare", "tag_geometry": "catchtag.measure",
    "pca_picture": "catchtag.measure", "HeadProbes": "catchtag.analysis.probes",
    "TagProbe": "catchtag.analysis.probes", "run_probe": "catchtag.jobs",
    "answer_logprobs": "catchtag.measure", "run_steer": "catchtag.jobs",
    "steering_curve": "catchtag.interventions.steering", "SWEEP_EPS": "catchtag.analysis.sweep",
    "sweep_table": "catchtag.analysis.sweep", "kind_shares": "catchtag.analysis.taxonomy",
    "sink_taxonomy": "catchtag.analysis.taxonomy", "write_report": "catchtag.report.html",
    "token_view": "catchtag.jobs", "show_tokens": "catchtag.jobs", "show_generation": "catchtag.jobs",
    "toy": "catchtag.toy:",  # the minimal averaging problem: catchtag.toy.construct_model, train_seeds, ...
}
__getattr__, __dir__ = lazy_exports(globals(), _LAZY)

__all__ = ["ActivationRequest", "CatchtagError", "GenerationResult", "HeadProbes", "SWEEP_EPS", "ScanResult",
           "SinkSettings", "TagProbe", "answer_logprobs", "available_models", "compare_runs", "generate",
           "kind_shares", "load_model", "pca_picture", "run_generate", "run_probe", "run_scan", "run_steer",
           "scan", "show_generation", "show_tokens", "sink_taxonomy", "steering_curve", "sweep_table", "tag_geometry",
           "token_view", "toy", "write_report"]
