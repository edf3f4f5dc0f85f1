"""Week 4: turning a language model into text — decoding rules, a KV cache, batched generation.

Reading order: one next-token distribution -> greedy and temperature (Ackley et al. 1985; temperature 0
is greedy) -> top-k (Fan et al. 2018) and top-p / nucleus sampling (Holtzman et al. 2020) -> a KV cache
(keys and values of past positions, kept so each new token costs one position, not the whole prefix)
-> one cached attention step -> `generate`, with left padding for batches of prompts.

A model used by `generate` is called as `model(idx, *, cache=None, attention_mask=None, last_only=False)`
and returns logits (B, T, V) (`course_utils.llama.Llama` does). Shape legend: B batch, T new positions,
S all positions (cached + new), V vocabulary, nh heads, hs head size.
Production servers add paged caches, speculative decoding and continuous batching on top of this.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .attention import causal_mask, rope
from .runtime import pick_cpu_threads


# ----------------------------------------------------------------------------------------------
# Decoding rules: from logits (B, V) to one token per row
# ----------------------------------------------------------------------------------------------
def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature: < 1 sharpens the distribution, > 1 flattens it (temperature > 0)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to scale logits, got {temperature}; use greedy for 0")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, set the rest to -inf (ties with the k-th are kept, as in transformers)."""
    k = min(int(k), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1): the k-th largest logit per row
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the fewest most likely tokens whose probabilities sum to >= p; -inf elsewhere.

    A token is kept when the probability of all MORE likely tokens is still below p, so the token that
    crosses the threshold is kept and the most likely token always survives.
    """
    if p >= 1.0:  # everything; also avoids float32 sums that reach 1.0 before the last tokens
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (..., V): probability of strictly more likely tokens
    keep_sorted = mass_before < p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # back to vocabulary order
    return logits.masked_fill(~keep, float("-inf"))


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits (B, V): greedy when temperature == 0, else sample after the filters.

    The order is transformers': temperature, then top-k, then top-p.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,) greedy
    logits = apply_temperature(logits.float(), temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


# ----------------------------------------------------------------------------------------------
# The KV cache
# ----------------------------------------------------------------------------------------------
def kv_cache_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
                            past_v: torch.Tensor, base: float = 10000.0):
    """Attention for T new positions given the cached (already rotated) keys and values of S past ones.

    Args:
        q, k, v: (B, nh, T, hs) projections of the new tokens, before RoPE; they sit at positions S..S+T-1.
        past_k, past_v: (B, nh, S, hs) the cache (S may be 0).
    Returns:
        out (B, nh, T, hs), and the grown cache k_all, v_all (B, nh, S + T, hs).
    """
    S, T = past_k.shape[-2], q.shape[-2]
    positions = torch.arange(S, S + T, device=q.device)  # absolute positions of the new tokens
    q, k = rope(q, positions, base), rope(k, positions, base)  # values are not rotated
    k_all = torch.cat([past_k, k], dim=-2)  # (B, nh, S + T, hs): append, once
    v_all = torch.cat([past_v, v], dim=-2)
    mask = causal_mask(T, S + T, device=q.device)  # (T, S + T): new query i sees keys <= S + i
    out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)  # (B, nh, T, hs)
    return out, k_all, v_all


class KVCache:
    """Keys and values of every position seen so far, one (B, n_kv, S, hs) pair per layer.

    Each forward pass appends its T new positions to every layer (`update`), so `length` grows by T:
    by exactly one per generated token. A cache that never grows is silently unused.
    """

    def __init__(self, n_layers: int = 0):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, n_kv, T, hs) to layer `layer`; return all its keys and values (B, n_kv, S, hs)."""
        while len(self.keys) <= layer:  # layers are added on first use
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=-2)  # (B, n_kv, S_old + T, hs)
            v = torch.cat([self.values[layer], v], dim=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def layer_lengths(self) -> list[int]:
        """Cached positions per layer (all equal after a complete forward pass)."""
        return [0 if k is None else k.shape[-2] for k in self.keys]

    @property
    def length(self) -> int:
        """Cached positions (of the first layer; every layer has the same after a forward pass)."""
        return self.layer_lengths()[0] if self.keys else 0

    def nbytes(self) -> int:
        """Memory held by the cache in bytes."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------
def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch token lists by padding on the LEFT: (input_ids, attention_mask), both (B, T_max).

    Left, so that every row's last position is a real token and the next token goes right after it.
    """
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), T, dtype=torch.long)
    for b, s in enumerate(sequences):
        ids[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[b, T - len(s):] = 1
    return ids, mask


@torch.no_grad()
def generate(model: Callable[..., torch.Tensor], input_ids: torch.Tensor, max_new_tokens: int, *,
             attention_mask: torch.Tensor | None = None, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, use_cache: bool = True, eos_token_id: int | None = None,
             pad_token_id: int | None = None, generator: torch.Generator | None = None,
             max_len: int | None = None) -> torch.Tensor:
    """Extend input_ids (B, T) by up to max_new_tokens tokens; return (B, T + n).

    Greedy when temperature == 0. With `use_cache` the prompt goes through the model once and every
    later step feeds only the newest token; without it every step re-reads the whole sequence.
    Rows that produced `eos_token_id` continue with `pad_token_id` (default: eos); generation stops
    when every row has finished. attention_mask (B, T): 1 on real tokens, 0 on LEFT padding.
    max_len: the model's context; default `model.config.max_seq_len` when the model has one.
    """
    B, T = input_ids.shape
    max_len = max_len or getattr(getattr(model, "config", None), "max_seq_len", None)
    if max_len is not None and T + max_new_tokens > max_len:
        raise ValueError(f"the prompt has {T} tokens and {max_new_tokens} new ones were asked for, but the model's "
                         f"context is {max_len} tokens: shorten the prompt or ask for fewer tokens")
    pad = eos_token_id if pad_token_id is None else pad_token_id
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    padded = attention_mask is not None and not bool(mask.all())
    cache = KVCache() if use_cache else None
    seq, step_in = input_ids, input_ids  # step_in: what the model reads this step
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = model(step_in, cache=cache, attention_mask=mask if padded else None, last_only=True)  # (B, 1, V)
        next_id = sample_next(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator)  # (B,)
        if eos_token_id is not None:
            next_id = torch.where(finished, torch.full_like(next_id, pad), next_id)
            finished |= next_id == eos_token_id
        seq = torch.cat([seq, next_id[:, None]], dim=1)  # (B, T + i + 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_in = next_id[:, None] if use_cache else seq
        if eos_token_id is not None and bool(finished.all()):
            break
    return seq


def pick_decode_threads(model: torch.nn.Module, input_ids: torch.Tensor, steps: int = 4) -> int:
    """On a CPU, time a few cached greedy steps with 1 thread and with every core; keep the faster (returned).

    Decoding one sequence is a chain of small matrix-vector products limited by memory reads, so extra
    threads gain little, and on a busy machine they wait for each other and can make it several times
    slower. Sets `torch.set_num_threads` for everything that follows (also `transformers`). No-op on GPU.
    """
    return pick_cpu_threads(lambda: generate(model, input_ids, steps), device=next(model.parameters()).device)
