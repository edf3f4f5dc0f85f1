"""Write the RL prompts of week 6 (GRPO): small additions phrased four ways, each with its exact answer.

    python datasets/rl_prompts/make_rl_prompts.py

The generator lives in `course_utils.grpo` (so an installed package can regenerate the same files
without this repository); this script writes train.jsonl, val.jsonl and test.jsonl next to itself and
prints a summary. Output is deterministic: running it again gives byte-identical files.
"""
from __future__ import annotations

from pathlib import Path

from course_utils.grpo import SPLIT_PAIRS, generate_rl_split, write_rl_split

HERE = Path(__file__).resolve().parent


def main() -> None:
    seen: dict[str, set[tuple[int, int]]] = {}
    for split in SPLIT_PAIRS:
        path = write_rl_split(HERE, split)
        items = generate_rl_split(split)
        seen[split] = {(it["a"], it["b"]) for it in items}
        print(f"{path.name}: {len(items)} prompts from {len(seen[split])} (a, b) pairs, "
              f"{path.stat().st_size / 1024:.0f} KiB, answers {min(i['answer'] for i in items)}-"
              f"{max(i['answer'] for i in items)}")
    assert not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"]), "a pair leaked into test"


if __name__ == "__main__":
    main()
