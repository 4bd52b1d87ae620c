"""Forward passes the analyses ask for, with a model already loaded. The analyses themselves only compute: each
declares what it needs from a pass (``pca_request``, ``geometry_request``) and reads it from the ScanResult
(``pca_from_result``, ``geometry_from_result``); the functions here run that pass over one prompt and hand the
result on. And the model's answer at the last token of each prompt (log-probabilities of chosen answer tokens,
plainly or with heads steered through the engine), read by the probes and by steering."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from catchtag.analysis.common import one_prompt
from catchtag.analysis.geometry import TagGeometry, geometry_from_result, geometry_request
from catchtag.analysis.pca import PcaPicture, choose_head, pca_from_result, pca_layers, pca_request
from catchtag.engine.positions import last_real
from catchtag.engine.request import SinkSettings
from catchtag.errors import CatchtagError
from catchtag.models import display_name


def pca_picture(model, tokenizer, text, *, layer: int | None = None, head: int | None = None,
                deeper: int | None = None, eps: float = SinkSettings.eps, min_rows: int = SinkSettings.min_rows,
                tag_level: float = 0.1, exclude_first: bool = True, name: str | None = None,
                chosen_from=None) -> PcaPicture:
    """The Figure-2 picture of one head on one prompt (analysis/pca.py): one pass with ``pca_request``.

    layer/head: the head (default: ``choose_head`` on ``chosen_from``, a scan that holds this prompt's rows, else
    on a pass of its own: the highest VE with a sink beyond the first token). deeper: residual stream after this
    layer (default layer + 4, capped at the last layer). tag_level, exclude_first: see ``pca_from_result``.
    """
    from catchtag.scan import scan

    prompts = one_prompt(text)
    if (layer is None) != (head is None):
        raise CatchtagError("give both --layer and --head, or neither (then the highest-VE head with a sink "
                            "beyond the first token is picked)")
    if layer is None:
        if chosen_from is None:
            chosen_from = scan(model, tokenizer, prompts, eps=eps, min_rows=min_rows, progress=False)
        layer, head = choose_head(chosen_from)
    deeper = pca_layers(model.config.num_hidden_layers, layer, deeper)
    result = scan(model, tokenizer, prompts, eps=eps, min_rows=min_rows, request=pca_request(layer, head, deeper),
                  progress=False)
    return pca_from_result(result, layer, head, deeper, tag_level=tag_level, exclude_first=exclude_first,
                           model=display_name(model, name))


def tag_geometry(model, tokenizer, text, *, layers=None, n_positions: int = 64, max_pairs: int = 20000,
                 eps: float = SinkSettings.eps, min_rows: int = SinkSettings.min_rows, min_norm_ratio: float = 1e-3,
                 max_condition: float = 1e3, seed: int = 0, name: str | None = None) -> TagGeometry:
    """Cosines between distinct residual-stream tags, and between each tag and the token it is added to
    (analysis/geometry.py), on one prompt: one pass with ``geometry_request``. layers: which layers (default all);
    n_positions: tokens sampled evenly from position 1 on; the rest: see ``geometry_from_result``."""
    from catchtag.data.prompts import model_context, tokenize_prompts
    from catchtag.scan import scan

    prompts = one_prompt(text)
    if isinstance(prompts[0], str):
        prompts = tokenize_prompts(prompts, tokenizer, context=model_context(model))
    request, positions = geometry_request(model.config.num_hidden_layers, len(prompts[0].input_ids), layers=layers,
                                          n_positions=n_positions)
    result = scan(model, tokenizer, prompts, eps=eps, min_rows=min_rows, request=request, progress=False)
    return geometry_from_result(result, positions, max_pairs=max_pairs, min_norm_ratio=min_norm_ratio,
                                max_condition=max_condition, seed=seed, model=display_name(model, name),
                                n_positions=n_positions)


def attention_to_columns(model, tokenizer, prompt, columns: dict, *, max_bytes: float = 2.5e8) -> dict:
    """Each token's attention to chosen columns of one tokenised prompt, per head: {(layer, head): (T, K) float32},
    the K columns in the order given. The engine keeps whole T x T patterns (``attention_maps``); they are taken a
    few heads at a time (at most ``max_bytes`` of patterns per pass) and cut to the columns at once, so a long text
    costs passes, not memory. Heads with no column are left out."""
    from catchtag.engine.request import ActivationRequest
    from catchtag.scan import scan

    pairs = sorted((int(layer), int(head)) for (layer, head), cols in columns.items() if len(cols))
    T = len(prompt.input_ids)
    group = max(1, int(max_bytes // (4 * T * T)))
    found = {}
    for start in range(0, len(pairs), group):
        chunk = pairs[start:start + group]
        result = scan(model, tokenizer, [prompt], request=ActivationRequest(layers=[], attention_maps=chunk),
                      progress=False)
        for layer, head in chunk:
            pattern = result.cache.get("pattern", layer=layer, head=head, prompt=prompt.prompt_id)
            found[(layer, head)] = np.asarray(pattern, dtype=np.float32)[:, [int(c) for c in columns[(layer, head)]]]
    return found


def answer_logprobs(model, tokenizer, prompts, answer_ids: Sequence[int], *, edit=None,
                    batch_size: int = 8, progress: bool = False, desc: str = "answers") -> np.ndarray:
    """Log-probabilities of the answer tokens at the last real token of each prompt.

    prompts: list of ``Prompt`` (tokenised). answer_ids: token ids to read (e.g. [id(' FALSE'), id(' TRUE')]).
    edit: an intervention (catchtag.interventions, e.g. steering) applied in the pass; None runs the model
    plainly. Returns (n_prompts, len(answer_ids)).
    """
    from catchtag.scan import _batch_tensors

    answer_ids = list(answer_ids) if isinstance(answer_ids, (list, tuple, range, np.ndarray)) else answer_ids
    if not isinstance(answer_ids, list) or not answer_ids or not all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in answer_ids):
        raise CatchtagError(f"answer_ids must be a list of token ids, got {answer_ids!r}. Fix: e.g. answer_ids="
                            f"[tokenizer.encode(' FALSE')[0], tokenizer.encode(' TRUE')[0]]")
    if not prompts:
        raise CatchtagError("no prompts to read answers from")
    if isinstance(prompts, str) or all(isinstance(p, str) for p in prompts):  # text: tokenised as a scan would
        from catchtag.data.prompts import model_context, tokenize_prompts

        prompts = tokenize_prompts(one_prompt(prompts) if isinstance(prompts, str) else list(prompts), tokenizer,
                                   context=model_context(model))
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
