"""Write the dates translation data set: human-written dates -> ISO dates (YYYY-MM-DD).

    python datasets/dates/make_dates.py

The generator lives in `course_utils.seq2seq` (so an installed package can regenerate the same files
without this repository); this script writes train.jsonl, val.jsonl and test.jsonl next to itself
and prints a summary. Output is deterministic: running it again gives byte-identical files.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from course_utils.seq2seq import SPLIT_SIZES, generate_split, write_split

HERE = Path(__file__).resolve().parent


def main() -> None:
    for split in SPLIT_SIZES:
        path = write_split(HERE, split)
        examples = generate_split(split)
        lengths = [len(e["src"]) for e in examples]
        buckets = Counter(min(L // 10 * 10, 60) for L in lengths)
        print(f"{path.name}: {len(examples)} pairs, {path.stat().st_size / 1024:.0f} KiB, input length "
              f"{min(lengths)}-{max(lengths)}, >30 chars: {sum(L > 30 for L in lengths) / len(lengths):.0%}, "
              f"by decade: {dict(sorted(buckets.items()))}")


if __name__ == "__main__":
    main()
