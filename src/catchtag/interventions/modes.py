"""What of a tag an ablation removes (``catchtag ablate --mode``; docs/method.md says what each tests), declared once
and without torch, so the command line can check it before any model loads."""

from __future__ import annotations

from catchtag.errors import CatchtagError

MODES = ("mean", "zero", "constant")


def check_mode(mode: str) -> str:
    """``mode`` if it is one of MODES, else one line naming the choices."""
    if mode not in MODES:
        raise CatchtagError(f"--mode must be {', '.join(MODES[:-1])} or {MODES[-1]}, got {mode!r}. Fix: --mode mean")
    return mode


DEFAULT_SCALES = (-8.0, -4.0, 0.0, 4.0, 8.0)  # steering: multiples of a head's mean tag difference to add
