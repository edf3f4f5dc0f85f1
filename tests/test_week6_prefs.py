"""Week 6 (notebooks 03-04): the checks of 6.5-6.8 fail on plausible wrong answers and pass correct
alternatives; DPO and GRPO pieces match their references; bad input gets a clear message; the RL prompts
are deterministic and held out; DPO matches TRL's DPOTrainer on a fixed batch (slow: loads SmolLM2)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from course_utils import dpo, grpo


# ----------------------------------------------------------------------------------------------
# 6.5 sequence log-probabilities
# ----------------------------------------------------------------------------------------------
def seq_no_shift(logits, ids, mask):  # scores token t with the logits AT t (no shift)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return (logp * mask.float()).sum(-1)


def seq_unshifted_mask(logits, ids, mask):  # shifts the tokens but takes mask[:, :-1]
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logp * mask[:, :-1].float()).sum(-1)


def seq_mean(logits, ids, mask):  # averages instead of summing
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    m = mask[:, 1:].float()
    return (logp * m).sum(-1) / m.sum(-1)


def seq_no_mask(logits, ids, mask):  # counts the prompt and the padding too
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return logp.sum(-1)


def seq_log_of_softmax(logits, ids, mask):  # log(softmax): -inf for large logits
    logp = torch.log(torch.softmax(logits[:, :-1].float(), -1)).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logp * mask[:, 1:].float()).sum(-1)


def seq_detached(logits, ids, mask):
    return dpo_seq_alt_loop(logits.detach(), ids, mask)


def dpo_seq_alt_loop(logits, ids, mask):  # correct: a Python loop over the completion tokens
    out = []
    for b in range(logits.shape[0]):
        total = logits.new_zeros((), dtype=torch.float32)
        for t in range(1, logits.shape[1]):
            if bool(mask[b, t]):
                total = total + torch.log_softmax(logits[b, t - 1].float(), -1)[ids[b, t]]
        out.append(total)
    return torch.stack(out)


def seq_alt_logsumexp(logits, ids, mask):  # correct: logit of the token minus logsumexp
    lg = logits[:, :-1].float()
    tok = lg.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, -1)
    return torch.where(mask[:, 1:].bool(), tok, torch.zeros_like(tok)).sum(-1)


# ----------------------------------------------------------------------------------------------
# 6.6 DPO loss
# ----------------------------------------------------------------------------------------------
def dpo_swapped_ratio(pc, pr, rc, rr, *, beta=0.1):  # reference minus policy
    loss = -F.logsigmoid(beta * ((rc - pc) - (rr - pr))).mean()
    return loss, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def dpo_no_beta_in_rewards(pc, pr, rc, rr, *, beta=0.1):
    loss = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    return loss, (pc - rc).detach(), (pr - rr).detach()


def dpo_log_sigmoid_naive(pc, pr, rc, rr, *, beta=0.1):  # overflows for large gaps
    loss = -torch.log(torch.sigmoid(beta * ((pc - rc) - (pr - rr)))).mean()
    return loss, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def dpo_no_reference(pc, pr, rc, rr, *, beta=0.1):  # forgets the reference model
    loss = -F.logsigmoid(beta * (pc - pr)).mean()
    return loss, (beta * pc).detach(), (beta * pr).detach()


def dpo_sum(pc, pr, rc, rr, *, beta=0.1):  # sums over pairs
    loss = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).sum()
    return loss, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def dpo_rewards_attached(pc, pr, rc, rr, *, beta=0.1):
    loss = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    return loss, beta * (pc - rc), beta * (pr - rr)


def dpo_alt_softplus(pc, pr, rc, rr, *, beta=0.1):  # correct: -logsigmoid(x) = log(1 + exp(-x)) = logaddexp(0, -x)
    cr, rj = beta * (pc - rc), beta * (pr - rr)
    x = cr - rj
    loss = torch.logaddexp(torch.zeros_like(x), -x).mean()
    return loss, cr.detach(), rj.detach()


def dpo_alt_ratio_form(pc, pr, rc, rr, *, beta=0.1):  # correct: policy gap minus reference gap
    logits = (pc - pr) - (rc - rr)
    loss = -F.logsigmoid(beta * logits).sum() / logits.numel()
    return loss, beta * (pc.detach() - rc), beta * (pr.detach() - rr)


# ----------------------------------------------------------------------------------------------
# 6.7 group-relative advantages
# ----------------------------------------------------------------------------------------------
def _check_groups(rewards, G):
    if G < 2 or rewards.numel() % G:
        raise ValueError("G must divide the batch")


def adv_population_std(rewards, G):
    _check_groups(rewards, G)
    r = rewards.view(-1, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-4)).view(-1)


def adv_strided(rewards, G):  # groups taken as every (B/G)-th reply
    _check_groups(rewards, G)
    r = rewards.view(G, -1)
    return ((r - r.mean(0, keepdim=True)) / (r.std(0, keepdim=True) + 1e-4)).reshape(-1)


def adv_batch_norm(rewards, G):  # normalises over the whole batch
    _check_groups(rewards, G)
    return (rewards - rewards.mean()) / (rewards.std() + 1e-4)


def adv_no_eps(rewards, G):  # NaN for a group of equal rewards
    _check_groups(rewards, G)
    r = rewards.view(-1, G)
    return ((r - r.mean(1, keepdim=True)) / r.std(1, keepdim=True)).view(-1)


def adv_no_check(rewards, G):  # silently drops the last partial group
    r = rewards[: rewards.numel() // G * G].view(-1, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)


def adv_alt_loop(rewards, G):  # correct: one group at a time
    if G < 2 or len(rewards) % G:
        raise ValueError(f"group size {G} must divide {len(rewards)}")
    parts = []
    for i in range(0, len(rewards), G):
        grp = rewards[i: i + G].float()
        parts.append((grp - grp.mean()) / (torch.sqrt(((grp - grp.mean()) ** 2).sum() / (G - 1)) + 1e-4))
    return torch.cat(parts)


def adv_alt_unflatten(rewards, G):  # correct: unflatten + var
    if G < 2 or rewards.shape[0] % G != 0:
        raise ValueError("batch is not a whole number of groups")
    r = rewards.float().unflatten(0, (-1, G))
    return ((r - r.mean(-1, keepdim=True)) / (r.var(-1, keepdim=True).sqrt() + 1e-4)).flatten()


# ----------------------------------------------------------------------------------------------
# 6.8 GRPO loss
# ----------------------------------------------------------------------------------------------
def _grpo(logps, old, adv, mask, ref, clip_eps, beta, *, use_max=False, kl_sign=1.0, token_mean=False, no_min=False,
          no_mask=False):
    ratio = torch.exp(logps - old)
    A = adv.unsqueeze(1)
    a, b = ratio * A, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A
    per = b if no_min else (torch.max(a, b) if use_max else torch.min(a, b))
    if beta:
        d = ref - logps
        per = per - kl_sign * beta * (torch.exp(d) - d - 1)
    m = torch.ones_like(per) if no_mask else mask.float()
    if token_mean:
        return -(per * m).sum() / m.sum()
    return -((per * m).sum(1) / m.sum(1)).mean()


def grpo_max(logps, old, adv, mask, *, ref_logps=None, clip_eps=0.2, beta=0.0):
    return _grpo(logps, old, adv, mask, ref_logps, clip_eps, beta, use_max=True)


def grpo_clip_only(logps, old, adv, mask, *, ref_logps=None, clip_eps=0.2, beta=0.0):
    return _grpo(logps, old, adv, mask, ref_logps, clip_eps, beta, no_min=True)


def grpo_kl_added(logps, old, adv, mask, *, ref_logps=None, clip_eps=0.2, beta=0.0):
    return _grpo(logps, old, adv, mask, ref_logps, clip_eps, beta, kl_sign=-1.0)


def grpo_token_mean(logps, old, adv, mask, *, ref_logps=None, clip_eps=0.2, beta=0.0):
    return _grpo(logps, old, adv, mask, ref_logps, clip_eps, beta, token_mean=True)


def grpo_no_mask(logps, old, adv, mask, *, ref_logps=None, clip_eps=0.2, beta=0.0):
    return _grpo(logps, old, adv, mask, ref_logps, clip_eps, beta, no_mask=True)


def grpo_fixed_clip(logps, old, adv, mask, *, ref_logps=None, clip_eps=0.2, beta=0.0):
    return _grpo(logps, old, adv, mask, ref_logps, 0.2, beta)


def grpo_kl_reversed(logps, old, adv, mask, *, ref_logps=None, clip_eps=0.2, beta=0.0):  # KL with logps - ref
    ratio = torch.exp(logps - old)
    A = adv.unsqueeze(1)
    per = torch.min(ratio * A, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A)
    if beta:
        d = logps - ref_logps
        per = per - beta * (torch.exp(d) - d - 1)
    m = mask.float()
    return -((per * m).sum(1) / m.sum(1)).mean()


def grpo_alt_where(logps, old, adv, mask, *, ref_logps=None, clip_eps=0.2, beta=0.0):  # correct: cases on the sign
    ratio = (logps - old).exp()
    A = adv[:, None].expand_as(ratio)
    capped = torch.where(A >= 0, torch.clamp(ratio, max=1 + clip_eps), torch.clamp(ratio, min=1 - clip_eps))
    per = capped * A
    if beta > 0:
        log_r = ref_logps - logps
        per = per - beta * (log_r.exp() - log_r - 1)
    m = mask.to(per.dtype)
    per_reply = (per * m).sum(-1) / m.sum(-1)
    return -per_reply.sum() / per_reply.numel()


def grpo_alt_loop(logps, old, adv, mask, *, ref_logps=None, clip_eps=0.2, beta=0.0):  # correct: reply by reply
    losses = []
    for b in range(logps.shape[0]):
        keep = mask[b].bool()
        lp, o = logps[b][keep], old[b][keep]
        r = torch.exp(lp - o)
        obj = torch.minimum(r * adv[b], r.clamp(1 - clip_eps, 1 + clip_eps) * adv[b])
        if beta:
            d = ref_logps[b][keep] - lp
            obj = obj - beta * (torch.exp(d) - d - 1)
        losses.append(-obj.mean())
    return torch.stack(losses).mean()


WRONG_IMPLEMENTATIONS = {
    "6.5": [seq_no_shift, seq_unshifted_mask, seq_mean, seq_no_mask, seq_log_of_softmax, seq_detached],
    "6.6": [dpo_swapped_ratio, dpo_no_beta_in_rewards, dpo_log_sigmoid_naive, dpo_no_reference, dpo_sum,
            dpo_rewards_attached],
    "6.7": [adv_population_std, adv_strided, adv_batch_norm, adv_no_eps, adv_no_check],
    "6.8": [grpo_max, grpo_clip_only, grpo_kl_added, grpo_token_mean, grpo_no_mask, grpo_fixed_clip, grpo_kl_reversed],
}
CORRECT_ALTERNATIVES = {
    "6.5": [dpo_seq_alt_loop, seq_alt_logsumexp],
    "6.6": [dpo_alt_softplus, dpo_alt_ratio_form],
    "6.7": [adv_alt_loop, adv_alt_unflatten],
    "6.8": [grpo_alt_where, grpo_alt_loop],
}


# ----------------------------------------------------------------------------------------------
# Package pieces against references, and clear messages for bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,T,V", [(1, 2, 3), (3, 7, 11), (2, 16, 50)])
def test_sequence_logprobs_matches_cross_entropy(B, T, V):
    g = torch.Generator().manual_seed(B * T)
    logits, ids = torch.randn(B, T, V, generator=g), torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    mask[:, T // 2:] = 1
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none").view(B, T - 1)
    torch.testing.assert_close(dpo.sequence_logprobs(logits, ids, mask), -(nll * mask[:, 1:]).sum(1))


def test_dpo_loss_is_log2_at_the_reference_and_falls_with_the_margin():
    lp = torch.tensor([-5.0, -7.0])
    loss, cr, rr = dpo.dpo_loss(lp, lp - 1, lp, lp - 1, beta=0.1)
    assert abs(loss.item() - torch.log(torch.tensor(2.0)).item()) < 1e-6 and cr.abs().max() == 0
    better, *_ = dpo.dpo_loss(lp + 1, lp - 2, lp, lp - 1, beta=0.1)
    assert better < loss


@pytest.mark.parametrize("G", [2, 4, 8])
def test_group_advantages_match_torch_per_group(G):
    r = torch.randn(4 * G, generator=torch.Generator().manual_seed(G))
    a = grpo.group_advantages(r, G)
    for i in range(0, 4 * G, G):
        grp = r[i: i + G]
        torch.testing.assert_close(a[i: i + G], (grp - grp.mean()) / (grp.std() + 1e-4))


def test_group_advantages_bad_input_messages():
    with pytest.raises(ValueError, match="divide the batch"):
        grpo.group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="must be 1-D"):
        grpo.group_advantages(torch.zeros(2, 4), 4)


def test_grpo_loss_gradient_is_policy_gradient_at_ratio_one():
    """At ratio 1 with no KL, d loss / d logps = -A / (tokens in the reply) / B: REINFORCE with a group baseline."""
    lp = torch.randn(3, 4).requires_grad_(True)
    adv, mask = torch.tensor([1.0, -2.0, 0.5]), torch.ones(3, 4)
    grpo.grpo_loss(lp, lp.detach(), adv, mask).backward()
    torch.testing.assert_close(lp.grad, (-adv / 4 / 3).unsqueeze(1).expand(3, 4))
    with pytest.raises(ValueError, match="ref_logps"):
        grpo.grpo_loss(lp, lp.detach(), adv, mask, beta=0.1)


def test_all_zero_rewards_warn_and_name_the_chat_template():
    with pytest.warns(RuntimeWarning, match="chat template was skipped"):
        grpo.check_reward_signal(torch.zeros(8), ["What is 2 + 3?"] * 8)
    with pytest.warns(RuntimeWarning, match="print a few replies"):
        grpo.check_reward_signal(torch.zeros(4), ["<|im_start|>user\nWhat is 2 + 3?"] * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grpo.check_reward_signal(torch.tensor([0.0, 1.0]), ["x", "y"])


def test_all_equal_fraction_and_reward():
    assert grpo.all_equal_fraction(torch.tensor([1., 1, 0, 1, 0, 0, 0, 0]), 4) == 0.5
    assert grpo.exact_reward(["7", "2 + 5 = 7.", "The answer is 8", ""], [7, 7, 7, 7]) == [1.0, 1.0, 0.0, 0.0]


def test_rl_prompts_are_deterministic_and_held_out(tmp_path):
    from course_utils.data import project_dataset_dir

    for split, n in (("train", 288), ("val", 48), ("test", 240)):
        items = grpo.load_rl_prompts(split)
        assert len(items) == n and items == grpo.generate_rl_split(split)
        assert all(it["answer"] == it["a"] + it["b"] and str(it["a"]) in it["question"] for it in items)
        assert grpo.write_rl_split(tmp_path, split).read_bytes() == (project_dataset_dir("rl_prompts") / f"{split}.jsonl").read_bytes()
    pairs = {s: {(i["a"], i["b"]) for i in grpo.load_rl_prompts(s)} for s in ("train", "val", "test")}
    assert not pairs["test"] & (pairs["train"] | pairs["val"])
    with pytest.raises(ValueError, match="unknown split"):
        grpo.load_rl_prompts("dev")


def test_win_rate_counts_ties_half():
    assert dpo.win_rate([True, False, True, False], [False, True, True, False]) == (0.5, 1, 2, 1)


# ----------------------------------------------------------------------------------------------
# The real model: tokenisation as TRL does it, and loss/metrics equal to DPOTrainer on a fixed batch
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    from course_utils import data

    torch.set_num_threads(1)
    return data.load_smollm2()


@pytest.mark.slow
def test_dpo_matches_trl_dpotrainer_on_a_fixed_batch(smollm2):
    from course_utils.reward import load_preferences

    ref, tok = smollm2
    ref.eval()
    policy = copy.deepcopy(ref)
    with torch.no_grad():  # a policy that differs from the reference, so rewards are not all zero
        for name, p in policy.named_parameters():
            if "layers.29.mlp" in name:
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    pairs = load_preferences("train")[:3]
    theirs = dpo.trl_dpo_metrics(policy, ref, tok, pairs, beta=0.1)
    batch = dpo.collate_preferences([dpo.encode_preference(tok, p["prompt"], p["chosen"], p["rejected"]) for p in pairs],
                                    tok.pad_token_id)
    for k in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batch[k], theirs["batch"][k]), k
    ours = dpo.dpo_metrics(policy, ref, batch, beta=0.1)
    assert abs(ours["loss"].item() - theirs["loss"]) < 1e-4
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert abs(ours[k] - theirs[k]) < 1e-4, k
    for k in ("logps/chosen", "logps/rejected"):
        assert abs(ours[k] - theirs[k]) < 1e-5 * abs(theirs[k]) + 1e-4, k


@pytest.mark.slow
def test_sample_masks_after_end_of_turn_and_dpo_encoding_refuses_equal_replies(smollm2):
    model, tok = smollm2
    out = grpo.sample(model, tok, [grpo.chat_prompt(tok, "Compute 2 + 3. Reply with only the number.")] * 2,
                      max_new_tokens=6, temperature=0.0)
    reply = out["input_ids"][:, -6:]
    cm = out["completion_mask"][:, -6:]
    for b in range(2):
        ends = (reply[b] == tok.eos_token_id).nonzero()
        if len(ends):
            assert cm[b, : ends[0] + 1].all() and not cm[b, ends[0] + 1:].any()
    with pytest.raises(ValueError, match="same reply"):
        dpo.encode_preference(tok, "Hi", "Hello", "Hello ")
