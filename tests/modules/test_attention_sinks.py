"""gpt-oss's attention sinks through SDPA (one extra key) against the materialised definition."""

from __future__ import annotations

import pytest
import torch

from tunelab.modules.attention import sink_attention, window_mask


def reference(q, k, v, sinks, mask, scale):
    """The definition, scores materialised: softmax over [scores, sink], the sink's share dropped."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(2, 3) * scale
    if mask is None:
        s, s_kv = q.shape[2], k.shape[2]
        mask = torch.ones(s, s_kv, dtype=torch.bool).tril(s_kv - s)
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return probs @ v


@pytest.mark.parametrize("case", ["causal", "window", "documents", "decode"])
def test_sdpa_sinks_equal_the_definition_with_gradients(case):
    """fp32, fresh random q/k/v/sinks (sinks of both signs, large enough to matter), grouped
    k/v (4 query heads over 2): outputs and the gradients of q, k, v and sinks within 1e-5
    (the same sums in another order). Cases: plain causal (no mask tensor), a sliding window,
    two packed documents, and 3 new queries over 11 cached keys."""
    g = torch.Generator().manual_seed(0)
    b, nh, nkv, hd = 2, 4, 2, 16
    s, s_kv = (3, 11) if case == "decode" else (10, 10)
    q = torch.randn(b, nh, s, hd, generator=g, requires_grad=True)
    k = torch.randn(b, nkv, s_kv, hd, generator=g, requires_grad=True)
    v = torch.randn(b, nkv, s_kv, hd, generator=g, requires_grad=True)
    sinks = (2 * torch.randn(nh, generator=g)).requires_grad_()
    mask = None
    if case == "window":
        mask = window_mask(s, 4, "cpu")
    elif case == "documents":
        mask = window_mask(s, 100, "cpu", document_ids=torch.tensor([[0] * 6 + [1] * 4, [0] * 3 + [1] * 7]))
    elif case == "decode":
        mask = torch.ones(s, s_kv, dtype=torch.bool).tril(s_kv - s)[None, None]
    scale = 0.3
    out = sink_attention(q, k, v, sinks, mask, scale)
    want = reference(q, k, v, sinks, mask, scale)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    grad = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v, sinks), grad)
    expected = torch.autograd.grad(want, (q, k, v, sinks), grad)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
