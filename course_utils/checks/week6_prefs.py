"""Week 6 exercises (notebooks 03-04): sequence log-probabilities, the DPO loss, group-relative advantages
and the GRPO clipped objective with KL.

Expected values come from independent references computed in the trusted checker: torch's
`F.cross_entropy` (a sequence log-probability is minus the summed token cross-entropy), `F.softplus`
(-log sigmoid(x) = softplus(-x)), Python's `statistics` module over each group, and plain Python loops
over every token for the clipped objective and the k3 KL estimator.
"""
from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F

from ..exercises import Case, case_rng, exercise, randn


def _mask(rows: list[tuple[int, int]], T: int) -> torch.Tensor:
    """(B, T) long mask with ones on [start, end) of each row."""
    m = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (s, e) in enumerate(rows):
        m[b, s:e] = 1
    return m


# ----------------------------------------------------------------------------------------------
# 6.5 Sequence log-probabilities under a completion mask (notebook 03)
# ----------------------------------------------------------------------------------------------
def _seq_case(name: str, g: torch.Generator, rows: list[tuple[int, int]], T: int, V: int, scale: float = 1.0,
              bool_mask: bool = False, hint: str | None = None) -> Case:
    B = len(rows)
    logits = randn(g, B, T, V, scale=scale)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = _mask(rows, T)
    mask = mask.bool() if bool_mask else mask
    upstream = randn(g, B)

    def run(fn):
        lg = logits.clone().requires_grad_(True)
        out = fn(lg, ids.clone(), mask.clone())
        if not isinstance(out, torch.Tensor):
            return out
        if not out.requires_grad:
            return (out, "the result is detached from the logits: no gradient would reach the model")
        if out.shape != (B,):
            return (out, f"expected one number per sequence, shape ({B},)")
        (out * upstream).sum().backward()
        return (out.detach(), lg.grad)

    def expected():
        lg = logits.clone().requires_grad_(True)
        nll = F.cross_entropy(lg[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none").view(B, T - 1)
        out = -(nll * mask[:, 1:].float()).sum(1)
        (out * upstream).sum().backward()
        return (out.detach(), lg.grad)

    return Case(name, run=run, expected=expected, names=("logps", "d/dlogits"), atol=1e-4, rtol=1e-4, hint=hint)


@exercise("6.5", "Sequence log-probabilities with a completion mask", reference="course_utils.dpo:sequence_logprobs",
          hint="The logits at position t-1 predict token t: log_softmax(logits[:, :-1]) over the vocabulary (last "
               "axis), gather input_ids[:, 1:], multiply by completion_mask[:, 1:] (as float) and SUM over time. "
               "Output (B,) float32, still attached to the graph.",
          forbid=("torch.nn.functional.cross_entropy", "torch.nn.functional.nll_loss"))
def _():
    g = case_rng(65)
    yield _seq_case("B=3, T=7, V=11: prompt of 3 tokens, replies to the end", g, [(3, 7)] * 3, 7, 11)
    yield _seq_case("B=4, T=9, V=13: prompts of different lengths and right padding", g,
                    [(2, 9), (4, 6), (3, 8), (5, 7)], 9, 13,
                    hint="only completion tokens count: prompt tokens and padding (mask 0) add nothing")
    yield _seq_case("one sequence, T=2: a one-token prompt and a one-token reply", g, [(1, 2)], 2, 5,
                    hint="token t is scored by the logits at t-1: shift the mask too (completion_mask[:, 1:])")
    yield _seq_case("logits ~ 1e3 (numerical stability)", g, [(2, 6), (1, 6)], 6, 7, scale=1e3,
                    hint="use log_softmax (log of softmax underflows to -inf for large logits)")
    yield _seq_case("a bool completion mask", g, [(2, 5), (3, 5)], 5, 6, bool_mask=True,
                    hint="convert the mask to float before multiplying")


# ----------------------------------------------------------------------------------------------
# 6.6 DPO loss and implicit rewards (notebook 03)
# ----------------------------------------------------------------------------------------------
def _dpo_case(name: str, pc, pr, rc, rr, beta: float, hint: str | None = None) -> Case:
    def run(fn):
        c, r = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
        out = fn(c, r, rc.clone(), rr.clone(), beta=beta)
        if not isinstance(out, tuple) or len(out) != 3:
            return (out, "return a tuple (loss, chosen_rewards, rejected_rewards)")
        loss, cr, rj = out
        if not all(isinstance(t, torch.Tensor) for t in out):
            return out
        if loss.dim() != 0:
            return (loss, "the loss must be one number (a 0-d tensor): average over the pairs")
        if not loss.requires_grad:
            return (loss, "the loss is detached: no gradient reaches the policy")
        if cr.requires_grad or rj.requires_grad:
            return (cr, "detach the rewards: they are logged, not trained on")
        loss.backward()
        return (loss.detach(), cr, rj, c.grad, r.grad)

    def expected():
        c, r = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
        gap = (c - rc) - (r - rr)
        loss = F.softplus(-beta * gap).mean()
        loss.backward()
        return (loss.detach(), beta * (pc - rc), beta * (pr - rr), c.grad, r.grad)

    return Case(name, run=run, expected=expected,
                names=("loss", "chosen_rewards", "rejected_rewards", "dloss/dpolicy_chosen", "dloss/dpolicy_rejected"),
                atol=1e-5, rtol=1e-4, hint=hint)


def _logps(g: torch.Generator, B: int, scale: float = 5.0) -> torch.Tensor:
    return -randn(g, B, scale=scale).abs() - 1.0


@exercise("6.6", "DPO loss with implicit rewards", reference="course_utils.dpo:dpo_loss",
          hint="chosen_rewards = beta * (policy_chosen - ref_chosen), rejected_rewards likewise (both detached); "
               "loss = mean of -logsigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))). "
               "Use F.logsigmoid: log(sigmoid(x)) gives -inf for very negative x.",
          forbid=("torch.nn.functional.binary_cross_entropy_with_logits", "torch.nn.functional.softplus"))
def _():
    g = case_rng(66)
    yield _dpo_case("6 pairs, beta 0.1", *(_logps(g, 6) for _ in range(4)), beta=0.1)
    yield _dpo_case("one pair, beta 0.5", *(_logps(g, 1) for _ in range(4)), beta=0.5)
    pc = _logps(g, 5)
    yield _dpo_case("policy equal to the reference: loss log 2, rewards 0", pc, pc - 1.0, pc.clone(), pc - 1.0, beta=0.1)
    rc, rr = _logps(g, 8), _logps(g, 8)
    yield _dpo_case("8 pairs where the policy prefers the REJECTED reply (the loss is not symmetric)",
                    rc - 2.0, rr + 3.0, rc, rr, beta=0.2,
                    hint="chosen log-ratio minus rejected log-ratio; each log-ratio is policy minus reference")
    yield _dpo_case("log-ratio gaps of +-400 with beta 1 (numerical stability)",
                    torch.tensor([-10.0, -410.0, -5.0, -300.0]), torch.tensor([-410.0, -10.0, -300.0, -5.0]),
                    torch.full((4,), -20.0), torch.full((4,), -20.0), beta=1.0,
                    hint="-log(sigmoid(-400)) is inf in float32: use F.logsigmoid")


# ----------------------------------------------------------------------------------------------
# 6.7 Group-relative advantages (notebook 04)
# ----------------------------------------------------------------------------------------------
def _expected_adv(rewards: torch.Tensor, G: int, eps: float = 1e-4) -> torch.Tensor:
    vals = [float(x) for x in rewards]
    out = []
    for i in range(0, len(vals), G):
        grp = vals[i: i + G]
        mu, sd = statistics.fmean(grp), statistics.stdev(grp)  # the sample (unbiased) std, n - 1
        out += [(x - mu) / (sd + eps) for x in grp]
    return torch.tensor(out, dtype=torch.float32)


def _adv_case(name: str, rewards: torch.Tensor, G: int, hint: str | None = None) -> Case:
    return Case(name, args=(rewards, G), expected=lambda: _expected_adv(rewards, G), names="advantages",
                atol=1e-4, rtol=1e-4, hint=hint)


def _raises(fn, *args) -> str:
    try:
        fn(*args)
    except ValueError:
        return "raised ValueError"
    except Exception as exc:  # noqa: BLE001 - any other error type is the wrong answer
        return f"raised {type(exc).__name__}"
    return "returned without an error"


@exercise("6.7", "Group-relative advantages", reference="course_utils.grpo:group_advantages",
          hint="rewards (B,) hold B // G groups of G CONSECUTIVE replies (view(-1, G)); A = (r - group mean) / "
               "(group std + 1e-4) with the unbiased std (torch's default, n - 1); output (B,) float32; a group of "
               "equal rewards gives zeros; raise ValueError when G < 2 or G does not divide B.")
def _():
    g = case_rng(67)
    yield _adv_case("B=8, G=4, random rewards", randn(g, 8), 4)
    yield _adv_case("binary rewards, B=12, G=4 (groups are consecutive, not strided)",
                    torch.tensor([1., 0, 0, 0, 1, 1, 1, 0, 0, 1, 0, 1]), 4,
                    hint="group i is rewards[i*G:(i+1)*G]: use rewards.view(-1, G), not view(G, -1)")
    yield _adv_case("a group whose rewards are all equal (advantages 0, not NaN)",
                    torch.tensor([1., 1, 1, 1, 0, 1, 0, 0]), 4, hint="add eps = 1e-4 to the std before dividing")
    yield _adv_case("one group of G=2", torch.tensor([0.3, 0.9]), 2,
                    hint="the unbiased std divides by n - 1 (torch's default std)")
    yield _adv_case("B=16, G=8, rewards ~ 100 (only differences matter)", randn(g, 16) + 100.0, 8)
    yield Case("G=3 does not divide B=8: raise ValueError", run=lambda fn: _raises(fn, torch.zeros(8), 3),
               expected=lambda: "raised ValueError", names="error",
               hint="check that the batch is a whole number of groups and raise ValueError with a clear message")


# ----------------------------------------------------------------------------------------------
# 6.8 GRPO clipped objective with KL (notebook 04)
# ----------------------------------------------------------------------------------------------
def _expected_grpo(logps, old, adv, mask, ref, clip_eps, beta):
    B, T = logps.shape
    total = 0.0
    for b in range(B):
        terms = []
        for t in range(T):
            if not bool(mask[b, t]):
                continue
            ratio = math.exp(float(logps[b, t]) - float(old[b, t]))
            A = float(adv[b])
            clipped = min(max(ratio, 1 - clip_eps), 1 + clip_eps)
            obj = min(ratio * A, clipped * A)
            if beta:
                d = float(ref[b, t]) - float(logps[b, t])
                obj -= beta * (math.exp(d) - d - 1)
            terms.append(obj)
        total += sum(terms) / max(len(terms), 1)
    return -total / B


def _grpo_case(name: str, g: torch.Generator, rows: list[tuple[int, int]], T: int, *, drift: float = 0.3,
               clip_eps: float = 0.2, beta: float = 0.0, hint: str | None = None) -> Case:
    B = len(rows)
    old = -randn(g, B, T).abs() - 0.5
    logps = old + randn(g, B, T, scale=drift)
    ref = old + randn(g, B, T, scale=0.2)
    adv = randn(g, B)
    mask = _mask(rows, T)
    kwargs = {"clip_eps": clip_eps, "beta": beta, "ref_logps": ref.clone() if beta else None}

    def run(fn):
        lp = logps.clone().requires_grad_(True)
        loss = fn(lp, old.clone(), adv.clone(), mask.clone(), **kwargs)
        if not isinstance(loss, torch.Tensor):
            return loss
        if loss.dim() != 0:
            return (loss, "the loss must be one number (a 0-d tensor)")
        if not loss.requires_grad:
            return (loss, "the loss is detached from logps: no gradient reaches the policy")
        loss.backward()
        return (loss.detach(), lp.grad)

    def expected():
        value = _expected_grpo(logps, old, adv, mask, ref, clip_eps, beta)
        eps = 1e-3  # the gradient by central differences, token by token (float64)
        lp64, grad = logps.double(), torch.zeros(B, T, dtype=torch.float64)
        for b in range(B):
            for t in range(T):
                hi, lo = lp64.clone(), lp64.clone()
                hi[b, t] += eps
                lo[b, t] -= eps
                grad[b, t] = (_expected_grpo(hi, old, adv, mask, ref, clip_eps, beta)
                              - _expected_grpo(lo, old, adv, mask, ref, clip_eps, beta)) / (2 * eps)
        return (torch.tensor(value, dtype=torch.float32), grad.float())

    return Case(name, run=run, expected=expected, names=("loss", "dloss/dlogps"), atol=2e-4, rtol=1e-3, hint=hint)


@exercise("6.8", "GRPO clipped objective with KL", reference="course_utils.grpo:grpo_loss",
          hint="ratio = exp(logps - old_logps); per token min(ratio * A, clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A) "
               "with A = advantages[:, None]; minus beta * (exp(ref - logps) - (ref - logps) - 1) when beta > 0; "
               "average over each reply's masked tokens, then over replies; return MINUS that (a 0-d loss).")
def _():
    g = case_rng(68)
    yield _grpo_case("4 replies x 6 tokens, small drift (clipping rarely active)", g, [(0, 6)] * 4, 6, drift=0.05)
    yield _grpo_case("4 replies x 5 tokens, large drift: clipping matters for both signs of A", g, [(0, 5)] * 4, 5,
                     drift=1.0, hint="min(unclipped, clipped) per token: a pessimistic bound for both signs of A")
    yield _grpo_case("replies of lengths 5, 2, 4 padded to 5", g, [(0, 5), (0, 2), (0, 4)], 5,
                     hint="mean over each reply's own tokens (mask), then mean over replies")
    yield _grpo_case("clip_eps 0.1, large drift", g, [(0, 4)] * 3, 4, drift=0.8, clip_eps=0.1,
                     hint="use the clip_eps argument")
    yield _grpo_case("beta 0.04 with a reference: the KL penalty (k3 estimator)", g, [(0, 4), (0, 3)], 4, beta=0.04,
                     hint="KL per token = exp(ref - logps) - (ref - logps) - 1, SUBTRACTED from the objective times beta")
    yield _grpo_case("beta 0.5, masked prompt positions", g, [(2, 6), (3, 5)], 6, drift=0.5, beta=0.5)
    yield _grpo_case("one reply of one token", g, [(0, 1)], 1)
