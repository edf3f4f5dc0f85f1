"""Week 5 exercises 5.6-5.10 (notebooks 03-04): int8 absmax per tensor and per channel, group-wise 4-bit,
the distillation loss, gradient accumulation.

Expected values are closed forms written out here (round(w / scale) with scale = absmax / 127, asymmetric
min/max groups), `F.kl_div` for the distillation loss, and `torch.autograd.grad` on the whole batch for
accumulation; all computed in the trusted checker, never by the package's reference implementations.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..exercises import Case, case_rng, exercise, randn


def _tensor(x) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return torch.tensor(float(x))
    return None


def _absmax_expected(w: torch.Tensor, per_row: bool):
    absmax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax()
    scale = torch.where(absmax == 0, torch.ones_like(absmax), absmax / 127).float()
    q = torch.round(w.float() / scale).clamp(-127, 127).to(torch.int8)
    out = [q, q.float() * scale, True]
    if per_row:
        out.append(list(absmax.shape))
    return tuple(out)


def _absmax_case(name: str, w: torch.Tensor, *, per_row: bool, hint: str | None = None) -> Case:
    def run(fn):
        out = fn(w.clone())
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            return f"returned {type(out).__name__}; expected a pair (q, scale)"
        q, scale = _tensor(out[0]), _tensor(out[1])
        if q is None or scale is None:
            return "q and scale must be tensors"
        got = [q, q.float() * scale.float(), bool(torch.isfinite(scale).all() and (scale > 0).all())]
        if per_row:
            got.append(list(scale.shape))
        return tuple(got)

    names = ("q", "dequantized scale * q", "every scale positive and finite", "scale's shape")
    return Case(name, run=run, expected=lambda: _absmax_expected(w, per_row), names=names, atol=1e-6, rtol=1e-5,
                hint=hint)


@exercise("5.6", "absmax int8 quantization, one scale per tensor", reference="course_utils.quantize:quantize_int8",
          hint="scale = max(|w|) / 127 over the WHOLE tensor (a 0-d float32 tensor; use 1 when w is all zeros); "
               "q = round(w / scale), clamped to [-127, 127], as torch.int8 (rounding, not truncation).")
def _():
    g = case_rng(56)
    yield _absmax_case("w (4, 8)", randn(g, 4, 8), per_row=False)
    yield _absmax_case("w (64,) whose largest magnitude is negative: -10", torch.cat([randn(g, 63), torch.tensor([-10.0])]),
                       per_row=False, hint="absmax means the largest ABSOLUTE value: w.abs().max(), not w.max()")
    yield _absmax_case("w (3, 5, 7), 3-D", randn(g, 3, 5, 7), per_row=False)
    yield _absmax_case("w (16, 16) ~ 1e4 (large values)", randn(g, 16, 16, scale=1e4), per_row=False)
    yield _absmax_case("w (8, 8) ~ 1e-6 (tiny values)", randn(g, 8, 8, scale=1e-6), per_row=False)
    yield _absmax_case("w (4, 4) of zeros", torch.zeros(4, 4), per_row=False,
                       hint="an all-zero tensor has absmax 0: use scale 1 so q = 0 and nothing divides by zero")
    yield _absmax_case("w (1, 1), a single weight 0.3", torch.tensor([[0.3]]), per_row=False)


@exercise("5.7", "absmax int8 quantization, one scale per output channel (row)",
          reference="course_utils.quantize:quantize_int8_per_channel",
          hint="for an nn.Linear weight (out, in): scale = max(|w|) over each ROW (dim=1, keepdim=True) / 127, shape "
               "(out, 1), float32 (1 for an all-zero row); q = round(w / scale) clamped to [-127, 127], torch.int8.")
def _():
    g = case_rng(57)
    yield _absmax_case("w (6, 10)", randn(g, 6, 10), per_row=True)
    yield _absmax_case("w (12, 5): more rows than columns", randn(g, 12, 5), per_row=True,
                       hint="one scale per ROW (output channel): reduce over dim=1, keep dim=0")
    rows = randn(g, 5, 16) * torch.tensor([1e-3, 0.1, 1.0, 10.0, 1e3]).view(5, 1)
    yield _absmax_case("w (5, 16) whose rows differ in size by 1e6", rows, per_row=True,
                       hint="each row gets its own scale, so a small row is not rounded to zero")
    z = randn(g, 4, 8)
    z[2] = 0
    yield _absmax_case("w (4, 8) with an all-zero row", z, per_row=True,
                       hint="an all-zero row has absmax 0: give it scale 1")
    yield _absmax_case("w (1, 7), a single row", randn(g, 1, 7), per_row=True)
    neg = randn(g, 3, 9)
    neg[:, 4] = torch.tensor([-8.0, -9.0, -7.0])
    yield _absmax_case("w (3, 9) whose largest magnitudes are negative", neg, per_row=True)


# ----------------------------------------------------------------------------------------------
# 5.8 group-wise 4-bit
# ----------------------------------------------------------------------------------------------
def _groups_expected(w: torch.Tensor, gs: int, with_codes: bool):
    *lead, width = w.shape
    g = w.float().reshape(*lead, width // gs, gs)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi))
    q = torch.round((g - lo) / scale).clamp(0, 15)
    deq = (q * scale + lo).reshape(w.shape)
    out = ["torch.uint8", True, True, deq]
    if with_codes:
        out.append(q.to(torch.uint8).reshape(w.shape))
    return tuple(out)


def _groups_case(name: str, w: torch.Tensor, gs: int, *, with_codes: bool = True, hint: str | None = None) -> Case:
    def run(fn):
        out = fn(w.clone(), gs)
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            return f"returned {type(out).__name__}; expected a triple (q, scale, minimum)"
        q, scale, minimum = (_tensor(o) for o in out)
        if q is None or scale is None or minimum is None:
            return "q, scale and minimum must be tensors"
        n_groups = w.shape[-1] // gs
        if q.shape != w.shape or scale.numel() * gs != w.numel() or minimum.numel() * gs != w.numel():
            return (f"shapes q {tuple(q.shape)}, scale {tuple(scale.shape)}, minimum {tuple(minimum.shape)}; expected q "
                    f"{tuple(w.shape)} and one scale and minimum per group: {(*w.shape[:-1], n_groups)}")
        shape = (*w.shape[:-1], n_groups, 1)
        deq = (q.float().reshape(*w.shape[:-1], n_groups, gs) * scale.float().reshape(shape)
               + minimum.float().reshape(shape)).reshape(w.shape)  # by the checker: scale * q + minimum
        got = [str(q.dtype), bool(q.min() >= 0 and q.max() <= 15),
               bool(torch.isfinite(scale).all() and (scale > 0).all()), deq]
        if with_codes:
            got.append(q)
        return tuple(got)

    names = ("q's dtype", "every code in 0..15", "every scale positive and finite", "dequantized scale * q + minimum",
             "q")
    return Case(name, run=run, expected=lambda: _groups_expected(w, gs, with_codes), names=names, atol=1e-5,
                rtol=1e-5, hint=hint)


def _bad_group_case(name: str, w: torch.Tensor, gs) -> Case:
    def run(fn):
        try:
            fn(w.clone(), gs)
        except ValueError:
            return "ValueError"
        except Exception as exc:  # noqa: BLE001 - the learner's function may raise anything
            return f"{type(exc).__name__} (raise a ValueError that says what is wrong)"
        return "no error (raise a ValueError that says what is wrong)"

    return Case(name, run=run, expected=lambda: "ValueError", names="the error raised",
                hint="check the arguments first: `if w.shape[-1] % group_size: raise ValueError(...)` with a message "
                     "that names the group size and the width")


@exercise("5.8", "4-bit quantization in groups (scale and minimum per group)",
          reference="course_utils.quantize:quantize_4bit_groups",
          hint="split the LAST axis into groups of group_size (reshape to (..., width // group_size, group_size)); per "
               "group: minimum = min, scale = (max - min) / 15 (1 for a constant group), q = round((w - minimum) / "
               "scale) clamped to 0..15 as torch.uint8 in w's shape; scale and minimum (..., width // group_size). "
               "Raise ValueError when group_size does not divide the width or is not a positive integer.")
def _():
    g = case_rng(58)
    yield _groups_case("w (4, 64), group_size 32", randn(g, 4, 64), 32)
    yield _groups_case("w (3, 48), group_size 16 (not square: groups run along the last axis)", randn(g, 3, 48), 16,
                       hint="groups are consecutive weights of a ROW (the last axis), not of a column")
    yield _groups_case("w (2, 3, 32), 3-D, group_size 8", randn(g, 2, 3, 32), 8)
    skew = randn(g, 4, 32).abs() + 5.0  # all positive: a symmetric (absmax) grid wastes half its codes
    yield _groups_case("w (4, 32) all positive in [5, 8]: the minimum matters", skew, 32,
                       hint="asymmetric: store the group's minimum and scale = (max - min) / 15, not absmax / 7")
    yield _groups_case("w (2, 128) ~ 100, one group per row", randn(g, 2, 128, scale=100.0), 128)
    const = randn(g, 2, 16)
    const[0, :8] = 0.25
    yield _groups_case("w (2, 16), group_size 8, one constant group", const, 8, with_codes=False,
                       hint="a constant group has max == min: give it scale 1 (not 0) so nothing divides by zero")
    yield _groups_case("w (1, 4), group_size 4", torch.tensor([[0.1, -0.7, 0.45, 0.9]]), 4)
    yield _bad_group_case("group_size 48 does not divide the width 64", randn(g, 2, 64), 48)
    yield _bad_group_case("group_size 0", randn(g, 2, 64), 0)


# ----------------------------------------------------------------------------------------------
# 5.9 the distillation loss
# ----------------------------------------------------------------------------------------------
def _kd_case(name: str, s: torch.Tensor, t: torch.Tensor, temperature: float, hint: str | None = None) -> Case:
    def run(fn):
        si = s.clone().requires_grad_(True)
        loss = fn(si, t.clone(), temperature)
        if not isinstance(loss, torch.Tensor):
            return loss
        if loss.dim() != 0:
            return f"a loss of shape {tuple(loss.shape)}; expected a scalar (0-d tensor)"
        if not loss.requires_grad:
            return (loss.detach(), "the loss is detached from the student's logits: no gradient")
        loss.backward()
        return (loss.detach(), si.grad)

    def expected():
        si = s.clone().requires_grad_(True)
        V = s.shape[-1]
        kl = F.kl_div(F.log_softmax(si.reshape(-1, V) / temperature, -1), F.log_softmax(t.reshape(-1, V) / temperature, -1),
                      log_target=True, reduction="batchmean")
        loss = temperature ** 2 * kl
        loss.backward()
        return (loss.detach(), si.grad)

    return Case(name, run=run, expected=expected, names=("loss", "dloss/dstudent_logits"), atol=1e-5, rtol=1e-4,
                hint=hint)


@exercise("5.9", "Distillation loss: temperature-softened KL, times T^2",
          reference="course_utils.distill:distillation_loss",
          hint="p = softmax(teacher / T), log q = log_softmax(student / T) over the LAST axis; KL(p || q) = sum over the "
               "vocabulary of p * (log p - log q); MEAN over all other positions; multiply by T**2. Use log_softmax "
               "(stable for large logits).",
          forbid=("torch.nn.functional.kl_div", "torch.kl_div", "torch.nn.KLDivLoss"))
def _():
    g = case_rng(59)
    yield _kd_case("logits (2, 5, 11), T = 2", randn(g, 2, 5, 11), randn(g, 2, 5, 11), 2.0)
    yield _kd_case("logits (6, 7), T = 1", randn(g, 6, 7), randn(g, 6, 7), 1.0,
                   hint="KL(teacher || student): the teacher's probabilities weight the log ratio")
    yield _kd_case("logits (3, 4, 20), T = 4", randn(g, 3, 4, 20, scale=3.0), randn(g, 3, 4, 20, scale=3.0), 4.0,
                   hint="soften BOTH sets of logits by T, and multiply the KL by T**2")
    same = randn(g, 2, 3, 9)
    yield _kd_case("student = teacher (loss 0), T = 2", same, same.clone(), 2.0)
    yield _kd_case("one position (1, 1, 5), T = 0.5", randn(g, 1, 1, 5), randn(g, 1, 1, 5), 0.5)
    yield _kd_case("large logits (2, 3, 6) ~ 80, T = 2: needs log_softmax", randn(g, 2, 3, 6, scale=80.0),
                   randn(g, 2, 3, 6, scale=80.0), 2.0, hint="log(softmax(x)) underflows for large logits: use log_softmax")


# ----------------------------------------------------------------------------------------------
# 5.10 gradient accumulation
# ----------------------------------------------------------------------------------------------
LR = 0.1


def _accum_case(name: str, seed: int, sizes: list[int], *, hint: str | None = None) -> Case:
    g = case_rng(seed)
    shapes = {"0.weight": (8, 6), "0.bias": (8,), "2.weight": (3, 8), "2.bias": (3,)}
    state = {k: randn(g, *shape, scale=0.5) for k, shape in shapes.items()}
    batches = [(randn(g, n, 6), torch.randint(0, 3, (n,), generator=g)) for n in sizes]
    stale = [randn(g, *v.shape) for v in state.values()]  # gradients left over from an earlier step

    def build():
        skip = nn.utils.skip_init  # no draw from the global random generator
        model = nn.Sequential(skip(nn.Linear, 6, 8), nn.Tanh(), skip(nn.Linear, 8, 3))
        model.load_state_dict(state)
        return model

    def run(fn):
        model = build()
        for p, s in zip(model.parameters(), stale):
            p.grad = s.clone()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        steps = []
        real_step = opt.step
        opt.step = lambda *a, **k: (steps.append(1), real_step(*a, **k))[1]
        loss = fn(model, opt, [(x.clone(), y.clone()) for x, y in batches], F.cross_entropy)
        loss = float(loss) if isinstance(loss, (int, float, torch.Tensor)) and not isinstance(loss, bool) else loss
        return (len(steps), [p.detach().clone() for p in model.parameters()], loss)

    def expected():
        model = build()
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        loss = F.cross_entropy(model(x), y)  # the whole batch's mean loss
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return (1, [p.detach() - LR * gr for p, gr in zip(model.parameters(), grads)], float(loss))

    return Case(name, run=run, expected=expected, names=("optimizer steps", "parameters after the step", "returned loss"),
                atol=1e-5, rtol=1e-4, hint=hint)


@exercise("5.10", "Gradient accumulation: one step, the big batch's gradient",
          reference="course_utils.distill:accumulation_step",
          hint="zero the gradients ONCE before the loop; for each micro-batch (x, y): loss_fn(model(x), y) * len(x) / "
               "total_examples, then backward (gradients add up); ONE optimizer.step() after the loop; return the "
               "whole batch's mean loss as a float.")
def _():
    yield _accum_case("micro-batches of 4 and 4", 510, [4, 4])
    yield _accum_case("micro-batches of 3, 5 and 2 (unequal sizes)", 511, [3, 5, 2],
                      hint="weight each micro-batch's mean loss by len(x) / total, not by 1 / number of micro-batches")
    yield _accum_case("one micro-batch of 7 (no accumulation)", 512, [7])
    yield _accum_case("six micro-batches of one example", 513, [1] * 6)
    yield _accum_case("micro-batches of 1 and 9", 514, [1, 9])
