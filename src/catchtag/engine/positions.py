"""Where each prompt's real tokens start and end in a padded batch: the one definition every module uses (padding
may sit on either side, so neither end is at a fixed index)."""

from __future__ import annotations

import numpy as np
import torch


def first_real(valid):
    """(B,) index of each row's first real token, from a (B, T) boolean mask (torch tensor or numpy array)."""
    if isinstance(valid, np.ndarray):
        return valid.argmax(axis=-1)
    return valid.to(torch.int8).argmax(dim=-1)


def last_real(valid):
    """(B,) index of each row's last real token."""
    T = valid.shape[-1]
    if isinstance(valid, np.ndarray):
        return T - 1 - valid[..., ::-1].argmax(axis=-1)
    return T - 1 - valid.flip(-1).to(torch.int8).argmax(dim=-1)
