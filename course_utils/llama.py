"""Week 4: a Llama-style decoder, small enough to read in one sitting, that runs SmolLM2-135M's weights.

Reading order: config -> grouped-query attention (Ainslie et al. 2023) with rotary positions (Su et al.
2021, built in week 3) and a KV cache -> a pre-norm block (RMSNorm, Zhang & Sennrich 2019; SwiGLU,
Shazeer 2020; both from `course_utils.transformer`) -> the model with tied input/output embeddings
(Touvron et al. 2023) -> loading a Hugging Face checkpoint by mapping state-dict keys.

Shape legend: B batch, T new positions, S all positions (cached + new), C model width, nh query heads,
nkv key/value heads, hs head size, V vocabulary. Mask convention (week 3): True where a query MAY attend.
transformers' `modeling_llama.py` adds RoPE scaling variants, attention backends, tensor parallelism
and more cache types; this file keeps only what SmolLM2 needs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import apply_rope, causal_mask, rope_cos_sin
from .generate import KVCache
from .transformer import RMSNorm, SwiGLU


@dataclass
class LlamaConfig:
    """Sizes of a Llama-style model; the defaults are SmolLM2-135M's."""

    vocab_size: int = 49152  # tokens in the vocabulary (V)
    dim: int = 576  # model width (C)
    n_layers: int = 30  # transformer blocks
    n_heads: int = 9  # query heads (nh)
    n_kv_heads: int = 3  # key/value heads (nkv); nh / nkv query heads share each one (GQA)
    hidden_dim: int = 1536  # inner width of the SwiGLU feed-forward
    max_seq_len: int = 8192  # context length: the most positions one sequence may have
    rope_base: float = 100000.0  # RoPE's base (theta); larger = slower-turning pairs, longer context
    norm_eps: float = 1e-5  # RMSNorm's epsilon
    tie_embeddings: bool = True  # the output layer reuses the input embedding matrix

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def smollm2_135m(cls) -> "LlamaConfig":
        """HuggingFaceTB/SmolLM2-135M(-Instruct)."""
        return cls()

    @classmethod
    def tiny(cls) -> "LlamaConfig":
        """A random toy model for tests and experiments (about 0.1M parameters)."""
        return cls(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=128,
                   rope_base=10000.0)

    @classmethod
    def from_hf_config(cls, hf: Any) -> "LlamaConfig":
        """Read a transformers `LlamaConfig`; refuses features this file leaves out (biases, RoPE scaling)."""
        rope_params = getattr(hf, "rope_parameters", None) or {}
        base = rope_params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        unsupported = [name for name, bad in [
            ("attention_bias", getattr(hf, "attention_bias", False)), ("mlp_bias", getattr(hf, "mlp_bias", False)),
            ("rope scaling", rope_params.get("rope_type", "default") != "default"),
            ("head_dim != hidden_size / num_attention_heads",
             getattr(hf, "head_dim", None) not in (None, hf.hidden_size // hf.num_attention_heads)),
            ("hidden_act != silu", getattr(hf, "hidden_act", "silu") != "silu")] if bad]
        if unsupported:
            raise ValueError(f"this Llama implementation does not support: {', '.join(unsupported)}")
        return cls(vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers,
                   n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
                   hidden_dim=hf.intermediate_size, max_seq_len=hf.max_position_embeddings, rope_base=float(base),
                   norm_eps=hf.rms_norm_eps, tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)))


# ----------------------------------------------------------------------------------------------
# Grouped-query attention
# ----------------------------------------------------------------------------------------------
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, S, hs) -> (B, nkv * n_rep, S, hs): query head h reads key/value head h // n_rep."""
    B, nkv, S, hs = x.shape
    return x[:, :, None].expand(B, nkv, n_rep, S, hs).reshape(B, nkv * n_rep, S, hs)  # each kv head n_rep times, in a row


class GroupedQueryAttention(nn.Module):
    """Multi-head attention where groups of nh / nkv query heads share one key and one value head.

    Fewer key/value heads make the KV cache nh / nkv times smaller (3x for SmolLM2) at little cost in quality.
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        assert cfg.n_heads % cfg.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        self.nh, self.nkv, self.hs = cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        self.q_proj = nn.Linear(cfg.dim, self.nh * self.hs, bias=False)
        self.k_proj = nn.Linear(cfg.dim, self.nkv * self.hs, bias=False)
        self.v_proj = nn.Linear(cfg.dim, self.nkv * self.hs, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hs, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, *, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0, return_weights: bool = False):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # rotate by each token's position
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hs): past positions + these T
        weights = None
        if return_weights:  # the explicit path, for looking at the weights
            n_rep = self.nh // self.nkv
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, nh, S, hs)
            if mask is None and T > 1:
                mask = causal_mask(T, k.shape[-2], device=x.device)
            scores = q @ k.transpose(-2, -1) / self.hs ** 0.5  # (B, nh, T, S)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores, dim=-1)
            out = weights @ v  # (B, nh, T, hs)
        else:  # the fused kernel; enable_gqa does repeat_kv's job without copying the keys and values
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                                 enable_gqa=True)  # (B, nh, T, hs)
        out = self.o_proj(out.transpose(1, 2).reshape(B, T, self.nh * self.hs))  # (B, T, C)
        return (out, weights) if return_weights else out


# ----------------------------------------------------------------------------------------------
# Block and model
# ----------------------------------------------------------------------------------------------
class LlamaBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = GroupedQueryAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.hidden_dim)

    def forward(self, x: torch.Tensor, *, return_weights: bool = False, **attn_kwargs):
        a = self.attn(self.attn_norm(x), return_weights=return_weights, **attn_kwargs)
        a, weights = a if return_weights else (a, None)
        x = x + a  # (B, T, C)
        x = x + self.mlp(self.mlp_norm(x))
        return (x, weights) if return_weights else x


class Llama(nn.Module):
    """Token embedding -> n_layers blocks -> final RMSNorm -> logits (tied to the embedding by default)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one (V, C) matrix reads tokens in and scores them out
        cos, sin = rope_cos_sin(torch.arange(cfg.max_seq_len), cfg.head_size, cfg.rope_base)  # (max_seq_len, hs)
        self.register_buffer("rope_cos", cos, persistent=False)  # a table, not a weight: not in state_dict
        self.register_buffer("rope_sin", sin, persistent=False)

    def _positions(self, B: int, T: int, past: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T) position of each new token; with left padding a row's first real token is position 0."""
        if attention_mask is None:
            return torch.arange(past, past + T, device=self.rope_cos.device).expand(B, T)
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)

    def _mask(self, T: int, S: int, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Bool (B, 1, T, S) or (T, S) mask, or None for the plain causal case (T == S) / a single new token."""
        if attention_mask is None:
            return None if T == 1 or T == S else causal_mask(T, S, device=self.rope_cos.device)
        mask = causal_mask(T, S, device=attention_mask.device) & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
        return mask | ~mask.any(dim=-1, keepdim=True)  # padding queries see everything: unused, but no NaN

    def forward(self, idx: torch.Tensor, *, cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
                last_only: bool = False, return_internals: bool = False):
        """Logits (B, T, V) for token ids idx (B, T), or (B, 1, V) with `last_only`.

        cache: a KVCache holding the earlier positions (it grows by T). attention_mask (B, S): 1 on real
        tokens, 0 on left padding, over cached + new positions. `return_internals` also returns the
        residual stream after every block ("hidden", n_layers + 1 of (B, T, C)) and the attention
        weights ("attn", n_layers of (B, nh, T, S)).
        """
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + T} positions ({past} cached + {T} new) is longer than the "
                             f"model's context of {self.config.max_seq_len}: truncate the prompt")
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must be (B, cached + new) = {(B, past + T)}, got {tuple(attention_mask.shape)}")
        pos = self._positions(B, T, past, attention_mask)  # (B, T)
        cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]  # (B, 1, T, hs): same for every head
        mask = self._mask(T, past + T, attention_mask)
        x = self.tok_emb(idx)  # (B, T, C)
        hidden, attn = [x], []
        for i, block in enumerate(self.blocks):
            x = block(x, cos=cos, sin=sin, mask=mask, cache=cache, layer=i, return_weights=return_internals)
            if return_internals:
                x, w = x
                hidden.append(x)
                attn.append(w)
        x = self.norm(x[:, -1:] if last_only else x)
        logits = self.lm_head(x)  # (B, T, V)
        return (logits, {"hidden": hidden, "attn": attn}) if return_internals else logits

    # ------------------------------------------------------------------------------------------
    # Loading Hugging Face weights
    # ------------------------------------------------------------------------------------------
    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> "Llama":
        """Copy a transformers LlamaForCausalLM state dict into this model, renaming keys with `HF_KEY_MAP`.

        Raises KeyError listing every missing and unexpected key, and ValueError on a shape mismatch.
        """
        renamed = {hf_to_ours(k): v for k, v in state_dict.items()}
        ours = self.state_dict()
        optional = {"lm_head.weight"} if self.config.tie_embeddings else set()  # tied: the embedding is enough
        missing = sorted(k for k in ours if k not in renamed and k not in optional)
        unexpected = sorted(orig for orig, k in zip(state_dict, renamed) if k not in ours)
        if missing or unexpected:
            raise KeyError(f"the checkpoint does not fit this model. missing keys ({len(missing)}): "
                           f"{missing[:8]}{' ...' if len(missing) > 8 else ''}; unexpected keys ({len(unexpected)}): "
                           f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
                 for k, v in renamed.items() if v.shape != ours[k].shape]
        if wrong:
            raise ValueError("shape mismatch: " + "; ".join(wrong[:5]))
        with torch.no_grad():
            for k, v in renamed.items():
                ours[k].copy_(v)
        return self

    @torch.no_grad()
    def use_decoding_layout(self) -> "Llama":
        """Store every weight matrix transposed in memory: same shapes and values, swapped strides.

        Decoding multiplies ONE row vector by each matrix, which is limited by how fast the weights are
        read. nn.Linear keeps W as (out, in) rows; CPU BLAS (MKL) computes x @ W^T about 1.4x faster
        when W^T is the contiguous one. A layout choice, not new arithmetic; GPUs do not need it.
        """
        for p in self.parameters():
            if p.dim() == 2:
                p.data = p.data.t().contiguous().t()  # (out, in) shape, column-major storage
        return self

    @classmethod
    def from_hf(cls, hf_model: nn.Module, *, decoding_layout: bool = True) -> "Llama":
        """Our model with the config and weights of a transformers LlamaForCausalLM, in eval mode."""
        model = cls(LlamaConfig.from_hf_config(hf_model.config))
        first = next(hf_model.parameters())
        model.to(dtype=first.dtype, device=first.device)
        model.load_hf_state_dict(hf_model.state_dict()).eval()
        return model.use_decoding_layout() if decoding_layout else model


# transformers name (regex) -> our name; the layer index is kept
HF_KEY_MAP = [
    (r"model\.embed_tokens\.weight", "tok_emb.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", r"blocks.\1.attn.\2_proj.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"blocks.\1.mlp.w_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"blocks.\1.mlp.w_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"blocks.\1.mlp.w_down.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blocks.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blocks.\1.mlp_norm.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]


def hf_to_ours(key: str) -> str:
    """Our state-dict name for a transformers Llama key (unchanged when no rule matches)."""
    for pattern, replacement in HF_KEY_MAP:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return key


def load_smollm2_from_scratch(dtype: torch.dtype = torch.float32):
    """(our Llama, the transformers model, tokenizer) for SmolLM2-135M-Instruct, from the course cache."""
    from .data import load_smollm2

    hf_model, tokenizer = load_smollm2(dtype=dtype)
    hf_model.eval()
    return Llama.from_hf(hf_model), hf_model, tokenizer
