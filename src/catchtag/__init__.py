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

__all__ = ["ActivationRequest", "CatchtagError", "ScanResult", "SinkSettings", "available_models", "load_model",
           "run_scan", "scan"]
