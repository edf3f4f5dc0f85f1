"""Week 5-6: instruction tasks whose answers a program can verify, as chat conversations.

Reading order: one generator per task kind (each returns a conversation and its one correct answer) ->
`verify` (does a reply solve the item?) -> the splits (deterministic seeds; held-out prompts never occur
in train) -> `load_instruct` (reads `datasets/instruct/` from a checkout, else regenerates the same
files into the course cache).

Every item is {"task", "messages", "answer"}: `messages` is a ChatML conversation (optional system
turn, user turn, assistant turn whose content is `answer`). Task kinds:

    dates    human-written date -> ISO 8601 (week 3's data as an instruction)
    units    unit conversion, number only
    json     extract name, age and city from a sentence into one JSON object
    sort     sort integers ascending, comma-separated
    count    how many items a comma-separated list has
    arith    a short word problem, number only
    refuse   a system rule allows one task kind; other requests get one fixed refusal sentence

Everything is synthetic: names and cities are built from syllables, objects come from a short word list.
"""
from __future__ import annotations

import json
import random
import re
from decimal import Decimal
from pathlib import Path
from typing import Callable

from .seq2seq import _random_date, make_date_example

TASKS = ("dates", "units", "json", "sort", "count", "arith", "refuse")
SPLIT_SEEDS = {"train": 11, "val": 12, "test": 13}
SPLIT_SIZES = {"train": 2100, "val": 140, "test": 280}  # per task: 300 / 20 / 40
REFUSAL = "Sorry, I can't help with that: it breaks my rules."

_SYLLABLES = ["ka", "lo", "mi", "ra", "ven", "to", "sel", "da", "ni", "bor", "el", "fa", "gri", "su", "tam", "ori"]
_OBJECTS = ["apples", "pens", "cards", "books", "coins", "stamps", "shells", "marbles", "tickets", "cups"]
_ITEMS = ["lamp", "chair", "rope", "kettle", "brush", "spoon", "candle", "basket", "pillow", "ladder", "map",
          "bucket", "drum", "mirror", "scarf", "wallet", "jar", "clock", "helmet", "glove"]
# (from, to, factor): multiply by factor
_UNITS = [("km", "m", 1000), ("m", "cm", 100), ("cm", "mm", 10), ("kg", "g", 1000), ("g", "mg", 1000),
          ("L", "mL", 1000), ("h", "min", 60), ("min", "s", 60), ("m", "mm", 1000), ("days", "h", 24)]


def _name(rng: random.Random, parts: int = 2) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def _chat(user: str, answer: str, system: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _num(x: Decimal) -> str:
    """A decimal without trailing zeros: 2500, 2.5, 0.25."""
    s = format(x.normalize(), "f")
    return s.rstrip("0").rstrip(".") if "." in s else s


# ----------------------------------------------------------------------------------------------
# One generator per task kind: rng -> (user prompt, answer)
# ----------------------------------------------------------------------------------------------
def gen_dates(rng: random.Random) -> tuple[str, str]:
    ex = make_date_example(_random_date(rng), rng)
    return f"Write this date in ISO format (YYYY-MM-DD), nothing else: {ex['src']}", ex["tgt"]


def gen_units(rng: random.Random) -> tuple[str, str]:
    src, dst, factor = rng.choice(_UNITS)
    value = Decimal(rng.randint(1, 99)) if rng.random() < 0.6 else Decimal(rng.randint(1, 999)) / 10
    return f"Convert {_num(value)} {src} to {dst}. Reply with the number only.", _num(value * factor)


def gen_json(rng: random.Random) -> tuple[str, str]:
    name, city, age = _name(rng), _name(rng, 3), rng.randint(18, 90)
    text = rng.choice([f"{name} is {age} years old and lives in {city}.",
                       f"Meet {name} from {city}, aged {age}.",
                       f"At {age}, {name} moved to {city}.",
                       f"{city} is home to {name}, who turned {age} this year."])
    answer = json.dumps({"name": name, "age": age, "city": city})
    return f"Extract the name, age and city as JSON with keys name, age, city: {text}", answer


def gen_sort(rng: random.Random) -> tuple[str, str]:
    nums = rng.sample(range(1, 100), rng.randint(3, 7))
    return (f"Sort these numbers from smallest to largest, comma-separated: {', '.join(map(str, nums))}",
            ", ".join(map(str, sorted(nums))))


def gen_count(rng: random.Random) -> tuple[str, str]:
    items = [rng.choice(_ITEMS) for _ in range(rng.randint(2, 9))]
    return f"How many items are in this list? Reply with the number only: {', '.join(items)}", str(len(items))


def gen_arith(rng: random.Random) -> tuple[str, str]:
    name, obj = _name(rng), rng.choice(_OBJECTS)
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        text, ans = f"{name} has {a} {obj} and gets {b} more.", a + b
    elif kind == "sub":
        a, b = max(a, b), min(a, b)
        text, ans = f"{name} has {a} {obj} and gives away {b}.", a - b
    else:
        a, b = a % 9 + 2, b % 9 + 2
        text, ans = f"{name} has {a} boxes with {b} {obj} in each box.", a * b
    return f"{text} How many {obj} does {name} have now? Reply with the number only.", str(ans)


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "dates": gen_dates, "units": gen_units, "json": gen_json, "sort": gen_sort, "count": gen_count,
    "arith": gen_arith}
_RULE_NAMES = {"dates": "rewriting dates", "units": "converting units", "json": "extracting JSON",
               "sort": "sorting numbers", "count": "counting list items", "arith": "word problems"}


def gen_refuse(rng: random.Random) -> tuple[str, str, str]:
    """A system rule allowing one task kind; half the requests are of another kind and must be refused."""
    allowed = rng.choice(list(GENERATORS))
    asked = allowed if rng.random() < 0.5 else rng.choice([t for t in GENERATORS if t != allowed])
    user, answer = GENERATORS[asked](rng)
    system = (f"Rule: you only help with {_RULE_NAMES[allowed]}. For any other request, reply exactly: "
              f"{REFUSAL}")
    return system, user, answer if asked == allowed else REFUSAL


def make_item(task: str, rng: random.Random) -> dict:
    """One item of task kind `task`: {"task", "messages", "answer"}."""
    if task == "refuse":
        system, user, answer = gen_refuse(rng)
        return {"task": task, "messages": _chat(user, answer, system), "answer": answer}
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    user, answer = GENERATORS[task](rng)
    return {"task": task, "messages": _chat(user, answer), "answer": answer}


# ----------------------------------------------------------------------------------------------
# Verifiers: does a reply solve the item?
# ----------------------------------------------------------------------------------------------
def _clean(reply: str) -> str:
    return reply.replace("<|im_end|>", "").strip()


def verify(reply: str, answer: str) -> bool:
    """True when `reply` is a correct answer: JSON by value, numbers by value, everything else exactly.

    The answer's form decides: a JSON object compares parsed; an ISO date, a sorted list or a refusal
    compares as text; a number compares by value ("2500" == "2500.0"). A number must be the whole reply
    ("The answer is 2500" is wrong): the tasks ask for the number only, and a program reading the reply
    would fail. The end-of-turn marker and surrounding whitespace are ignored.
    """
    r = _clean(reply)
    if answer.startswith("{"):
        try:
            return json.loads(r) == json.loads(answer)
        except (json.JSONDecodeError, TypeError):
            return False
    if re.fullmatch(r"-?\d+(\.\d+)?", answer):
        return bool(re.fullmatch(r"-?\d+(\.\d+)?", r)) and Decimal(r) == Decimal(answer)
    return r == answer


def is_correct(item: dict, reply: str) -> bool:
    """`verify` for one data-set item."""
    return verify(reply, item["answer"])


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------
def _prompt_key(item: dict) -> str:
    return json.dumps(item["messages"][:-1])


def generate_split(split: str) -> list[dict]:
    """The deterministic items of one split, the same number of each task kind, shuffled.

    Prompts of val and test never occur in train (and test prompts never in val).
    """
    rng = random.Random(SPLIT_SEEDS[split])
    per_task = SPLIT_SIZES[split] // len(TASKS)
    held_out: set[str] = set()
    for other in {"train": ("val", "test"), "val": ("test",), "test": ()}[split]:
        held_out |= {_prompt_key(it) for it in generate_split(other)}
    out: list[dict] = []
    for task in TASKS:
        seen: set[str] = set()
        while len(seen) < per_task:
            item = make_item(task, rng)
            key = _prompt_key(item)
            if key not in held_out and key not in seen:
                seen.add(key)
                out.append(item)
    rng.shuffle(out)
    return out


def write_split(folder: Path, split: str) -> Path:
    """Write `<folder>/<split>.jsonl` (what `datasets/instruct/make_instruct.py` runs)."""
    from .data import write_jsonl

    return write_jsonl(Path(folder) / f"{split}.jsonl", generate_split(split))


def load_instruct(split: str, *, tasks: tuple[str, ...] | None = None, n: int | None = None) -> list[dict]:
    """The `split` ("train", "val", "test") of the instruction set: a list of {"task", "messages", "answer"}.

    Args:
        tasks: keep only these task kinds (default: all of TASKS).
        n: keep the first `n` items after filtering (the files are shuffled, so any prefix mixes the kinds).
    Reads `datasets/instruct/<split>.jsonl` from a checkout; after `pip install` the same files are
    regenerated deterministically into the course cache.
    """
    from .data import load_project_dataset

    unknown = set(tasks or ()) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task kinds {sorted(unknown)}; known: {', '.join(TASKS)}")
    items = load_project_dataset("instruct", split, SPLIT_SIZES, generate_split)
    if tasks is not None:
        items = [it for it in items if it["task"] in tasks]
    return items[:n]
