"""Write the intents classification data set: short voice-assistant requests labelled with one of six intents.

    python datasets/intents/make_intents.py [--out FOLDER]

The generator lives in `course_utils.intents` (so an installed package can regenerate the same files
without this repository); this script writes train.jsonl, val.jsonl and test.jsonl next to itself (or
into --out) and prints a summary. Output is deterministic: running it again gives byte-identical files.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from course_utils.intents import SPLIT_SIZES, generate_split, write_split

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write the splits into")
    folder = parser.parse_args().out
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLIT_SIZES:
        path = write_split(folder, split)
        examples = generate_split(split)
        words = [len(e["text"].split()) for e in examples]
        print(f"{path.name}: {len(examples)} requests, {path.stat().st_size / 1024:.0f} KiB, {min(words)}-{max(words)} "
              f"words, held-out phrasings: {sum(not e['seen'] for e in examples)}, "
              f"per label: {dict(sorted(Counter(e['label'] for e in examples).items()))}")


if __name__ == "__main__":
    main()
