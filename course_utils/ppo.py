"""RL on a language model from scratch: REINFORCE with a baseline, then PPO with a value head and a KL penalty.

Reading order: per-token log-probabilities -> reward shaping (the reward model's score at the last token,
a KL penalty to a frozen reference at every token) -> advantages (REINFORCE: return minus a baseline;
PPO: generalised advantage estimation, GAE) -> the clipped PPO objective -> rollouts and the training loop.

Shapes: B rollouts, T response tokens (right-padded; `mask` is 1 on real response tokens).
Papers: Williams 1992 (REINFORCE), Schulman et al. 2016 (GAE), Schulman et al. 2017 (PPO),
Ziegler et al. 2019 and Ouyang et al. 2022 (PPO with a KL penalty for language models).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .reward import chat_messages, chat_ids, verify


def _same_shape(**tensors: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"these must all have the same (B, T) shape, one entry per response token: {shapes}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (all rollouts' real tokens pooled)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(token_t | earlier tokens): logits (B, T, V) that predicted tokens (B, T) -> (B, T)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Rewards: a score for the whole reply, a KL penalty for every token
# ----------------------------------------------------------------------------------------------
def shaped_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                   beta: float) -> torch.Tensor:
    """Per-token rewards (B, T): -beta * (logp - ref_logp) on every real token, plus `score` on the last real one.

    The sum over a reply is score - beta * (a sample of KL(pi || pi_ref)): the policy earns the reward model's
    score but pays for every nat it moves away from the frozen reference (Ziegler et al. 2019, eq. 2).
    """
    _same_shape(logp=logp, ref_logp=ref_logp, mask=mask)
    if score.shape != logp.shape[:1]:
        raise ValueError(f"score {tuple(score.shape)} must hold one number per rollout: shape ({logp.shape[0]},)")
    lengths = mask.sum(dim=1).long()
    if (lengths == 0).any():
        raise ValueError("a rollout has no response tokens (its mask row is all zeros): drop it before shaping")
    mask = mask.to(logp.dtype)
    rewards = -beta * (logp - ref_logp) * mask  # (B, T)
    last = F.one_hot(lengths - 1, logp.shape[1]).to(logp.dtype)  # (B, T): 1 at the last real token
    return rewards + last * score.to(logp.dtype).unsqueeze(1)


def kl_to_reference(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-rollout KL estimate (B,): the sum over its response tokens of log pi - log pi_ref."""
    return ((logp - ref_logp) * mask).sum(dim=1)


# ----------------------------------------------------------------------------------------------
# Advantages: how much better than expected was each action?
# ----------------------------------------------------------------------------------------------
def reinforce_advantages(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a baseline: every token of a reply gets (its return-to-go) - (the batch mean return-to-go
    at that position). The baseline lowers the variance and leaves the expected gradient unchanged."""
    _same_shape(rewards=rewards, mask=mask)
    returns = (rewards * mask).flip(1).cumsum(1).flip(1)  # (B, T) sum of rewards from t to the end
    baseline = masked_mean_over_batch(returns, mask)  # (T,)
    return (returns - baseline) * mask


def masked_mean_over_batch(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (T,): the mean over the rollouts that are still running at each position."""
    return (x * mask).sum(0) / mask.sum(0).clamp(min=1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016): (advantages, returns), each (B, T).

    delta_t = r_t + gamma * V_{t+1} - V_t, with V = 0 after a reply's last real token;
    A_t = delta_t + gamma * lam * A_{t+1}, computed backwards; returns = A + V (the value head's targets).
    """
    _same_shape(rewards=rewards, values=values, mask=mask)
    mask = mask.to(values.dtype)
    values = values * mask
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


# ----------------------------------------------------------------------------------------------
# The clipped objective
# ----------------------------------------------------------------------------------------------
def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  clip_eps: float = 0.2) -> torch.Tensor:
    """-masked mean of min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), ratio = exp(logp - old_logp).

    The min makes the objective pessimistic: once a token's probability has moved more than eps in the
    direction its advantage favours, its gradient is zero (Schulman et al. 2017, eq. 7).
    """
    _same_shape(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    return -masked_mean(torch.minimum(unclipped, clipped), mask.to(logp.dtype))


# ----------------------------------------------------------------------------------------------
# The policy: a causal LM with LoRA adapters and a value head; the reference is the same LM, adapters off
# ----------------------------------------------------------------------------------------------
class PolicyWithValue(nn.Module):
    """A PEFT-wrapped causal LM plus a linear value head on its last hidden state (TRL's layout).

    `reference()` is a context in which the adapters are off: the frozen starting model, for free.
    """

    def __init__(self, lm: nn.Module, *, rank: int = 8, last_layers: int = 4, seed: int = 0):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        n = lm.config.num_hidden_layers
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                            layers_to_transform=list(range(n - last_layers, n)))
        self.lm = get_peft_model(lm, config)
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def reference(self):
        return self.lm.disable_adapter()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, L, V), values (B, L)) over the whole prompt + response sequence."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1)


@dataclass
class Rollouts:
    """One batch of sampled replies: left-padded prompt + right-padded response, and what scored them."""
    input_ids: torch.Tensor  # (B, P + T) prompt then response tokens
    attention_mask: torch.Tensor  # (B, P + T)
    mask: torch.Tensor  # (B, T) 1 on real response tokens (up to and including the end-of-turn token)
    prompt_len: int  # P
    texts: list[str] = field(default_factory=list)  # the decoded replies


@torch.no_grad()
def rollout(policy: PolicyWithValue, tok, prompts: list[str], *, max_new_tokens: int = 16,
            temperature: float = 1.0, greedy: bool = False) -> Rollouts:
    """Sample one reply per prompt from the policy (chat template, left padding)."""
    tok.padding_side = "left"
    texts = [tok.apply_chat_template(chat_messages(p), tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(policy.value_head.weight.device)
    policy.eval()
    out = policy.lm.generate(**enc, max_new_tokens=max_new_tokens, do_sample=not greedy,
                             temperature=temperature if not greedy else None, top_k=0 if not greedy else None,
                             top_p=1.0 if not greedy else None, pad_token_id=tok.pad_token_id)
    P = enc["input_ids"].shape[1]
    response = out[:, P:]  # (B, T)
    ended = (response == tok.eos_token_id).long()
    # real tokens: everything up to and including the first end-of-turn token
    mask = (torch.cumsum(ended, 1) - ended == 0).long()
    attention_mask = torch.cat([enc["attention_mask"], mask], 1)
    replies = [tok.decode(r[m.bool()], skip_special_tokens=True).strip() for r, m in zip(response, mask)]
    return Rollouts(out, attention_mask, mask, P, replies)


def response_stats(policy: PolicyWithValue, ro: Rollouts, *, reference: bool = False, grad: bool = False,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities (of the distribution sampled at `temperature`) and values of the response
    tokens: two (B, T) tensors."""
    ctx = policy.reference() if reference else contextlib.nullcontext()
    with ctx, torch.set_grad_enabled(grad):
        logits, values = policy(ro.input_ids, ro.attention_mask)
    P = ro.prompt_len
    # position i predicts token i + 1: the logits at P-1 .. L-2 score the response tokens P .. L-1
    logp = token_logprobs(logits[:, P - 1:-1] / temperature, ro.input_ids[:, P:])  # (B, T)
    return logp, values[:, P - 1:-1]  # the value of the state before each response token


@torch.no_grad()
def score_replies(rm, tok, prompts: list[str], replies: list[str]) -> torch.Tensor:
    """The reward model's score of each (prompt, reply): (B,)."""
    from .reward import collate_pairs

    ids = [{"chosen_ids": chat_ids(tok, p, r), "rejected_ids": []} for p, r in zip(prompts, replies)]
    batch = collate_pairs(ids, tok.pad_token_id)
    n, device = len(prompts), rm.score.weight.device
    return rm(batch["input_ids"][:n].to(device), batch["attention_mask"][:n].to(device)).float().cpu()


# ----------------------------------------------------------------------------------------------
# Training: one function, two algorithms
# ----------------------------------------------------------------------------------------------
@dataclass
class RLConfig:
    algo: str = "ppo"  # "ppo" (clipped objective, value head, GAE) or "reinforce" (return minus batch baseline)
    steps: int = 10  # rollout batches
    batch_size: int = 8  # prompts per rollout batch
    max_new_tokens: int = 16  # reply length cap
    temperature: float = 1.0  # sampling temperature; the policy is the tempered distribution (as in TRL)
    beta: float = 0.05  # weight of the KL penalty to the reference
    lr: float = 1e-4  # AdamW on the LoRA adapters and the value head
    ppo_epochs: int = 2  # optimisation passes over each rollout batch (PPO only; REINFORCE uses one)
    clip_eps: float = 0.2  # PPO clip range
    gamma: float = 1.0  # discount (1: the reply is one short episode)
    lam: float = 0.95  # GAE lambda
    vf_coef: float = 0.1  # weight of the value loss
    seed: int = 0


def train_rl(policy: PolicyWithValue, rm, tok, items: list[dict[str, Any]], cfg: RLConfig,
             advantages_fn: Callable | None = None, clip_loss_fn: Callable | None = None,
             shape_fn: Callable | None = None, callback: Callable[[int], None] | None = None
             ) -> dict[str, list[float]]:
    """RL against the reward model; logs per step the proxy (reward-model score), the gold rate (the
    verifier on the same replies) and the KL to the reference. `items` carry "prompt" and "check".
    `callback(step)`, if given, runs after every update (step 0: before the first), e.g. a held-out evaluation."""
    from tqdm.auto import tqdm

    if cfg.algo not in ("ppo", "reinforce"):
        raise ValueError(f"algo must be 'ppo' or 'reinforce', got {cfg.algo!r}")
    shape_fn, clip_loss_fn, gae_fn = shape_fn or shaped_rewards, clip_loss_fn or ppo_clip_loss, advantages_fn or gae
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    hist: dict[str, list[float]] = {k: [] for k in ("step", "proxy", "gold", "kl", "length")}
    if callback is not None:
        callback(0)
    for step in (bar := tqdm(range(1, cfg.steps + 1), desc=f"{cfg.algo} seed {cfg.seed}")):
        batch = [items[i] for i in torch.randint(len(items), (cfg.batch_size,), generator=g).tolist()]
        prompts = [b["prompt"] for b in batch]
        ro = rollout(policy, tok, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
        score = score_replies(rm, tok, prompts, ro.texts).to(ro.mask.device)
        ref_logp, _ = response_stats(policy, ro, reference=True, temperature=cfg.temperature)
        mask = ro.mask.float()
        policy.train()  # (no dropout in SmolLM2 or the adapters: the same function as in eval mode)
        for epoch in range(cfg.ppo_epochs if cfg.algo == "ppo" else 1):
            logp, values = response_stats(policy, ro, grad=True, temperature=cfg.temperature)
            if epoch == 0:  # before any update the policy is the one that sampled: its log-probs are the old ones
                old_logp, old_values = logp.detach(), values.detach()
                rewards = shape_fn(score, old_logp, ref_logp, mask, cfg.beta)
                if cfg.algo == "reinforce":
                    adv = reinforce_advantages(rewards, mask)
                else:
                    adv, returns = gae_fn(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
                    centred = adv - masked_mean(adv, mask)
                    std = centred.pow(2).mul(mask).sum().div(mask.sum()).sqrt().clamp(min=1e-6)
                    adv = centred / std * mask  # whitened: zero mean, unit variance over real tokens
            if cfg.algo == "reinforce":
                loss = -masked_mean(logp * adv, mask)
            else:
                loss = clip_loss_fn(logp, old_logp, adv, mask, cfg.clip_eps) \
                    + cfg.vf_coef * 0.5 * masked_mean((values - returns) ** 2, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.algo == "ppo":
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        hist["step"].append(step)
        hist["proxy"].append(score.mean().item())
        hist["gold"].append(sum(verify(b["check"], t) for b, t in zip(batch, ro.texts)) / len(batch))
        hist["kl"].append(kl_to_reference(old_logp, ref_logp, mask).mean().item())
        hist["length"].append(mask.sum(1).mean().item())
        bar.set_postfix(proxy=f"{hist['proxy'][-1]:.2f}", gold=f"{hist['gold'][-1]:.2f}", kl=f"{hist['kl'][-1]:.2f}")
        if callback is not None:
            callback(step)
    return hist


@torch.no_grad()
def evaluate_policy(policy: PolicyWithValue, rm, tok, items: list[dict[str, Any]], *, batch_size: int = 16,
                    max_new_tokens: int = 16, reference: bool = False) -> dict[str, list]:
    """Greedy replies to held-out items: per item the reply, the proxy score and the gold verdict."""
    out: dict[str, list] = {"reply": [], "proxy": [], "gold": []}
    ctx = policy.reference() if reference else contextlib.nullcontext()
    with ctx:
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            prompts = [c["prompt"] for c in chunk]
            ro = rollout(policy, tok, prompts, max_new_tokens=max_new_tokens, greedy=True)
            out["reply"] += ro.texts
            out["proxy"] += score_replies(rm, tok, prompts, ro.texts).tolist()
            out["gold"] += [verify(c["check"], t) for c, t in zip(chunk, ro.texts)]
    return out


@torch.no_grad()
def sampled_kl(policy: PolicyWithValue, tok, items: list[dict[str, Any]], *, samples: int = 1, batch_size: int = 16,
               max_new_tokens: int = 16, temperature: float = 1.0) -> list[float]:
    """Per item, KL(policy || reference) in nats per reply, estimated from `samples` replies sampled from the policy
    (both tempered by `temperature`): the mean over them of sum_t log pi(a_t) - log pi_ref(a_t). One per item."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    totals = [0.0] * len(items)
    for _ in range(samples):
        for i in range(0, len(items), batch_size):
            prompts = [c["prompt"] for c in items[i:i + batch_size]]
            ro = rollout(policy, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature)
            logp, _ = response_stats(policy, ro, temperature=temperature)
            ref_logp, _ = response_stats(policy, ro, reference=True, temperature=temperature)
            for j, k in enumerate(kl_to_reference(logp, ref_logp, ro.mask.float()).tolist()):
                totals[i + j] += k / samples
    return totals


def checkpoint_evaluator(policy: PolicyWithValue, rm, tok, items: list[dict[str, Any]], at: set[int] | list[int], *,
                         max_new_tokens: int = 16, kl_samples: int = 2, temperature: float = 1.0
                         ) -> tuple[Callable[[int], None], list[dict]]:
    """A `train_rl` callback that, at the steps in `at`, evaluates the policy on held-out `items`: greedy replies
    scored by the reward model (proxy) and the verifier (gold), and the sampled KL to the reference (at the
    `temperature` the policy was trained at).
    Returns (callback, log); each log entry is {"step", "kl", "proxy", "gold", "reply"} with per-item lists."""
    at, log = set(at), []

    def callback(step: int) -> None:
        if step not in at:
            return
        ev = evaluate_policy(policy, rm, tok, items, max_new_tokens=max_new_tokens)
        kl = sampled_kl(policy, tok, items, samples=kl_samples, max_new_tokens=max_new_tokens, temperature=temperature)
        log.append({"step": step, "kl": kl, **ev})

    return callback, log


# ----------------------------------------------------------------------------------------------
# Best-of-n: optimising against the reward model without training (Stiennon et al. 2020, Gao et al. 2023)
# ----------------------------------------------------------------------------------------------
def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || reference) in nats for picking the highest-scored of n samples: log n - (n - 1) / n
    (exact when no two samples tie; an upper bound otherwise)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_expectation(scores: Sequence[float], values: Sequence[float], n: int) -> float:
    """Expected `values` of the reply that best-of-n keeps (the highest score among n samples), estimated without
    bias from N >= n samples of one prompt: every n-subset of the N is equally likely, and the sample ranked i-th
    lowest (0-based) is the best of a random n-subset with probability C(i, n-1) / C(N, n).
    Ties in `scores` are broken by position (stable sort)."""
    N = len(scores)
    if len(values) != N:
        raise ValueError(f"scores and values differ in length: {N} vs {len(values)}")
    if not 1 <= n <= N:
        raise ValueError(f"n must be between 1 and the number of samples ({N}), got {n}")
    order = sorted(range(N), key=lambda i: scores[i])
    total = math.comb(N, n)
    return sum(math.comb(rank, n - 1) * float(values[i]) for rank, i in enumerate(order)) / total


@torch.no_grad()
def sample_replies(policy: PolicyWithValue, tok, prompt: str, n: int, *, batch_size: int = 16, max_new_tokens: int = 16,
                   temperature: float = 1.0, reference: bool = False) -> list[str]:
    """`n` replies sampled from the policy (or, with reference=True, from the reference) for one prompt."""
    replies: list[str] = []
    ctx = policy.reference() if reference else contextlib.nullcontext()
    with ctx:
        while len(replies) < n:
            k = min(batch_size, n - len(replies))
            replies += rollout(policy, tok, [prompt] * k, max_new_tokens=max_new_tokens, temperature=temperature).texts
    return replies
