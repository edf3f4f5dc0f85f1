"""Preference data with verifiable answers, and a reward model trained on it (week 6).

Reading order: the preference pairs (three kinds, each with a program that says which reply is right)
-> `verify` (the gold metric) -> tokenised pairs -> `RewardModel` (a language model with a scalar head
on its last token) -> the Bradley-Terry loss -> training and held-out pairwise accuracy.

The Bradley-Terry model (Bradley & Terry, 1952; used for RLHF by Ouyang et al., 2022):
P(chosen beats rejected) = sigmoid(r(chosen) - r(rejected)); the loss is -log of that probability.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Preference pairs: correct vs wrong answer, rule kept vs rule broken, concise vs padded
# ----------------------------------------------------------------------------------------------
SPLIT_SIZES = {"test": 300, "val": 200, "train": 1200}  # generated in this order: held-out prompts come first
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}
KINDS = ("correct", "rule", "concise")
TOPICS = {
    "colours": ["red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "black", "white", "grey"],
    "animals": ["cat", "dog", "horse", "cow", "sheep", "goat", "lion", "tiger", "bear", "wolf", "fox", "mouse"],
    "fruits": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon", "kiwi"],
    "vegetables": ["carrot", "potato", "onion", "pea", "bean", "leek", "cabbage", "radish", "pepper", "spinach"],
    "tools": ["hammer", "saw", "drill", "wrench", "chisel", "spanner", "file", "pliers", "ladder", "shovel"],
}
FILLERS_BEFORE = ["Great question! Let me think about this carefully.", "Sure, I would be happy to help with that.",
                  "That is a really interesting question, and I am glad you asked it.",
                  "Of course! Here is a detailed and thorough answer for you."]
FILLERS_AFTER = ["I hope this helps, and let me know if you have any other questions!",
                 "Please feel free to ask me anything else you would like to know.",
                 "Thank you for asking, it was a pleasure to answer this question for you.",
                 "Let me know if you would like me to explain this in more detail."]
CONCISE_MAX_WORDS = 12


def _arithmetic(rng: random.Random) -> tuple[str, int]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"{a} times {b}", a * b
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"{a} minus {b}", a - b
    return f"{a} plus {b}", a + b


def _wrong(rng: random.Random, n: int) -> int:
    candidates = {n + 1, n - 1, n + 2, n + 10, n - 10, int(str(n)[::-1]) if n > 9 else n + 3}
    return rng.choice(sorted(c for c in candidates if c != n and c >= 0))


def _pair_correct(rng: random.Random) -> dict[str, Any]:
    question, n = _arithmetic(rng)
    form = rng.choice(["{n}", "The answer is {n}.", "{q} is {n}."])
    reply = lambda m: form.format(n=m, q=question[0].upper() + question[1:])  # noqa: E731
    return {"prompt": f"What is {question}?", "chosen": reply(n), "rejected": reply(_wrong(rng, n)),
            "check": {"answer": n}}


def _pair_rule(rng: random.Random) -> dict[str, Any]:
    topic = rng.choice(sorted(TOPICS))
    k = rng.randint(3, 5)
    items = rng.sample(TOPICS[topic], k)
    given = ", ".join(items)
    rule = rng.choice(["uppercase", "lowercase", "count", "separator", "start"])
    if rule == "uppercase":
        return {"prompt": f"Here are some {topic}: {given}. Write them again in capital letters only.",
                "chosen": given.upper(), "rejected": ", ".join(w.capitalize() for w in items),
                "check": {"rule": "uppercase"}}
    if rule == "lowercase":
        shout = ", ".join(w.upper() if i % 2 == 0 else w for i, w in enumerate(items))
        return {"prompt": f"Here are some {topic}: {shout}. Write them again in lowercase letters only.",
                "chosen": given, "rejected": shout, "check": {"rule": "lowercase"}}
    if rule == "count":
        n = rng.randint(2, k - 1)
        wrong = n + 1 if rng.random() < 0.5 else n - 1
        return {"prompt": f"Pick exactly {n} of these {topic}: {given}. Separate them with commas.",
                "chosen": ", ".join(items[:n]), "rejected": ", ".join(items[:wrong]), "check": {"rule": "count", "n": n}}
    if rule == "separator":
        return {"prompt": f"Here are some {topic}: {given}. Write them again separated by semicolons.",
                "chosen": "; ".join(items), "rejected": given, "check": {"rule": "separator", "sep": ";"}}
    return {"prompt": f"Repeat these {topic}, beginning your reply with the word 'Sure': {given}.",
            "chosen": f"Sure: {given}.", "rejected": f"Here you go: {given}.", "check": {"rule": "start", "word": "Sure"}}


def _pair_concise(rng: random.Random) -> dict[str, Any]:
    question, n = _arithmetic(rng)
    short = rng.choice(["{n}.", "It is {n}.", "The answer is {n}."]).format(n=n)
    padded = f"{rng.choice(FILLERS_BEFORE)} {question[0].upper() + question[1:]} is {n}. {rng.choice(FILLERS_AFTER)}"
    return {"prompt": f"What is {question}?", "chosen": short, "rejected": padded,
            "check": {"answer": n, "max_words": CONCISE_MAX_WORDS}}


def generate_split(split: str, seen: set[str] | None = None) -> list[dict[str, Any]]:
    """The `split`'s pairs; prompts in `seen` (from the held-out splits) are skipped so splits never share one."""
    rng = random.Random(SPLIT_SEEDS[split])
    seen = set() if seen is None else seen
    makers = {"correct": _pair_correct, "rule": _pair_rule, "concise": _pair_concise}
    out: list[dict[str, Any]] = []
    while len(out) < SPLIT_SIZES[split]:
        kind = KINDS[len(out) % len(KINDS)]  # equal thirds, interleaved
        pair = makers[kind](rng)
        key = pair["prompt"]
        if key in seen:
            continue
        seen.add(key)
        out.append({"id": f"{split}-{len(out):04d}", "kind": kind, **pair})
    return out


def generate_all() -> dict[str, list[dict[str, Any]]]:
    """All three splits, held-out prompts first so train never repeats a val or test prompt."""
    seen: set[str] = set()
    return {split: generate_split(split, seen) for split in SPLIT_SIZES}


def write_splits(folder: Path) -> list[Path]:
    """Write every split to `<folder>/<split>.jsonl` (what `datasets/preferences/make_preferences.py` runs)."""
    from .data import write_jsonl

    return [write_jsonl(Path(folder) / f"{split}.jsonl", pairs) for split, pairs in generate_all().items()]


def load_preferences(split: str) -> list[dict[str, Any]]:
    """The `split` ("train", "val", "test") of the preference pairs: {"id", "kind", "prompt", "chosen",
    "rejected", "check"}. Outside a checkout the same files are regenerated into the course cache."""
    from .data import load_project_dataset

    return load_project_dataset("preferences", split, SPLIT_SIZES, lambda s: generate_all()[s])


# ----------------------------------------------------------------------------------------------
# The gold metric: a program that says whether a reply is right
# ----------------------------------------------------------------------------------------------
def last_integer(text: str) -> int | None:
    numbers = re.findall(r"-?\d+", text)
    return int(numbers[-1]) if numbers else None


def verify(check: dict[str, Any], reply: str) -> bool:
    """True when `reply` satisfies the pair's `check` (the verifiable preference)."""
    reply = reply.strip()
    if "answer" in check:
        ok = last_integer(reply) == check["answer"]
        return ok and len(reply.split()) <= check.get("max_words", 10**9)
    rule = check.get("rule")
    letters = [c for c in reply if c.isalpha()]
    if rule == "uppercase":
        return bool(letters) and all(c.isupper() for c in letters)
    if rule == "lowercase":
        return bool(letters) and all(c.islower() for c in letters)
    if rule == "count":
        return len([w for w in reply.rstrip(".").split(",") if w.strip()]) == check["n"]
    if rule == "separator":
        return check["sep"] in reply and "," not in reply
    if rule == "start":
        return reply.split(maxsplit=1)[0].strip(":,.!").lower() == check["word"].lower() if reply else False
    raise ValueError(f"unknown check {check!r}: expected an 'answer' or a 'rule' of "
                     "uppercase/lowercase/count/separator/start")


# ----------------------------------------------------------------------------------------------
# Tokenised pairs: the chat template around prompt + reply, chosen rows first (TRL's batch layout)
# ----------------------------------------------------------------------------------------------
SYSTEM = "You are a helpful assistant."  # shorter than SmolLM2's default system turn: fewer tokens per step on a CPU


def chat_messages(prompt: str, reply: str | None = None) -> list[dict[str, str]]:
    """The conversation [system, user: prompt, assistant: reply] (no assistant turn when reply is None)."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    return messages + ([{"role": "assistant", "content": reply}] if reply is not None else [])


def chat_ids(tok, prompt: str, reply: str) -> list[int]:
    """Token ids of the conversation (system, user: prompt, assistant: reply), as the chat template writes it."""
    messages = chat_messages(prompt, reply)
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def encode_pairs(pairs: list[dict[str, Any]], tok, *, max_length: int = 256) -> list[dict[str, Any]]:
    """{"chosen_ids", "rejected_ids", "kind"} per pair. Refuses pairs a reward model cannot learn from."""
    out = []
    for i, pair in enumerate(pairs):
        missing = {"prompt", "chosen", "rejected"} - set(pair)
        if missing:
            raise ValueError(f"pair {i} has no {sorted(missing)}: each pair needs 'prompt', 'chosen' and 'rejected'")
        if pair["chosen"].strip() == pair["rejected"].strip():
            raise ValueError(f"pair {i} ({pair.get('id', '?')}): chosen and rejected are the same reply "
                             f"({pair['chosen']!r}), so there is no preference to learn; drop or fix the pair")
        chosen, rejected = chat_ids(tok, pair["prompt"], pair["chosen"]), chat_ids(tok, pair["prompt"], pair["rejected"])
        if max(len(chosen), len(rejected)) > max_length:
            raise ValueError(f"pair {i} is {max(len(chosen), len(rejected))} tokens, over max_length={max_length}")
        out.append({"chosen_ids": chosen, "rejected_ids": rejected, "kind": pair.get("kind", "")})
    return out


def collate_pairs(batch: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask of shape (2B, T): the B chosen rows, then the B rejected rows."""
    rows = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention_mask[i, : len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# ----------------------------------------------------------------------------------------------
# The reward model: the language model's trunk, and one linear "score" on the last token's state
# ----------------------------------------------------------------------------------------------
class RewardModel(nn.Module):
    """r(x) = w . h_last(x): the trunk's final hidden state at the last real token, mapped to one number.

    The same layout as transformers' `LlamaForSequenceClassification(num_labels=1)` (TRL's reward model),
    so the two can share weights: `backbone` is the decoder (`model.model`), `score` a bias-free Linear(C, 1).
    """

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.score = nn.Linear(hidden_size, 1, bias=False)
        nn.init.normal_(self.score.weight, std=hidden_size ** -0.5)

    @classmethod
    def from_causal_lm(cls, lm: nn.Module, *, n_layers: int | None = None, train_layers: int = 2) -> RewardModel:
        """Take a causal LM's trunk (its LM head is dropped), optionally only its first `n_layers` blocks (a
        cheaper reward model); only the last `train_layers` blocks, the final norm and the score head train."""
        if n_layers is not None:
            lm.model.layers = lm.model.layers[:n_layers]
            lm.config.num_hidden_layers = n_layers
        rm = cls(lm.model, lm.config.hidden_size)
        for p in rm.backbone.parameters():
            p.requires_grad_(False)
        n = len(rm.backbone.layers)
        for module in list(rm.backbone.layers[n - train_layers:]) + [rm.backbone.norm]:
            for p in module.parameters():
                p.requires_grad_(True)
        return rm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded ids and mask -> (B,) rewards."""
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, C)
        last = attention_mask.sum(dim=1) - 1  # (B,) index of the last real token (right padding)
        return self.score(h[torch.arange(h.shape[0]), last]).squeeze(-1)  # (B,)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged over pairs (Bradley-Terry; Ouyang et al. 2022, eq. 1).

    `logsigmoid` rather than `log(sigmoid(.))`: the latter underflows to log(0) = -inf for a large wrong margin.
    """
    if not isinstance(r_chosen, torch.Tensor) or not isinstance(r_rejected, torch.Tensor):
        raise TypeError("r_chosen and r_rejected must be tensors of rewards, one per pair")
    if r_chosen.shape != r_rejected.shape or r_chosen.dim() != 1:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} must be two "
                         "1-D tensors of the same length (one reward per pair)")
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pair_rewards(rm: RewardModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (B,), from a collated (2B, T) batch."""
    return torch.chunk(rm(batch["input_ids"], batch["attention_mask"]), 2)


@torch.no_grad()
def score_pairs(rm: RewardModel, encoded: list[dict[str, Any]], pad_id: int, *, batch_size: int = 16,
                progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of every chosen and rejected reply, in order: two (N,) tensors."""
    from tqdm.auto import tqdm

    rm.eval()
    chosen, rejected = [], []
    for i in tqdm(range(0, len(encoded), batch_size), desc="scoring pairs", disable=not progress, leave=False):
        rc, rr = pair_rewards(rm, collate_pairs(encoded[i:i + batch_size], pad_id))
        chosen.append(rc)
        rejected.append(rr)
    return torch.cat(chosen), torch.cat(rejected)


def train_reward_model(rm: RewardModel, encoded: list[dict[str, Any]], pad_id: int, *, steps: int,
                       batch_size: int = 8, lr: float = 1e-4, seed: int = 0, log_every: int = 10,
                       loss_fn=bradley_terry_loss) -> dict[str, list[float]]:
    """AdamW on the Bradley-Terry loss over random batches of pairs; returns {"step", "loss", "accuracy"}."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    history: dict[str, list[float]] = {"step": [], "loss": [], "accuracy": []}
    rm.train()
    for step in (bar := tqdm(range(1, steps + 1), desc="reward model")):
        idx = torch.randint(len(encoded), (batch_size,), generator=g).tolist()
        rc, rr = pair_rewards(rm, collate_pairs([encoded[i] for i in idx], pad_id))
        loss = loss_fn(rc, rr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history["step"].append(step)
        history["loss"].append(loss.item())
        history["accuracy"].append((rc > rr).float().mean().item())
        if step % log_every == 0:
            bar.set_postfix(loss=f"{sum(history['loss'][-log_every:]) / log_every:.3f}")
    rm.eval()
    return history


def trl_reward_loss(rm: RewardModel, lm_config, tok, pairs: list[dict[str, Any]], *, batch_size: int = 4,
                    output_dir: str = "/tmp/course-trl-reward") -> tuple[float, float, int]:
    """TRL's `RewardTrainer.compute_loss` and ours on the same batch and weights: (trl_loss, our_loss, batch size).

    TRL tokenises the conversational pairs itself and pools `LlamaForSequenceClassification` at the last
    non-pad token; we copy our trunk and score head into that model, take TRL's first training batch and
    run both losses on it.
    """
    from datasets import Dataset
    from transformers import LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    config = lm_config.__class__.from_dict({**lm_config.to_dict(), "num_labels": 1, "pad_token_id": tok.pad_token_id})
    clf = LlamaForSequenceClassification(config)
    clf.model.load_state_dict(rm.backbone.state_dict())
    clf.score.weight.data.copy_(rm.score.weight.data)
    clf.eval()
    data = Dataset.from_list([{"prompt": chat_messages(p["prompt"]),
                               "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    args = RewardConfig(output_dir=output_dir, per_device_train_batch_size=batch_size, report_to="none",
                        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, disable_dropout=True,
                        dataloader_num_workers=0, max_length=None, seed=0)
    trainer = RewardTrainer(model=clf, args=args, train_dataset=data, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(clf, dict(batch)).item()
        rm.eval()
        ours = bradley_terry_loss(*pair_rewards(rm, batch)).item()
    return trl_loss, ours, batch["input_ids"].shape[0] // 2


# ----------------------------------------------------------------------------------------------
# One trained reward model shared by notebooks 01 and 02 (its trainable weights cached on disk)
# ----------------------------------------------------------------------------------------------
RM_SIZES = {  # per profile: trunk depth, trained top blocks, steps, batch, learning rate, training pairs
    "smoke": dict(n_layers=2, train_layers=1, steps=4, batch_size=4, lr=3e-4, train_pairs=64),
    "cpu": dict(n_layers=10, train_layers=2, steps=60, batch_size=8, lr=1e-4, train_pairs=1200),
    "gpu": dict(n_layers=30, train_layers=4, steps=300, batch_size=16, lr=5e-5, train_pairs=1200),
}


def _rm_path(sizes: dict[str, Any]) -> Path:
    from .runtime import cache_dir

    tag = "-".join(f"{k}{v}" for k, v in sorted(sizes.items()))
    return cache_dir("week6") / f"reward-model-{tag}.pt"


def save_reward_model(rm: RewardModel, sizes: dict[str, Any]) -> Path:
    """Cache the trained (requires_grad) weights; the frozen rest is SmolLM2's and reloads from the data layer."""
    path = _rm_path(sizes)
    torch.save({k: v for k, v in rm.state_dict().items() if k in _trainable_names(rm)}, path)
    return path


def _trainable_names(rm: RewardModel) -> set[str]:
    return {n for n, p in rm.named_parameters() if p.requires_grad}


def get_reward_model(sizes: dict[str, Any], *, seed: int = 0) -> tuple[RewardModel, Any]:
    """(reward model, tokenizer) of these sizes: loaded from the cache if notebook 01 saved one, else trained now."""
    from .data import load_smollm2

    lm, tok = load_smollm2()
    torch.manual_seed(seed)
    rm = RewardModel.from_causal_lm(lm, n_layers=sizes["n_layers"], train_layers=sizes["train_layers"])
    path = _rm_path(sizes)
    if path.exists():
        rm.load_state_dict(torch.load(path), strict=False)
    else:
        encoded = encode_pairs(load_preferences("train")[: sizes["train_pairs"]], tok)
        train_reward_model(rm, encoded, tok.pad_token_id, steps=sizes["steps"], batch_size=sizes["batch_size"],
                           lr=sizes["lr"], seed=seed)
        save_reward_model(rm, sizes)
    rm.eval()
    for p in rm.parameters():
        p.requires_grad_(False)
    return rm, tok
