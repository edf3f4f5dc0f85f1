"""Week 4: the three Transformer families, built from the same parts and contrasted by mask and objective.

- decoder-only (GPT, Llama, Qwen): causal self-attention, predict the next token (`transformer.GPT`);
- encoder-only (BERT, Devlin et al. 2019): bidirectional self-attention, predict masked tokens (`MaskedLM`);
- encoder-decoder (the original Transformer, T5, BART): a bidirectional encoder reads the source, a
  causal decoder writes the target and reads the encoder through cross-attention (`EncoderDecoder`).

All three reuse week 3's `MultiHeadAttention` and the norms and feed-forward layers of `transformer`.
Masks follow week 3's convention: True where a query may attend to a key.
Shape legend: B batch, S source positions, T (target) positions, C width, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attention as attn
from .transformer import GPT, CausalSelfAttention, GPTConfig, make_mlp, make_norm

IGNORE = -100  # target id that cross_entropy skips (positions that are not predicted)


# ----------------------------------------------------------------------------------------------
# Encoder-only: bidirectional self-attention and a masked-token objective
# ----------------------------------------------------------------------------------------------
class EncoderBlock(nn.Module):
    """A pre-norm block whose attention sees every (non-padding) position, left and right."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm_1, self.norm_2 = make_norm(cfg), make_norm(cfg)
        self.attn = attn.MultiHeadAttention(cfg.n_embd, cfg.n_head, bias=cfg.bias, dropout=cfg.dropout,
                                            fused=cfg.fused_attention)
        self.mlp = make_mlp(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm_1(x), mask=mask))  # (B, S, C), no causal mask
        return x + self.drop(self.mlp(self.norm_2(x)))


class Encoder(nn.Module):
    """Token and position embeddings, then bidirectional blocks: ids (B, S) -> contextual vectors (B, S, C)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList([EncoderBlock(cfg) for _ in range(cfg.n_layer)])
        self.norm_f = make_norm(cfg)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        S = ids.shape[1]
        if S > self.config.block_size:
            raise ValueError(f"sequence length {S} is longer than the encoder's context "
                             f"(block_size {self.config.block_size})")
        mask = None if lengths is None else attn.padding_mask(lengths, S)[:, None, None, :]  # (B, 1, 1, S)
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(S, device=ids.device))  # (B, S, C)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm_f(x)


class MaskedLM(nn.Module):
    """BERT-style masked language model: an encoder and an output layer tied to its token embedding.

    The vocabulary has one extra id, `mask_id` = vocab_size - 1, for the [MASK] token.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.encoder.tok_emb.weight
        self.apply(GPT._init_weights)

    @property
    def mask_id(self) -> int:
        return self.config.vocab_size - 1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.encoder(ids))  # (B, S, V)


def mask_tokens(ids: torch.Tensor, mask_id: int, n_real: int, *, p: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption: choose each position with probability p; of those, 80% become [MASK], 10% a random
    token (one of the n_real ordinary ids), 10% stay. Returns (inputs, targets) with targets IGNORE elsewhere."""
    u = torch.rand(ids.shape, generator=generator)  # one draw decides whether and how a position is corrupted
    chosen = u < p
    targets = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    inputs = ids.clone()
    inputs[u < 0.8 * p] = mask_id
    randomised = (u >= 0.8 * p) & (u < 0.9 * p)
    inputs[randomised] = torch.randint(n_real, (int(randomised.sum()),), generator=generator)
    return inputs, targets


def masked_lm_loss(model: MaskedLM, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the chosen positions only (the others have target IGNORE)."""
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def masked_accuracy(model: MaskedLM, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of chosen positions whose original token is the model's top prediction."""
    model.eval()
    pred = model(inputs).argmax(-1)  # (B, S)
    model.train()
    chosen = targets != IGNORE
    return (pred[chosen] == targets[chosen]).float().mean().item()


# ----------------------------------------------------------------------------------------------
# Encoder-decoder: a causal decoder that reads the encoder through cross-attention
# ----------------------------------------------------------------------------------------------
class DecoderBlock(nn.Module):
    """Causal self-attention over the target so far, cross-attention to the source, then the MLP."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm_1, self.norm_2, self.norm_3 = make_norm(cfg), make_norm(cfg), make_norm(cfg)
        self.self_attn = CausalSelfAttention(cfg.n_embd, cfg.n_head, bias=cfg.bias, dropout=cfg.dropout,
                                             fused=cfg.fused_attention)
        self.cross_attn = attn.MultiHeadAttention(cfg.n_embd, cfg.n_head, bias=cfg.bias, dropout=cfg.dropout,
                                                  fused=cfg.fused_attention)
        self.mlp = make_mlp(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, y: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = y + self.drop(self.self_attn(self.norm_1(y)))  # (B, T, C): the target's own past
        y = y + self.drop(self.cross_attn(self.norm_2(y), context=memory, mask=memory_mask))  # queries T, keys S
        return y + self.drop(self.mlp(self.norm_3(y)))


class EncoderDecoder(nn.Module):
    """Source ids (B, S) and target-so-far ids (B, T) -> next target-token logits (B, T, V); one shared vocabulary."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)  # the decoder's positions
        self.blocks = nn.ModuleList([DecoderBlock(cfg) for _ in range(cfg.n_layer)])
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.encoder.tok_emb.weight  # one table for source, target and output
        self.apply(GPT._init_weights)

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_lengths: torch.Tensor | None = None) -> torch.Tensor:
        T = tgt.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"target length {T} is longer than the decoder's context (block_size {self.config.block_size})")
        mask = None if src_lengths is None else attn.padding_mask(src_lengths, memory.shape[1])[:, None, None, :]
        y = self.encoder.tok_emb(tgt) + self.pos_emb(torch.arange(T, device=tgt.device))  # (B, T, C)
        for block in self.blocks:
            y = block(y, memory, mask)
        return self.lm_head(self.norm_f(y))  # (B, T, V)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(tgt, self.encoder(src, src_lengths), src_lengths)

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, src_lengths: torch.Tensor, *, bos: int, eos: int, max_len: int) -> torch.Tensor:
        """Greedy decoding: encode once, then append the most likely token until every row wrote EOS."""
        was_training = self.training
        self.eval()
        memory = self.encoder(src, src_lengths)
        out = torch.full((src.shape[0], 1), bos, dtype=torch.long, device=src.device)
        for _ in range(max_len):
            nxt = self.decode(out, memory, src_lengths)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            out = torch.cat([out, nxt], dim=1)
            if (out == eos).any(dim=1).all():
                break
        self.train(was_training)
        return out[:, 1:]


def seq2seq_loss(model: EncoderDecoder, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor,
                 tgt_out: torch.Tensor, pad: int) -> torch.Tensor:
    """Teacher-forced cross-entropy of the target tokens (padding skipped)."""
    logits = model(src, tgt_in, src_lengths)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1), ignore_index=pad)

