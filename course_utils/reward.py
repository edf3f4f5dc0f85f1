"""Preference data with verifiable answers, and a reward model trained on it (week 6).

Reading order: the preference pairs (three kinds, each with a program that says which reply is right)
-> `verify` (the gold metric) -> tokenised pairs -> `RewardModel` (a language model with a scalar head
on its last token) -> the Bradley-Terry loss -> training and held-out pairwise accuracy.

The Bradley-Terry model (Bradley & Terry, 1952; used for RLHF by Ouyang et al., 2022):
P(chosen beats rejected) = sigmoid(r(chosen) - r(rejected)); the loss is -log of that probability.
"""
from __future__ import annotations

import json
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
    paths = []
    for split, pairs in generate_all().items():
        path = Path(folder) / f"{split}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for pair in pairs:
                f.write(json.dumps(pair) + "\n")
        paths.append(path)
    return paths


def preferences_dir() -> Path | None:
    """`datasets/preferences` in a checkout, else None."""
    folder = Path(__file__).resolve().parent.parent / "datasets" / "preferences"
    return folder if (folder / "test.jsonl").exists() else None


def load_preferences(split: str) -> list[dict[str, Any]]:
    """The `split` ("train", "val", "test") of the preference pairs: {"id", "kind", "prompt", "chosen",
    "rejected", "check"}. Outside a checkout the same files are regenerated into the course cache."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be one of {sorted(SPLIT_SIZES)}, got {split!r}")
    folder = preferences_dir()
    if folder is None:
        from .runtime import cache_dir

        folder = cache_dir("preferences")
        if not (folder / f"{split}.jsonl").exists():
            write_splits(folder)
    with open(folder / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


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
