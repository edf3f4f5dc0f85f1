"""Direct Preference Optimization from scratch (Rafailov et al. 2023, "Your Language Model is Secretly a Reward Model").

DPO skips the reward model and the RL loop: for a prompt x with a preferred reply y_w and a rejected
reply y_l, it raises log pi(y_w|x) - log pi_ref(y_w|x) above log pi(y_l|x) - log pi_ref(y_l|x):

    loss = -log sigmoid( beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))] )

beta * (log pi(y) - log ref(y)) is the "implicit reward" of y. Built in teaching order: per-token
log-probabilities -> sequence log-probabilities under a completion mask (exercise 6.5) -> the loss and
implicit rewards (6.6) -> TRL-layout batches -> a training loop -> held-out evaluation -> parity with
TRL's DPOTrainer. The per-token helper is shared with `course_utils.grpo`.
"""
from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


# ----------------------------------------------------------------------------------------------
# Log-probabilities of the tokens a model was given
# ----------------------------------------------------------------------------------------------
def per_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..T-1: logits (B, T, V), input_ids (B, T) -> (B, T-1).

    The logits at position t-1 predict token t, hence the shift by one.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over the completion tokens only: (B, T, V), (B, T), (B, T) -> (B,) float32.

    completion_mask[b, t] = 1 marks token t as part of the reply (prompt and padding are 0).
    """
    mask = completion_mask[:, 1:].to(torch.float32)  # (B, T-1): token t is scored by the logits at t-1
    return (per_token_logprobs(logits, input_ids) * mask).sum(-1)


# ----------------------------------------------------------------------------------------------
# The DPO loss and the implicit rewards
# ----------------------------------------------------------------------------------------------
def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen_rewards, rejected_rewards) from four (B,) sequence log-probabilities (DPO paper, eq. 7).

    Rewards are beta * (log pi - log ref), detached (they are for logging); the loss is the batch mean.
    """
    chosen_logratios = policy_chosen - ref_chosen  # (B,)
    rejected_logratios = policy_rejected - ref_rejected  # (B,)
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    return loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# ----------------------------------------------------------------------------------------------
# Batches in TRL's layout: chat-templated prompt + reply, the B chosen rows first, then the B rejected
# ----------------------------------------------------------------------------------------------
def _messages(prompt: str, reply: str | None = None) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] + ([{"role": "assistant", "content": reply}] if reply is not None else [])


def _ids(tok, messages, **kw) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])


def encode_reply(tok, prompt: str, reply: str) -> tuple[list[int], list[int]]:
    """(prompt_ids, reply_ids): the chat template around the user prompt (ending with the assistant header),
    and the reply's tokens with the turn's end (<|im_end|> and newline)."""
    prompt_ids = _ids(tok, _messages(prompt), add_generation_prompt=True)
    full = _ids(tok, _messages(prompt, reply))
    if full[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template renders the prompt differently once the reply is added; "
                         "the prompt must be a prefix of prompt + reply")
    return prompt_ids, full[len(prompt_ids):]


def encode_preference(tok, prompt: str, chosen: str, rejected: str) -> dict[str, list[int]]:
    """{"prompt_ids", "chosen_ids", "rejected_ids"}: the chat template around the user prompt, and each reply
    with the assistant turn's end (<|im_end|> and newline), as TRL's DPOTrainer tokenizes a conversational pair."""
    for name, text in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"the pair's {name} must be a non-empty string, got {text!r}")
    if chosen.strip() == rejected.strip():
        raise ValueError(f"chosen and rejected are the same reply ({chosen!r}): there is no preference to learn")
    prompt_ids, chosen_ids = encode_reply(tok, prompt, chosen)
    _, rejected_ids = encode_reply(tok, prompt, rejected)
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


def collate_preferences(examples: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and completion_mask, each (2B, T): chosen rows, then rejected."""
    rows = [e["prompt_ids"] + e["chosen_ids"] for e in examples] + [e["prompt_ids"] + e["rejected_ids"] for e in examples]
    starts = [len(e["prompt_ids"]) for e in examples] * 2
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    completion_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, starts)):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention_mask[i, : len(r)] = 1
        completion_mask[i, s: len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def batch_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probabilities, each (B,), for a `collate_preferences` batch."""
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    return sequence_logprobs(logits, ids, batch["completion_mask"].to(device)).chunk(2)


def dpo_metrics(policy, ref, batch: dict[str, torch.Tensor], *, beta: float = 0.1, loss_fn=None) -> dict[str, Any]:
    """Loss (with graph), and TRL's logged metrics: rewards/chosen, rewards/rejected, rewards/margins,
    rewards/accuracies, logps/chosen, logps/rejected (batch means, as floats)."""
    pc, pr = batch_logprobs(policy, batch)
    with torch.no_grad():
        rc, rr = batch_logprobs(ref, batch)
    loss, chosen_r, rejected_r = (loss_fn or dpo_loss)(pc, pr, rc, rr, beta=beta)
    return {"loss": loss, "rewards/chosen": chosen_r.mean().item(), "rewards/rejected": rejected_r.mean().item(),
            "rewards/margins": (chosen_r - rejected_r).mean().item(),
            "rewards/accuracies": (chosen_r > rejected_r).float().mean().item(),
            "logps/chosen": pc.detach().mean().item(), "logps/rejected": pr.detach().mean().item(),
            "margins": (chosen_r - rejected_r).tolist()}


# ----------------------------------------------------------------------------------------------
# Training and held-out evaluation
# ----------------------------------------------------------------------------------------------
def train_dpo(policy, ref, encoded: Sequence[dict[str, list[int]]], pad_id: int, *, steps: int, batch_size: int = 4,
              lr: float = 5e-5, beta: float = 0.1, seed: int = 0, log_every: int = 5,
              loss_fn=None) -> list[dict[str, float]]:
    """AdamW on the DPO loss (`loss_fn`: a learner's `dpo_loss`) over shuffled batches of `encoded` pairs;
    returns a history of logged metrics."""
    if not encoded:
        raise ValueError("no preference pairs to train on")
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters (did LoRA freeze everything?)")
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    history = []
    policy.train()
    for step in tqdm(range(1, steps + 1), desc="DPO"):
        if len(order) < batch_size:
            order += torch.randperm(len(encoded), generator=g).tolist()
        batch = collate_preferences([encoded[i] for i in order[:batch_size]], pad_id)
        del order[:batch_size]
        m = dpo_metrics(policy, ref, batch, beta=beta, loss_fn=loss_fn)
        opt.zero_grad(set_to_none=True)
        m["loss"].backward()
        opt.step()
        if step % log_every == 0 or step == steps:
            history.append({"step": step, "loss": m["loss"].item(), "margin": m["rewards/margins"],
                            "accuracy": m["rewards/accuracies"], "chosen": m["rewards/chosen"],
                            "rejected": m["rewards/rejected"]})
    policy.eval()
    return history


@torch.no_grad()
def preference_margins(policy, ref, encoded: Sequence[dict[str, list[int]]], pad_id: int, *, beta: float = 0.1,
                       batch_size: int = 8) -> list[float]:
    """Implicit-reward margin r(chosen) - r(rejected) per held-out pair; accuracy is the fraction > 0."""
    policy.eval()
    out: list[float] = []
    for i in range(0, len(encoded), batch_size):
        m = dpo_metrics(policy, ref, collate_preferences(encoded[i: i + batch_size], pad_id), beta=beta)
        out += m["margins"]
    return out


def win_rate(after_ok: Sequence[bool], before_ok: Sequence[bool]) -> tuple[float, int, int, int]:
    """(win rate, wins, ties, losses) of replies judged by a program: a win when only the new reply passes,
    a loss when only the old one does; ties count half."""
    wins = sum(a and not b for a, b in zip(after_ok, before_ok, strict=True))
    losses = sum(b and not a for a, b in zip(after_ok, before_ok, strict=True))
    ties = len(after_ok) - wins - losses
    return (wins + 0.5 * ties) / max(len(after_ok), 1), wins, ties, losses


# ----------------------------------------------------------------------------------------------
# Parity: the same fixed batch through TRL's DPOTrainer
# ----------------------------------------------------------------------------------------------
TRL_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected")


def trl_dpo_metrics(policy, ref, tok, pairs: Sequence[dict[str, str]], *, beta: float = 0.1) -> dict[str, Any]:
    """TRL DPOTrainer's loss and logged metrics on one batch holding all `pairs` (in order), plus its batch.

    Copies of both models go into the trainer (it patches their forward). CPU, fp32, no gradient
    checkpointing, reference logps computed on the fly, the sigmoid (standard DPO) loss.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list([{"prompt": _messages(p["prompt"]), "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, beta=beta, per_device_train_batch_size=len(pairs), bf16=False, fp16=False,
                         gradient_checkpointing=False, report_to="none", use_cpu=True, max_length=None,
                         precompute_ref_log_probs=False, disable_dropout=True, logging_strategy="no", save_strategy="no")
        trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
                             train_dataset=data, processing_class=tok)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        metrics = {k: trainer._metrics["train"][k][-1] for k in TRL_KEYS}
    return {"loss": loss.item(), **metrics, "batch": {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}}
