"""Float64 attention built from the definition alone, independently of ``tileattn.reference``: the expectation the
option tests (ALiBi, sinks, head dims) check every entry point and backend against."""

import torch


def expected(q, k, v, *, causal=False, window=None, softcap=None, mask=None, slopes=None, sinks=None, scale=None):
    """float64 ``(out [B, Hq, Sq, D_v], lse [B, Hq, Sq])``: ``softmax(q k^T * scale + biases) v`` with the default
    scale ``D ** -0.5`` of q/k's head dim, bottom-right aligned causality and window, ALiBi as ``-slope * |rel|``,
    the bool ``mask`` (True = attend) and a sink as one more logit column whose value is never read."""
    q, k, v = (t.double() for t in (q, k, v))
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    group = hq // k.shape[1]
    logits = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * (d ** -0.5 if scale is None else scale)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    rel = torch.arange(sk, device=q.device)[None, :] - (torch.arange(sq, device=q.device)[:, None] + sk - sq)
    if slopes is not None:
        logits = logits - (slopes.double() if slopes.dim() == 2 else slopes.double()[None])[..., None, None] * rel.abs()
    hidden = torch.zeros(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        hidden |= rel > 0
    if window is not None:
        hidden |= (rel < -window[0]) | (rel > window[1])
    logits = logits.masked_fill(hidden, float("-inf"))
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        logits = torch.cat([logits, sinks.double()[None, :, None, None].expand(b, hq, sq, 1)], dim=-1)
    lse = logits.logsumexp(-1)
    probs = torch.exp(logits - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    if sinks is not None:
        probs = probs[..., :-1]
    return probs @ v.repeat_interleave(group, 1), lse
