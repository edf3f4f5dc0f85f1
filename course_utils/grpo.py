"""Group Relative Policy Optimization from scratch (Shao et al. 2024, DeepSeekMath, section 4.1).

For each prompt, sample a GROUP of G replies, score each with a program (the reward), and use the
reward relative to the group as the advantage: A_i = (r_i - mean(r)) / (std(r) + eps). No value
network: the group is the baseline. A group whose rewards are all equal teaches nothing (every A_i = 0),
so we log that fraction. The loss is PPO's clipped surrogate per token, optionally with a KL penalty
to a frozen reference. Built in teaching order: the RL prompts and their reward -> group-relative
advantages (exercise 6.7) -> the clipped objective with KL (6.8) -> sampling groups -> a training loop
-> held-out pass@1; plus SFT / rejection-sampling baselines on the same task for the comparison.
"""
from __future__ import annotations

import random
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .dpo import per_token_logprobs

# ----------------------------------------------------------------------------------------------
# The RL prompts: small additions phrased four ways, with an exact answer a program checks
# ----------------------------------------------------------------------------------------------
TEMPLATES = ("What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "What is the sum of {a} and {b}?")
INSTRUCTION = " Reply with only the number."
OPERANDS = range(1, 13)  # a, b in 1..12: 144 ordered pairs
SPLIT_PAIRS = {"train": 72, "val": 12, "test": 60}  # ordered (a, b) pairs per split; x4 phrasings = items
SEED = 6


def generate_rl_split(split: str) -> list[dict[str, Any]]:
    """The `split` of the RL prompts: {"id", "question", "answer", "a", "b"}; no (a, b) pair in two splits."""
    if split not in SPLIT_PAIRS:
        raise ValueError(f"split must be one of {sorted(SPLIT_PAIRS)}, got {split!r}")
    pairs = [(a, b) for a in OPERANDS for b in OPERANDS]
    random.Random(SEED).shuffle(pairs)
    start = {"train": 0, "val": SPLIT_PAIRS["train"], "test": SPLIT_PAIRS["train"] + SPLIT_PAIRS["val"]}[split]
    chosen = pairs[start: start + SPLIT_PAIRS[split]]
    items = [{"id": f"{split}-{i:04d}", "question": t.format(a=a, b=b) + INSTRUCTION, "answer": a + b, "a": a, "b": b}
             for i, ((a, b), t) in enumerate((p, t) for p in chosen for t in TEMPLATES)]
    random.Random(f"{SEED}-{split}").shuffle(items)
    return [{**it, "id": f"{split}-{i:04d}"} for i, it in enumerate(items)]


def write_rl_split(folder: Path, split: str) -> Path:
    """Write `<folder>/<split>.jsonl` (what `datasets/rl_prompts/make_rl_prompts.py` runs)."""
    from .data import write_jsonl

    return write_jsonl(Path(folder) / f"{split}.jsonl", generate_rl_split(split))


def load_rl_prompts(split: str) -> list[dict[str, Any]]:
    """The RL prompts' `split` ("train", "val", "test"); regenerated into the cache outside a checkout."""
    from .data import load_project_dataset

    return load_project_dataset("rl_prompts", split, SPLIT_PAIRS, generate_rl_split)


def last_integer(text: str) -> int | None:
    numbers = re.findall(r"-?\d+", text)
    return int(numbers[-1]) if numbers else None


def exact_reward(completions: Sequence[str], answers: Sequence[int]) -> list[float]:
    """1.0 when the last integer of a reply is the answer, else 0.0 (the programmatic reward)."""
    return [float(last_integer(c) == a) for c, a in zip(completions, answers, strict=True)]


def chat_prompt(tok, question: str) -> str:
    """The question inside the chat template, ending with the assistant header the model answers after."""
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


# ----------------------------------------------------------------------------------------------
# Group-relative advantages and the clipped objective
# ----------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, *, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps) for rewards (B,) laid out as B // G consecutive groups of G.

    std is the unbiased sample std (as TRL's GRPOTrainer); a group with equal rewards gets advantages 0.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} must be >= 2 and divide the batch of {rewards.numel()} rewards "
                         "(the replies of one prompt sit next to each other)")
    r = rewards.view(-1, group_size).float()  # (B/G, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              ref_logps: torch.Tensor | None = None, clip_eps: float = 0.2, beta: float = 0.0) -> torch.Tensor:
    """GRPO loss: -mean over replies of the mean over their tokens of
    min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) - beta * KL, with ratio = exp(logps - old_logps)
    and the k3 estimator KL = exp(ref - logps) - (ref - logps) - 1. logps, old_logps, ref_logps, mask: (B, T);
    advantages: (B,)."""
    ratio = torch.exp(logps - old_logps)  # (B, T)
    A = advantages.unsqueeze(1)  # (B, 1)
    per_token = torch.min(ratio * A, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps (the frozen reference model's per-token log-probs)")
        d = ref_logps - logps
        per_token = per_token - beta * (torch.exp(d) - d - 1)
    mask = mask.to(per_token.dtype)
    return -((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def all_equal_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose G rewards are all equal (they carry no learning signal)."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(1).float().mean().item()


def check_reward_signal(rewards: torch.Tensor, prompts: Sequence[str]) -> None:
    """Warn when every reward is zero: training would be a silent no-op. Names the likely cause."""
    if rewards.numel() and bool((rewards == 0).all()):
        no_template = [p for p in prompts if "<|im_start|>" not in p]
        cause = (f"{len(no_template)} of {len(prompts)} prompts do not contain '<|im_start|>': the chat template was "
                 "skipped (use chat_prompt(tok, question)), so the instruct model does not answer the question"
                 if no_template else "the task may be too hard for the model, or the reward function never matches "
                 "its replies: print a few replies next to their answers")
        warnings.warn(f"every reward in this batch is 0, so every advantage is 0 and the update does nothing; "
                      f"{cause}.", RuntimeWarning, stacklevel=2)


# ----------------------------------------------------------------------------------------------
# Sampling replies and scoring them
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(model, tok, prompts: Sequence[str], *, max_new_tokens: int = 12, temperature: float = 1.0,
           seed: int | None = None) -> dict[str, Any]:
    """Generate one reply per prompt string (left-padded batch; temperature 0 = greedy).

    Returns input_ids (B, P + T) of prompt + reply, attention_mask, completion_mask (B, P + T): 1 on the
    reply's tokens up to and including its first end-of-turn, and texts (the replies).
    """
    model.eval()
    tok.padding_side = "left"
    enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    if seed is not None:
        torch.manual_seed(seed)
    kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    out = model.generate(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device),
                         max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kw).cpu()
    P = enc.input_ids.shape[1]
    reply = out[:, P:]  # (B, T)
    ended = (reply == tok.eos_token_id).long()
    after_end = (ended.cumsum(1) - ended) > 0  # positions after the first end-of-turn
    completion_mask = torch.cat([torch.zeros_like(enc.input_ids), (~after_end).long()], 1)
    attention_mask = torch.cat([enc.attention_mask, (~after_end).long()], 1)
    texts = tok.batch_decode(reply, skip_special_tokens=True)
    return {"input_ids": out, "attention_mask": attention_mask, "completion_mask": completion_mask, "texts": texts}


def reply_logprobs(model, batch: dict[str, Any]) -> torch.Tensor:
    """Per-token log-probs (B, P + T - 1) of the sampled sequences under `model` (mask with completion_mask[:, 1:])."""
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    return per_token_logprobs(logits, ids)


def pass_at_1(model, tok, items: Sequence[dict], *, max_new_tokens: int = 12, batch_size: int = 32,
              temperature: float = 0.0, seed: int = 0) -> tuple[list[bool], list[str]]:
    """Per-item correctness of one reply per held-out item (greedy by default), and the replies."""
    ok, texts = [], []
    for i in tqdm(range(0, len(items), batch_size), desc="pass@1", leave=False):
        chunk = items[i: i + batch_size]
        out = sample(model, tok, [chat_prompt(tok, it["question"]) for it in chunk], max_new_tokens=max_new_tokens,
                     temperature=temperature, seed=seed + i)
        texts += out["texts"]
        ok += [r == 1.0 for r in exact_reward(out["texts"], [it["answer"] for it in chunk])]
    return ok, texts


# ----------------------------------------------------------------------------------------------
# The GRPO loop
# ----------------------------------------------------------------------------------------------
def train_grpo(model, tok, items: Sequence[dict], *, steps: int, prompts_per_step: int = 4, group_size: int = 8,
               max_new_tokens: int = 12, temperature: float = 1.0, lr: float = 1e-4, clip_eps: float = 0.2,
               beta: float = 0.0, ref_model=None, updates_per_batch: int = 1, seed: int = 0,
               use_chat_template: bool = True, reward_fn=exact_reward, advantage_fn=None,
               loss_fn=None) -> list[dict[str, float]]:
    """GRPO on `items` ({"question", "answer"}); returns one history row per step: mean reward, fraction of
    all-equal groups, loss, and KL to `ref_model` (when given). `use_chat_template=False` shows the no-op;
    `advantage_fn` / `loss_fn` swap in a learner's `group_advantages` / `grpo_loss`."""
    advantage_fn, loss_fn = advantage_fn or group_advantages, loss_fn or grpo_loss
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (apply LoRA or unfreeze it)")
    if beta > 0 and ref_model is None:
        raise ValueError("beta > 0 needs ref_model, a frozen copy of the starting model")
    opt = torch.optim.AdamW(params, lr=lr)
    rng = random.Random(seed)
    history = []
    for step in tqdm(range(1, steps + 1), desc="GRPO"):
        chunk = rng.sample(list(items), prompts_per_step)
        prompts = [chat_prompt(tok, it["question"]) if use_chat_template else it["question"] for it in chunk]
        prompts = [p for p in prompts for _ in range(group_size)]  # (B,) = G copies of each prompt, side by side
        batch = sample(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed * 100_000 + step)
        rewards = torch.tensor(reward_fn(batch["texts"], [it["answer"] for it in chunk for _ in range(group_size)]))
        check_reward_signal(rewards, prompts)
        adv = advantage_fn(rewards, group_size)
        mask = batch["completion_mask"][:, 1:]
        with torch.no_grad():
            old = reply_logprobs(model, batch)
            ref = reply_logprobs(ref_model, batch) if ref_model is not None else None
        model.train()
        for _ in range(updates_per_batch):
            logps = reply_logprobs(model, batch)
            loss = loss_fn(logps, old, adv, mask, ref_logps=ref, clip_eps=clip_eps, beta=beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        row = {"step": step, "reward": rewards.mean().item(), "all_equal": all_equal_fraction(rewards, group_size),
               "loss": loss.item(), "reply_tokens": mask.sum(1).float().mean().item()}
        if ref is not None:
            d = (ref - logps.detach())
            row["kl"] = (((torch.exp(d) - d - 1) * mask).sum() / mask.sum()).item()
        history.append(row)
    return history


# ----------------------------------------------------------------------------------------------
# Baselines on the same task: SFT on gold replies, rejection sampling (best-of-n, then SFT on the winners)
# ----------------------------------------------------------------------------------------------
def train_on_replies(model, tok, questions: Sequence[str], replies: Sequence[str], *, steps: int, batch_size: int = 8,
                     lr: float = 1e-4, seed: int = 0) -> list[float]:
    """Supervised fine-tuning: maximise log p(reply | chat prompt) on (question, reply) pairs; returns losses."""
    from .dpo import collate_preferences, encode_reply

    if not questions:
        raise ValueError("no (question, reply) pairs to train on")
    enc = []
    for q, r in zip(questions, replies, strict=True):
        prompt_ids, reply_ids = encode_reply(tok, q, r)
        enc.append({"prompt_ids": prompt_ids, "chosen_ids": reply_ids, "rejected_ids": reply_ids})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = random.Random(seed)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="SFT"):
        rows = g.sample(enc, min(batch_size, len(enc)))
        batch = collate_preferences(rows, tok.pad_token_id)
        half = len(rows)  # the first half (the "chosen" rows) holds each reply once
        ids, mask = batch["input_ids"][:half], batch["completion_mask"][:half]
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"][:half], use_cache=False).logits
        m = mask[:, 1:].float()
        loss = -(per_token_logprobs(logits, ids) * m).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def sample_n(model, tok, items: Sequence[dict], *, n: int = 4, max_new_tokens: int = 12, temperature: float = 1.0,
             seed: int = 0, batch_size: int = 32) -> list[list[str]]:
    """n sampled replies per item (the raw material of rejection sampling and of on-policy preference pairs)."""
    prompts = [chat_prompt(tok, it["question"]) for it in items for _ in range(n)]
    texts: list[str] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=f"sampling {n} per item", leave=False):
        texts += sample(model, tok, prompts[i: i + batch_size], max_new_tokens=max_new_tokens, temperature=temperature,
                        seed=seed + i)["texts"]
    return [texts[j * n: (j + 1) * n] for j in range(len(items))]


def best_of_n(items: Sequence[dict], samples: Sequence[Sequence[str]]) -> tuple[list[str], list[str]]:
    """Rejection sampling: per item keep the shortest reply the reward accepts; returns (questions, replies)."""
    qs, rs = [], []
    for it, replies in zip(items, samples, strict=True):
        good = [t.strip() for t in replies if last_integer(t) == it["answer"] and t.strip()]
        if good:
            qs.append(it["question"])
            rs.append(min(good, key=len))
    return qs, rs


def wrong_reply_pairs(items: Sequence[dict], samples: Sequence[Sequence[str]]) -> list[dict[str, str]]:
    """Preference pairs for DPO on the same task: chosen = the exact answer, rejected = one of the model's own
    wrong replies (items where every sample was right give no pair)."""
    pairs = []
    for it, replies in zip(items, samples, strict=True):
        wrong = [t.strip() for t in replies if last_integer(t) != it["answer"] and t.strip()]
        if wrong and wrong[0] != str(it["answer"]):
            pairs.append({"prompt": it["question"], "chosen": str(it["answer"]), "rejected": wrong[0]})
    return pairs


# ----------------------------------------------------------------------------------------------
# The same reward through TRL's GRPOTrainer
# ----------------------------------------------------------------------------------------------
def train_trl_grpo(model, tok, items: Sequence[dict], *, steps: int, prompts_per_step: int = 4, group_size: int = 8,
                   max_new_tokens: int = 12, temperature: float = 1.0, lr: float = 1e-4, r: int = 8, seed: int = 0):
    """TRL's GRPOTrainer with a LoRA adapter on `exact_reward` (conversational prompts, so the chat template is
    applied); returns (trained model in eval mode, TRL's log history). beta stays at TRL's default 0."""
    import tempfile

    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return exact_reward(texts, answer)

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": it["question"]}], "answer": it["answer"]}
                              for it in items])
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=prompts_per_step * group_size,
                          num_generations=group_size, max_completion_length=max_new_tokens, max_steps=steps,
                          learning_rate=lr, temperature=temperature, bf16=False, fp16=False,
                          gradient_checkpointing=False, report_to="none", use_cpu=True, logging_steps=1,
                          save_strategy="no", seed=seed, disable_tqdm=True)
        peft = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"], task_type="CAUSAL_LM")
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                              peft_config=peft)
        trainer.train()
    trained = trainer.model
    trained.eval()  # the trainer leaves it in train mode
    return trained, trainer.state.log_history
