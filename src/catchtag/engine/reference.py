"""The plain reference: the method computed from eager attention maps, in float64, straight from the
definitions in docs/method.md.

Slow and memory-hungry on purpose (full T x T maps for every layer, python loops over prompts and heads);
it exists so tests can hold every fast path to it. It shares no code with the engine: which rows see
which columns comes from the mask the model hands its own eager attention (padding, causality, sliding windows,
chunks, sparse selections), restricted to the tokenizer's real tokens, and
the residual-stream tag goes through the model's own output projection module.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from catchtag.engine.request import SinkSettings

REF_NAME = "catchtag_reference"


_PROJECTIONS = ("o_proj", "out_proj", "dense", "c_proj", "Wo")


def _recording_eager(records: list, hooks: list):
    def attention(module, query, key, value, attention_mask, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        out, weights = eager(module, query, key, value, attention_mask, **kwargs)
        n_rep = query.shape[1] // value.shape[1]
        weights64 = weights.detach().double()
        sinks = kwargs.get("s_aux")
        if sinks is not None and bool(((weights64.sum(-1) - 1).abs() < 1e-4).all()):
            # a learned sink the eager code applies as a factor on the output (granite-swa: sigmoid(lse - sink)) and
            # leaves out of the weights it returns: the model's softmax over the real columns and the sink column
            scores = torch.matmul(query.double(), key.double().repeat_interleave(n_rep, dim=1).transpose(-1, -2))
            scores = scores * kwargs.get("scaling", query.shape[-1] ** -0.5)
            if attention_mask is not None:
                scores = scores + attention_mask.double()
            lse = torch.logsumexp(scores, dim=-1, keepdim=True)
            weights64 = weights64 * torch.sigmoid(lse - sinks.double().reshape(1, -1, 1, 1))
        record = dict(module=module, weights=weights64, allowed=_allowed(attention_mask),
                      values=value.detach().double().repeat_interleave(n_rep, dim=1),
                      rtol=max(1e-5, 2 * torch.finfo(value.dtype).eps),
                      out=out.detach().double().transpose(1, 2))  # (B,H,T,D)
        records.append(record)
        proj = next((getattr(module, a) for a in _PROJECTIONS if hasattr(getattr(module, a, None), "weight")), None)
        if proj is not None:  # the projection's input: the head outputs, times a gate where the model has one

            def seen(_, args, record=record):
                record["written"] = args[0].detach().double()
                hooks.pop().remove()

            hooks.append(proj.register_forward_pre_hook(seen))
        return out, weights

    return attention


def _orth(vectors: np.ndarray, scores: np.ndarray, rtol: float) -> np.ndarray:
    """Orthonormal basis (columns) of the span of the sink values (rows), by the span rule of docs/method.md: the
    values in descending score order (ties: lower position first), each adding a direction only if its distance to
    the span of those before it exceeds rtol x the largest norm so far (values equal up to the model's rounding
    count once). Written out plainly, one value at a time."""
    basis: list[np.ndarray] = []
    largest = 0.0
    for i in np.argsort(-np.asarray(scores), kind="stable"):
        v = np.asarray(vectors[i], dtype=np.float64)
        largest = max(largest, float(np.linalg.norm(v)))
        r = v.copy()
        for _ in range(2):  # twice: once is not enough in floating point for nearly dependent values
            for q in basis:
                r = r - (q @ r) * q
        norm = float(np.linalg.norm(r))
        if norm > rtol * largest:
            basis.append(r / norm)
    return np.stack(basis, axis=1) if basis else np.zeros((vectors.shape[1], 0))


def _visibility(valid: np.ndarray, allowed: np.ndarray | None):
    """Which real rows see which real columns, and how many rows see each column. allowed (T,T) bool: the model's own
    eager mask for this prompt (None: plain causal)."""
    if allowed is None:
        i_idx, j_idx = np.meshgrid(valid, valid, indexing="ij")
        sees = i_idx >= j_idx
    else:
        sees = allowed[np.ix_(valid, valid)]
    return sees, sees.sum(axis=0)


def _allowed(mask) -> np.ndarray | None:
    """(B,T,T) bool from the mask eager attention got (additive float or bool, (B,1,T,T)), or None."""
    if mask is None:
        return None
    m = mask.detach()[:, 0]
    m = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    return m.cpu().numpy()


@torch.no_grad()
def reference_scan(model, input_ids, attention_mask, eps=SinkSettings.eps, min_rows=SinkSettings.min_rows,
                   positions="last"):
    """Per (prompt, layer, head): column scores, sinks, VE, R^2, and residual-stream full/tag/non-tag
    activations (result, result_tag, result_nontag) at the last real token of every prompt. Also returns the logits."""
    records: list = []
    hooks: list = []
    AttentionInterface.register(REF_NAME, _recording_eager(records, hooks))
    AttentionMaskInterface.register(REF_NAME, eager_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(REF_NAME)
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        model.set_attn_implementation(previous)
        for hook in hooks:
            hook.remove()
    pad = attention_mask.bool().cpu().numpy()
    rows = []
    for call, rec in enumerate(records):
        layer = getattr(rec["module"], "layer_idx", None)
        layer = call if layer is None else int(layer)  # the model's own layer numbers (hybrids skip some)
        A = rec["weights"].cpu().numpy()  # (B,H,T,T)
        V = rec["values"].cpu().numpy()
        O = rec["out"].cpu().numpy()
        module = rec["module"]
        B, H, T, _ = A.shape
        # the gate between the head outputs and the output projection (1 where the model has none): written / out
        gate = np.ones_like(O)
        if "written" in rec:
            written = rec["written"].cpu().numpy().reshape(B, T, H, -1).transpose(0, 2, 1, 3)
            gate = np.divide(written, O, out=np.zeros_like(O), where=O != 0)
        for b in range(B):
            valid = np.flatnonzero(pad[b])
            allowed = rec["allowed"]
            sees, counts = _visibility(valid, None if allowed is None else allowed[min(b, len(allowed) - 1)])
            last = valid[-1]
            for h in range(H):
                a = A[b, h][np.ix_(valid, valid)]
                scores = np.where(counts >= min_rows, (a * sees).sum(axis=0) / np.maximum(counts, 1), np.nan)
                sinks = [int(p) for p in np.flatnonzero(np.nan_to_num(scores, nan=-1) > eps)]
                o = O[b, h][valid]
                tag = np.zeros_like(o)
                for p in sinks:
                    tag += a[:, p:p + 1] * V[b, h, valid[p]][None, :]
                oc = o - o.mean(axis=0)
                nc = (o - tag) - (o - tag).mean(axis=0)
                basis = (_orth(np.stack([V[b, h, valid[p]] for p in sinks]), scores[sinks], rec["rtol"]) if sinks
                         else np.zeros((o.shape[1], 0)))
                total = (oc ** 2).sum()
                ve = float(((oc @ basis) ** 2).sum() / total) if sinks and total > 0 else 0.0
                r2 = float(1 - (nc ** 2).sum() / total) if sinks and total > 0 else 0.0
                ve_unc = float(((o @ basis) ** 2).sum() / (o ** 2).sum()) if sinks and total > 0 else 0.0
                g = gate[b, h][valid][-1]
                full_r = _through_output_projection(module, h, H, g * o[-1])
                tag_r = _through_output_projection(module, h, H, g * tag[-1])
                # rows of A over the real columns sum to 1 less what a learned sink column (gpt-oss) takes
                learned = float(1 - a.sum(axis=1).mean())
                # how much float32 rounding of o is magnified in the centred ratios (large for near-constant heads)
                conditioning = float(np.sqrt((o ** 2).sum() / total)) if total > 0 else float("inf")
                # the head's write of any head-space vector at the last token (the projection and the gate of
                # this pass): checks a write path apart from how far an MoE's routing drifted the layer's input
                write = (lambda vec, module=module, h=h, H=H, g=g: _through_output_projection(module, h, H, g * vec))
                rows.append(dict(prompt=b, layer=layer, head=h, scores=scores, sinks=sinks, ve=ve, r2=r2,
                                 ve_uncentred=ve_unc, learned_sink=learned, write=write,
                                 conditioning=conditioning,
                                 result=full_r, result_tag=tag_r, result_nontag=full_r - tag_r, last=int(last)))
    return rows, logits


def _through_output_projection(module, h, H, vec):
    """Residual-stream contribution of one head-space vector: run the module's own output projection on an
    input that is zero except in head h's slice, minus its bias."""
    proj = next(getattr(module, a) for a in _PROJECTIONS if hasattr(getattr(module, a, None), "weight"))
    D = vec.shape[0]
    x = torch.zeros(1, H * D, dtype=proj.weight.dtype, device=proj.weight.device)
    x[0, h * D:(h + 1) * D] = torch.as_tensor(vec, dtype=proj.weight.dtype)
    zero = torch.zeros_like(x)
    with torch.no_grad():
        return (proj(x) - proj(zero)).double().cpu().numpy()[0]


@torch.no_grad()
def reference_edited_logits(model, input_ids, attention_mask, edits: dict, eps=SinkSettings.eps,
                            min_rows=SinkSettings.min_rows):
    """Logits of ``model`` in float64 with chosen heads' outputs changed by hand, for the interventions' tests.

    edits: {(layer, head): (kind, unit vector or None)} with kind zero_tag, mean_tag, control_zero or control_mean
    (docs/method.md): on each prompt, for the tokens at or after the head's first sink, remove the tag (zero),
    replace it by its mean over those tokens (mean), or remove a component of the same per-token norm along the
    unit vector (control). Sinks come from this pass's own eager attention maps, one head and prompt at a time."""
    import copy

    net = copy.deepcopy(model).double()
    pad = attention_mask.bool().cpu().numpy()
    order: dict[int, int] = {}

    def attention(module, query, key, value, mask, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        out, weights = eager(module, query, key, value, mask, **kwargs)  # out (B,T,H,D)
        layer = getattr(module, "layer_idx", None)
        layer = order.setdefault(id(module), len(order)) if layer is None else int(layer)
        n_rep = query.shape[1] // value.shape[1]
        V = value.repeat_interleave(n_rep, dim=1)
        out = out.clone()
        # padding rows see no key: in float64 their scores overflow to -inf and the row is nan, which the next
        # layer would multiply by a zero weight into every real token; they are padding, so zero them
        out[torch.as_tensor(~pad, device=out.device)] = 0
        for (l, h), (kind, unit) in edits.items():
            if l != layer:
                continue
            for b in range(out.shape[0]):
                valid = np.flatnonzero(pad[b])
                allowed = _allowed(mask)
                sees, counts = _visibility(valid, None if allowed is None else allowed[min(b, len(allowed) - 1)])
                a = weights[b, h].cpu().numpy()[np.ix_(valid, valid)]
                scores = np.where(counts >= min_rows, (a * sees).sum(axis=0) / np.maximum(counts, 1), -1.0)
                sinks = [int(p) for p in np.flatnonzero(scores > eps)]
                if not sinks:
                    continue
                v = V[b, h].cpu().numpy()[valid]
                tag = a[:, sinks] @ v[sinks]  # (n, D): sum over sinks of A_is v_s
                after = np.arange(len(valid)) >= sinks[0]
                removed = tag * after[:, None]
                if kind in ("mean_tag", "control_mean"):
                    mean = removed[after].mean(axis=0)
                    removed = (tag - mean) * after[:, None]
                if kind.startswith("control"):
                    u = np.asarray(unit, dtype=np.float64) / np.linalg.norm(unit)
                    delta = np.linalg.norm(removed, axis=1, keepdims=True) * u[None, :]
                else:
                    delta = removed
                out[b, valid, h] -= torch.as_tensor(delta, dtype=out.dtype)
        return out, weights

    name = REF_NAME + "_edit"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, eager_mask)
    net.set_attn_implementation(name)
    return net(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
