"""The jobs layer: what each command does, end to end, one module per command. A job's settings are one frozen
dataclass (jobs/options.py: defaults, flags, help and checks declared once); its ``run`` loads the model and data,
calls the analyses (which only compute) and writes the outputs (through catchtag.runs, atomically); nothing below
this layer loads models or writes files. The CLI is generated from ``JOBS``; the ``run_*`` functions are the same
jobs for Python (the settings by name, checked the same way, before any model loads)."""

from __future__ import annotations

from catchtag.jobs import (ablate, compare, generate, geometry, pca, probe, release, report, scan, steer, sweep,
                           taxonomy, view)
from catchtag.jobs.probe import load_probe_inputs
from catchtag.jobs.scan import write_views
from catchtag.jobs.view import show_generation, show_tokens, token_view

JOBS = {m.JOB.name: m.JOB for m in (scan, pca, compare, sweep, taxonomy, geometry, report, view, probe, steer, ablate,
                                    release, generate)}

run_scan = scan.JOB.api()
run_pca = pca.JOB.api()
run_compare = compare.JOB.api()
run_sweep = sweep.JOB.api()
run_taxonomy = taxonomy.JOB.api()
run_geometry = geometry.JOB.api()
run_report = report.JOB.api()
run_view = view.JOB.api()
run_probe = probe.JOB.api()
run_steer = steer.JOB.api()
run_ablate = ablate.JOB.api()
run_release = release.JOB.api()
run_generate = generate.JOB.api()

__all__ = ["JOBS", "load_probe_inputs", "run_ablate", "run_compare", "run_generate", "run_geometry", "run_pca",
           "run_probe", "run_release", "run_report", "run_scan", "run_steer", "run_sweep", "run_taxonomy", "run_view",
           "show_generation", "show_tokens", "token_view", "write_views"]
