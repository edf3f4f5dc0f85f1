"""Write the tool-use task suite (week 6, agents): tasks with checkable answers and, for training,
complete tool-use traces (call -> result -> answer) for supervised fine-tuning.

    python datasets/tool_tasks/make_tool_tasks.py

Three kinds of task, one tool each: arithmetic word problems (calculator), questions about the
fictional planets of datasets/documents (search), and counting/number puzzles (python). Entirely
synthetic, fixed seeds: running it again gives byte-identical test.jsonl and train.jsonl.
Test and train share no task text; lookup tasks use the documents' test questions for test and
its train questions for train.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "documents"
NAMES = ["Ada", "Bo", "Cyra", "Dev", "Esme", "Finn", "Gale", "Hana", "Ivo", "Juno", "Kai", "Lena", "Milo", "Nia"]
SIZES = {"test": {"arithmetic": 60, "lookup": 40, "python": 30}, "train": {"arithmetic": 160, "lookup": 100, "python": 80}}
SEEDS = {"test": 61, "train": 62}


def arithmetic(rng: random.Random) -> tuple[str, str, int]:
    """(question, canonical expression, integer answer): a 2-3 step word problem with 2-3 digit numbers."""
    name = rng.choice(NAMES)
    kind = rng.randrange(6)
    a, b, c = rng.randint(12, 97), rng.randint(13, 89), rng.randint(101, 999)
    if kind == 0:
        return (f"A warehouse has {a} shelves with {b} boxes on each shelf. How many boxes are in the warehouse?",
                f"{a} * {b}", a * b)
    if kind == 1:
        c = a * b + rng.randint(5, 900)
        return (f"{name} buys {a} tickets at {b} credits each and pays with {c} credits. How many credits of "
                f"change does {name} get back?", f"{c} - {a} * {b}", c - a * b)
    if kind == 2:
        return (f"A train travels {a} km every hour for {b} hours, then {c} km more. How many km does it travel "
                f"in total?", f"{a} * {b} + {c}", a * b + c)
    if kind == 3:
        total = a * b
        return (f"{total} apples are shared equally among {b} baskets. How many apples go into each basket?",
                f"{total} / {b}", a)
    if kind == 4:
        return (f"A factory makes {c} bolts every day. How many bolts does it make in {b} weeks?",
                f"{c} * 7 * {b}", c * 7 * b)
    c = rng.randint(10, a * b - 1)
    return (f"{name} saves {a} credits every month for {b} months, then spends {c} credits. How many credits "
            f"are left?", f"{a} * {b} - {c}", a * b - c)


def _primes_below(n: int) -> int:
    return sum(all(k % d for d in range(2, int(k ** 0.5) + 1)) for k in range(2, n))


def python_task(rng: random.Random) -> tuple[str, str, int]:
    """(question, canonical program that prints the answer, integer answer)."""
    kind = rng.randrange(4)
    if kind == 0:
        n, a, b = rng.randint(200, 5000), rng.randint(3, 9), rng.randint(10, 19)
        return (f"How many integers from 1 to {n} are divisible by {a} or by {b}?",
                f"print(sum(1 for i in range(1, {n} + 1) if i % {a} == 0 or i % {b} == 0))",
                sum(1 for i in range(1, n + 1) if i % a == 0 or i % b == 0))
    if kind == 1:
        a, b = rng.randint(2, 9), rng.randint(20, 90)
        return (f"What is the sum of the digits of {a} to the power {b}?",
                f"print(sum(int(d) for d in str({a} ** {b})))", sum(int(d) for d in str(a ** b)))
    if kind == 2:
        n = rng.randint(100, 3000)
        return (f"How many prime numbers are smaller than {n}?",
                f"print(sum(all(k % d for d in range(2, int(k ** 0.5) + 1)) for k in range(2, {n})))",
                _primes_below(n))
    n = rng.randint(20, 80)
    a, b = 1, 1
    for _ in range(n - 2):
        a, b = b, a + b
    return (f"What is the {n}th Fibonacci number, counting F(1) = F(2) = 1?",
            f"a, b = 1, 1\nfor _ in range({n} - 2):\n    a, b = b, a + b\nprint(b)", b)


def make_split(split: str) -> list[dict]:
    rng = random.Random(SEEDS[split])
    sizes = SIZES[split]
    avoid: set[str] = set()
    if split == "train":
        avoid = {t["question"] for t in make_split("test")}
    tasks: list[dict] = []
    seen: set[str] = set(avoid)

    def add(kind: str, question: str, tool: str, arguments: dict, answer: str, **extra) -> None:
        seen.add(question)
        tasks.append({"id": f"{split}-{kind}-{sum(t['kind'] == kind for t in tasks):03d}", "kind": kind,
                      "question": question, "tool": tool, "arguments": arguments, "answer": answer, **extra})

    while sum(t["kind"] == "arithmetic" for t in tasks) < sizes["arithmetic"]:
        q, expr, ans = arithmetic(rng)
        if q not in seen:
            add("arithmetic", q, "calculator", {"expression": expr}, str(ans))
    while sum(t["kind"] == "python" for t in tasks) < sizes["python"]:
        q, code, ans = python_task(rng)
        if q not in seen:
            add("python", q, "python", {"code": code}, str(ans))
    with open(DOCS / f"{split}.jsonl", encoding="utf-8") as f:
        questions = [json.loads(line) for line in f]
    for q in questions[: sizes["lookup"]]:
        add("lookup", q["question"], "search", {"query": q["question"]}, q["answer"], passage_id=q["passage_id"])
    rng.shuffle(tasks)
    return tasks


def main() -> None:
    for split in ("test", "train"):
        tasks = make_split(split)
        with open(HERE / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for t in tasks:
                f.write(json.dumps(t) + "\n")
        kinds = {k: sum(t["kind"] == k for t in tasks) for k in SIZES[split]}
        print(f"{split}.jsonl: {len(tasks)} tasks {kinds}")


if __name__ == "__main__":
    main()
