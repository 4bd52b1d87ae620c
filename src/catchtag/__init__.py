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
from catchtag.analysis.probes import HeadProbes, TagProbe, run_probe
from catchtag.analysis.steering import answer_logprobs, run_steer, steering_curve

__all__ = ["ActivationRequest", "CatchtagError", "HeadProbes", "ScanResult", "SinkSettings", "TagProbe",
           "answer_logprobs", "available_models", "load_model", "run_probe", "run_scan", "run_steer", "scan",
           "steering_curve"]
