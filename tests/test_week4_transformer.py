"""Week 4 (notebooks 02-03): every check fails on plausible wrong answers; the Transformer parts, the GPT,
the accounting formulas, the three families and the pretraining loop match their references."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from course_utils import accounting as acc
from course_utils import attention as A
from course_utils import families as fam
from course_utils import optim as week1_optim
from course_utils import pretrain as P
from course_utils import transformer as T

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# 4.3 RMSNorm: wrong versions, correct alternatives, the placeholder the student notebook ships
# ----------------------------------------------------------------------------------------------
class _Norm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class RMSNormPlaceholder(_Norm):
    def forward(self, x):
        raise NotImplementedError("complete forward")


class RMSNormSubtractsMean(_Norm):  # LayerNorm's centring, kept by mistake
    def forward(self, x):
        xc = x - x.mean(-1, keepdim=True)
        return xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class RMSNormEpsOutsideSqrt(_Norm):
    def forward(self, x):
        return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.eps) * self.weight


class RMSNormWrongAxis(_Norm):  # mean over the positions instead of the channels
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + self.eps) * self.weight


class RMSNormNoSquare(_Norm):  # mean absolute value instead of the root mean square
    def forward(self, x):
        return x / (x.abs().mean(-1, keepdim=True) + self.eps) * self.weight


class RMSNormFloat32(_Norm):  # computes in float32 and forgets to cast back
    def forward(self, x):
        h = x.float()
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class RMSNormDetachedScale(_Norm):  # treats 1/rms as a constant: forward right, gradient wrong
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps).detach() * self.weight


class RMSNormIgnoresEpsArgument(_Norm):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class RMSNormSumOverDim(_Norm):
    def forward(self, x):  # a norm-style division (sum, not mean)
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + self.eps) * self.weight


class RMSNormDivides(_Norm):
    def forward(self, x):
        return x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + self.eps) * self.weight


class RMSNormLlamaStyle(_Norm):  # Llama: compute in float32, cast back to the input's dtype
    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RMSNormVectorNorm(_Norm):
    def forward(self, x):
        rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True) / math.sqrt(x.shape[-1])
        return x / torch.sqrt(rms ** 2 + self.eps) * self.weight


# ----------------------------------------------------------------------------------------------
# 4.4 SwiGLU
# ----------------------------------------------------------------------------------------------
class _FF(nn.Module):
    def __init__(self, dim, hidden, bias=False):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=bias)
        self.w_up = nn.Linear(dim, hidden, bias=bias)
        self.w_down = nn.Linear(hidden, dim, bias=bias)


class SwiGLUPlaceholder(_FF):
    def forward(self, x):
        raise NotImplementedError("complete forward")


class SwiGLUGatesUpBranch(_FF):  # SiLU on the wrong branch
    def forward(self, x):
        return self.w_down(self.w_gate(x) * F.silu(self.w_up(x)))


class SwiGLUSigmoid(_FF):  # GLU's sigmoid instead of SiLU
    def forward(self, x):
        return self.w_down(torch.sigmoid(self.w_gate(x)) * self.w_up(x))


class SwiGLUGelu(_FF):  # GEGLU, not SwiGLU
    def forward(self, x):
        return self.w_down(F.gelu(self.w_gate(x)) * self.w_up(x))


class SwiGLUActivationAfterProduct(_FF):
    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x) * self.w_up(x)))


class SwiGLUWithBias(_FF):  # biases the checked state dict does not have
    def __init__(self, dim, hidden):
        super().__init__(dim, hidden, bias=True)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class SwiGLUManualSilu(_FF):
    def forward(self, x):
        g = self.w_gate(x)
        return self.w_down(g * torch.sigmoid(g) * self.w_up(x))


class SwiGLUMatmul(_FF):
    def forward(self, x):
        hidden = F.silu(x @ self.w_gate.weight.T) * (x @ self.w_up.weight.T)  # (..., H)
        return F.linear(hidden, self.w_down.weight)


# ----------------------------------------------------------------------------------------------
# 4.5 causal self-attention
# ----------------------------------------------------------------------------------------------
class _Attn(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(n_embd, n_embd) for _ in range(4))

    def heads(self, x):
        B, T, C = x.shape
        return [p(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                for p in (self.q_proj, self.k_proj, self.v_proj)]

    def finish(self, y):
        B, nh, T, hs = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, T, nh * hs))

    def attend(self, x, *, diagonal=0, scale=None, axis=-1, upper=False):
        q, k, v = self.heads(x)
        T, hs = q.shape[-2], q.shape[-1]
        s = q @ k.transpose(-2, -1) / (math.sqrt(hs) if scale is None else scale)
        ones = torch.ones(T, T, dtype=torch.bool)
        mask = ones.triu(diagonal) if upper else ones.tril(diagonal)
        s = s.masked_fill(~mask, float("-inf"))
        return self.finish(torch.softmax(s, dim=axis) @ v)


class AttentionPlaceholder(_Attn):
    def forward(self, x):
        raise NotImplementedError("complete forward")


class AttentionMaskNoDiagonal(_Attn):  # a token may not see itself (row 0 sees nothing: NaN)
    def forward(self, x):
        return self.attend(x, diagonal=-1)


class AttentionMaskOneAhead(_Attn):  # off by one the other way: sees the next token
    def forward(self, x):
        return self.attend(x, diagonal=1)


class AttentionNoScale(_Attn):
    def forward(self, x):
        return self.attend(x, scale=1.0)


class AttentionScaleByWidth(_Attn):
    def forward(self, x):
        return self.attend(x, scale=math.sqrt(x.shape[-1]))


class AttentionSoftmaxOverQueries(_Attn):
    def forward(self, x):
        return self.attend(x, axis=-2)


class AttentionSeesTheFuture(_Attn):  # the upper triangle: the future instead of the past
    def forward(self, x):
        return self.attend(x, upper=True)


class AttentionHeadsMixed(_Attn):  # reshape straight to (B, nh, T, hs)
    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (p(x).reshape(B, self.n_head, T, C // self.n_head) for p in (self.q_proj, self.k_proj, self.v_proj))
        s = (q @ k.transpose(-2, -1) / math.sqrt(C // self.n_head)).masked_fill(~A.causal_mask(T), float("-inf"))
        return self.finish(torch.softmax(s, -1) @ v)


class AttentionEinsum(_Attn):
    def forward(self, x):
        q, k, v = self.heads(x)
        T = x.shape[1]
        s = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(q.shape[-1])
        s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1), float("-inf"))
        return self.finish(torch.einsum("bhts,bhsd->bhtd", s.softmax(-1), v))


class AttentionLoopOverHeads(_Attn):
    def forward(self, x):
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        outs = []
        for h in range(self.n_head):
            sl = slice(h * hs, (h + 1) * hs)
            s = q[..., sl] @ k[..., sl].transpose(1, 2) * hs ** -0.5  # (B, T, T)
            s = s.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf"))
            outs.append(F.softmax(s, dim=-1) @ v[..., sl])
        return self.o_proj(torch.cat(outs, dim=-1))


class AttentionFromWeek3(A.MultiHeadAttention):  # week 3's module, explicit softmax, with the causal mask
    def __init__(self, n_embd, n_head):
        super().__init__(n_embd, n_head, fused=False)

    def forward(self, x):
        return super().forward(x, mask=A.causal_mask(x.shape[1]))


# ----------------------------------------------------------------------------------------------
# 4.6 AdamW
# ----------------------------------------------------------------------------------------------
class _Adam(torch.optim.Optimizer):
    """A configurable AdamW to write wrong versions compactly; `variant` names the mistake."""

    variant = "correct"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.t = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.t += 1
        for group in self.param_groups:
            lr = self.defaults["lr"] if self.variant == "defaults_lr" else group["lr"]
            wd = self.defaults["weight_decay"] if self.variant == "defaults_wd" else group["weight_decay"]
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                st["step"] += 1
                t = self.t if self.variant == "global_step" else st["step"]
                g = p.grad + wd * p if self.variant == "coupled" else p.grad
                st["m"] = b1 * st["m"] + (1 - b1) * g
                st["v"] = b2 * st["v"] + (1 - b2) * g * g
                if self.variant == "no_bias_correction":
                    m_hat, v_hat = st["m"], st["v"]
                else:
                    m_hat, v_hat = st["m"] / (1 - b1 ** t), st["v"] / (1 - b2 ** t)
                denom = (v_hat + group["eps"]).sqrt() if self.variant == "eps_inside" else v_hat.sqrt() + group["eps"]
                if self.variant == "rebinds":
                    p = p * (1 - lr * wd) - lr * m_hat / denom  # noqa: PLW2901 - the mistake: p is only rebound
                    continue
                if self.variant != "coupled":
                    p.mul_(1 - lr * wd)
                p.sub_(lr * m_hat / denom)


def _adam_variant(name):
    return type(f"AdamW_{name}", (_Adam,), {"variant": name})


class AdamWPlaceholder(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def step(self, closure=None):
        raise NotImplementedError("complete step")


class AdamWFromTorch(torch.optim.AdamW):  # the library itself: reported, not accepted
    pass


class AdamWWithWeek1Step(torch.optim.Optimizer):
    """Week 1's adam_step (no decay) after shrinking the weight: the same update, written another way."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state.setdefault(p, {})
                st.setdefault("t", 0)
                st["t"] += 1
                m, v = st.get("m", torch.zeros_like(p)), st.get("v", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                new, st["m"], st["v"] = week1_optim.adam_step(p.clone(), p.grad, m, v, st["t"], lr=group["lr"],
                                                              betas=group["betas"], eps=group["eps"])
                p.copy_(new)


class AdamWPaperForm(torch.optim.Optimizer):
    """Loshchilov & Hutter's Algorithm 2: one update lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moments = {}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                t, m, v = self.moments.get(p, (0, 0.0, 0.0))
                t, m = t + 1, torch.lerp(torch.zeros_like(p) + m, p.grad, 1 - b1)
                v = b2 * v + (1 - b2) * p.grad.square()
                self.moments[p] = (t, m, v)
                update = (m / (1 - b1 ** t)) / (torch.sqrt(v / (1 - b2 ** t)) + group["eps"])
                p.sub_(group["lr"] * (update + group["weight_decay"] * p))


# ----------------------------------------------------------------------------------------------
# 4.7 warmup + cosine
# ----------------------------------------------------------------------------------------------
def lr_warmup_plus_one(step, *, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    return P.warmup_cosine_lr(step, max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup_steps, total_steps=total_steps)


def lr_warmup_over_warmup_plus_one(step, *, max_lr, min_lr, warmup_steps, total_steps):
    if step <= warmup_steps:
        return max_lr * step / (warmup_steps + 1)
    return P.warmup_cosine_lr(step, max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup_steps, total_steps=total_steps)


def lr_cosine_to_zero(step, *, max_lr, min_lr, warmup_steps, total_steps):  # ignores min_lr
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return max_lr * 0.5 * (1 + math.cos(math.pi * p))


def lr_progress_over_total(step, *, max_lr, min_lr, warmup_steps, total_steps):  # forgets to subtract the warmup
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    p = min(1.0, step / total_steps)
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * p))


def lr_no_clamp(step, *, max_lr, min_lr, warmup_steps, total_steps):  # rises again after total_steps
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    p = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * p))


def lr_linear_decay(step, *, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return max_lr + (min_lr - max_lr) * p


def lr_clamped_progress(step, *, max_lr, min_lr, warmup_steps, total_steps):
    if warmup_steps and step < warmup_steps:
        return max_lr * step / warmup_steps
    p = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * p)) / 2


def lr_cos_squared(step, *, max_lr, min_lr, warmup_steps, total_steps):  # (1 + cos x) / 2 = cos^2(x / 2)
    if step >= total_steps:
        return min_lr
    if step < warmup_steps:
        return step / warmup_steps * max_lr
    p = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * math.cos(math.pi * p / 2) ** 2


WRONG_IMPLEMENTATIONS = {
    "4.3": [RMSNormSubtractsMean, RMSNormEpsOutsideSqrt, RMSNormWrongAxis, RMSNormNoSquare, RMSNormFloat32,
            RMSNormDetachedScale, RMSNormIgnoresEpsArgument, RMSNormSumOverDim],
    "4.4": [SwiGLUGatesUpBranch, SwiGLUSigmoid, SwiGLUGelu, SwiGLUActivationAfterProduct, SwiGLUWithBias],
    "4.5": [AttentionMaskNoDiagonal, AttentionMaskOneAhead, AttentionNoScale, AttentionScaleByWidth,
            AttentionSoftmaxOverQueries, AttentionSeesTheFuture, AttentionHeadsMixed],
    "4.6": [_adam_variant(v) for v in ("coupled", "no_bias_correction", "defaults_wd", "defaults_lr", "eps_inside",
                                       "global_step", "rebinds")] + [AdamWFromTorch],
    "4.7": [lr_warmup_plus_one, lr_warmup_over_warmup_plus_one, lr_cosine_to_zero, lr_progress_over_total,
            lr_no_clamp, lr_linear_decay],
}
CORRECT_ALTERNATIVES = {
    "4.3": [RMSNormDivides, RMSNormLlamaStyle, RMSNormVectorNorm],
    "4.4": [SwiGLUManualSilu, SwiGLUMatmul],
    "4.5": [AttentionEinsum, AttentionLoopOverHeads, AttentionFromWeek3],
    "4.6": [_adam_variant("correct"), AdamWWithWeek1Step, AdamWPaperForm],
    "4.7": [lr_clamped_progress, lr_cos_squared],
}
PLACEHOLDERS = {"4.3": RMSNormPlaceholder, "4.4": SwiGLUPlaceholder, "4.5": AttentionPlaceholder,
                "4.6": AdamWPlaceholder}


def test_week4_transformer_exercises_are_registered_in_notebook_order():
    from course_utils.exercises import get_exercise

    titles = [get_exercise(f"4.{i}").title for i in range(3, 8)]
    assert titles == ["RMSNorm", "SwiGLU feed-forward layer", "Causal multi-head self-attention",
                      "AdamW step with parameter groups", "Learning-rate schedule: linear warmup, then cosine to min_lr"]


def test_adamw_check_reports_the_library_as_forbidden():
    from course_utils import check

    res = check("4.6", AdamWFromTorch, quiet=True)
    assert not res and "torch.optim" in res.message


# ----------------------------------------------------------------------------------------------
# The parts against torch
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 5, 16), (3, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch(shape, bias):
    torch.manual_seed(0)
    ours, theirs = T.LayerNorm(shape[-1], bias=bias), nn.LayerNorm(shape[-1], bias=bias)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
        if bias:
            ours.bias.normal_()
            theirs.bias.copy_(ours.bias)
    x = (torch.randn(shape) * 3 + 1).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(ours(x), theirs(x2), atol=1e-5, rtol=1e-5)
    ours(x).square().sum().backward()
    theirs(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 5, 16)])
def test_rmsnorm_matches_torch(shape):
    x = torch.randn(shape)
    ours = T.RMSNorm(shape[-1])
    torch.testing.assert_close(ours(x), nn.RMSNorm(shape[-1], eps=1e-6)(x))
    assert [n for n, _ in ours.named_parameters()] == ["weight"]


def test_mlp_and_swiglu_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    mlp = T.MLP(8, 32)
    torch.testing.assert_close(mlp(x), mlp.c_proj(F.gelu(mlp.c_fc(x), approximate="tanh")))
    sw = T.SwiGLU(8, 24)
    assert {n for n, _ in sw.named_parameters()} == {"w_gate.weight", "w_up.weight", "w_down.weight"}
    torch.testing.assert_close(sw(x), sw.w_down(F.silu(sw.w_gate(x)) * sw.w_up(x)))


@pytest.mark.parametrize("B,Tn,C,nh", [(1, 1, 8, 2), (2, 7, 16, 4), (3, 5, 12, 3)])
def test_causal_attention_fused_and_explicit_agree_with_sdpa(B, Tn, C, nh):
    torch.manual_seed(0)
    explicit = T.CausalSelfAttention(C, nh, fused=False).eval()
    fused = T.CausalSelfAttention(C, nh, fused=True).eval()
    fused.load_state_dict(explicit.state_dict())
    x = torch.randn(B, Tn, C)
    q, k, v = (A.split_heads(p(x), nh) for p in (explicit.q_proj, explicit.k_proj, explicit.v_proj))
    ref = explicit.o_proj(A.merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True)))
    torch.testing.assert_close(explicit(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused(x), ref, atol=1e-5, rtol=1e-5)


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = T.GPT(T.GPTConfig.tiny()).eval()
    x = torch.randint(0, 65, (1, 10))
    x2 = x.clone()
    x2[0, 6:] = (x2[0, 6:] + 1) % 65  # change the future
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :6], model(x2)[:, :6])
        assert not torch.allclose(model(x)[:, 6:], model(x2)[:, 6:])


@pytest.mark.parametrize("n_layer,n_head,n_embd,T_", [(1, 1, 16, 8), (2, 4, 32, 16), (3, 2, 48, 5)])
def test_gpt_matches_transformers_gpt2(n_layer, n_head, n_embd, T_):
    """minGPT's test: our GPT with GPT-2's weights gives transformers' logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hc = GPT2Config(vocab_size=50, n_positions=16, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(hc).eval()
    ours = T.GPT.from_hf_gpt2(hf).eval()
    x = torch.randint(0, 50, (2, T_))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=1e-4)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())


def test_gpt_weight_tying_and_scaled_init():
    torch.manual_seed(0)
    cfg = T.GPTConfig(vocab_size=100, block_size=32, n_layer=8, n_head=4, n_embd=256)
    model = T.GPT(cfg)
    assert model.lm_head.weight is model.tok_emb.weight
    std_proj = torch.cat([b.attn.o_proj.weight.flatten() for b in model.blocks]).std().item()
    std_fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.blocks]).std().item()
    assert std_proj == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert std_fc == pytest.approx(0.02, rel=0.05)
    untied = T.GPT(dataclasses.replace(cfg, tie_weights=False))
    assert untied.num_params() - model.num_params() == 100 * 256


def test_gpt_rejects_a_sequence_longer_than_its_context():
    model = T.GPT(T.GPTConfig.tiny())
    with pytest.raises(ValueError, match=r"sequence length 65 .*block_size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_config_presets_and_validation():
    assert T.GPTConfig.shakespeare_char().n_embd == 384
    assert acc.param_count(T.GPTConfig.gpt2())["total"] == 124_439_808  # GPT-2 small
    assert T.GPTConfig(n_embd=64, n_head=4, mlp="swiglu").hidden == 176
    with pytest.raises(ValueError, match="divisible"):
        T.GPTConfig(n_embd=10, n_head=3)


# ----------------------------------------------------------------------------------------------
# Accounting: formulas equal what the model has, does and keeps
# ----------------------------------------------------------------------------------------------
VARIANTS = [dict(), dict(bias=False), dict(norm="rmsnorm"), dict(mlp="swiglu", norm="rmsnorm", bias=False),
            dict(tie_weights=False), dict(fused_attention=False), dict(mlp="gelu", mlp_hidden=40)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "gpt2")
def test_accounting_formulas_equal_the_model(variant):
    cfg = T.GPTConfig(vocab_size=70, block_size=24, n_layer=2, n_head=4, n_embd=32, **variant)
    model = T.GPT(cfg)
    assert acc.param_count(cfg)["total"] == model.num_params()
    assert acc.param_count(cfg)["non_embedding"] == model.num_params(non_embedding=True)
    assert acc.measure_flops_per_token(model, 2) == acc.flops_per_token(cfg)
    assert acc.measure_flops_per_token(model, 2, training=True) == acc.flops_per_token(cfg, training=True)
    B = 3
    x, y = torch.randint(0, 70, (B, 24)), torch.randint(0, 70, (B, 24))
    saved = acc.saved_activation_bytes(model, lambda: T.lm_loss(model, x, y))
    formula = 4 * B * 24 * acc.activation_elements_per_token(cfg)["total"]
    assert abs(saved - formula) / formula < 0.01  # the rest: token ids and the boolean mask


def test_training_memory_estimate_and_t4_fit():
    est = acc.training_memory(T.GPTConfig.shakespeare_char(), 64, precision="fp16")
    n = acc.param_count(T.GPTConfig.shakespeare_char())["total"]
    assert est.gradients == 4 * n and est.adamw_state == 8 * n and est.weights == 6 * n
    assert est.total < 15e9


_PEAK_MEMORY_RUN = """
import torch
from course_utils import accounting as acc
from course_utils import transformer as T

cfg = T.GPTConfig(vocab_size=65, block_size=128, n_layer=3, n_head=4, n_embd=192)
x = torch.randint(0, 65, (8, 128))

def step(model, opt):
    xb = x[:, :model.config.block_size]
    T.lm_loss(model, xb, xb).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

warm = T.GPT(T.GPTConfig.tiny())  # the first step in a process also loads kernels and thread pools
step(warm, torch.optim.AdamW(warm.parameters(), foreach=False))

def run():
    model = T.GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    for _ in range(2):
        step(model, opt)

print(acc.measure_peak_memory(run), acc.training_memory(cfg, 8).total)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak CPU memory needs Linux")
def test_measured_peak_memory_is_near_the_estimate():
    # in a fresh process: the resident-set peak of a long pytest process depends on what ran before it
    out = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_RUN], capture_output=True, text=True, timeout=300, check=True)
    measured, estimate = map(int, out.stdout.split()[-2:])
    assert 0.6 < measured / estimate < 1.4, (measured, estimate)


# ----------------------------------------------------------------------------------------------
# Pretraining: AdamW, groups, schedule, loop, checkpoints, bits per character
# ----------------------------------------------------------------------------------------------
def test_adamw_matches_torch_on_a_model_with_groups():
    torch.manual_seed(0)
    a = T.GPT(T.GPTConfig.tiny())
    b = T.GPT(T.GPTConfig.tiny())
    b.load_state_dict(a.state_dict())
    ours = P.AdamW(P.param_groups(a, 0.1), lr=3e-3, betas=(0.9, 0.95))
    theirs = torch.optim.AdamW(P.param_groups(b, 0.1), lr=3e-3, betas=(0.9, 0.95), foreach=False)
    x = torch.randint(0, 65, (4, 16))
    for step in range(1, 16):
        for opt, model in ((ours, a), (theirs, b)):
            for group in opt.param_groups:
                group["lr"] = P.warmup_cosine_lr(step, max_lr=3e-3, min_lr=3e-4, warmup_steps=3, total_steps=15)
            opt.zero_grad()
            T.lm_loss(model, x, x).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_param_groups_decay_matrices_only():
    model = T.GPT(T.GPTConfig.tiny())
    decay, no_decay = P.param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


def _char_setup(seed=0, steps=12, **over):
    from course_utils.text import CharVocab, train_val_split

    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40
    vocab = CharVocab(text)
    train, val = train_val_split(vocab.encode(text), 0.2)
    torch.manual_seed(seed)
    cfg = T.GPTConfig(vocab_size=len(vocab), block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.1)
    tcfg = P.TrainConfig(steps=steps, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=3, eval_every=4,
                         eval_iters=2, seed=seed, **over)
    model = T.GPT(cfg)
    return P.Trainer(model, P.WindowLoader(train, val, 4, 16, seed=seed), tcfg)


def test_training_lowers_the_loss_and_logs_throughput():
    trainer = _char_setup(steps=40)
    h = trainer.run(progress=False)
    assert h["val_loss"][-1] < h["val_loss"][0] - 0.25
    assert len(h["loss"]) == 40 and h["eval_step"] == [4 * i for i in range(1, 11)]
    assert h["lr"][2] == pytest.approx(3e-3) and h["lr"][-1] == pytest.approx(3e-4)
    assert all(t > 0 for t in h["tokens_per_s"])


def test_resumed_run_continues_exactly(tmp_path):
    """Dropout on, so the RNG state must be restored too: the losses after resuming equal the uninterrupted run's."""
    full = _char_setup()
    full.run(progress=False)
    first = _char_setup()
    first.run(until=5, progress=False)
    first.save(tmp_path / "ckpt.pt")
    torch.manual_seed(123)  # disturb every random state before resuming
    resumed = _char_setup(seed=7)
    resumed.load(tmp_path / "ckpt.pt")
    resumed.run(progress=False)
    assert resumed.history["loss"][5:] == full.history["loss"][5:]
    assert resumed.history["val_loss"] == full.history["val_loss"]


def test_checkpoint_from_another_configuration_names_the_fields(tmp_path):
    trainer = _char_setup()
    trainer.save(tmp_path / "ckpt.pt")
    other = _char_setup()
    other.model = T.GPT(dataclasses.replace(trainer.model.config, n_layer=2, n_embd=32))
    with pytest.raises(ValueError, match=r"n_embd: checkpoint 16, model 32.*n_layer: checkpoint 1, model 2"):
        other.load(tmp_path / "ckpt.pt")


def test_bits_per_char_of_a_uniform_model():
    class Uniform(nn.Module):
        config = T.GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=4)

        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))

        def forward(self, idx):
            return torch.zeros(*idx.shape, 16) + self.dummy

    ids = torch.randint(0, 16, (81,))
    # 10 windows of 8 predicted tokens cover 80 tokens; with 2 characters per token that is 160 characters
    assert P.bits_per_char(Uniform(), ids, n_chars=162) == pytest.approx(4 / 2)


def test_window_loader_splits_the_global_batch_across_processes():
    data = torch.arange(1000)
    whole = P.WindowLoader(data, data, 8, 5, seed=3)
    halves = [P.WindowLoader(data, data, 8, 5, seed=3, rank=r, world_size=2) for r in (0, 1)]
    x, y = whole.get_batch()
    parts = [h.get_batch() for h in halves]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert torch.equal(y[:, :-1], x[:, 1:])
    with pytest.raises(ValueError, match="divisible"):
        P.WindowLoader(data, data, 7, 5, world_size=2)


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="needs torchrun")
def test_ddp_with_two_processes_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node=2` (gloo, CPU) gives the same loss curve as one process at the same global batch."""
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 60)
    args = ["--data", str(text), "--steps", "8", "--batch-size", "4", "--block-size", "16", "--n-layer", "1",
            "--n-embd", "16", "--n-head", "2", "--eval-every", "4", "--eval-iters", "2", "--device", "cpu"]
    P.launch(1, [*args, "--out", str(tmp_path / "one.json")], timeout=120)
    P.launch(2, [*args, "--out", str(tmp_path / "two.json")], timeout=180)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(one["loss"]) == len(two["loss"]) == 8
    for a, b in zip(one["loss"] + one["val_loss"], two["loss"] + two["val_loss"]):
        assert a == pytest.approx(b, abs=1e-5)  # same math, different order of float additions


def test_launch_reports_the_scripts_error():
    with pytest.raises(RuntimeError, match="block_size"):
        P.launch(1, ["--data", __file__, "--steps", "1", "--block-size", "100000"], timeout=120)


# ----------------------------------------------------------------------------------------------
# The three families
# ----------------------------------------------------------------------------------------------
def test_encoder_sees_both_sides_and_padding_is_ignored():
    torch.manual_seed(0)
    enc = fam.Encoder(T.GPTConfig(vocab_size=20, block_size=10, n_layer=1, n_head=2, n_embd=16)).eval()
    x = torch.randint(0, 20, (1, 8))
    x2 = x.clone()
    x2[0, -1] = (x2[0, -1] + 1) % 20
    with torch.no_grad():
        assert not torch.allclose(enc(x)[:, 0], enc(x2)[:, 0])  # position 0 sees the last token
        lengths = torch.tensor([6])
        torch.testing.assert_close(enc(x, lengths)[:, :6], enc(x2, lengths)[:, :6])  # ...unless it is padding


def test_mask_tokens_follows_bert_proportions():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (200, 100), generator=g)
    inputs, targets = fam.mask_tokens(ids, 50, 50, p=0.15, generator=g)
    chosen = targets != fam.IGNORE
    assert chosen.float().mean().item() == pytest.approx(0.15, abs=0.01)
    assert torch.equal(targets[chosen], ids[chosen])
    assert (inputs[chosen] == 50).float().mean().item() == pytest.approx(0.8, abs=0.03)
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_masked_lm_and_encoder_decoder_train():
    torch.manual_seed(0)
    cfg = T.GPTConfig(vocab_size=11, block_size=12, n_layer=1, n_head=2, n_embd=32)
    mlm = fam.MaskedLM(cfg)
    opt = torch.optim.AdamW(mlm.parameters(), lr=1e-2)
    ids = torch.arange(10).repeat(16, 1) + 0  # a fixed pattern: every masked digit is predictable from its neighbours
    losses = []
    for _ in range(60):
        inputs, targets = fam.mask_tokens(ids, mlm.mask_id, 10, p=0.3)
        loss = fam.masked_lm_loss(mlm, inputs, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    seq = fam.EncoderDecoder(cfg)
    src = torch.randint(3, 11, (4, 6))
    tgt_in = torch.cat([torch.ones(4, 1, dtype=torch.long), src.flip(1)], 1)
    assert seq(src, tgt_in).shape == (4, 7, 11)
    out = seq.greedy(src, torch.full((4,), 6), bos=1, eos=2, max_len=5)
    assert out.shape[0] == 4 and out.shape[1] <= 5


def test_speed_helpers():
    cfg = T.GPTConfig.tiny()
    res = acc.throughput_vs_hf_gpt2(cfg, 2, steps=1)
    assert res["params_ours"] == res["params_transformers"] and res["ratio"] > 0
    with pytest.raises(ValueError, match="GPT-2-shaped"):
        acc.throughput_vs_hf_gpt2(dataclasses.replace(cfg, mlp="swiglu"), 2)
    before = torch.get_num_threads()
    model, x = T.GPT(cfg), torch.randint(0, 65, (2, 16))
    try:
        assert acc.pick_training_threads(model, x, x) in {1, len(os.sched_getaffinity(0))}
    finally:
        torch.set_num_threads(before)
    assert acc.seconds_per_step(model, x, x) > 0
    peak, source = acc.peak_flops("cpu")
    assert peak > 1e8 and "measured" in source
    assert acc.mfu(1000.0, cfg, peak) == pytest.approx(1000.0 * acc.flops_per_token(cfg, training=True) / peak)
