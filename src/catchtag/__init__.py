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
from catchtag.analysis.sweep import SWEEP_EPS, sweep_table
from catchtag.analysis.taxonomy import kind_shares, sink_taxonomy
from catchtag.report.html import write_report
from catchtag.report.viewer import token_view

__all__ = ["ActivationRequest", "CatchtagError", "SWEEP_EPS", "ScanResult", "SinkSettings", "available_models",
           "compare_runs", "kind_shares", "load_model", "pca_picture", "run_scan", "scan", "sink_taxonomy",
           "sweep_table", "tag_geometry", "token_view", "write_report"]
