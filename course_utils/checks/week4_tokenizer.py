"""Week 4 tokenizer exercises: one BPE merge step, and encoding a string with learned merges.

Expected values come from independent references: Python's `str.replace` (which also replaces
left to right without overlap) for a merge, and the `tokenizers` library's BPE model (Rust) for
encoding. Case inputs (the merges) are learned by a small loop written here, not by the package.
"""
from __future__ import annotations

import torch

from ..exercises import Case, case_rng, exercise

_OFFSET = 0x4E00  # ids are spelled as CJK characters so `str.replace` can act on them


def _replace_reference(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Merge by string replacement: str.replace scans left to right and never overlaps matches."""
    spell = "".join(chr(_OFFSET + i) for i in ids)
    merged = spell.replace(chr(_OFFSET + pair[0]) + chr(_OFFSET + pair[1]), chr(_OFFSET + new_id))
    return [ord(ch) - _OFFSET for ch in merged]


def _same_ids(got, expected) -> str | None:
    """Exact comparison of id lists with the first differing position (ids are labels, not numbers)."""
    if not isinstance(got, (list, tuple)):
        return f"expected a list of ints, got {type(got).__name__}: {got!r:.80}"
    if any(not isinstance(i, int) or isinstance(i, bool) for i in got):
        bad = next(i for i in got if not isinstance(i, int) or isinstance(i, bool))
        return f"expected a list of ints, but it contains {bad!r} ({type(bad).__name__})"
    got = list(got)
    if got == expected:
        return None
    k = next((k for k, (g, e) in enumerate(zip(got, expected)) if g != e), min(len(got), len(expected)))
    lo, hi = max(0, k - 3), k + 4
    counts = "" if len(got) == len(expected) else f"{len(got)} ids where {len(expected)} were expected; "
    return (f"{counts}first difference at position {k}.\n"
            f"expected ids[{lo}:{hi}] = {expected[lo:hi]}\ngot      ids[{lo}:{hi}] = {got[lo:hi]}")


def _same_merge(got, expected) -> str | None:
    """[merged ids, ids after the call]: the merge is right and the input list was left alone."""
    problem = _same_ids(got[0], expected[0])
    if problem:
        return problem
    if got[1] != expected[1]:
        return "the function changed its input list `ids` in place; build and return a new list instead."
    return None


@exercise("4.1", "One BPE merge step", reference="course_utils.tokenizer:merge",
          hint="Walk left to right with an index i: if ids[i], ids[i+1] is the pair, append new_id and jump i by 2, "
               "else append ids[i] and step by 1. Return a new list; [a, a, a] with pair (a, a) -> [new, a].")
def _():
    g = case_rng(41)
    fixed = [("[5, 6, 5, 6, 7], pair (5, 6)", [5, 6, 5, 6, 7], (5, 6), 99),
             ("overlapping: [97, 97, 97], pair (97, 97)", [97, 97, 97], (97, 97), 256),
             ("overlapping: five 97s, pair (97, 97)", [97] * 5, (97, 97), 256),
             ("runs: [1, 1, 2, 1, 1, 1, 2, 1], pair (1, 1)", [1, 1, 2, 1, 1, 1, 2, 1], (1, 1), 300),
             ("the pair is the last two ids", [1, 2, 3, 4], (3, 4), 260),
             ("the pair is the first two ids", [3, 4, 1, 2], (3, 4), 260),
             ("the pair in reverse order only: [4, 3, 4, 3], pair (3, 4)", [4, 3, 4, 3], (3, 4), 261),
             ("the pair does not occur", [10, 20, 30], (20, 10), 257),
             ("length one", [42], (42, 42), 256),
             ("empty list", [], (1, 2), 256)]
    for k in range(3):  # random ids from a small alphabet, so pairs repeat; merge a pair that occurs
        ids = torch.randint(0, 4, (40 + 17 * k,), generator=g).tolist()
        at = int(torch.randint(0, len(ids) - 1, (1,), generator=g))
        fixed.append((f"random: {len(ids)} ids in 0..3, pair {tuple(ids[at:at + 2])}", ids,
                      tuple(ids[at:at + 2]), 256 + k))
    for name, ids, pair, new_id in fixed:
        yield Case(f"merge({name}, new_id={new_id})",
                   run=lambda f, ids=ids, pair=pair, new_id=new_id: (lambda arg: [f(arg, pair, new_id), arg])(list(ids)),
                   expected=lambda ids=ids, pair=pair, new_id=new_id: [_replace_reference(ids, pair, new_id), list(ids)],
                   compare=_same_merge, names=("merged ids", "ids after the call"))


# ---- 4.2: encode a string with learned merges ------------------------------------------------------

def _learn(corpus: str, n: int) -> dict[tuple[int, int], int]:
    """Case inputs: up to n merges on the raw UTF-8 bytes of `corpus` (most frequent pair, then smallest)."""
    ids, merges, known = list(corpus.encode("utf-8")), {}, {bytes([b]) for b in range(256)}
    spelled = {i: bytes([i]) for i in range(256)}
    for new_id in range(256, 256 + n):
        counts: dict[tuple[int, int], int] = {}
        for p in zip(ids, ids[1:]):
            counts[p] = counts.get(p, 0) + 1
        if not counts:
            break
        pair = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))
        token = spelled[pair[0]] + spelled[pair[1]]
        if token in known:  # `tokenizers` keys its vocabulary by string: keep every token's bytes unique
            break
        known.add(token)
        spelled[new_id] = token
        merges[pair] = new_id
        out, i = [], 0
        while i < len(ids):
            if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
                out.append(new_id)
                i += 2
            else:
                out.append(ids[i])
                i += 1
        ids = out
    return merges


def _tokenizers_reference(text: str, merges: dict[tuple[int, int], int]) -> list[int]:
    """Encode with the `tokenizers` library's BPE model on byte-level symbols (no regex split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's byte -> symbol map
    symbol = {b: chr(b) for b in printable}
    symbol.update({b: chr(256 + k) for k, b in enumerate(b for b in range(256) if b not in printable)})
    spelled = {i: symbol[i] for i in range(256)}
    for (a, b), new in sorted(merges.items(), key=lambda item: item[1]):
        spelled[new] = spelled[a] + spelled[b]
    ordered = sorted(merges.items(), key=lambda item: item[1])
    bpe = models.BPE(vocab={s: i for i, s in spelled.items()},
                     merges=[(spelled[a], spelled[b]) for (a, b), _ in ordered])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return tok.encode(text).ids if text else []


def _random_text(g: torch.Generator, alphabet: str, n: int) -> str:
    return "".join(alphabet[i] for i in torch.randint(0, len(alphabet), (n,), generator=g).tolist())


@exercise("4.2", "Encode a string with learned BPE merges", reference="course_utils.tokenizer:encode_chunk",
          hint="Start from list(text.encode('utf-8')) (bytes, not characters). While two or more ids remain, take "
               "the adjacent pair with the LOWEST merges[pair] (learned first), stop if no pair is in merges, "
               "and merge every occurrence of it.")
def _():
    g = case_rng(42)
    wiki = "aaabdaaabac"
    english = "the cat sat on the mat; the rat ate the hat. " * 3
    cases = [("'aaabdaaabac' with the merges learned on it", wiki, _learn(wiki, 3)),
             ("the empty string", "", _learn(english, 10)),
             ("one character 'a'", "a", _learn(wiki, 3)),
             ("'the hat' with 12 merges learned on English", "the hat", _learn(english, 12)),
             ("a word that merges into a single token", "the", _learn("the the the the", 2)),
             ("'aaaaaaa' (overlapping pairs) with merges learned on 'aaaaaaaa'", "a" * 7, _learn("a" * 8, 3)),
             ("rank, not frequency: 'abcbcbcbc' with merges ab (learned first), then bc", "abcbcbcbc",
              {(97, 98): 256, (98, 99): 257}),
             ("two bytes that one merge joins: 'ab'", "ab", {(97, 98): 256}),
             ("characters never seen in training fall back to bytes: 'tea 你好 🍵'", "tea 你好 🍵", _learn(english, 10)),
             ("merges inside multi-byte characters: '你好世界，你好'", "你好世界，你好", _learn("你好你好你好，世界世界", 10)),
             ("accents: 'café crème'", "café crème", _learn("café café crème crème brûlée", 9))]
    for k in range(3):  # random strings: merges learned on one, applied to another
        corpus, text = _random_text(g, "ab c", 60 + 20 * k), _random_text(g, "ab cd", 30 + 10 * k)
        cases.append((f"random {text!r} with {8 + 2 * k} merges learned on a random text", text, _learn(corpus, 8 + 2 * k)))
    for name, text, merges in cases:
        yield Case(f"{name} ({len(merges)} merges)", args=(text, merges),
                   expected=lambda text=text, merges=merges: _tokenizers_reference(text, merges),
                   compare=_same_ids, names="ids")
