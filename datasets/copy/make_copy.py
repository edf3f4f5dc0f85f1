"""Write the copy data set: a random string of 5-40 symbols -> the same string.

    python datasets/copy/make_copy.py

The generator lives in `course_utils.seq2seq` (so an installed package can regenerate the same files
without this repository); this script writes train.jsonl, val.jsonl and test.jsonl next to itself
and prints a summary. Output is deterministic: running it again gives byte-identical files.
The reversal task reads the same files and reverses each target (`load_copy(split, task="reverse")`).
"""
from __future__ import annotations

from pathlib import Path

from course_utils.seq2seq import COPY_SIZES, generate_copy_split, write_jsonl

HERE = Path(__file__).resolve().parent


def main() -> None:
    for split in COPY_SIZES:
        examples = generate_copy_split(split)
        path = write_jsonl(HERE / f"{split}.jsonl", examples)
        lengths = [len(e["src"]) for e in examples]
        print(f"{path.name}: {len(examples)} pairs, {path.stat().st_size / 1024:.0f} KiB, input length "
              f"{min(lengths)}-{max(lengths)}, mean {sum(lengths) / len(lengths):.1f}")


if __name__ == "__main__":
    main()
