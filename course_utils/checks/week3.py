"""Week 3 exercises: attention scores, masked weights, scaled dot-product attention, causal masks,
multi-head attention and rotary position embeddings.

Expected values come from independent references: explicit loops and closed forms, complex-number
rotations, `F.scaled_dot_product_attention` and `torch.nn.MultiheadAttention`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..exercises import Case, exercise, randn


def _lengths_mask(lengths: list[int], S: int) -> torch.Tensor:
    return torch.tensor([[s < n for s in range(S)] for n in lengths])  # (B, S) True on real keys


@exercise("3.1", "Additive (Bahdanau) attention score", reference="course_utils.attention:additive_score",
          hint="scores[b, s] = v . tanh(query[b] @ W_q + keys[b, s] @ W_k): tanh inside, then the dot product with v.")
def _():
    g = torch.Generator().manual_seed(31)
    for B, S, Dq, Dk, A, scale in [(1, 1, 3, 3, 2, 1.0), (2, 5, 4, 6, 8, 1.0), (3, 7, 16, 8, 5, 1.0),
                                   (2, 4, 5, 5, 6, 20.0)]:
        q, k = randn(g, B, Dq, scale=scale), randn(g, B, S, Dk, scale=scale)
        W_q, W_k, v = randn(g, Dq, A) / math.sqrt(Dq), randn(g, Dk, A) / math.sqrt(Dk), randn(g, A)
        expected = torch.stack([torch.stack([v @ torch.tanh(q[b] @ W_q + k[b, s] @ W_k) for s in range(S)])
                                for b in range(B)])  # explicit loop over every (example, key)
        name = f"query ({B},{Dq}), keys ({B},{S},{Dk}), A={A}" + (", large inputs (tanh saturates)" if scale > 1 else "")
        yield Case(name, args=(q, k, W_q, W_k, v), expected=expected, atol=1e-5)


@exercise("3.2", "Attention weights with a padding mask", reference="course_utils.attention:attention_weights",
          hint="Set masked scores to -inf (not 0) before a softmax over the LAST axis; masked keys get weight 0.")
def _():
    g = torch.Generator().manual_seed(32)

    def reference(scores, mask):  # softmax over each row's allowed keys only, zeros elsewhere
        out = torch.zeros_like(scores)
        rows = scores.reshape(-1, scores.shape[-1])
        keep = (torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.expand_as(scores)).reshape(rows.shape)
        flat = out.view(rows.shape)
        for r in range(rows.shape[0]):
            e = torch.exp(rows[r, keep[r]].double() - rows[r, keep[r]].double().max())
            flat[r, keep[r]] = (e / e.sum()).float()
        return out

    cases = [("scores (3, 5), no mask", randn(g, 3, 5), None),
             ("scores (3, 6), key lengths [6, 4, 1]", randn(g, 3, 6), _lengths_mask([6, 4, 1], 6)),
             ("one key: scores (2, 1)", randn(g, 2, 1), torch.ones(2, 1, dtype=torch.bool)),
             ("very negative scores (-50 ± 5), key lengths [2, 5]", randn(g, 2, 5, scale=5) - 50,
              _lengths_mask([2, 5], 5)),
             ("large scores (x1000): softmax must not overflow", randn(g, 2, 4, scale=1000), None),
             ("scores (2, 3, 5) with mask (2, 1, 5) broadcast over queries", randn(g, 2, 3, 5),
              _lengths_mask([3, 5], 5)[:, None, :])]
    for name, scores, mask in cases:
        yield Case(name, args=(scores, mask), expected=reference(scores, mask), atol=1e-6)


@exercise("3.3", "Scaled dot-product attention", reference="course_utils.attention:scaled_dot_product_attention",
          hint="softmax(q @ k.transpose(-2, -1) / sqrt(d_k), dim=-1) @ v, with masked scores set to -inf first.")
def _():
    g = torch.Generator().manual_seed(33)
    shapes = [("length one: q, k (1, 1, 4), v (1, 1, 4)", (1,), 1, 1, 4, 4, None),
              ("q (2, 5, 8), k (2, 7, 8), v (2, 7, 3)", (2,), 5, 7, 8, 3, None),
              ("heads: (2, 3, 6, 16) with a causal mask (6, 6)", (2, 3), 6, 6, 16, 16, "causal"),
              ("padding: (3, 2, 4, 16), mask (3, 1, 1, 6) from key lengths [6, 2, 4]", (3, 2), 4, 6, 16, 16, "pad"),
              ("large values (x4), d_k=64, causal", (1, 2), 5, 5, 64, 8, "causal")]
    for name, lead, T, S, dk, dv, kind in shapes:
        scale = 4.0 if "large" in name else 1.0
        q, k, v = randn(g, *lead, T, dk, scale=scale), randn(g, *lead, S, dk, scale=scale), randn(g, *lead, S, dv)
        mask = None
        if kind == "causal":
            mask = torch.ones(T, S, dtype=torch.bool).tril()
        elif kind == "pad":
            mask = _lengths_mask([6, 2, 4], S)[:, None, None, :]
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        yield Case(name, args=(q, k, v, mask), expected=expected, atol=1e-5)


@exercise("3.4", "Causal mask (also for queries that are the last T of S keys)",
          reference="course_utils.attention:causal_mask",
          hint="Query i sits at absolute position i + (S - T); it may see every key j <= i + (S - T). Return dtype torch.bool.")
def _():
    for T, S in [(1, None), (2, None), (5, None), (16, None), (1, 7), (3, 8)]:
        S_ = T if S is None else S
        i = torch.arange(T)[:, None] + (S_ - T)  # absolute position of each query
        expected = torch.arange(S_)[None, :] <= i  # closed form: key j is visible if j <= query position
        if S is None:
            yield Case(f"T={T}", args=(T,), expected=expected)
        else:
            yield Case(f"T={T} new queries after {S - T} cached keys (S={S})", args=(T, S), expected=expected)


@exercise("3.5", "Multi-head self-attention (matches nn.MultiheadAttention)",
          reference="course_utils.attention:multi_head_attention",
          hint="Split q, k, v with view(B, T, nh, hs).transpose(1, 2); scale by sqrt(hs), not sqrt(C); merge with "
               "transpose(1, 2).reshape(B, T, C); finish with the output projection.")
def _():
    g = torch.Generator().manual_seed(35)
    for B, T, C, nh, kind in [(1, 1, 8, 2, None), (2, 5, 16, 4, None), (3, 7, 12, 3, "causal"),
                              (2, 6, 16, 1, None), (3, 5, 16, 4, "pad")]:
        torch.manual_seed(350 + T)
        mha = torch.nn.MultiheadAttention(C, nh, batch_first=True)
        with torch.no_grad():
            mha.in_proj_bias.normal_(generator=g)
            mha.out_proj.bias.normal_(generator=g)
        x = randn(g, B, T, C)
        mask, kwargs = None, {}
        if kind == "causal":
            mask = torch.ones(T, T, dtype=torch.bool).tril()
            kwargs = {"attn_mask": ~mask}  # nn.MultiheadAttention: True means "may NOT attend"
        elif kind == "pad":
            keep = _lengths_mask([5, 2, 3], T)
            mask = keep[:, None, None, :]  # (B, 1, 1, T)
            kwargs = {"key_padding_mask": ~keep}
        with torch.no_grad():
            expected = mha(x, x, x, need_weights=False, **kwargs)[0]
        params = [p.detach().clone() for p in (mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight,
                                               mha.out_proj.bias)]
        label = {None: "", "causal": ", causal mask", "pad": ", key lengths [5, 2, 3]"}[kind]
        yield Case(f"x ({B},{T},{C}), {nh} heads{label}", args=(x, *params, nh, mask), expected=expected, atol=1e-5)


@exercise("3.6", "Rotary position embedding (RoPE)", reference="course_utils.attention:rope",
          hint="theta_i = base ** (-2i / hs) for i < hs/2; pair x[..., i] with x[..., i + hs/2] (Llama layout) and "
               "rotate it by the angle positions[t] * theta_i.")
def _():
    g = torch.Generator().manual_seed(36)

    def reference(x, positions, base=10000.0):  # each pair as one complex number, multiplied by e^{i m theta}
        hs = x.shape[-1]
        theta = 1.0 / base ** (torch.arange(hs // 2, dtype=torch.float64) * 2 / hs)
        angle = positions.double()[:, None] * theta  # (T, hs/2)
        z = torch.complex(x[..., : hs // 2].double(), x[..., hs // 2:].double()) * torch.polar(torch.ones_like(angle), angle)
        return torch.cat([z.real, z.imag], dim=-1).float()

    cases = [("x (1, 1, 2) at position 0 (no rotation)", (1, 1, 2), torch.tensor([0]), {}, 1e-5),
             ("x (2, 5, 8), positions 0..4", (2, 5, 8), torch.arange(5), {}, 1e-5),
             ("x (1, 3, 4, 16), positions 7..10 (a continuation)", (1, 3, 4, 16), torch.arange(7, 11), {}, 1e-4),
             ("x (2, 3, 6), positions [3, 0, 5], base=500", (2, 3, 6), torch.tensor([3, 0, 5]), {"base": 500.0}, 1e-5),
             ("x (1, 2, 32), large positions [1000, 4000]", (1, 2, 32), torch.tensor([1000, 4000]), {}, 3e-3)]
    for name, shape, pos, kwargs, atol in cases:
        x = randn(g, *shape)
        yield Case(name, args=(x, pos), kwargs=kwargs, expected=reference(x, pos, **kwargs), atol=atol)
