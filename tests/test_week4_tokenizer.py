"""Week 4 tokenizer: the checks reject plausible wrong answers; the BPE tokenizer round-trips any UTF-8 text,
trains the same merges as a full-recount loop, and encodes exactly like `tokenizers`, `tiktoken` and
SmolLM2's `transformers` tokenizer."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from course_utils import tokenizer as T


# ----------------------------------------------------------------------------------------------
# 4.1 merge: wrong and correct versions
# ----------------------------------------------------------------------------------------------
def merge_overlapping(ids, pair, new_id):  # never skips the partner: [a, a, a] -> [X, X]
    out = []
    for i in range(len(ids)):
        out.append(new_id if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair else ids[i])
    return out


def merge_drops_last(ids, pair, new_id):  # off by one: the loop stops before the last id
    out, i = [], 0
    while i < len(ids) - 1:
        if (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def merge_right_to_left(ids, pair, new_id):  # [a, a, a] -> [a, X] instead of [X, a]
    out, i = [], len(ids) - 1
    while i >= 0:
        if i >= 1 and (ids[i - 1], ids[i]) == pair:
            out.append(new_id)
            i -= 2
        else:
            out.append(ids[i])
            i -= 1
    return out[::-1]


def merge_in_place(ids, pair, new_id):  # right answer, but it edits the caller's list
    i = 0
    while i < len(ids) - 1:
        if (ids[i], ids[i + 1]) == pair:
            ids[i: i + 2] = [new_id]
        i += 1
    return ids


def merge_first_only(ids, pair, new_id):  # replaces one occurrence
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == pair:
            return ids[:i] + [new_id] + ids[i + 2:]
    return list(ids)


def merge_recursive(ids, pair, new_id):
    if len(ids) < 2:
        return list(ids)
    if (ids[0], ids[1]) == pair:
        return [new_id] + merge_recursive(ids[2:], pair, new_id)
    return [ids[0]] + merge_recursive(ids[1:], pair, new_id)


def merge_skip_flag(ids, pair, new_id):
    out, skip = [], False
    for a, b in zip(ids, [*ids[1:], None]):
        if skip:
            skip = False
        elif (a, b) == pair:
            out.append(new_id)
            skip = True
        else:
            out.append(a)
    return out


# ----------------------------------------------------------------------------------------------
# 4.2 encode with merges: wrong and correct versions
# ----------------------------------------------------------------------------------------------
def _pairs(ids):
    return list(zip(ids, ids[1:]))


def encode_by_frequency(text, merges):  # merges the most frequent known pair, not the earliest learned
    ids = list(text.encode("utf-8"))
    while True:
        known = Counter(p for p in _pairs(ids) if p in merges)
        if not known:
            return ids
        pair = max(known, key=known.get)
        ids = T.merge(ids, pair, merges[pair])


def encode_latest_first(text, merges):  # highest rank first
    ids = list(text.encode("utf-8"))
    while len(ids) >= 2:
        known = [p for p in _pairs(ids) if p in merges]
        if not known:
            break
        pair = max(known, key=merges.get)
        ids = T.merge(ids, pair, merges[pair])
    return ids


def encode_characters(text, merges):  # forgets the byte fallback: code points, not UTF-8 bytes
    ids = [ord(ch) for ch in text]
    while len(ids) >= 2:
        pair = min(_pairs(ids), key=lambda p: merges.get(p, float("inf")))
        if pair not in merges:
            break
        ids = T.merge(ids, pair, merges[pair])
    return ids


def encode_stops_at_two(text, merges):  # off by one: a chunk never becomes a single token
    ids = list(text.encode("utf-8"))
    while len(ids) > 2:
        pair = min(_pairs(ids), key=lambda p: merges.get(p, float("inf")))
        if pair not in merges:
            break
        ids = T.merge(ids, pair, merges[pair])
    return ids


def encode_one_pass(text, merges):  # one left-to-right sweep merging whatever pair is known
    ids, out, i = list(text.encode("utf-8")), [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) in merges:
            out.append(merges[(ids[i], ids[i + 1])])
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def encode_merges_in_rank_order(text, merges):  # every merge once, earliest first: the same result
    ids = list(text.encode("utf-8"))
    for pair, new_id in sorted(merges.items(), key=lambda item: item[1]):
        ids = T.merge(ids, pair, new_id)
    return ids


def encode_leftmost_lowest(text, merges):  # merge one occurrence at a time, like `tokenizers`' queue
    ids = list(text.encode("utf-8"))
    while True:
        ranked = [(merges[p], k) for k, p in enumerate(_pairs(ids)) if p in merges]
        if not ranked:
            return ids
        rank, k = min(ranked)
        ids = ids[:k] + [rank] + ids[k + 2:]


WRONG_IMPLEMENTATIONS = {
    "4.1": [merge_overlapping, merge_drops_last, merge_right_to_left, merge_in_place, merge_first_only],
    "4.2": [encode_by_frequency, encode_latest_first, encode_characters, encode_stops_at_two, encode_one_pass],
}
CORRECT_ALTERNATIVES = {
    "4.1": [merge_recursive, merge_skip_flag],
    "4.2": [encode_merges_in_rank_order, encode_leftmost_lowest],
}


def test_tokenizer_exercises_registered():
    from course_utils import list_exercises

    assert {"4.1", "4.2"} <= set(list_exercises(4))


# ----------------------------------------------------------------------------------------------
# The tokenizer module
# ----------------------------------------------------------------------------------------------
CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
          "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
          "We're 2 citizens in 1603, aren't we?  I'LL go!\t'tis so.\n") * 4


@pytest.fixture(scope="module")
def trained():
    return T.train_bpe(CORPUS, 256 + 60 + 1, special_tokens=["<|endoftext|>"])


def _random_unicode(rng: random.Random, n: int) -> str:
    """Any code point but surrogates (which are not valid in UTF-8)."""
    out = []
    for _ in range(n):
        cp = rng.choice([rng.randrange(0x80), rng.randrange(0x80, 0x800), rng.randrange(0x800, 0x10000),
                         rng.randrange(0x10000, 0x110000)])
        out.append(chr(cp if not 0xD800 <= cp < 0xE000 else 0xFFFD))
    return "".join(out)


@pytest.mark.parametrize("pattern", [T.GPT2_PATTERN, T.GPT4_PATTERN])
@pytest.mark.parametrize("vocab_size", [256, 257, 300, 420])
def test_incremental_training_equals_full_recount(pattern, vocab_size):
    tok = T.train_bpe(CORPUS, vocab_size, pattern=pattern)
    assert tok.merges == T.train_bpe_naive(CORPUS, vocab_size, pattern=pattern)
    assert len(tok.merge_counts) == len(tok.merges) and tok.merge_counts == sorted(tok.merge_counts, reverse=True)


def test_training_stops_when_every_chunk_is_one_token():
    tok = T.train_bpe("ab ab ab", 1000)
    assert tok.encode("ab ab") == [tok.merges[(97, 98)], max(tok.merges.values())]  # 'ab', ' ab'
    assert tok.merges == T.train_bpe_naive("ab ab ab", 1000) == {(97, 98): 256, (32, 256): 257}


def test_training_learns_the_same_merges_as_tokenizers():
    """`tokenizers`' BpeTrainer breaks ties differently, so compare the set of merges, not their order."""
    from course_utils.data import load_shakespeare
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    text = load_shakespeare()[:100_000]
    ours = T.train_bpe(text, 256 + 150)
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(T.GPT4_PATTERN), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.train_from_iterator([text], trainers.BpeTrainer(vocab_size=256 + 150, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    to_byte = {ch: b for b, ch in T.bytes_to_unicode().items()}
    theirs = {tuple(bytes(to_byte[c] for c in s) for s in m) for m in json.loads(hf.to_str())["model"]["merges"]}
    mine = {(ours.vocab[a], ours.vocab[b]) for a, b in ours.merges}
    last_count = ours.merge_counts[-1]  # merges tied with the last one may differ at the cut
    tied = sum(c == last_count for c in ours.merge_counts)
    assert len(mine ^ theirs) <= 2 * tied, (len(mine ^ theirs), tied)


def test_round_trip_random_unicode(trained):
    rng = random.Random(0)
    texts = [_random_unicode(rng, rng.randint(0, 60)) for _ in range(300)] + ["", " ", "\n\n", "🇫🇷👩\u200d💻", "e\u0301"]
    for text in texts:
        ids = trained.encode(text)
        assert trained.decode(ids) == text
        assert all(0 <= i < trained.vocab_size for i in ids)


def test_byte_fallback_for_unseen_characters(trained):
    ids = trained.encode("你")  # never seen in training: three UTF-8 bytes, three byte tokens
    assert ids == list("你".encode("utf-8"))
    assert trained.decode(ids[:2]) == "\ufffd"  # half a character decodes to the replacement character


def test_special_tokens(trained):
    eot = trained.special_tokens["<|endoftext|>"]
    assert eot == trained.vocab_size - 1
    text = "Speak.<|endoftext|>All:"
    assert trained.encode(text, allowed_special="all") == [*trained.encode("Speak."), eot, *trained.encode("All:")]
    assert trained.encode(text, allowed_special={"<|endoftext|>"}) == trained.encode(text, allowed_special="all")
    assert eot not in trained.encode(text, allowed_special="none")
    assert trained.decode(trained.encode(text, allowed_special="none")) == text
    with pytest.raises(ValueError, match="special token"):
        trained.encode(text)
    with pytest.raises(ValueError, match="unknown special"):
        trained.encode(text, allowed_special={"<|nope|>"})
    assert trained.decode([eot]) == "<|endoftext|>"


@pytest.mark.parametrize("bad", [-1, "vocab_size", 10**9, 1.5, "7", None, True])
def test_decode_rejects_invalid_ids_with_a_clear_message(trained, bad):
    bad = trained.vocab_size if bad == "vocab_size" else bad
    with pytest.raises(ValueError) as info:
        trained.decode([72, bad])
    message = str(info.value)
    assert repr(bad) in message and f"vocab_size={trained.vocab_size}" in message and "position 1" in message


def test_decode_accepts_tensors_and_numpy(trained):
    import numpy as np
    import torch

    ids = trained.encode("Speak, speak.")
    assert trained.decode(torch.tensor(ids)) == trained.decode(np.array(ids)) == "Speak, speak."


def test_save_and_load_json(trained, tmp_path):
    path = trained.save(tmp_path / "tok.json")
    assert json.loads(path.read_text())["format"] == "course_utils.BPETokenizer"
    again = T.BPETokenizer.load(path)
    assert again.merges == trained.merges and again.vocab == trained.vocab
    assert again.encode(CORPUS + "<|endoftext|>", allowed_special="all") == trained.encode(
        CORPUS + "<|endoftext|>", allowed_special="all")


def test_bytes_to_unicode_is_gpt2s_alphabet():
    from tokenizers import pre_tokenizers

    table = T.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"


def test_encode_identical_to_tokenizers_and_tiktoken(trained):
    tiktoken = pytest.importorskip("tiktoken")
    hf, tk = T.to_tokenizers(trained), T.to_tiktoken(trained)
    assert isinstance(tk, tiktoken.Encoding)
    texts = T.probe_strings(300, seed=5) + [CORPUS]
    for text in texts:
        ours = trained.encode(text, allowed_special="all")
        assert ours == hf.encode(text).ids == tk.encode(text, allowed_special="all"), text


# ----------------------------------------------------------------------------------------------
# SmolLM2's vocabulary in our encoder
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    return T.BPETokenizer.from_smollm2()


@pytest.fixture(scope="module")
def smol_spec():
    return json.loads((T.smollm2_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))


def test_probe_strings_are_varied_and_seeded():
    probes = T.probe_strings(2000)
    assert len(probes) == 2000 and probes == T.probe_strings(2000) and probes != T.probe_strings(2000, seed=1)
    joined = "".join(probes)
    for needle in ["   ", "\t", "\r\n", "2024", "def ", "é", "你", "👍🏽", "<|im_start|>", "\u3000"]:
        assert needle in joined, needle
    assert len(set(probes)) > 1900


def test_smollm2_ids_identical_to_transformers(smol):
    hf = T.load_smollm2_tokenizer()
    probes = T.probe_strings(2000)
    theirs = hf(probes, add_special_tokens=False)["input_ids"]
    ours = [smol.encode(text, allowed_special="all") for text in probes]
    mismatched = [text for text, a, b in zip(probes, ours, theirs) if a != b]
    assert not mismatched, f"{len(mismatched)} of 2000 differ, e.g. {mismatched[:3]!r}"
    assert smol.vocab_size == len(hf) == 49152
    assert smol.special_tokens["<|im_start|>"] == hf.convert_tokens_to_ids("<|im_start|>")
    assert all(smol.decode(ids) == hf.decode(ids) for ids in ours[:200])


@pytest.mark.parametrize("digits", [False, True], ids=["as cached", "Digits pre-tokenizer (hub)"])
def test_smollm2_variants_identical_to_tokenizers(smol_spec, digits):
    """The hub's tokenizer.json isolates digits first; the offline GGUF conversion does not. Both must match."""
    from tokenizers import Tokenizer

    spec = dict(smol_spec)
    if digits:
        byte_level = [p for p in (spec["pre_tokenizer"].get("pretokenizers") or [spec["pre_tokenizer"]])
                      if p["type"] == "ByteLevel"]
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, *byte_level]}
    ours, theirs = T.BPETokenizer.from_tokenizer_json(spec), Tokenizer.from_str(json.dumps(spec))
    assert ours.split_digits == digits
    rng = random.Random(1)
    texts = T.probe_strings(500, seed=2) + [_random_unicode(rng, rng.randint(0, 30)) for _ in range(300)]
    for text, enc in zip(texts, theirs.encode_batch(texts, add_special_tokens=False)):
        assert ours.encode(text, allowed_special="all") == enc.ids, text


def test_smollm2_drops_bytes_its_vocabulary_lacks_like_transformers(smol):
    missing = [b for b in range(32) if smol.byte_ids[b] is None]
    assert missing  # SmolLM2 has no token for a few control bytes (e.g. 0x04)
    text = f"a{chr(missing[0])}b"
    assert smol.decode(smol.encode(text)) == "ab"


def test_from_tokenizer_json_refuses_what_it_cannot_mirror(smol_spec):
    spec = dict(smol_spec, normalizer={"type": "NFC"})
    with pytest.raises(ValueError, match="NFC"):
        T.BPETokenizer.from_tokenizer_json(spec)
    spec = dict(smol_spec, pre_tokenizer={"type": "Whitespace"})
    with pytest.raises(ValueError, match="Whitespace"):
        T.BPETokenizer.from_tokenizer_json(spec)
    spec = dict(smol_spec, model=dict(smol_spec["model"], ignore_merges=True))  # Llama 3 style: not mirrored
    with pytest.raises(ValueError, match="byte-level BPE"):
        T.BPETokenizer.from_tokenizer_json(spec)
