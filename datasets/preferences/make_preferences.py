"""Write the preference pairs for week 6: a prompt, a chosen and a rejected reply, and a program-checkable rule.

    python datasets/preferences/make_preferences.py

The generator lives in `course_utils.reward` (so an installed package can regenerate the same files
without this repository); this script writes train.jsonl, val.jsonl and test.jsonl next to itself and
prints a summary. Output is deterministic: running it again gives byte-identical files. It also asserts
that the verifier accepts every chosen reply and rejects every rejected one.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from course_utils.reward import generate_all, verify, write_splits

HERE = Path(__file__).resolve().parent


def main() -> None:
    splits = generate_all()
    for split, pairs in splits.items():
        bad = [p["id"] for p in pairs if not verify(p["check"], p["chosen"]) or verify(p["check"], p["rejected"])]
        assert not bad, f"verifier disagrees with the preference on {bad[:5]}"
    for path in write_splits(HERE):
        pairs = splits[path.stem]
        print(f"{path.name}: {len(pairs)} pairs, {path.stat().st_size / 1024:.0f} KiB, "
              f"kinds {dict(sorted(Counter(p['kind'] for p in pairs).items()))}")


if __name__ == "__main__":
    main()
