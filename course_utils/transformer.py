"""Week 4: the Transformer block and a GPT built from it (Radford et al. 2018, 2019).

Reading order: normalisation (LayerNorm, Ba et al. 2016; RMSNorm, Zhang & Sennrich 2019) -> the
feed-forward layer (GELU MLP; SwiGLU, Shazeer 2020) -> causal self-attention (week 3's multi-head
attention with the causal mask) -> a pre-norm residual block -> one config -> the GPT: token and
position embeddings, N blocks, a final norm and an output layer tied to the token embedding.

Shape legend: B batch, T positions, C width (n_embd), H hidden width of the feed-forward layer,
V vocabulary, nh heads, hs head size. Production GPTs add what this leaves out: a KV cache for
generation (notebook 05), fused kernels, tensor parallelism, mixed-precision-aware norms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attention as attn


# ----------------------------------------------------------------------------------------------
# Normalisation: keep the residual stream's scale under control
# ----------------------------------------------------------------------------------------------
class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis (Ba et al. 2016); var is biased."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x - x.mean(-1, keepdim=True)  # (..., C) centred
        var = xc.pow(2).mean(-1, keepdim=True)  # (..., 1), divided by C, not C - 1
        y = xc * torch.rsqrt(var + self.eps) * self.weight
        return y + self.bias if self.bias is not None else y


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019): LayerNorm without centring or bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


# ----------------------------------------------------------------------------------------------
# The feed-forward layer: the same small network applied to every position
# ----------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """GPT-2's feed-forward layer: Linear(C, H) -> GELU (tanh approximation) -> Linear(H, C)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # (..., C) -> (..., H) -> (..., C)


class SwiGLU(nn.Module):
    """Gated feed-forward layer (Shazeer 2020; Llama): w_down(silu(w_gate(x)) * w_up(x)), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))  # the gate decides, per channel, how much passes


# ----------------------------------------------------------------------------------------------
# Causal self-attention: week 3's multi-head attention, every position seeing only its past
# ----------------------------------------------------------------------------------------------
class CausalSelfAttention(attn.MultiHeadAttention):
    """Masked multi-head self-attention: position t attends to positions 0..t only.

    The parameters are week 3's (`q_proj`, `k_proj`, `v_proj`, `o_proj`). With `fused=False` the
    forward pass is week 3's explicit softmax(QK^T / sqrt(hs)) V with `causal_mask`; with `fused=True`
    the fused kernel builds the mask itself (`is_causal`), which is faster and never stores the weights.
    """

    def __init__(self, n_embd: int, n_head: int, *, bias: bool = True, dropout: float = 0.0, fused: bool = False):
        super().__init__(n_embd, n_head, bias=bias, dropout=dropout, fused=fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if not self.fused:
            return super().forward(x, mask=attn.causal_mask(T, device=x.device))
        q, k, v = (attn.split_heads(proj(x), self.n_head) for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,  # (B, nh, T, hs)
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(attn.merge_heads(y))  # (B, T, C)


# ----------------------------------------------------------------------------------------------
# One config for the whole model
# ----------------------------------------------------------------------------------------------
@dataclass
class GPTConfig:
    """Every size and switch of a GPT. Change one with `dataclasses.replace(cfg, n_layer=2)`."""

    vocab_size: int = 65  # token ids 0..V-1 (65 characters of Shakespeare; GPT-2's BPE has 50257)
    block_size: int = 256  # context length: the most positions the model reads at once
    n_layer: int = 6  # number of Transformer blocks stacked on the residual stream
    n_head: int = 6  # attention heads per block; n_embd must be divisible by it
    n_embd: int = 384  # width C of the residual stream (every token is a vector of this size)
    dropout: float = 0.0  # dropout on attention weights and on each residual branch (0 when data is plentiful)
    bias: bool = True  # biases in the linear layers and LayerNorms (GPT-2: True; Llama: False)
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama)
    mlp: str = "gelu"  # "gelu" (GPT-2's Linear-GELU-Linear) or "swiglu" (Llama's gated layer)
    mlp_hidden: int | None = None  # hidden width H; None: 4 C for gelu, 8/3 C rounded up to a multiple of 8 for swiglu
    tie_weights: bool = True  # the output layer reuses the token embedding matrix (Press & Wolf 2017)
    fused_attention: bool = True  # use the fused attention kernel; False: week 3's explicit softmax (slower)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.norm not in ("layernorm", "rmsnorm") or self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm' and mlp 'gelu' or 'swiglu'; got {self.norm!r}, "
                             f"{self.mlp!r}")

    @property
    def hidden(self) -> int:
        """The feed-forward hidden width H."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 4 * self.n_embd if self.mlp == "gelu" else 8 * math.ceil(8 * self.n_embd / 3 / 8)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def tiny(cls, vocab_size: int = 65) -> "GPTConfig":
        """2 layers of width 64, context 64: trains in seconds on a CPU (tests, smoke runs)."""
        return cls(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64)

    @classmethod
    def shakespeare_char(cls, vocab_size: int = 65) -> "GPTConfig":
        """nanoGPT's Shakespeare-char model: 6 layers, 6 heads, width 384, context 256, dropout 0.2 (10.7M)."""
        return cls(vocab_size=vocab_size, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2)

    @classmethod
    def gpt2(cls, vocab_size: int = 50257) -> "GPTConfig":
        """GPT-2 small: 12 layers, 12 heads, width 768, context 1024 (124M parameters)."""
        return cls(vocab_size=vocab_size, block_size=1024, n_layer=12, n_head=12, n_embd=768)


# ----------------------------------------------------------------------------------------------
# The block and the GPT
# ----------------------------------------------------------------------------------------------
def make_norm(cfg: GPTConfig) -> nn.Module:
    return LayerNorm(cfg.n_embd, bias=cfg.bias) if cfg.norm == "layernorm" else RMSNorm(cfg.n_embd)


def make_mlp(cfg: GPTConfig) -> nn.Module:
    return MLP(cfg.n_embd, cfg.hidden, bias=cfg.bias) if cfg.mlp == "gelu" else SwiGLU(cfg.n_embd, cfg.hidden)


class Block(nn.Module):
    """A pre-norm Transformer block: x + attention(norm(x)), then x + mlp(norm(x)) (GPT-2's order).

    Each branch reads a normalised copy of the residual stream and adds its result back, so the
    stream itself is never normalised and gradients flow straight down it.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg.n_embd, cfg.n_head, bias=cfg.bias, dropout=cfg.dropout,
                                        fused=cfg.fused_attention)
        self.norm_2 = make_norm(cfg)
        self.mlp = make_mlp(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm_1(x)))  # (B, T, C): positions talk to each other
        return x + self.drop(self.mlp(self.norm_2(x)))  # (B, T, C): each position thinks on its own


class GPT(nn.Module):
    """A decoder-only Transformer language model: token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)  # learned positions (GPT-2)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight  # one (V, C) matrix reads tokens in and writes them out
        self.apply(self._init_weights)
        # Scaled residual init (GPT-2): each of the 2 n_layer branches adds to the stream, so their output
        # layers start smaller and the stream's variance stays about constant with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "c_proj.weight", "w_down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} is longer than the model's context (block_size "
                             f"{self.config.block_size}); crop the input to its last {self.config.block_size} tokens")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C) + (T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        return self.lm_head(self.norm_f(x))  # (B, T, V)

    def num_params(self, *, non_embedding: bool = False) -> int:
        """Parameters (a tied matrix counted once); `non_embedding` leaves out both embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        return n

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample `max_new_tokens` tokens after idx (B, T), one at a time, reading at most block_size tokens back."""
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[:, -1, :] / temperature  # (B, V) at the last position
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
        self.train(was_training)
        return idx

    @classmethod
    @torch.no_grad()
    def from_hf_gpt2(cls, hf_model: nn.Module) -> "GPT":
        """Our GPT with the weights of a `transformers` GPT2LMHeadModel (GPT-2's Conv1D stores W transposed)."""
        hc = hf_model.config
        cfg = GPTConfig(vocab_size=hc.vocab_size, block_size=hc.n_positions, n_layer=hc.n_layer, n_head=hc.n_head,
                        n_embd=hc.n_embd, dropout=0.0)
        model = cls(cfg)
        t = hf_model.transformer
        model.tok_emb.weight.copy_(t.wte.weight)
        model.pos_emb.weight.copy_(t.wpe.weight)
        for ours, theirs in zip(model.blocks, t.h):
            for a, b in ((ours.norm_1, theirs.ln_1), (ours.norm_2, theirs.ln_2)):
                a.weight.copy_(b.weight)
                a.bias.copy_(b.bias)
            w_q, w_k, w_v = theirs.attn.c_attn.weight.t().chunk(3, dim=0)  # (3C, C) -> 3 x (C, C)
            b_q, b_k, b_v = theirs.attn.c_attn.bias.chunk(3)
            for proj, w, b in ((ours.attn.q_proj, w_q, b_q), (ours.attn.k_proj, w_k, b_k), (ours.attn.v_proj, w_v, b_v)):
                proj.weight.copy_(w)
                proj.bias.copy_(b)
            for a, b in ((ours.attn.o_proj, theirs.attn.c_proj), (ours.mlp.c_fc, theirs.mlp.c_fc),
                         (ours.mlp.c_proj, theirs.mlp.c_proj)):
                a.weight.copy_(b.weight.t())
                a.bias.copy_(b.bias)
        model.norm_f.weight.copy_(t.ln_f.weight)
        model.norm_f.bias.copy_(t.ln_f.bias)
        return model


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per token) of model(x) (B, T, V) against targets y (B, T)."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))  # (B*T, V) vs (B*T,)
