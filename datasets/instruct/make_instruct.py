"""Write the instruction data set: seven task kinds with answers a program can verify, as chat turns.

    python datasets/instruct/make_instruct.py

The generator lives in `course_utils.tasks` (so an installed package can regenerate the same files
without this repository); this script writes train.jsonl, val.jsonl and test.jsonl next to itself
and prints a summary. Output is deterministic: running it again gives byte-identical files.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from course_utils.tasks import SPLIT_SIZES, generate_split, is_correct, write_split

HERE = Path(__file__).resolve().parent


def main() -> None:
    for split in SPLIT_SIZES:
        path = write_split(HERE, split)
        items = generate_split(split)
        assert all(is_correct(it, it["answer"]) for it in items), "a verifier rejects its own answer"
        kinds = Counter(it["task"] for it in items)
        refusals = sum(it["task"] == "refuse" and it["answer"].startswith("Sorry") for it in items)
        print(f"{path.name}: {len(items)} items, {path.stat().st_size / 1024:.0f} KiB, per task {dict(kinds)}, "
              f"refusals {refusals} of {kinds['refuse']}")


if __name__ == "__main__":
    main()
