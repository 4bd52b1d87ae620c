"""The model's answer at the last token of each prompt: log-probabilities of chosen answer tokens, plainly or with
heads steered through the engine. Read by the probes (which answers the model gives) and by steering (how they
move)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from catchtag.engine.positions import last_real
from catchtag.errors import CatchtagError


def answer_logprobs(model, tokenizer, prompts, answer_ids: Sequence[int], *, edit=None,
                    batch_size: int = 8, progress: bool = False, desc: str = "answers") -> np.ndarray:
    """Log-probabilities of the answer tokens at the last real token of each prompt.

    prompts: list of ``Prompt`` (tokenised). answer_ids: token ids to read (e.g. [id(' FALSE'), id(' TRUE')]).
    edit: an intervention (catchtag.interventions, e.g. steering) applied in the pass; None runs the model
    plainly. Returns (n_prompts, len(answer_ids)).
    """
    from catchtag.scan import _batch_tensors

    if not prompts:
        raise CatchtagError("no prompts to read answers from")
    device = next(model.parameters()).device
    ids_t = torch.as_tensor(list(answer_ids), dtype=torch.long)
    out = np.zeros((len(prompts), len(answer_ids)), dtype=np.float64)
    starts = range(0, len(prompts), batch_size)
    if progress:
        from catchtag.progress import progress_bar

        starts = progress_bar(starts, desc=desc, unit="batch")
    for start in starts:
        batch = prompts[start:start + batch_size]
        ids, mask = _batch_tensors(batch, tokenizer, device)
        last = last_real(mask.bool())  # last real token (either padding side)
        with torch.no_grad():
            if edit is None:
                logits = _last_logits(model, ids, mask, last)
            else:
                from catchtag.engine.attention import capture
                from catchtag.engine.request import SinkSettings

                with capture(SinkSettings(), edit=edit):
                    logits = _last_logits(model, ids, mask, last)
        logp = torch.log_softmax(logits.double(), dim=-1)
        out[start:start + len(batch)] = logp[:, ids_t.to(logp.device)].cpu().numpy()
    return out


def _last_logits(model, ids, mask, last) -> torch.Tensor:
    """Logits (B, vocab) at each prompt's last real token. Asks the model for the logits of those positions
    only (``logits_to_keep``, when the model takes it): the vocabulary projection of every token is most
    of the cost of a short prompt."""
    keep = torch.unique(last)
    try:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
    except TypeError:
        logits = None
    if logits is None or logits.shape[1] != len(keep):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return logits[torch.arange(len(last)), last]
    return logits[torch.arange(len(last)), torch.searchsorted(keep, last)]
