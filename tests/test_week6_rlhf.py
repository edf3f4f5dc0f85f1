"""Week 6 (notebooks 01-02): the preference data, the reward model (parity with TRL's RewardTrainer loss),
REINFORCE and PPO pieces, and every check failing on plausible wrong answers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from course_utils import ppo as P
from course_utils import reward as R

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# 6.1 Bradley-Terry loss
# ----------------------------------------------------------------------------------------------
def bt_reversed(rc, rr):
    return -F.logsigmoid(rr - rc).mean()


def bt_naive_log_sigmoid(rc, rr):  # overflows for a large wrong gap
    return -torch.log(torch.sigmoid(rc - rr)).mean()


def bt_sum(rc, rr):
    return -F.logsigmoid(rc - rr).sum()


def bt_sigmoid_not_log(rc, rr):
    return (1 - torch.sigmoid(rc - rr)).mean()


def bt_detached(rc, rr):
    return -F.logsigmoid((rc - rr).detach()).mean().requires_grad_(True)


def bt_hinge(rc, rr):
    return F.relu(1 - (rc - rr)).mean()


def bt_softplus(rc, rr):
    return F.softplus(rr - rc).mean()


def bt_logaddexp(rc, rr):
    gap = rc - rr
    return torch.logaddexp(torch.zeros_like(gap), -gap).sum() / gap.numel()


# ----------------------------------------------------------------------------------------------
# 6.2 shaped rewards
# ----------------------------------------------------------------------------------------------
def shaped_last_column(score, logp, ref_logp, mask, beta):  # ignores padding when placing the score
    r = -beta * (logp - ref_logp) * mask
    r[:, -1] += score
    return r


def shaped_sign_flipped(score, logp, ref_logp, mask, beta):
    last = F.one_hot(mask.sum(1).long() - 1, logp.shape[1]).to(logp.dtype)
    return beta * (logp - ref_logp) * mask + last * score[:, None]


def shaped_unmasked(score, logp, ref_logp, mask, beta):  # padding pays the penalty too
    last = F.one_hot(mask.sum(1).long() - 1, logp.shape[1]).to(logp.dtype)
    return -beta * (logp - ref_logp) + last * score[:, None]


def shaped_score_everywhere(score, logp, ref_logp, mask, beta):
    return (-beta * (logp - ref_logp) + score[:, None]) * mask


def shaped_loop(score, logp, ref_logp, mask, beta):
    out = torch.zeros_like(logp)
    for b in range(logp.shape[0]):
        n = int(mask[b].sum())
        out[b, :n] = -beta * (logp[b, :n] - ref_logp[b, :n])
        out[b, n - 1] = out[b, n - 1] + score[b]
    return out


def shaped_scatter(score, logp, ref_logp, mask, beta):
    kl = (logp - ref_logp) * mask
    last = (mask.sum(1).long() - 1).unsqueeze(1)  # (B, 1)
    return (-beta * kl).scatter_add(1, last, score.unsqueeze(1).to(logp.dtype))


# ----------------------------------------------------------------------------------------------
# 6.3 GAE
# ----------------------------------------------------------------------------------------------
def _gae_loop(rewards, values, mask, gamma, lam, *, mask_values=True, forward=False, bootstrap=True,
              add_values=True):
    B, T = rewards.shape
    v = values * mask if mask_values else values
    adv = torch.zeros_like(rewards)
    steps = range(T) if forward else reversed(range(T))
    carry = torch.zeros(B, dtype=rewards.dtype)
    for t in steps:
        nxt = v[:, t + 1] if (t + 1 < T and bootstrap) else torch.zeros(B, dtype=rewards.dtype)
        delta = rewards[:, t] + gamma * nxt - v[:, t]
        carry = delta + gamma * lam * carry
        adv[:, t] = carry * mask[:, t]
    return adv, (adv + v) * mask if add_values else adv


def gae_forward(rewards, values, mask, *, gamma=1.0, lam=0.95):
    return _gae_loop(rewards, values, mask, gamma, lam, forward=True)


def gae_no_bootstrap(rewards, values, mask, *, gamma=1.0, lam=0.95):
    return _gae_loop(rewards, values, mask, gamma, lam, bootstrap=False)


def gae_padding_leaks(rewards, values, mask, *, gamma=1.0, lam=0.95):  # V on padding used as V_{t+1}
    return _gae_loop(rewards, values, mask, gamma, lam, mask_values=False)


def gae_returns_are_advantages(rewards, values, mask, *, gamma=1.0, lam=0.95):
    return _gae_loop(rewards, values, mask, gamma, lam, add_values=False)


def gae_ignores_lambda(rewards, values, mask, *, gamma=1.0, lam=0.95):
    return _gae_loop(rewards, values, mask, gamma, 1.0)


def gae_matrix(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """Closed form: A = D @ delta with D[t, k] = (gamma lam)^(k - t) for k >= t."""
    T = rewards.shape[1]
    v = values * mask
    v_next = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], 1)  # (B, T); padding after the end holds 0
    delta = (rewards + gamma * v_next - v) * mask
    idx = torch.arange(T)
    power = (idx[None, :] - idx[:, None]).clamp(min=0).to(rewards.dtype)  # (T, T) k - t
    D = torch.where(idx[None, :] >= idx[:, None], (gamma * lam) ** power, torch.zeros((), dtype=rewards.dtype))
    adv = delta @ D.T * mask  # (B, T)
    return adv, (adv + v) * mask


def gae_per_row(rewards, values, mask, *, gamma=1.0, lam=0.95):
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        a = 0.0
        for t in reversed(range(n)):
            v_next = values[b, t + 1] if t + 1 < n else 0.0
            a = rewards[b, t] + gamma * v_next - values[b, t] + gamma * lam * a
            adv[b, t], ret[b, t] = a, a + values[b, t]
    return adv, ret


# ----------------------------------------------------------------------------------------------
# 6.4 PPO clipped loss
# ----------------------------------------------------------------------------------------------
def _mm(x, mask):
    return (x * mask).sum() / mask.sum()


def clip_max(logp, old_logp, adv, mask, clip_eps=0.2):  # optimistic instead of pessimistic
    r = torch.exp(logp - old_logp)
    return -_mm(torch.maximum(r * adv, r.clamp(1 - clip_eps, 1 + clip_eps) * adv), mask)


def clip_advantage(logp, old_logp, adv, mask, clip_eps=0.2):
    r = torch.exp(logp - old_logp)
    return -_mm(torch.minimum(r * adv, r * adv.clamp(1 - clip_eps, 1 + clip_eps)), mask)


def clip_mean_with_padding(logp, old_logp, adv, mask, clip_eps=0.2):
    r = torch.exp(logp - old_logp)
    return -(torch.minimum(r * adv, r.clamp(1 - clip_eps, 1 + clip_eps) * adv) * mask).mean()


def clip_ratio_not_exp(logp, old_logp, adv, mask, clip_eps=0.2):
    r = logp - old_logp + 1
    return -_mm(torch.minimum(r * adv, r.clamp(1 - clip_eps, 1 + clip_eps) * adv), mask)


def clip_only_clipped_term(logp, old_logp, adv, mask, clip_eps=0.2):
    r = torch.exp(logp - old_logp)
    return -_mm(r.clamp(1 - clip_eps, 1 + clip_eps) * adv, mask)


def clip_where(logp, old_logp, adv, mask, clip_eps=0.2):
    r = torch.exp(logp - old_logp)
    bound = torch.where(adv >= 0, torch.minimum(r, torch.full_like(r, 1 + clip_eps)),
                        torch.maximum(r, torch.full_like(r, 1 - clip_eps)))
    return -(bound * adv)[mask.bool()].mean()


def clip_per_token_max_form(logp, old_logp, adv, mask, clip_eps=0.2):
    r = (logp - old_logp).exp()
    losses = torch.max(-adv * r, -adv * torch.clamp(r, 1 - clip_eps, 1 + clip_eps))  # TRL/OpenAI baselines form
    return (losses * mask).sum() / mask.sum()


WRONG_IMPLEMENTATIONS = {
    "6.1": [bt_reversed, bt_naive_log_sigmoid, bt_sum, bt_sigmoid_not_log, bt_detached, bt_hinge],
    "6.2": [shaped_last_column, shaped_sign_flipped, shaped_unmasked, shaped_score_everywhere],
    "6.3": [gae_forward, gae_no_bootstrap, gae_padding_leaks, gae_returns_are_advantages, gae_ignores_lambda],
    "6.4": [clip_max, clip_advantage, clip_mean_with_padding, clip_ratio_not_exp, clip_only_clipped_term],
}
CORRECT_ALTERNATIVES = {
    "6.1": [bt_softplus, bt_logaddexp],
    "6.2": [shaped_loop, shaped_scatter],
    "6.3": [gae_matrix, gae_per_row],
    "6.4": [clip_where, clip_per_token_max_form],
}


# ----------------------------------------------------------------------------------------------
# The data set
# ----------------------------------------------------------------------------------------------
def test_committed_files_are_what_the_generator_writes(tmp_path):
    R.write_splits(tmp_path)
    for split in R.SPLIT_SIZES:
        committed = (ROOT / "datasets" / "preferences" / f"{split}.jsonl").read_bytes()
        assert (tmp_path / f"{split}.jsonl").read_bytes() == committed, f"{split}.jsonl is stale: rerun the generator"


def test_verifier_agrees_with_every_preference_and_splits_are_disjoint():
    prompts = {}
    for split, n in R.SPLIT_SIZES.items():
        pairs = R.load_preferences(split)
        assert len(pairs) == n
        assert {p["kind"] for p in pairs} == set(R.KINDS)
        for p in pairs:
            assert R.verify(p["check"], p["chosen"]), p
            assert not R.verify(p["check"], p["rejected"]), p
        prompts[split] = {p["prompt"] for p in pairs}
    assert len(R.load_preferences("test")) >= 200
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["val"]
    assert not prompts["val"] & prompts["test"]


@pytest.mark.parametrize("check, reply, ok", [
    ({"answer": 12}, "7 plus 5 is 12.", True), ({"answer": 12}, "It is 13", False), ({"answer": 12}, "twelve", False),
    ({"answer": 12, "max_words": 3}, "The answer is 12.", False), ({"rule": "uppercase"}, "CAT, DOG", True),
    ({"rule": "uppercase"}, "", False), ({"rule": "lowercase"}, "cat, Dog", False), ({"rule": "count", "n": 2}, "a, b.", True),
    ({"rule": "separator", "sep": ";"}, "a; b, c", False), ({"rule": "start", "word": "Sure"}, "Sure! a, b", True),
])
def test_verify(check, reply, ok):
    assert R.verify(check, reply) is ok


def test_bad_input_messages():
    with pytest.raises(ValueError, match="unknown split"):
        R.load_preferences("dev")
    with pytest.raises(ValueError, match="unknown check"):
        R.verify({"rule": "rhymes"}, "x")
    with pytest.raises(ValueError, match="same reply"):
        R.encode_pairs([{"prompt": "p", "chosen": "yes", "rejected": "yes "}], tok=None)
    with pytest.raises(ValueError, match="needs 'prompt', 'chosen' and 'rejected'"):
        R.encode_pairs([{"prompt": "p", "chosen": "yes"}], tok=None)
    with pytest.raises(ValueError, match="same length"):
        R.bradley_terry_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(TypeError, match="tensors"):
        R.bradley_terry_loss([1.0], [0.0])
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="same \\(B, T\\) shape"):
        P.shaped_rewards(torch.zeros(2), z, torch.zeros(2, 4), torch.ones(2, 3), 0.1)
    with pytest.raises(ValueError, match="one number per rollout"):
        P.shaped_rewards(torch.zeros(3), z, z, torch.ones(2, 3), 0.1)
    with pytest.raises(ValueError, match="no response tokens"):
        P.shaped_rewards(torch.zeros(2), z, z, torch.tensor([[1.0, 0, 0], [0, 0, 0]]), 0.1)
    with pytest.raises(ValueError, match="same \\(B, T\\) shape"):
        P.gae(z, z, torch.ones(3, 3))
    with pytest.raises(ValueError, match="same \\(B, T\\) shape"):
        P.ppo_clip_loss(z, z, z, torch.ones(2, 2))
    with pytest.raises(ValueError, match="algo must be"):
        P.train_rl(None, None, None, [], P.RLConfig(algo="a2c"))


# ----------------------------------------------------------------------------------------------
# Package pieces against independent references
# ----------------------------------------------------------------------------------------------
def test_token_logprobs_match_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, tokens = torch.randn(2, 5, 11, generator=g), torch.randint(11, (2, 5), generator=g)
    ce = F.cross_entropy(logits.reshape(-1, 11), tokens.reshape(-1), reduction="none").view(2, 5)
    torch.testing.assert_close(P.token_logprobs(logits, tokens), -ce)


def test_reinforce_advantages_are_return_to_go_minus_the_batch_mean():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    adv = P.reinforce_advantages(rewards, mask)
    # returns-to-go: [1, 1, 1] and [2, 2, 0]; per-position means over running rollouts: [1.5, 1.5, 1]
    torch.testing.assert_close(adv, torch.tensor([[-0.5, -0.5, 0.0], [0.5, 0.5, 0.0]]))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("lengths", [[5, 5, 5], [5, 2, 7, 1]])
def test_reward_model_pools_like_llama_for_sequence_classification(lengths):
    from transformers import LlamaForSequenceClassification

    lm = _tiny_llama()
    rm = R.RewardModel.from_causal_lm(lm, train_layers=1)
    clf = LlamaForSequenceClassification(lm.config.__class__.from_dict({**lm.config.to_dict(), "num_labels": 1}))
    clf.model.load_state_dict(rm.backbone.state_dict())
    clf.score.weight.data.copy_(rm.score.weight.data)
    T = max(lengths)
    ids = torch.randint(1, 64, (len(lengths), T))
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    ids = ids * mask  # right padding with the pad id 0
    with torch.no_grad():
        torch.testing.assert_close(rm(ids, mask), clf(input_ids=ids, attention_mask=mask).logits.squeeze(-1),
                                   atol=1e-5, rtol=1e-4)
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and not any("layers.0." in n for n in trainable)


def test_gae_with_lambda_one_and_zero_values_gives_returns_to_go():
    rewards, mask = torch.tensor([[1.0, 0.0, 2.0]]), torch.ones(1, 3)
    adv, ret = P.gae(rewards, torch.zeros(1, 3), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[3.0, 2.0, 2.0]]))
    torch.testing.assert_close(ret, adv)


@pytest.mark.slow
def test_reward_loss_equals_trl_reward_trainer_on_one_batch():
    """Our Bradley-Terry loss on TRL's own first batch equals RewardTrainer.compute_loss (same weights)."""
    from transformers import AutoTokenizer

    from course_utils import data

    data._ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(data._smollm2_dir())
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    rm = R.RewardModel.from_causal_lm(LlamaForCausalLM(cfg), train_layers=1)
    pairs = R.load_preferences("val")[:8]
    trl_loss, ours, n = R.trl_reward_loss(rm, cfg, tok, pairs, batch_size=4)
    assert n == 4
    assert abs(trl_loss - ours) < 1e-6


def _tiny_policy_rm_tok():
    """A tiny random Llama as policy (LoRA rank 2 + value head) and as reward model, with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from course_utils import data

    data._ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(data._smollm2_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    rm = R.RewardModel.from_causal_lm(LlamaForCausalLM(cfg), train_layers=1)
    policy = P.PolicyWithValue(LlamaForCausalLM(cfg), rank=2, last_layers=1)
    return policy, rm, tok


@pytest.mark.slow
def test_rl_step_runs_and_starts_at_the_reference():
    """One REINFORCE and one PPO step on a tiny random Llama: the first rollout has KL 0 (LoRA's B starts at 0)."""
    policy, rm, tok = _tiny_policy_rm_tok()
    items = R.load_preferences("train")[:8]
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    for algo in ("reinforce", "ppo"):
        hist = P.train_rl(policy, rm, tok, items, P.RLConfig(algo=algo, steps=1, batch_size=2, max_new_tokens=4))
        assert set(hist) == {"step", "proxy", "gold", "kl", "length"} and len(hist["kl"]) == 1
        if algo == "reinforce":
            assert abs(hist["kl"][0]) < 1e-5
    moved = [n for n, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora" in n for n in moved) and any("value_head" in n for n in moved)
    ev = P.evaluate_policy(policy, rm, tok, items[:3], max_new_tokens=4)
    assert len(ev["reply"]) == len(ev["proxy"]) == len(ev["gold"]) == 3


@pytest.mark.slow
def test_checkpoint_evaluator_logs_held_out_proxy_gold_and_kl_at_the_chosen_steps():
    """The over-optimisation harness: `train_rl` calls back at step 0 and after every update; the evaluator logs
    only at the chosen steps, one value per held-out item; at step 0 the policy is the reference, so KL is 0."""
    policy, rm, tok = _tiny_policy_rm_tok()
    items, held = R.load_preferences("train")[:8], R.load_preferences("val")[:3]
    callback, log = P.checkpoint_evaluator(policy, rm, tok, held, at=(0, 2), max_new_tokens=4, kl_samples=2)
    seen = []
    P.train_rl(policy, rm, tok, items, P.RLConfig(steps=2, batch_size=2, max_new_tokens=4, lr=1e-2),
               callback=lambda s: (seen.append(s), callback(s)))
    assert seen == [0, 1, 2]
    assert [e["step"] for e in log] == [0, 2]
    for e in log:
        assert len(e["kl"]) == len(e["proxy"]) == len(e["gold"]) == len(e["reply"]) == 3
    assert max(abs(k) for k in log[0]["kl"]) < 1e-5
    with pytest.raises(ValueError, match="samples must be at least 1"):
        P.sampled_kl(policy, tok, held, samples=0)


def test_best_of_n_expectation_equals_enumerating_every_subset():
    import itertools
    import math
    import random

    rng = random.Random(0)
    scores = [rng.gauss(0, 1) for _ in range(7)]
    values = [rng.random() < 0.5 for _ in range(7)]
    for n in range(1, 8):
        subsets = list(itertools.combinations(range(7), n))
        brute = sum(values[max(s, key=lambda i: scores[i])] for s in subsets) / len(subsets)
        assert math.isclose(P.best_of_n_expectation(scores, values, n), brute, abs_tol=1e-12)
    assert P.best_of_n_expectation(scores, scores, 1) == pytest.approx(sum(scores) / 7)  # n=1: the plain mean
    assert P.best_of_n_expectation(scores, scores, 7) == max(scores)  # n=N: the single best sample
    assert P.best_of_n_kl(1) == 0.0 and P.best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    with pytest.raises(ValueError, match="between 1 and"):
        P.best_of_n_expectation(scores, values, 8)
    with pytest.raises(ValueError, match="differ in length"):
        P.best_of_n_expectation(scores, values[:3], 2)
