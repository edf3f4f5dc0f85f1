"""Week 4 exercises (notebooks 02-03): RMSNorm, SwiGLU, causal self-attention, AdamW, warmup + cosine.

Expected values come from independent references: `torch.nn.RMSNorm`, SwiGLU written with
`F.linear` and `F.silu`, `F.scaled_dot_product_attention(is_causal=True)`, `torch.optim.AdamW` and
transformers' `get_cosine_with_min_lr_schedule_with_warmup`, each computed in the trusted checker.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..exercises import Case, case_rng, exercise, randn


# ----------------------------------------------------------------------------------------------
# 4.3 RMSNorm (notebook 02)
# ----------------------------------------------------------------------------------------------
def _rms_case(name: str, x: torch.Tensor, weight: torch.Tensor | None, eps: float | None = None,
              hint: str | None = None) -> Case:
    """Build the module (default eps unless given), set its weight (or keep the initial one), run forward
    and backward; the expected values come from torch.nn.RMSNorm through the same steps."""
    dim = x.shape[-1]
    upstream = randn(case_rng(430 + x.numel()), *x.shape).to(x.dtype)  # d loss / d output

    def harness(make):
        module = make(dim) if eps is None else make(dim, eps=eps)
        if x.dtype == torch.float64:
            module = module.double()
        if weight is not None:
            with torch.no_grad():
                module.weight.copy_(weight.to(x.dtype))
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        if not isinstance(y, torch.Tensor):
            return y
        if not y.requires_grad:
            return (y, "the output is detached from the graph: no gradient reaches x")
        (y * upstream.to(y.dtype)).sum().backward()
        return (y.detach(), xi.grad, module.weight.grad)

    def torch_rmsnorm(d, eps=1e-6):
        return nn.RMSNorm(d, eps=eps)

    return Case(name, run=harness, expected=lambda: harness(torch_rmsnorm), names=("y", "dL/dx", "dL/dweight"),
                atol=1e-5, rtol=1e-4, hint=hint)


@exercise("4.3", "RMSNorm", reference="course_utils.transformer:RMSNorm",
          hint="y = x / sqrt(mean(x**2 over the LAST axis) + eps) * weight: no mean subtracted, eps inside the "
               "square root, `weight` a Parameter of ones (dim,), and keep the input's dtype.",
          forbid=("torch.nn.functional.rms_norm", "torch.rms_norm", "torch.nn.functional.layer_norm",
                  "torch.nn.functional.normalize"))
def _():
    g = case_rng(43)
    yield _rms_case("x (2, 5, 8), weight as initialised (ones)", randn(g, 2, 5, 8), None,
                    hint="`weight` starts as ones, one per channel")
    yield _rms_case("x (2, 5, 8), random weight", randn(g, 2, 5, 8), randn(g, 8))
    yield _rms_case("x (3, 4, 16) with mean 3 (RMSNorm does not centre)", randn(g, 3, 4, 16) + 3, randn(g, 16),
                    hint="RMSNorm divides by the root mean square; it does NOT subtract the mean (that is LayerNorm)")
    yield _rms_case("x (4, 6) with 6 channels and 4 rows: normalise over the last axis", randn(g, 4, 6), randn(g, 6),
                    hint="take the mean of x**2 over the last axis (dim=-1, keepdim=True)")
    yield _rms_case("a single token x (1, 1, 32)", randn(g, 1, 1, 32), randn(g, 32))
    yield _rms_case("tiny x (2, 3, 8) ~ 1e-3: eps matters (default eps = 1e-6)", randn(g, 2, 3, 8, scale=1e-3),
                    randn(g, 8), hint="eps goes INSIDE the square root: sqrt(mean(x**2) + eps); default eps=1e-6")
    yield _rms_case("eps=1e-2 given to the constructor, x (2, 4, 8) ~ 0.1", randn(g, 2, 4, 8, scale=0.1),
                    randn(g, 8), eps=1e-2, hint="use the eps passed to the constructor")
    yield _rms_case("large x (2, 3, 8) ~ 1e4", randn(g, 2, 3, 8, scale=1e4), randn(g, 8))
    yield _rms_case("float64 module (.double()) and input (2, 3, 8)", randn(g, 2, 3, 8).double(), randn(g, 8),
                    hint="keep the input's dtype: no .float() inside forward")


# ----------------------------------------------------------------------------------------------
# 4.4 SwiGLU (notebook 02)
# ----------------------------------------------------------------------------------------------
def _swiglu_case(name: str, g: torch.Generator, shape: tuple[int, ...], hidden: int, scale: float = 1.0) -> Case:
    dim = shape[-1]
    x = randn(g, *shape, scale=scale)
    w_gate, w_up = randn(g, hidden, dim) / math.sqrt(dim), randn(g, hidden, dim) / math.sqrt(dim)
    w_down = randn(g, dim, hidden) / math.sqrt(hidden)
    upstream = randn(g, *shape)

    def run(cls):
        module = cls(dim, hidden)
        module.load_state_dict({"w_gate.weight": w_gate, "w_up.weight": w_up, "w_down.weight": w_down}, strict=True)
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        if not isinstance(y, torch.Tensor) or not y.requires_grad:
            return y
        (y * upstream).sum().backward()
        return (y.detach(), xi.grad)

    def expected():
        xi = x.clone().requires_grad_(True)
        y = F.linear(F.silu(F.linear(xi, w_gate)) * F.linear(xi, w_up), w_down)
        (y * upstream).sum().backward()
        return (y.detach(), xi.grad)

    return Case(name, run=run, expected=expected, names=("y", "dL/dx"), atol=1e-5, rtol=1e-4)


@exercise("4.4", "SwiGLU feed-forward layer", reference="course_utils.transformer:SwiGLU",
          hint="Three bias-free nn.Linear layers named w_gate (dim->hidden), w_up (dim->hidden), w_down (hidden->dim); "
               "y = w_down(silu(w_gate(x)) * w_up(x)): SiLU (x * sigmoid(x)) on the GATE branch only.")
def _():
    g = case_rng(44)
    yield _swiglu_case("x (1, 1, 4), hidden 8: one token", g, (1, 1, 4), 8)
    yield _swiglu_case("x (2, 5, 16), hidden 40", g, (2, 5, 16), 40)
    yield _swiglu_case("x (3, 8), hidden 6 (narrower than the input)", g, (3, 8), 6)
    yield _swiglu_case("x (2, 3, 8) ~ 5 (large values), hidden 24", g, (2, 3, 8), 24, scale=5.0)


# ----------------------------------------------------------------------------------------------
# 4.5 Causal self-attention (notebook 02)
# ----------------------------------------------------------------------------------------------
def _attention_case(name: str, g: torch.Generator, B: int, T: int, C: int, nh: int, scale: float = 1.0) -> Case:
    x = randn(g, B, T, C, scale=scale)
    weights = {f"{p}.weight": randn(g, C, C) / math.sqrt(C) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    biases = {f"{p}.bias": randn(g, C, scale=0.1) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}

    def run(cls):
        module = cls(C, nh)
        module.load_state_dict({**weights, **biases}, strict=True)
        module.eval()
        with torch.no_grad():
            return module(x.clone())

    def expected():
        def proj(p, t):
            return F.linear(t, weights[f"{p}.weight"], biases[f"{p}.bias"])

        q, k, v = (proj(p, x).view(B, T, nh, C // nh).transpose(1, 2) for p in ("q_proj", "k_proj", "v_proj"))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return proj("o_proj", y.transpose(1, 2).reshape(B, T, C))

    return Case(name, run=run, expected=expected, names="y", atol=1e-5, rtol=1e-4)


@exercise("4.5", "Causal multi-head self-attention", reference="course_utils.transformer:CausalSelfAttention",
          hint="nn.Linear(C, C) q_proj, k_proj, v_proj, o_proj (with bias); split heads with view(B, T, nh, hs)."
               "transpose(1, 2); scores q @ k^T / sqrt(hs); key j visible to query i only when j <= i (the diagonal "
               "included); softmax over the keys (last axis); merge heads and apply o_proj.",
          forbid=("torch.nn.functional.scaled_dot_product_attention",
                  "torch.nn.functional.multi_head_attention_forward"))
def _():
    g = case_rng(45)
    yield _attention_case("x (1, 1, 8), 2 heads: one token sees only itself", g, 1, 1, 8, 2)
    yield _attention_case("x (2, 5, 16), 4 heads", g, 2, 5, 16, 4)
    yield _attention_case("x (3, 7, 12), 3 heads", g, 3, 7, 12, 3)
    yield _attention_case("x (2, 6, 16), 1 head", g, 2, 6, 16, 1)
    yield _attention_case("x (1, 9, 32) ~ 3 (large scores), 2 heads of 16", g, 1, 9, 32, 2, scale=3.0)


# ----------------------------------------------------------------------------------------------
# 4.6 AdamW (notebook 03)
# ----------------------------------------------------------------------------------------------
def _adamw_case(name: str, g: torch.Generator, shapes: list[tuple[int, ...]], *, steps: int, group_decay=None,
                lrs=None, none_grads=(), grad_scale: float = 1.0, hint: str | None = None, **hyper) -> Case:
    """Parameters (one group, or one group each with its own weight_decay), `steps` updates with given gradients.

    `lrs` sets every group's lr before each step (as a schedule does); `none_grads` lists (step, param)
    pairs where that parameter has no gradient. The expected values come from torch.optim.AdamW.
    """
    params0 = [randn(g, *s) for s in shapes]
    grads = [[randn(g, *s, scale=grad_scale) for s in shapes] for _ in range(steps)]

    def drive(make):
        params = [p.clone().requires_grad_(True) for p in params0]
        groups = ([{"params": params}] if group_decay is None else
                  [{"params": [p], "weight_decay": wd} for p, wd in zip(params, group_decay)])
        opt = make(groups, **hyper)
        for t in range(steps):
            if lrs is not None:
                for group in opt.param_groups:
                    group["lr"] = lrs[t]
            for i, p in enumerate(params):
                p.grad = None if (t, i) in none_grads else grads[t][i].clone()
            opt.step()
        return [p.detach().clone() for p in params]

    def run(cls):
        return {"parameters": drive(cls), "built on torch.optim.Adam/AdamW": issubclass(cls, (torch.optim.Adam,
                                                                                              torch.optim.AdamW))}

    def expected():
        return {"parameters": drive(lambda groups, **kw: torch.optim.AdamW(groups, foreach=False, **kw)),
                "built on torch.optim.Adam/AdamW": False}

    return Case(name, run=run, expected=expected, atol=1e-6, rtol=1e-5, hint=hint)


@exercise("4.6", "AdamW step with parameter groups", reference="course_utils.pretrain:AdamW",
          hint="Per parameter with a gradient: step t += 1; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; "
               "p -= lr * wd * p (decoupled, NOT added to g); p -= lr * m_hat / (sqrt(v_hat) + eps) with "
               "m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t). Read lr and weight_decay from each GROUP "
               "(group['lr'], group['weight_decay']); update p in place; skip parameters whose grad is None.",
          forbid=("torch.optim.AdamW", "torch.optim.Adam", "torch._fused_adamw_", "torch._fused_adam_"))
def _():
    # The first optimizer a process builds imports torch's compiler stack (seconds); build one here, in the
    # learner's process, so the child that runs each check inherits it instead of importing it again.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    g = case_rng(46)
    yield _adamw_case("one weight (3, 4), lr 1e-2, weight_decay 0.1, one step (bias correction)", g, [(3, 4)],
                      steps=1, lr=1e-2, weight_decay=0.1,
                      hint="bias correction: at t = 1, m_hat = g and v_hat = g^2, so the first step is about lr * sign(g)")
    yield _adamw_case("weight (4, 3) with weight_decay 0.1 and bias (3,) with 0.0 in two groups, 5 steps", g,
                      [(4, 3), (3,)], steps=5, group_decay=(0.1, 0.0), lr=0.05, weight_decay=0.1,
                      hint="each group has its own weight_decay: read group['weight_decay'], not the constructor's")
    yield _adamw_case("lr changed before every step (as a schedule does): 1e-2, 5e-2, 2e-2, 1e-3", g, [(5, 2)],
                      steps=4, lrs=[1e-2, 5e-2, 2e-2, 1e-3], lr=1e-3, weight_decay=0.01,
                      hint="read the learning rate from group['lr'] at every step")
    yield _adamw_case("weight_decay 0.5, lr 0.1, 3 steps: decoupled decay, not L2 in the gradient", g, [(3, 3)],
                      steps=3, lr=0.1, weight_decay=0.5,
                      hint="AdamW shrinks p by lr * wd * p directly; adding wd * p to the gradient is Adam with L2")
    yield _adamw_case("betas (0.8, 0.95), eps 1e-3, tiny gradients ~1e-4, 6 steps", g, [(2, 5)], steps=6,
                      grad_scale=1e-4, lr=1e-2, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.0,
                      hint="eps is added after the square root: sqrt(v_hat) + eps; use the betas and eps given")
    yield _adamw_case("two parameters, the second without a gradient in steps 1-2: skipped, its step count waits", g,
                      [(2, 2), (3,)], steps=4, none_grads={(0, 1), (1, 1)}, lr=0.05, weight_decay=0.1,
                      hint="skip a parameter whose .grad is None, and keep a step count per parameter")


# ----------------------------------------------------------------------------------------------
# 4.7 Linear warmup + cosine schedule (notebook 03)
# ----------------------------------------------------------------------------------------------
def _schedule_case(name: str, steps: list[int], hint: str | None = None, **kw) -> Case:
    def run(fn):
        out = []
        for s in steps:
            lr = fn(s, **kw)
            out.append(float(lr) if isinstance(lr, (int, float)) else lr)
        return out

    def expected():
        from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=kw["max_lr"])
        sched = get_cosine_with_min_lr_schedule_with_warmup(opt, kw["warmup_steps"], kw["total_steps"],
                                                            min_lr=kw["min_lr"])
        lrs = []
        for _ in range(kw["total_steps"] + 1):
            lrs.append(sched.get_last_lr()[0])  # the lr of update number len(lrs)
            opt.step()
            sched.step()
        return [lrs[s] if s <= kw["total_steps"] else kw["min_lr"] for s in steps]

    return Case(name, run=run, expected=expected, names="learning rates", atol=1e-12, rtol=1e-9, hint=hint)


@exercise("4.7", "Learning-rate schedule: linear warmup, then cosine to min_lr",
          reference="course_utils.pretrain:warmup_cosine_lr",
          hint="step < warmup_steps: max_lr * step / warmup_steps (so 0 at step 0 and max_lr at step warmup_steps); "
               "then p = (step - warmup_steps) / (total_steps - warmup_steps) and "
               "lr = min_lr + (max_lr - min_lr) * (1 + cos(pi * p)) / 2; min_lr for every step >= total_steps.")
def _():
    yield _schedule_case("max 1e-3, min 1e-4, warmup 10, total 100: steps 0..110", list(range(111)),
                         max_lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=100)
    yield _schedule_case("no warmup (warmup_steps=0), min_lr 0, total 50: steps 0..60", list(range(61)),
                         max_lr=6e-4, min_lr=0.0, warmup_steps=0, total_steps=50)
    yield _schedule_case("warmup 1, total 5, max 1.0, min 0.1: steps 0..8", list(range(9)),
                         max_lr=1.0, min_lr=0.1, warmup_steps=1, total_steps=5)
    yield _schedule_case("warmup 100, total 5000: steps around the warmup end and the end, and after",
                         [0, 1, 50, 99, 100, 101, 2550, 4999, 5000, 5001, 7000],
                         max_lr=3e-4, min_lr=3e-5, warmup_steps=100, total_steps=5000,
                         hint="the lr stays at min_lr after total_steps; it must not rise again")
    yield _schedule_case("min_lr = max_lr (a constant after warmup): steps 0..12", list(range(13)),
                         max_lr=2e-3, min_lr=2e-3, warmup_steps=4, total_steps=10)
