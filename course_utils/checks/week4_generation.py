"""Week 4 exercises (notebooks 04-05): grouped-query head repetition, top-k and top-p filters, one
attention step with a KV cache.

Expected values come from independent references: an index formula for the head a query reads,
transformers' TopKLogitsWarper / TopPLogitsWarper, and full (uncached) attention with
`F.scaled_dot_product_attention` over RoPE written with complex numbers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..exercises import Case, case_rng, exercise, randn


@exercise("4.8", "Grouped-query attention: repeat key/value heads", reference="course_utils.llama:repeat_kv",
          hint="Query head h must read key/value head h // n_rep, so each kv head is repeated n_rep times IN A ROW "
               "(kv0, kv0, kv1, kv1 ...), like repeat_interleave on dim 1, not tiled (kv0, kv1, kv0, kv1 ...). "
               "Keep the dtype.",
          forbid=("transformers.models.llama.modeling_llama.repeat_kv",))
def _():
    g = case_rng(48)
    for B, nkv, S, hs, n_rep, dtype in [(1, 1, 1, 4, 1, torch.float32), (2, 3, 5, 8, 3, torch.float32),
                                        (1, 2, 4, 16, 4, torch.float32), (2, 1, 3, 4, 5, torch.float32),
                                        (1, 3, 6, 8, 2, torch.float64)]:
        x = randn(g, B, nkv, S, hs).to(dtype)
        name = f"x (B={B}, nkv={nkv}, S={S}, hs={hs}) {str(dtype).replace('torch.', '')}, n_rep={n_rep}"
        if nkv == 1:
            name += " (multi-query: one kv head for all)"
        yield Case(name, args=(x, n_rep),
                   expected=lambda x=x, n_rep=n_rep: x[:, torch.arange(x.shape[1] * n_rep) // n_rep].clone(),
                   names="kv repeated", atol=0.0, rtol=0.0)


def _warper(name: str, value: float):
    def thunk_for(logits: torch.Tensor):
        from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

        warper = TopKLogitsWarper(top_k=int(value)) if name == "top_k" else TopPLogitsWarper(top_p=value)
        return lambda: warper(None, logits.clone())
    return thunk_for


def _distinct_logits(g: torch.Generator, B: int, V: int, scale: float = 1.0) -> torch.Tensor:
    """Random logits without ties (a tie at the cut-off would make 'the k largest' ambiguous)."""
    return torch.stack([torch.randperm(V, generator=g).float() / V * 4 - 2 for _ in range(B)]) * scale \
        + randn(g, B, V, scale=1e-3)


@exercise("4.9", "Top-k filtering of logits", reference="course_utils.generate:top_k_filter",
          hint="Per row, find the k-th largest logit (torch.topk(...).values[..., -1:]) and set every logit below it "
               "to -inf; keep the others unchanged. If k > V keep everything.",
          forbid=("transformers.generation.logits_process.TopKLogitsWarper",))
def _():
    g = case_rng(49)
    for B, V, k, scale, label in [(1, 10, 1, 1.0, "k=1 (greedy's support)"), (4, 50, 5, 1.0, ""),
                                  (3, 7, 7, 1.0, "k = V keeps all"), (2, 6, 20, 1.0, "k > V keeps all"),
                                  (3, 1000, 40, 10.0, "large logits")]:
        logits = _distinct_logits(g, B, V, scale)
        yield Case(f"logits ({B}, {V}), k={k}" + (f", {label}" if label else ""), args=(logits, k),
                   expected=_warper("top_k", k)(logits), names="filtered logits", atol=0.0, rtol=0.0)


@exercise("4.10", "Top-p (nucleus) filtering of logits", reference="course_utils.generate:top_p_filter",
          hint="Sort probabilities in DESCENDING order; keep a token if the probability of all tokens before it is "
               "< p (so the token that crosses p is kept, and the top token always is); map the mask back to the "
               "original order; set the rest to -inf.",
          forbid=("transformers.generation.logits_process.TopPLogitsWarper",))
def _():
    g = case_rng(410)
    peaked = _distinct_logits(g, 2, 20)
    peaked[:, 3] = 8.0  # one token holds almost all the probability
    cases = [("logits (1, 10), p=0.9", _distinct_logits(g, 1, 10), 0.9),
             ("logits (4, 50), p=0.5", _distinct_logits(g, 4, 50, 2.0), 0.5),
             ("peaked rows (2, 20): the top token alone exceeds p=0.8", peaked, 0.8),
             ("tiny p=0.01 keeps only the top token, (3, 30)", _distinct_logits(g, 3, 30), 0.01),
             ("p=1.0 keeps all, (2, 12)", _distinct_logits(g, 2, 12), 1.0),
             ("flat rows (3, 40) x0.2, p=0.3", _distinct_logits(g, 3, 40, 0.2), 0.3),
             ("large logits (2, 500) x20, p=0.95", _distinct_logits(g, 2, 500, 20.0), 0.95)]
    for name, logits, p in cases:
        yield Case(name, args=(logits, p), expected=_warper("top_p", p)(logits), names="filtered logits",
                   atol=0.0, rtol=0.0)


def _rope_complex(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE as a complex multiplication of pairs (x_i, x_{i+hs/2}) by e^{i m theta_i}, in float64."""
    hs = x.shape[-1]
    theta = base ** (-torch.arange(hs // 2, dtype=torch.float64) * 2 / hs)
    angle = positions.double()[:, None] * theta  # (T, hs/2)
    z = torch.complex(x[..., : hs // 2].double(), x[..., hs // 2:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


@exercise("4.11", "One attention step with a KV cache", reference="course_utils.generate:kv_cache_attention_step",
          hint="The new tokens sit at positions S..S+T-1 where S = past_k.shape[-2]: rotate q and k (not v) with "
               "rope(x, positions, base); append the new k, v to the cache ONCE (torch.cat on dim -2); attend "
               "causally (new query i sees keys 0..S+i); return (out, k_all, v_all).")
def _():
    g = case_rng(411)
    for B, nh, S, T, hs, base in [(1, 1, 0, 1, 4, 10000.0), (2, 3, 5, 1, 8, 10000.0), (1, 2, 0, 4, 8, 10000.0),
                                  (2, 2, 6, 3, 16, 10000.0), (1, 4, 9, 1, 8, 500.0)]:
        q, k, v = randn(g, B, nh, T, hs), randn(g, B, nh, T, hs), randn(g, B, nh, T, hs)
        raw_past_k, past_v = randn(g, B, nh, S, hs), randn(g, B, nh, S, hs)
        past_k = _rope_complex(raw_past_k, torch.arange(S), base)  # the cache holds rotated keys

        def expected(q=q, k=k, v=v, past_k=past_k, past_v=past_v, S=S, T=T, base=base):
            pos = torch.arange(S, S + T)
            k_all = torch.cat([past_k, _rope_complex(k, pos, base)], dim=-2)
            v_all = torch.cat([past_v, v], dim=-2)
            q_all = torch.cat([torch.zeros_like(past_k), _rope_complex(q, pos, base)], dim=-2)  # dummy past queries
            out = F.scaled_dot_product_attention(q_all, k_all, v_all, is_causal=True)[..., S:, :]  # uncached attention
            return out, k_all, v_all

        what = "empty cache (prefill)" if S == 0 else f"{S} cached positions"
        name = f"q, k, v (B={B}, nh={nh}, T={T}, hs={hs}), {what}" + (f", base={base:g}" if base != 10000.0 else "")
        yield Case(name, args=(q, k, v, past_k, past_v), kwargs={"base": base}, expected=expected,
                   names=("out", "k_all", "v_all"), atol=1e-5)
