"""catchtag: attention sinks and the catch, tag, release mechanism in Hugging Face causal LMs.

Most users need two calls: ``load_model`` and ``scan``; each analysis is one function here.
"""

__version__ = "0.1.0"

from catchtag.errors import CatchtagError
from catchtag.engine.request import ActivationRequest, SinkSettings
from catchtag.models import available_models, load_model
from catchtag.result import ScanResult
from catchtag.scan import scan
from catchtag.api import run_scan
from catchtag.analysis.compare import compare_runs
from catchtag.analysis.geometry import tag_geometry
from catchtag.analysis.pca import pca_picture
from catchtag.analysis.probes import HeadProbes, TagProbe, run_probe
from catchtag.analysis.steering import answer_logprobs, run_steer, steering_curve
from catchtag.analysis.sweep import SWEEP_EPS, sweep_table
from catchtag.analysis.taxonomy import kind_shares, sink_taxonomy
from catchtag.report.html import write_report
from catchtag.report.viewer import token_view
from catchtag import toy  # the minimal averaging problem: catchtag.toy.construct_model, train_seeds, ...

__all__ = ["ActivationRequest", "CatchtagError", "HeadProbes", "SWEEP_EPS", "ScanResult", "SinkSettings", "TagProbe",
           "answer_logprobs", "available_models", "compare_runs", "kind_shares", "load_model", "pca_picture",
           "run_probe", "run_scan", "run_steer", "scan", "sink_taxonomy", "steering_curve", "sweep_table",
           "tag_geometry", "token_view", "toy", "write_report"]
