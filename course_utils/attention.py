"""Week 3: attention, from a decoder looking back at its encoder to multi-head self-attention.

Reading order: scores (additive, Bahdanau et al. 2015; dot and general, Luong et al. 2015) -> weights
(a softmax over keys, with masks) -> scaled dot-product attention (Vaswani et al. 2017, eq. 1), with
attention dropout -> causal and padding masks -> heads (split, merge) -> multi-head attention with an
output projection, as self-attention or cross-attention -> positions (sinusoidal, learned, rotary: Su
et al. 2021) -> the cost of attention in time and measured memory.

Mask convention everywhere in this module: a boolean tensor, True where a query MAY attend to a key
(the same as `F.scaled_dot_product_attention`; note that `nn.MultiheadAttention` uses the opposite).
Shape legend: B batch, T query positions, S key positions, C model width, nh heads, hs head size.
Production kernels (FlashAttention) fuse these steps and never store the (T, S) weight matrix.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Scores and weights
# ----------------------------------------------------------------------------------------------
def additive_score(query: torch.Tensor, keys: torch.Tensor, W_q: torch.Tensor, W_k: torch.Tensor,
                   v: torch.Tensor) -> torch.Tensor:
    """Bahdanau's additive score e_s = v . tanh(q W_q + k_s W_k) for every key s.

    Args:
        query: (B, Dq) one query (e.g. the decoder state) per example.
        keys: (B, S, Dk) the keys (e.g. the encoder states).
        W_q: (Dq, A), W_k: (Dk, A) projections into a shared hidden layer of width A; v: (A,).
    Returns:
        scores (B, S).
    """
    hidden = torch.tanh((query @ W_q)[:, None, :] + keys @ W_k)  # (B, 1, A) + (B, S, A) -> (B, S, A)
    return hidden @ v  # (B, S)


def dot_product_score(query: torch.Tensor, keys: torch.Tensor, *, scale: bool = True) -> torch.Tensor:
    """The dot-product score q . k_s, divided by sqrt(d) when `scale` (query (..., d), keys (..., S, d)).

    With scale=False this is Luong's "dot" score; with scale=True, the scaled score of the Transformer.
    """
    scores = torch.einsum("...d,...sd->...s", query, keys)  # (..., S)
    return scores / math.sqrt(query.shape[-1]) if scale else scores


def general_score(query: torch.Tensor, keys: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Luong's "general" score q^T W k_s: query (..., Dq), keys (..., S, Dk), W (Dq, Dk) -> (..., S).

    Unlike "dot", query and keys may have different widths, and W learns which directions to compare.
    """
    return dot_product_score(query @ W, keys, scale=False)  # (q W) . k_s


def attention_weights(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the key axis (the last one); masked-out keys (mask False) get exactly zero weight.

    Masked scores become -inf, so exp(-inf) = 0; setting them to 0 instead would still give those keys
    weight e^0. Each row's own largest score is subtracted before exp (it cancels in the ratio): exp
    then never overflows, and a row of small scores is not flushed to 0 by another row's large ones.
    Every row needs at least one key it may attend to.
    """
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))  # (..., S), each row's max -> e^0 = 1
    return e / e.sum(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# Scaled dot-product attention and masks
# ----------------------------------------------------------------------------------------------
def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                                 *, return_weights: bool = False, dropout_p: float = 0.0,
                                 generator: torch.Generator | None = None):
    """softmax(q k^T / sqrt(d_k)) v  (Vaswani et al. 2017, eq. 1), with optional attention dropout.

    Args:
        q: (..., T, d_k) queries; k: (..., S, d_k) keys; v: (..., S, d_v) values.
        mask: optional bool, broadcastable to (..., T, S); True where a query may attend.
        dropout_p: attention dropout (training only; pass 0.0 in evaluation): each weight is zeroed with
            probability p and the survivors are scaled by 1 / (1 - p), so a row sums to 1 on average.
    Returns:
        (..., T, d_v), and the weights (..., T, S) when `return_weights` (after dropout, if any).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # `attention_weights`, as one library kernel (faster, less memory)
    if dropout_p > 0:
        keep = torch.rand(weights.shape, generator=generator, device=weights.device) >= dropout_p
        weights = weights * keep / (1 - dropout_p)
    out = weights @ v  # (..., T, d_v)
    return (out, weights) if return_weights else out


def causal_mask(T: int, S: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, S) bool, True where query i may attend to key j: j <= i + (S - T).

    With S = T (the default) that is the lower triangle incl. the diagonal. With S > T the T queries
    are the LAST T positions of S keys (new tokens after S - T cached ones, as with a KV cache).
    """
    S = T if S is None else S
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B, max_len) bool, True on the first lengths[b] positions (real tokens), False on padding.

    For (B, nh, T, S) scores, broadcast it as `mask[:, None, None, :]`.
    """
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


# ----------------------------------------------------------------------------------------------
# Multi-head attention
# ----------------------------------------------------------------------------------------------
def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, C) -> (B, nh, T, hs): each head sees its own hs = C / nh channels."""
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, T, nh, hs) -> (B, nh, T, hs)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, hs) -> (B, T, C): the inverse of `split_heads`."""
    B, nh, T, hs = x.shape
    return x.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, nh, hs) -> (B, T, C)


def multi_head_attention(x: torch.Tensor, in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor,
                         out_proj_weight: torch.Tensor, out_proj_bias: torch.Tensor, n_head: int,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head self-attention of x (B, T, C) with `nn.MultiheadAttention`'s parameters.

    in_proj_weight (3C, C) stacks W_q, W_k, W_v (rows), in_proj_bias (3C,); out_proj (C, C), (C,).
    mask: bool broadcastable to (B, nh, T, T), True where a query may attend.
    """
    q, k, v = F.linear(x, in_proj_weight, in_proj_bias).chunk(3, dim=-1)  # 3 x (B, T, C)
    q, k, v = (split_heads(t, n_head) for t in (q, k, v))  # (B, nh, T, hs)
    out = scaled_dot_product_attention(q, k, v, mask)  # (B, nh, T, hs)
    return F.linear(merge_heads(out), out_proj_weight, out_proj_bias)  # (B, T, C)


class MultiHeadAttention(nn.Module):
    """Multi-head attention: project to queries, keys, values; attend in nh heads; project back.

    Self-attention with `mha(x, mask=...)`: queries, keys and values all come from x. Cross-attention
    with `mha(x, context=enc, mask=...)`: queries from x (a decoder), keys and values from `context`
    (an encoder), as the seq2seq decoder of notebook 02 did. `dropout` is attention dropout on the
    weights while training. `fused=True` calls `F.scaled_dot_product_attention` (a fused kernel);
    False uses ours.
    """

    def __init__(self, d_model: int, n_head: int, *, bias: bool = True, dropout: float = 0.0, fused: bool = True):
        super().__init__()
        assert d_model % n_head == 0, "d_model must be divisible by n_head"
        self.n_head, self.dropout, self.fused = n_head, dropout, fused
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor, *, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                return_weights: bool = False):
        context = x if context is None else context
        q = split_heads(self.q_proj(x), self.n_head)  # (B, nh, T, hs)
        k = split_heads(self.k_proj(context), self.n_head)  # (B, nh, S, hs)
        v = split_heads(self.v_proj(context), self.n_head)  # (B, nh, S, hs)
        weights = None
        p = self.dropout if self.training else 0.0  # attention dropout: only while training
        if self.fused and not return_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            out, weights = scaled_dot_product_attention(q, k, v, mask, return_weights=True, dropout_p=p)
        out = self.o_proj(merge_heads(out))  # (B, T, C)
        return (out, weights) if return_weights else out

    @torch.no_grad()
    def load_from_torch(self, mha: nn.MultiheadAttention) -> "MultiHeadAttention":
        """Copy the weights of a `torch.nn.MultiheadAttention` (in_proj_weight rows are q, k, v)."""
        for proj, w in zip((self.q_proj, self.k_proj, self.v_proj), mha.in_proj_weight.chunk(3, dim=0)):
            proj.weight.copy_(w)
        if mha.in_proj_bias is not None:
            for proj, b in zip((self.q_proj, self.k_proj, self.v_proj), mha.in_proj_bias.chunk(3)):
                proj.bias.copy_(b)
        self.o_proj.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            self.o_proj.bias.copy_(mha.out_proj.bias)
        return self


# ----------------------------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------------------------
def sinusoidal_positions(T: int, d: int, base: float = 10000.0) -> torch.Tensor:
    """(T, d): PE[t, 2i] = sin(t / base^(2i/d)), PE[t, 2i+1] = cos(t / base^(2i/d)) (Vaswani et al. 2017, 3.5)."""
    pos = torch.arange(T, dtype=torch.float32)[:, None]  # (T, 1)
    freq = base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)  # (d/2,)
    pe = torch.zeros(T, d)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: d // 2])
    return pe


class LearnedPositions(nn.Module):
    """One trainable vector per position (GPT-2): x + P[0:T]. Cannot go beyond `max_len`."""

    def __init__(self, max_len: int, d: int):
        super().__init__()
        self.table = nn.Embedding(max_len, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[-2]
        return x + self.table(torch.arange(T, device=x.device))  # (..., T, d) + (T, d)


def rope_cos_sin(positions: torch.Tensor, head_size: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, hs) for rotary embeddings, in Llama's layout (dimension i pairs with i + hs/2)."""
    # 1 / base^(2i/hs), computed exactly as transformers' Llama does (same float32 rounding, so logits match bit for bit)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32, device=positions.device) / head_size))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, hs/2): theta_i * m
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last axis: a 90-degree turn of every pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+hs/2}) of x (..., T, hs) by the angle of its position."""
    return x * cos + rotate_half(x) * sin


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021) of x (..., T, hs) at integer `positions` (T,).

    Pair (x_i, x_{i+hs/2}) is rotated by angle m * base^(-2i/hs) at position m, so that
    rope(q, m) . rope(k, n) depends only on m - n.
    """
    cos, sin = rope_cos_sin(positions, x.shape[-1], base)
    return apply_rope(x, cos.to(x.dtype), sin.to(x.dtype))


# ----------------------------------------------------------------------------------------------
# Cost: time and memory against sequence length
# ----------------------------------------------------------------------------------------------
def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention that materialises the full (B, nh, T, S) score and weight tensors."""
    return scaled_dot_product_attention(q, k, v, mask)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
                    is_causal: bool = False) -> torch.Tensor:
    """`F.scaled_dot_product_attention`: a fused kernel where one is available (FlashAttention on GPU,
    a blocked kernel on CPU) that computes the output block by block without storing all T x S weights."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


def time_call(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best-of-`repeats` wall time of fn() in seconds (one warm-up call first)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Bytes allocated at the peak of fn() above what was allocated before the call (measured, not computed).

    On CUDA from `torch.cuda.max_memory_allocated`; on CPU from torch.profiler's record of every
    allocation and free (`profile_memory=True`), summed in time order. Both count the output tensor.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:  # + on allocation, - on free
        running += nbytes
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C++ start/stop lines (written to file descriptor 2, not to sys.stderr)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def attention_cost(lengths: Sequence[int], *, batch: int = 1, n_head: int = 4, head_size: int = 64,
                   causal: bool = True, repeats: int = 3, device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Time (s) and measured peak memory (bytes) of attention per length T, three ways, like for like:

    - "naive": ours, which stores the (B, nh, T, T) scores and weights;
    - "fused": `F.scaled_dot_product_attention` given the same explicit mask: the same work, fused;
    - "fused_causal": the fused kernel with `is_causal=True` (only with causal=True): it builds no mask
      and may skip blocks above the diagonal, so it does less work, not the same work.
    "weights_bytes" is the size of one (B, nh, T, T) float weight tensor, for reference.
    """
    res: dict[str, list[float]] = {"T": [], "weights_bytes": []}
    for T in lengths:
        q, k, v = (torch.randn(batch, n_head, T, head_size, device=device) for _ in range(3))
        mask = causal_mask(T, device=device) if causal else None
        calls = {"naive": lambda: naive_attention(q, k, v, mask),
                 "fused": lambda: fused_attention(q, k, v, mask)}
        if causal:
            calls["fused_causal"] = lambda: fused_attention(q, k, v, is_causal=True)
        res["T"].append(T)
        res["weights_bytes"].append(batch * n_head * T * T * q.element_size())
        for name, call in calls.items():
            res.setdefault(f"{name}_s", []).append(time_call(call, repeats))
            res.setdefault(f"{name}_peak_bytes", []).append(peak_memory(call, device))
    return res
