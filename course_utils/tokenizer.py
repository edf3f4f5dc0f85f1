"""Byte-level BPE, from scratch: pre-tokenize with a regex, learn merges, encode, decode.

Byte-pair encoding (Sennrich et al. 2016) starts from 256 byte tokens, so every UTF-8 string can be
encoded (no unknown token: a character the merges never saw falls back to its bytes), and learns
merges: the most frequent adjacent pair becomes a new token, again and again. GPT-2 (Radford et al.
2019) first splits text into chunks with a regex, so merges never cross a word and its punctuation.

    tok = train_bpe(text, vocab_size=1256)       # 1000 merges, learned with incremental pair counts
    ids = tok.encode("To be, or not to be")      # -> list[int]
    tok.decode(ids)                              # -> the same string, for any UTF-8 text
    smol = BPETokenizer.from_smollm2()           # SmolLM2's own merges: ids identical to transformers'

Production tokenizers (`tokenizers`, `tiktoken`) run the same algorithm in Rust, with offsets,
normalizers, and parallel training; this module keeps only what the algorithm needs.
"""
from __future__ import annotations

import heapq
import json
import operator
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

import regex as re  # the `regex` package: \p{L} (any letter), \p{N} (any digit), like the Rust tokenizers

# GPT-2's pre-tokenizer (also used by SmolLM2): contractions, words, numbers, punctuation runs and
# whitespace, each optionally led by one space.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's (tiktoken cl100k_base): case-insensitive contractions, numbers in groups of at most three digits,
# newlines kept apart from other whitespace.
GPT4_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


# --------------------------------------------------------------------------------------------------
# The two operations BPE is made of: count adjacent pairs, merge one pair
# --------------------------------------------------------------------------------------------------

def get_pair_counts(ids: list[int], counts: dict[tuple[int, int], int] | None = None, weight: int = 1
                    ) -> dict[tuple[int, int], int]:
    """How often each adjacent pair occurs in `ids` (added, times `weight`, to `counts` if given)."""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids` by `new_id`, left to right, never overlapping.

    [97, 97, 97] with pair (97, 97) -> [new_id, 97]: the first two a's merge, the third has no partner.
    """
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _bpe(ids: list[int], merges: dict[tuple[int, int], int], ranks: dict[tuple[int, int], int]) -> list[int]:
    """Apply merges to one chunk: always the pair with the lowest rank (learned first), until none applies."""
    while len(ids) >= 2:
        pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        ids = merge(ids, pair, merges[pair])
    return ids


def encode_chunk(text: str, merges: dict[tuple[int, int], int]) -> list[int]:
    """BPE-encode one chunk: its UTF-8 bytes, then merges applied in the order they were learned.

    `merges` maps a pair of ids to the new id; ids 0..255 are the bytes, merge k made id 256 + k, so a
    lower new id means learned earlier, and that is the order in which encoding applies them.
    """
    return _bpe(list(text.encode("utf-8")), merges, merges)


# --------------------------------------------------------------------------------------------------
# GPT-2's printable stand-ins for bytes (how tokenizer.json files spell byte-level tokens)
# --------------------------------------------------------------------------------------------------

def _as_int(i: Any) -> Any:
    """An integer id from int-like values (numpy integers too); anything else unchanged."""
    try:
        return operator.index(i)
    except TypeError:
        return i


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character map: printable bytes stand for themselves, the others (space, newline,
    control bytes, 127-160, 173) are moved to U+0100 and up, so 'Ġ' is a space and 'Ċ' a newline."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(moved)}}


# --------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------

class BPETokenizer:
    """A byte-level BPE tokenizer: regex pre-tokenizer, ordered merges, a vocabulary of byte strings,
    and special tokens (strings such as "<|endoftext|>" that always map to one reserved id)."""

    def __init__(self, merges: dict[tuple[int, int], int], *, pattern: str = GPT4_PATTERN,
                 special_tokens: dict[str, int] | None = None, vocab: dict[int, bytes] | None = None,
                 byte_ids: list[int | None] | None = None, split_digits: bool = False):
        """`merges` in the order learned (pair -> new id); by default bytes are ids 0..255 (`byte_ids`
        maps byte -> id; None for a byte the vocabulary lacks) and each token's bytes follow from the
        merges; `split_digits` isolates every digit before the regex (SmolLM2 does)."""
        self.merges = dict(merges)
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.byte_ids = list(range(256)) if byte_ids is None else list(byte_ids)
        self.pattern, self.split_digits = pattern, split_digits
        self.special_tokens = dict(special_tokens or {})
        if vocab is None:
            vocab = {i: bytes([b]) for b, i in enumerate(self.byte_ids) if i is not None}
            for (a, b), new in self.merges.items():
                vocab[new] = vocab[a] + vocab[b]
        self.vocab = dict(vocab)
        for text, i in self.special_tokens.items():
            self.vocab.setdefault(i, text.encode("utf-8"))
        self.vocab_size = max(self.vocab) + 1
        self._regex = re.compile(pattern)
        self._special_regex: dict[frozenset, Any] = {}
        self._cache: dict[str, list[int]] = {}

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={list(self.special_tokens)})")

    # ---- encoding -----------------------------------------------------------------------------
    def pre_tokenize(self, text: str) -> list[str]:
        """Split text into the chunks that BPE encodes separately (merges never cross a chunk)."""
        pieces = re.split(r"(\p{N})", text) if self.split_digits else [text]
        return [chunk for piece in pieces if piece for chunk in self._regex.findall(piece)]

    def _encode_chunk(self, chunk: str) -> list[int]:
        ids = self._cache.get(chunk)
        if ids is None:
            ids = [self.byte_ids[b] for b in chunk.encode("utf-8")]
            if None in ids:  # a byte missing from the vocabulary is dropped, as `tokenizers` does
                ids = [i for i in ids if i is not None]
            ids = _bpe(ids, self.merges, self.ranks)
            if len(self._cache) > 200_000:  # a bounded memo: natural text repeats its chunks a lot
                self._cache.clear()
            self._cache[chunk] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text, treating special-token strings as ordinary text."""
        return [i for chunk in self.pre_tokenize(text) for i in self._encode_chunk(chunk)]

    def encode(self, text: str, *, allowed_special: str | Iterable[str] = "none_raise") -> list[int]:
        """Encode text to ids. `allowed_special`: "all" (special-token strings become their ids),
        "none" (they are ordinary text), a set of names, or "none_raise" (default: a ValueError if the
        text contains one, so user text cannot smuggle in a control token by accident)."""
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        elif allowed_special in ("none", "none_raise"):
            allowed = set()
            if allowed_special == "none_raise":
                found = [s for s in self.special_tokens if s in text]
                if found:
                    raise ValueError(f"the text contains the special token(s) {found}: pass "
                                     "allowed_special='all' to encode them as special ids, or 'none' to "
                                     "encode them as ordinary text")
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(self.special_tokens)
            if unknown:
                raise ValueError(f"unknown special tokens {sorted(unknown)}; this tokenizer has "
                                 f"{sorted(self.special_tokens)}")
        if not allowed:
            return self.encode_ordinary(text)
        key = frozenset(allowed)
        if key not in self._special_regex:  # longest first: leftmost-longest match, like HF's added tokens
            names = sorted(allowed, key=len, reverse=True)
            self._special_regex[key] = re.compile("(" + "|".join(re.escape(s) for s in names) + ")")
        ids: list[int] = []
        for k, part in enumerate(self._special_regex[key].split(text)):
            if k % 2:  # odd parts are the separators: the special tokens themselves
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    # ---- decoding -----------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of a sequence of ids (ValueError naming the first id not in the vocabulary)."""
        if hasattr(ids, "tolist"):  # a torch tensor or numpy array
            ids = ids.tolist()
        out = []
        for position, i in enumerate(ids):
            key = _as_int(i)
            token = self.vocab.get(key) if isinstance(key, int) and not isinstance(i, bool) else None
            if token is None:
                gap = isinstance(key, int) and 0 <= key < self.vocab_size
                raise ValueError(f"cannot decode token id {i!r} at position {position}: this tokenizer's ids are "
                                 f"integers 0..{self.vocab_size - 1} (vocab_size={self.vocab_size})"
                                 + ("; that id is in the range but unused" if gap else ""))
            out.append(token)
        return b"".join(out)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. A sequence cut inside a multi-byte character shows U+FFFD for the partial bytes."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_str(self, i: int) -> str:
        """One token's text, readable even when it is a partial UTF-8 character (shown as \\xNN)."""
        return self.vocab[i].decode("utf-8", errors="backslashreplace")

    # ---- saving -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as JSON (bytes as hex strings; no pickle)."""
        path = Path(path)
        data = {"format": "course_utils.BPETokenizer", "version": 1, "pattern": self.pattern,
                "split_digits": self.split_digits, "special_tokens": self.special_tokens,
                "byte_ids": self.byte_ids, "merges": [[a, b, new] for (a, b), new in self.merges.items()],
                "vocab": {str(i): token.hex() for i, token in sorted(self.vocab.items())}}
        path.write_text(json.dumps(data), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Read a tokenizer written by `save`."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != "course_utils.BPETokenizer":
            raise ValueError(f"{path} is not a file written by BPETokenizer.save")
        return cls({(a, b): new for a, b, new in data["merges"]}, pattern=data["pattern"],
                   special_tokens=data["special_tokens"], byte_ids=data["byte_ids"],
                   vocab={int(i): bytes.fromhex(h) for i, h in data["vocab"].items()},
                   split_digits=data["split_digits"])

    # ---- pretrained vocabularies ----------------------------------------------------------------
    @classmethod
    def from_tokenizer_json(cls, spec: dict | str | Path) -> BPETokenizer:
        """Load a Hugging Face `tokenizer.json` of a byte-level BPE (GPT-2, SmolLM2, StarCoder style)."""
        if not isinstance(spec, dict):
            spec = json.loads(Path(spec).read_text(encoding="utf-8"))
        model, pre = spec["model"], spec.get("pre_tokenizer") or {}
        steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
        split_digits = steps[0].get("type") == "Digits" and steps[0].get("individual_digits", False)
        rest = steps[1:] if split_digits else steps
        supported = (model.get("type") == "BPE" and not spec.get("normalizer") and not model.get("byte_fallback")
                     and not model.get("ignore_merges") and not model.get("continuing_subword_prefix")
                     and not model.get("end_of_word_suffix") and len(rest) == 1 and rest[0].get("type") == "ByteLevel"
                     and rest[0].get("use_regex", True) and not rest[0].get("add_prefix_space"))
        if not supported:
            raise ValueError("only byte-level BPE with GPT-2's regex (optionally after Digits) is supported; got model "
                             f"type {model.get('type')}, normalizer {spec.get('normalizer')}, pre-tokenizer "
                             f"{[step.get('type') for step in steps]}")
        to_byte = {ch: b for b, ch in bytes_to_unicode().items()}
        added = {tok["content"]: tok["id"] for tok in spec.get("added_tokens", [])}
        vocab = {}
        for token, i in model["vocab"].items():
            vocab[i] = (token.encode("utf-8") if token in added or any(ch not in to_byte for ch in token)
                        else bytes(to_byte[ch] for ch in token))
        ids = model["vocab"]
        merges: dict[tuple[int, int], int] = {}
        for line in model["merges"]:
            left, right = line.split(" ", 1) if isinstance(line, str) else line
            merges.pop((ids[left], ids[right]), None)  # a repeated pair keeps its last rank, as in `tokenizers`
            merges[(ids[left], ids[right])] = ids[left + right]
        byte_ids = [ids.get(ch) for _, ch in sorted(bytes_to_unicode().items())]  # None: a byte it lacks
        return cls(merges, pattern=GPT2_PATTERN, special_tokens=added, vocab=vocab, byte_ids=byte_ids,
                   split_digits=bool(split_digits))

    @classmethod
    def from_hf(cls, tokenizer: Any) -> BPETokenizer:
        """Copy the vocabulary, merges and special tokens of a `transformers` (fast) tokenizer."""
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # a transformers or a `tokenizers` object
        return cls.from_tokenizer_json(json.loads(backend.to_str()))

    @classmethod
    def from_smollm2(cls) -> BPETokenizer:
        """SmolLM2-135M-Instruct's tokenizer (49,152 ids), read from the course cache; the model is not loaded."""
        return cls.from_tokenizer_json(smollm2_tokenizer_dir() / "tokenizer.json")


def smollm2_tokenizer_dir() -> Path:
    """The cached SmolLM2 folder (fetched through `course_utils.data` if missing)."""
    from . import data

    data._ensure_smollm2()
    return data._smollm2_dir()


def load_smollm2_tokenizer() -> Any:
    """SmolLM2's `transformers` tokenizer alone (no model weights), from the course cache."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())


# --------------------------------------------------------------------------------------------------
# The same vocabulary in the two production libraries (for like-for-like comparisons)
# --------------------------------------------------------------------------------------------------

def _plain_vocab(tok: BPETokenizer) -> dict[bytes, int]:
    """byte string -> id of every non-special token; ValueError if two ids share one byte string."""
    specials = set(tok.special_tokens.values())
    plain = {token: i for i, token in tok.vocab.items() if i not in specials}
    if len(plain) != len(tok.vocab) - len(specials & set(tok.vocab)):
        raise ValueError("two token ids have the same bytes: the libraries cannot represent this vocabulary")
    return plain


def to_tokenizers(tok: BPETokenizer) -> Any:
    """The same merges, pre-tokenizer and special tokens as a `tokenizers.Tokenizer` (Rust)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spell = bytes_to_unicode()
    vocab = {"".join(spell[b] for b in token): i for token, i in _plain_vocab(tok).items()}
    merges = [tuple("".join(spell[b] for b in tok.vocab[i]) for i in pair) for pair in tok.merges]
    out = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if tok.split_digits else []
    steps += [pre_tokenizers.Split(Regex(tok.pattern), "isolated"),
              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    out.pre_tokenizer = pre_tokenizers.Sequence(steps)
    out.decoder = decoders.ByteLevel()
    if tok.special_tokens:
        out.add_special_tokens(sorted(tok.special_tokens, key=tok.special_tokens.get))
    return out


def to_tiktoken(tok: BPETokenizer, name: str = "course") -> Any:
    """The same vocabulary as a `tiktoken.Encoding` (Rust): a token's id is its merge rank, so the
    merges must have been learned in id order (true for `train_bpe`)."""
    import tiktoken

    ranks = _plain_vocab(tok)
    new_ids = list(tok.merges.values())
    if tok.split_digits or new_ids != sorted(new_ids):
        raise ValueError("tiktoken needs merge ranks equal to ids and no digit pre-split")
    return tiktoken.Encoding(name, pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens=tok.special_tokens)


# --------------------------------------------------------------------------------------------------
# Training: repeated merges, with pair counts updated incrementally
# --------------------------------------------------------------------------------------------------

def _chunk_counts(text: str, pattern: str, special_tokens: Iterable[str]) -> Counter:
    """How often each pre-tokenized chunk occurs (special tokens are cut out: never learned from)."""
    parts = [text]
    if special_tokens:
        parts = re.split("|".join(re.escape(s) for s in special_tokens), text)
    regex = re.compile(pattern)
    return Counter(chunk for part in parts for chunk in regex.findall(part))


def train_bpe(text: str, vocab_size: int, *, pattern: str = GPT4_PATTERN, special_tokens: Iterable[str] = (),
              verbose: int = 0, progress: bool = False) -> BPETokenizer:
    """Learn vocab_size - 256 - len(special_tokens) merges on `text`; specials take the last ids.

    Each step merges the most frequent pair (ties: the smallest pair of ids). Pair counts are not
    recounted over the corpus: only the words that contain the merged pair are updated. `verbose=k`
    prints every k-th merge (and the first 10); `progress` shows a bar. The result's `merge_counts`
    holds how often each merge occurred when it was learned.
    """
    from tqdm.auto import tqdm

    special_tokens = list(special_tokens)
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise ValueError(f"vocab_size={vocab_size} is smaller than 256 bytes + {len(special_tokens)} special tokens")
    chunks = _chunk_counts(text, pattern, special_tokens)
    words = [list(chunk.encode("utf-8")) for chunk in chunks]  # each distinct chunk once ...
    freqs = list(chunks.values())  # ... with how often it occurs
    counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> the words that contain it
    for w, word in enumerate(words):
        get_pair_counts(word, counts, freqs[w])
        for pair in zip(word, word[1:]):
            where[pair].add(w)
    heap = [(-count, pair) for pair, count in counts.items()]  # max count first, then the smallest pair
    heapq.heapify(heap)

    merges: dict[tuple[int, int], int] = {}
    merge_counts: list[int] = []
    vocab = {i: bytes([i]) for i in range(256)}
    for step in tqdm(range(n_merges), desc="BPE merges", disable=not progress, mininterval=0.5):
        while heap and counts.get(heap[0][1], 0) != -heap[0][0]:  # stale entry: that count has changed
            heapq.heappop(heap)
        if not heap:
            break  # every chunk is a single token
        count, pair = -heap[0][0], heapq.heappop(heap)[1]
        new_id = 256 + step
        changed = set()
        for w in where.pop(pair):
            old, new = words[w], merge(words[w], pair, new_id)
            if len(new) == len(old):
                continue  # stale: an earlier merge already consumed the pair in this word
            for p in zip(old, old[1:]):  # take the word's old pairs out, put its new pairs in
                counts[p] -= freqs[w]
            for p in zip(new, new[1:]):
                counts[p] = counts.get(p, 0) + freqs[w]
                where[p].add(w)
            changed.update(zip(old, old[1:]), zip(new, new[1:]))
            words[w] = new
        for p in changed:
            if counts.get(p, 0) > 0:
                heapq.heappush(heap, (-counts[p], p))
            else:
                counts.pop(p, None)
        merges[pair] = new_id
        merge_counts.append(count)
        vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
        if verbose and (step < 10 or (step + 1) % verbose == 0):
            a, b, ab = (repr(vocab[i].decode("utf-8", errors="backslashreplace")) for i in (*pair, new_id))
            shown = f"{a:>10} + {b:<10} -> {ab:<14}"
            print(f"merge {step + 1:5d}: {shown} id {new_id:5d}  ({count} times)")
    first_special = 256 + len(merges)
    tokenizer = BPETokenizer(merges, pattern=pattern,
                             special_tokens={s: first_special + k for k, s in enumerate(special_tokens)})
    tokenizer.merge_counts = merge_counts
    return tokenizer


def train_bpe_naive(text: str, vocab_size: int, *, pattern: str = GPT4_PATTERN) -> dict[tuple[int, int], int]:
    """The textbook loop, for comparison: recount every pair of the corpus before each merge.

    Same tie rule as `train_bpe` (most frequent, then the smallest pair), so it learns the same merges.
    """
    chunks = _chunk_counts(text, pattern, ())
    words, freqs = [list(c.encode("utf-8")) for c in chunks], list(chunks.values())
    merges: dict[tuple[int, int], int] = {}
    for new_id in range(256, vocab_size):
        counts: dict[tuple[int, int], int] = {}
        for word, freq in zip(words, freqs):
            get_pair_counts(word, counts, freq)
        if not counts:
            break
        pair = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))
        words = [merge(word, pair, new_id) for word in words]
        merges[pair] = new_id
    return merges


# --------------------------------------------------------------------------------------------------
# Probe strings for parity tests: varied text written by this project, assembled at random
# --------------------------------------------------------------------------------------------------

PROBE_FRAGMENTS = {
    "english": ["Hello, world!", "The quick brown fox jumps over the lazy dog.", "I'm sure they'll say it's fine",
                "DON'T SHOUT", "we've", "Tokenizers split text into pieces.", "a", "to be or not",
                "e-mail: someone@example.com", "https://example.org/path?q=1&x=2", "state-of-the-art"],
    "digits": ["0", "7", "42", "2024", "3.14159", "1,000,000", "-273.15", "+44 20 7946 0000", "2025-01-31",
               "12:30:05", "0x1F", "1e-9", "99%", "v2.0.1", "#1"],
    "code": ["def f(x):\n    return x ** 2", "for (int i = 0; i < n; ++i) {", "    }\n", "{\"key\": [1, 2, 3]}",
             "<div class=\"a\">x</div>", "x += 1  # comment", "if a != b and c <= d:", "SELECT * FROM t;",
             "print(f'{name!r}')", "\tindented\ttabs", "a_b_c = None", "λx. x"],
    "accents": ["café", "naïve", "résumé", "Ångström", "Łódź", "straße", "São Paulo", "Ærø", "Dvořák",
                "crème brûlée", "e\u0301", "ÉCOLE", "ñandú"],
    "scripts": ["你好，世界！", "今天天气很好。", "分词器", "日本語のテキスト", "カタカナ", "한국어 문장",
                "Привет, мир", "Ελληνικά", "مرحبا بالعالم", "שלום", "नमस्ते", "ภาษาไทย", "Tiếng Việt"],
    "emoji": ["😀", "👍🏽", "👩\u200d💻", "🇫🇷", "❤️", "🎉🎉🎉", "🤖 robot", "✨new✨", "🧑\u200d🤝\u200d🧑", "☕", "1️⃣"],
    "space": [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "    \n\n  ", "\u00a0", "\u3000", "\u2003",
              "\x0b", "\x0c", "\u2028", "\u0085", "  \t  "],
    "special": ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\n", "<|im_end|>\n",
                "<|im_start|>assistant\n", "<|im_start", "im_end|>", "<|notatoken|>"],
    "punct": ["...", "!!!", "???", "—", "–", "«»", "“quoted”", "'single'", "(parens)", "[brackets]", "---",
              "***", "~/", "@#$%^&*", "''", "'S", "'ll've"],
}
_SEPARATORS = ["", "", " ", " ", "  ", "\n", "\t", "\n\n", " \n", "   "]


def probe_strings(n: int = 2000, seed: int = 0) -> list[str]:
    """`n` varied strings (whitespace runs, digits, code, accents, CJK, emoji, special tokens), seeded.

    Each joins 1-6 fragments from `PROBE_FRAGMENTS` (all written for this course) with random
    separators, sometimes upper- or title-cased.
    """
    rng = random.Random(seed)
    kinds = sorted(PROBE_FRAGMENTS)
    out = []
    for _ in range(n):
        parts = [rng.choice(PROBE_FRAGMENTS[rng.choice(kinds)]) for _ in range(rng.randint(1, 6))]
        text = "".join(part + rng.choice(_SEPARATORS) for part in parts)
        style = rng.random()
        out.append(text.upper() if style < 0.05 else text.title() if style < 0.1 else text)
    return out
