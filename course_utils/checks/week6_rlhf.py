"""Week 6 exercises (notebooks 01-02): Bradley-Terry loss, KL-shaped rewards, GAE, the PPO clipped loss.

Expected values come from independent references computed in the trusted checker: torch's
`binary_cross_entropy_with_logits` (a Bradley-Terry loss is a logistic loss on the reward gap), and
plain Python loops over each rollout for the shaped rewards, GAE (as the discounted sum of TD errors)
and the clipped objective (written case by case on the sign of the advantage).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..exercises import Case, case_rng, exercise, randn


def _lengths_mask(lengths: list[int], T: int, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=dtype)


# ----------------------------------------------------------------------------------------------
# 6.1 Bradley-Terry loss (notebook 01)
# ----------------------------------------------------------------------------------------------
def _bt_case(name: str, rc: torch.Tensor, rr: torch.Tensor, hint: str | None = None) -> Case:
    def run(fn):
        c, r = rc.clone().requires_grad_(True), rr.clone().requires_grad_(True)
        loss = fn(c, r)
        if not isinstance(loss, torch.Tensor):
            return loss
        if loss.dim() != 0:
            return (loss, "the loss must be one number (a 0-d tensor): average over the pairs")
        if not loss.requires_grad:
            return (loss, "the loss is detached from the rewards: no gradient reaches the reward model")
        loss.backward()
        return (loss.detach(), c.grad, r.grad)

    def expected():
        c, r = rc.clone().requires_grad_(True), rr.clone().requires_grad_(True)
        loss = F.binary_cross_entropy_with_logits(c - r, torch.ones_like(c))
        loss.backward()
        return (loss.detach(), c.grad, r.grad)

    return Case(name, run=run, expected=expected, names=("loss", "dloss/dr_chosen", "dloss/dr_rejected"),
                atol=1e-5, rtol=1e-4, hint=hint)


@exercise("6.1", "Bradley-Terry loss for a reward model", reference="course_utils.reward:bradley_terry_loss",
          hint="loss = mean over pairs of -log sigmoid(r_chosen - r_rejected); use F.logsigmoid (log(sigmoid(x)) "
               "becomes log(0) = -inf for a large negative gap); the chosen reward comes first.",
          forbid=("torch.nn.functional.binary_cross_entropy_with_logits",
                  "torch.nn.functional.binary_cross_entropy", "torch.nn.functional.soft_margin_loss"))
def _():
    g = case_rng(61)
    yield _bt_case("rewards of 6 pairs", randn(g, 6), randn(g, 6))
    yield _bt_case("one pair (batch of one)", randn(g, 1), randn(g, 1))
    yield _bt_case("16 pairs, rejected mostly higher (the loss is not symmetric)", randn(g, 16), randn(g, 16) + 2.0,
                   hint="the CHOSEN reward minus the REJECTED reward goes into the sigmoid")
    yield _bt_case("8 pairs with gaps up to +-200 (numerical stability)",
                   torch.tensor([200., -200., 50., -90., 0., 3., -150., 120.]), torch.zeros(8),
                   hint="-log(sigmoid(-200)) overflows to inf in float32: use F.logsigmoid")
    yield _bt_case("float64 rewards of 5 pairs (keep the dtype)", randn(g, 5).double(), randn(g, 5).double())


# ----------------------------------------------------------------------------------------------
# 6.2 Shaped per-token rewards: the score at the last real token, a KL penalty on every token (notebook 02)
# ----------------------------------------------------------------------------------------------
def _expected_shaped(score, logp, ref_logp, lengths, beta):
    B, T = logp.shape
    out = torch.zeros(B, T, dtype=logp.dtype)
    for b in range(B):
        for t in range(lengths[b]):
            out[b, t] = -beta * (float(logp[b, t]) - float(ref_logp[b, t]))
        out[b, lengths[b] - 1] += float(score[b])
    return out


def _shaped_case(name: str, g: torch.Generator, lengths: list[int], T: int, beta: float,
                 dtype=torch.float32, hint: str | None = None) -> Case:
    B = len(lengths)
    score, logp = randn(g, B).to(dtype), (-randn(g, B, T).abs() - 0.1).to(dtype)
    ref_logp = (logp + randn(g, B, T, scale=0.5)).to(dtype)
    mask = _lengths_mask(lengths, T, dtype)
    return Case(name, args=(score, logp, ref_logp, mask, beta),
                expected=lambda: _expected_shaped(score, logp, ref_logp, lengths, beta),
                names="rewards", atol=1e-5, rtol=1e-4, hint=hint)


@exercise("6.2", "Per-token rewards with a KL penalty", reference="course_utils.ppo:shaped_rewards",
          hint="rewards[b, t] = -beta * (logp - ref_logp) on real tokens (mask 1), 0 on padding; then add score[b] "
               "at the LAST real token of row b (index mask[b].sum() - 1), not at the last column. Output (B, T), "
               "same dtype as logp.")
def _():
    g = case_rng(62)
    yield _shaped_case("4 rollouts, 6 tokens, no padding, beta 0.1", g, [6, 6, 6, 6], 6, 0.1)
    yield _shaped_case("3 rollouts of lengths 5, 2, 7 padded to 7, beta 0.05", g, [5, 2, 7], 7, 0.05,
                       hint="the score goes on the last REAL token of each row; padding gets no reward and no penalty")
    yield _shaped_case("one rollout of one token, beta 0.2", g, [1], 1, 0.2)
    yield _shaped_case("5 rollouts, lengths 1-4 in 6 columns, beta 0 (score only)", g, [1, 4, 2, 3, 1], 6, 0.0)
    yield _shaped_case("2 rollouts, beta 1.0 (penalty sign: moving away from the reference costs)", g, [3, 5], 5, 1.0,
                       hint="the penalty is -beta * (logp - ref_logp): log pi minus log pi_ref, times minus beta")
    yield _shaped_case("float64, 3 rollouts, lengths 4, 1, 3", g, [4, 1, 3], 4, 0.3, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# 6.3 Generalised advantage estimation (notebook 02)
# ----------------------------------------------------------------------------------------------
def _expected_gae(rewards, values, lengths, gamma, lam):
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=rewards.dtype)
    ret = torch.zeros(B, T, dtype=rewards.dtype)
    for b in range(B):
        n = lengths[b]
        V = [float(values[b, t]) for t in range(n)] + [0.0]  # the reply ends: nothing to bootstrap from
        deltas = [float(rewards[b, t]) + gamma * V[t + 1] - V[t] for t in range(n)]
        for t in range(n):
            a = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            adv[b, t], ret[b, t] = a, a + V[t]
    return adv, ret


def _gae_case(name: str, g: torch.Generator, lengths: list[int], T: int, gamma: float, lam: float,
              dtype=torch.float32, hint: str | None = None) -> Case:
    B = len(lengths)
    mask = _lengths_mask(lengths, T, dtype)
    rewards = (randn(g, B, T, scale=0.3) * mask).to(dtype)
    values = randn(g, B, T).to(dtype)  # values on padding are garbage on purpose: they must not leak in
    return Case(name, args=(rewards, values, mask), kwargs={"gamma": gamma, "lam": lam},
                expected=lambda: _expected_gae(rewards, values, lengths, gamma, lam),
                names=("advantages", "returns"), atol=1e-5, rtol=1e-4, hint=hint)


@exercise("6.3", "Generalised advantage estimation (GAE)", reference="course_utils.ppo:gae",
          hint="go BACKWARDS over t: delta = r_t + gamma * V_{t+1} - V_t with V = 0 after each row's last real token "
               "(ignore values on padding); A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V; both (B, T), "
               "0 on padding, same dtype as the rewards.")
def _():
    g = case_rng(63)
    yield _gae_case("2 rollouts, 5 tokens, gamma 1, lam 0.95", g, [5, 5], 5, 1.0, 0.95)
    yield _gae_case("3 rollouts of lengths 4, 2, 6 (padding), gamma 0.99, lam 0.9", g, [4, 2, 6], 6, 0.99, 0.9,
                    hint="values on padding positions must not be used: V after the last real token is 0")
    yield _gae_case("lam = 1: advantage = discounted return - V", g, [3, 5], 5, 0.9, 1.0)
    yield _gae_case("lam = 0: advantage = one-step TD error", g, [4, 4, 1], 4, 1.0, 0.0)
    yield _gae_case("one rollout of one token", g, [1], 1, 1.0, 0.95)
    yield _gae_case("float64, 2 rollouts, lengths 3 and 1", g, [3, 1], 3, 0.97, 0.8, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# 6.4 PPO clipped loss (notebook 02)
# ----------------------------------------------------------------------------------------------
def _expected_clip(logp, old_logp, adv, mask, eps):
    total, count = 0.0, 0.0
    grads = torch.zeros_like(logp)
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[b, t] == 0:
                continue
            r, a = float(torch.exp(logp[b, t] - old_logp[b, t])), float(adv[b, t])
            # the pessimistic bound: for A >= 0 the ratio is capped at 1 + eps, for A < 0 floored at 1 - eps
            capped = (a >= 0 and r > 1 + eps) or (a < 0 and r < 1 - eps)
            total += (1 + eps if a >= 0 else 1 - eps) * a if capped else r * a
            grads[b, t] = 0.0 if capped else -r * a  # d(-r a)/d logp = -r a
            count += 1
    return torch.tensor(-total / count, dtype=logp.dtype), grads / count


def _clip_case(name: str, g: torch.Generator, lengths: list[int], T: int, eps: float, spread: float = 0.3,
               dtype=torch.float32, hint: str | None = None) -> Case:
    B = len(lengths)
    mask = _lengths_mask(lengths, T, dtype)
    old_logp = (-randn(g, B, T).abs() - 0.5).to(dtype)
    logp = (old_logp + randn(g, B, T, scale=spread)).to(dtype)
    adv = randn(g, B, T).to(dtype)

    def run(fn):
        lp = logp.clone().requires_grad_(True)
        loss = fn(lp, old_logp.clone(), adv.clone(), mask.clone(), eps)
        if not isinstance(loss, torch.Tensor):
            return loss
        if loss.dim() != 0:
            return (loss, "the loss must be one number (a 0-d tensor): the masked mean over real tokens")
        if not loss.requires_grad:
            return (loss, "the loss is detached from logp: no gradient reaches the policy")
        loss.backward()
        return (loss.detach(), lp.grad)

    return Case(name, run=run, expected=lambda: _expected_clip(logp, old_logp, adv, mask, eps),
                names=("loss", "dloss/dlogp"), atol=1e-5, rtol=1e-4, hint=hint)


@exercise("6.4", "PPO clipped policy loss", reference="course_utils.ppo:ppo_clip_loss",
          hint="ratio = exp(logp - old_logp); per token take min(ratio * A, clamp(ratio, 1 - eps, 1 + eps) * A); "
               "loss = -(sum over real tokens) / (number of real tokens); old_logp is a constant.")
def _():
    g = case_rng(64)
    yield _clip_case("3 rollouts, 5 tokens, small steps (nothing clipped), eps 0.2", g, [5, 5, 5], 5, 0.2, spread=0.02)
    yield _clip_case("4 rollouts, 6 tokens, large steps (many clipped), eps 0.2", g, [6, 6, 6, 6], 6, 0.2, spread=1.0,
                     hint="take the MIN of the clipped and unclipped terms; clip the RATIO, not the advantage")
    yield _clip_case("lengths 2, 5, 3 (padding must not count in the mean), eps 0.1", g, [2, 5, 3], 5, 0.1, spread=0.5,
                     hint="average over real tokens only: sum(x * mask) / mask.sum()")
    yield _clip_case("one token, eps 0.3", g, [1], 1, 0.3, spread=0.8)
    yield _clip_case("float64, lengths 4 and 2, eps 0.2", g, [4, 2], 4, 0.2, spread=0.6, dtype=torch.float64)
