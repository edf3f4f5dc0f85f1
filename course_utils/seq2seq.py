"""Week 3: sequence-to-sequence models, with and without attention, on two generated tasks.

Reading order: the data sets (human-written dates -> ISO dates, whose output is always 10 characters;
copying a random string of 5-40 symbols, whose output grows with the input) -> vocabularies and
padded batches -> a GRU encoder -> the decoder step of Cho et al. (2014) / Sutskever et al. (2014),
which reads one fixed summary vector -> attention contexts (Luong et al. 2015: "dot" and "general";
Bahdanau et al. 2015: "additive", with a bidirectional encoder) -> the teacher-forced loss -> greedy
decoding and beam search -> sizing models to one parameter budget, training -> accuracy by input
length -> alignment pictures and a small browser widget.

Every model here uses one decoder wiring (Luong's order): the GRU steps first, reading the previous
character and the summary; then the new state queries the encoder states; the output layer reads the
state and the context. Only the context differs between models, so comparisons change one thing.
Bahdanau's decoder queried with the previous state and fed the context back into the GRU.
A production translator adds subword vocabularies, length-normalised beam search and a Transformer
instead of GRUs (week 4); the ideas carry over unchanged.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import random
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attention as attn_lib
from .attention import padding_mask
from .metrics import paired_difference  # noqa: F401  (re-exported: notebooks call s2s.paired_difference)
from .runtime import one_cpu_thread
from .text import CharVocab

# ----------------------------------------------------------------------------------------------
# The data set: dates written many human ways -> "YYYY-MM-DD"
# ----------------------------------------------------------------------------------------------
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FIRST_DAY, LAST_DAY = dt.date(1950, 1, 1), dt.date(2049, 12, 31)  # two-digit years: 50-99 -> 19xx, 00-49 -> 20xx
PREFIXES = ["on ", "on the ", "date: ", "due ", "from ", "it happened on ", "we met on ", "she was born on ",
            "the meeting is on ", "please reply by ", "sometime on ", "it was ", "deadline: ", "scheduled for "]
SUFFIXES = [" at noon", " in the morning", " (approx.)", " or so", " at 9 am", ", if all goes well",
            " at the latest", " before lunch", ", as agreed", " in the evening"]
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}
SPLIT_SIZES = {"train": 12000, "val": 1000, "test": 2000}
TRAIN_MAX_LEN = 30  # no train/val input is longer than this; the test split goes up to 60


def _ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _case(word: str, rng: random.Random) -> str:
    return rng.choice([word, word.lower(), word.upper(), word])


def _core(date: dt.date, rng: random.Random) -> str:
    """The date itself, in one of many human formats (numbers are day-first: 03/04/97 is 3 April)."""
    d, m, y, yy = date.day, date.month, date.year, f"{date.year % 100:02d}"
    mon = _case(rng.choice([MONTHS[m - 1], MONTHS[m - 1][:3]]), rng)
    day = rng.choice([str(d), f"{d:02d}", _ordinal(d)])
    year = rng.choice([str(y), str(y), yy, "'" + yy])
    sep = rng.choice(["/", "-", ".", " "])
    formats = [
        f"{d:02d}{sep}{m:02d}{sep}{yy}", f"{d}{sep}{m}{sep}{y}", f"{d:02d}{sep}{m:02d}{sep}{y}",
        f"{y}-{m:02d}-{d:02d}", f"{y}/{m}/{d}", f"{d}{sep}{m}{sep}{yy}",
        f"{day} {mon} {year}", f"{mon} {day}, {year}", f"{mon} {day} {year}", f"{day}-{mon}-{year}",
        f"the {_ordinal(d)} of {mon}, {year}", f"{mon} the {_ordinal(d)}, {year}",
        f"{_ordinal(d)} of {mon} in the year {y}", f"{day} {mon} in the year {y}",
    ]
    return rng.choice(formats)


def make_date_example(date: dt.date, rng: random.Random) -> dict[str, str]:
    """One (source, target) pair: optional filler and weekday around a formatted date."""
    text = _core(date, rng)
    if rng.random() < 0.35:
        weekday = WEEKDAYS[date.weekday()]
        weekday = _case(rng.choice([weekday, weekday[:3]]), rng)
        text = rng.choice([f"{weekday}, {text}", f"{weekday} {text}", f"{weekday} the {text}"
                           if text[0].isdigit() else f"{weekday}, {text}"])
    if rng.random() < 0.4:
        text = rng.choice(PREFIXES) + text
    if rng.random() < 0.4:  # one or more trailing remarks: the long inputs end in a long tail of filler
        text = text + rng.choice(SUFFIXES)
        while rng.random() < 0.5:
            text = text + rng.choice(SUFFIXES)
    return {"src": text, "tgt": date.isoformat()}


def _random_date(rng: random.Random) -> dt.date:
    return FIRST_DAY + dt.timedelta(days=rng.randrange((LAST_DAY - FIRST_DAY).days + 1))


def generate_split(split: str) -> list[dict[str, str]]:
    """The deterministic examples of one split.

    train and val: inputs of at most TRAIN_MAX_LEN (30) characters; test: lengths spread evenly over
    5..60 characters (buckets of 5), so more than half of it is longer than every training input.
    Val and test dates never occur in train.
    """
    rng = random.Random(SPLIT_SEEDS[split])
    n = SPLIT_SIZES[split]
    held_out = set()
    if split == "train":
        for other in ("val", "test"):
            held_out |= {ex["tgt"] for ex in generate_split(other)}
    out: list[dict[str, str]] = []
    if split in ("train", "val"):
        while len(out) < n:
            ex = make_date_example(_random_date(rng), rng)
            if len(ex["src"]) <= TRAIN_MAX_LEN and ex["tgt"] not in held_out:
                out.append(ex)
        return out
    buckets = {b: n // 11 + (1 if b < n % 11 else 0) for b in range(11)}  # (5,10], (10,15], ... (55,60]
    while any(buckets.values()):
        ex = make_date_example(_random_date(rng), rng)
        b = (len(ex["src"]) - 1) // 5 - 1
        if 0 <= b < 11 and buckets[b] > 0:
            buckets[b] -= 1
            out.append(ex)
    rng.shuffle(out)
    return out


def load_dates(split: str) -> list[dict[str, str]]:
    """The `split` ("train", "val", "test") of the dates data set as a list of {"src", "tgt"} dicts.

    Reads `datasets/dates/<split>.jsonl` from the repository; outside a checkout (e.g. Colab after
    `pip install`) the same files are regenerated deterministically into the course cache.
    """
    from .data import load_project_dataset

    return load_project_dataset("dates", split, SPLIT_SIZES, generate_split)


def load_splits(eval_examples: int | None = None) -> dict[str, list[dict[str, str]]]:
    """{"train", "val", "test"}: all of train, and the first `eval_examples` of val and test (all when None)."""
    return {split: load_dates(split)[: eval_examples if split != "train" else None] for split in SPLIT_SIZES}


def write_split(folder: Path, split: str) -> Path:
    """Write `<folder>/<split>.jsonl` (what `datasets/dates/make_dates.py` runs)."""
    from .data import write_jsonl

    return write_jsonl(Path(folder) / f"{split}.jsonl", generate_split(split))


# ----------------------------------------------------------------------------------------------
# Characters <-> ids, and padded batches
# ----------------------------------------------------------------------------------------------
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(len(SPECIALS))  # the ids of the special tokens, first in every vocabulary here


def default_vocab() -> CharVocab:
    """Every character the generator can write (so train, val and test share one vocabulary)."""
    import string

    return CharVocab(string.ascii_letters + string.digits + " ,./-':()", specials=SPECIALS)


@dataclass
class Batch:
    src: torch.Tensor  # (B, S) source ids, PAD-padded on the right
    src_len: torch.Tensor  # (B,) true source lengths
    tgt_in: torch.Tensor  # (B, U) decoder inputs: BOS + target (teacher forcing)
    tgt_out: torch.Tensor  # (B, U) what the decoder must predict: target + EOS

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.src, self.src_len, self.tgt_in, self.tgt_out)))


def make_batch(examples: Sequence[dict[str, str]], vocab: CharVocab) -> Batch:
    """Pad a list of {"src", "tgt"} examples into one Batch."""
    src = [vocab.encode(e["src"]).tolist() for e in examples]
    tgt = [vocab.encode(e["tgt"]).tolist() for e in examples]
    S, U = max(map(len, src)), max(map(len, tgt)) + 1
    B = len(examples)
    src_t = torch.full((B, S), PAD, dtype=torch.long)
    tgt_in = torch.full((B, U), PAD, dtype=torch.long)
    tgt_out = torch.full((B, U), PAD, dtype=torch.long)
    for i, (s, t) in enumerate(zip(src, tgt)):
        src_t[i, :len(s)] = torch.tensor(s)
        tgt_in[i, :len(t) + 1] = torch.tensor([BOS] + t)
        tgt_out[i, :len(t) + 1] = torch.tensor(t + [EOS])
    return Batch(src_t, torch.tensor([len(s) for s in src]), tgt_in, tgt_out)




# ----------------------------------------------------------------------------------------------
# The copy task: a random string of symbols -> the same string (output length grows with input)
# ----------------------------------------------------------------------------------------------
SYMBOLS = "abcdefghij"  # ten symbols: log2(10) = 3.3 bits of information per input character
COPY_LENGTHS = (5, 40)  # every split draws input lengths from this range (inclusive)
COPY_SEEDS = {"train": 11, "val": 12, "test": 13}
COPY_SIZES = {"train": 10000, "val": 500, "test": 720}  # test: 20 strings of every length 5..40


def make_copy_example(length: int, rng: random.Random, task: str = "copy") -> dict[str, str]:
    """A random string of `length` symbols and its copy (task="copy") or its reversal ("reverse")."""
    text = "".join(rng.choice(SYMBOLS) for _ in range(length))
    return {"src": text, "tgt": text if task == "copy" else text[::-1]}


def generate_copy_split(split: str) -> list[dict[str, str]]:
    """The deterministic examples of one split of the copy task.

    train and val: lengths uniform over COPY_LENGTHS; test: the same number of strings for every
    length, so accuracy against length has equal support everywhere. Test and val strings never
    occur in train. Unlike the dates, every test length also occurs in training: what fails on long
    inputs is the fixed-size summary, not generalisation to unseen lengths.
    """
    rng = random.Random(COPY_SEEDS[split])
    lo, hi = COPY_LENGTHS
    n = COPY_SIZES[split]
    held_out = set()
    if split == "train":
        held_out = {ex["src"] for other in ("val", "test") for ex in generate_copy_split(other)}
    out: list[dict[str, str]] = []
    if split == "test":
        per_length = n // (hi - lo + 1)
        for length in range(lo, hi + 1):
            out += [make_copy_example(length, rng) for _ in range(per_length)]
        rng.shuffle(out)
        return out
    while len(out) < n:
        ex = make_copy_example(rng.randint(lo, hi), rng)
        if ex["src"] not in held_out:
            out.append(ex)
    return out


def load_copy(split: str, task: str = "copy") -> list[dict[str, str]]:
    """The `split` of the copy data set (`datasets/copy/`, or regenerated into the course cache).

    task="reverse" gives the same inputs with reversed targets (Sutskever et al. reversed their inputs).
    """
    folder = _dataset_folder("copy", generate_copy_split)
    with open(folder / f"{split}.jsonl", encoding="utf-8") as f:
        examples = [json.loads(line) for line in f]
    if task == "reverse":
        examples = [{"src": e["src"], "tgt": e["src"][::-1]} for e in examples]
    elif task != "copy":
        raise ValueError(f"task must be 'copy' or 'reverse', not {task!r}")
    return examples


def symbol_vocab() -> CharVocab:
    """The vocabulary of the copy task: the four specials and the ten symbols."""
    return CharVocab(SYMBOLS, specials=SPECIALS)


def _dataset_folder(name: str, generate) -> Path:
    """`datasets/<name>/` of the repository, or the course cache filled by `generate(split)` (outside a checkout)."""
    from .runtime import cache_dir

    here = Path(__file__).resolve().parent.parent / "datasets" / name
    if (here / "train.jsonl").exists():
        return here
    folder = cache_dir(name)
    for split in ("train", "val", "test"):
        if not (folder / f"{split}.jsonl").exists():
            write_jsonl(folder / f"{split}.jsonl", generate(split))
    return folder


def write_jsonl(path: Path, examples: Sequence[dict[str, str]]) -> Path:
    """One JSON object per line (the format of every data set in `datasets/`)."""
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex) + "\n")
    return Path(path)


def load_task(task: str, eval_examples: int | None = None) -> dict[str, list[dict[str, str]]]:
    """{"train", "val", "test"} of "dates", "copy" or "reverse"; only the first `eval_examples` of val and test."""
    load = load_dates if task == "dates" else (lambda split: load_copy(split, task))
    return {split: load(split)[: eval_examples if split != "train" else None] for split in ("train", "val", "test")}


# ----------------------------------------------------------------------------------------------
# The models
# ----------------------------------------------------------------------------------------------
ATTENTION_KINDS = ("none", "dot", "general", "additive")


@dataclass
class Seq2SeqConfig:
    vocab_size: int = 75  # characters incl. the 4 specials (len(default_vocab()))
    emb: int = 32  # character embedding size
    hidden: int = 64  # GRU state size (encoder: per direction)
    attention: str = "none"  # "none" (fixed summary), "dot" / "general" (Luong), "additive" (Bahdanau)
    attn_size: int = 64  # width of the additive scorer's hidden layer
    bidirectional: bool = False  # encoder reads both ways (Bahdanau) or left to right only (Cho, Sutskever)

    @property
    def context_size(self) -> int:
        """Width of one encoder state, and so of the summary and of every context vector."""
        return self.hidden * (2 if self.bidirectional else 1)

    @classmethod
    def bahdanau(cls, **kwargs) -> "Seq2SeqConfig":
        """Additive attention over a bidirectional encoder (Bahdanau et al. 2015)."""
        return cls(attention="additive", bidirectional=True, **kwargs)


def count_parameters(cfg: Seq2SeqConfig) -> int:
    """The number of trainable parameters of `Seq2Seq(cfg)` (closed form, no model is built)."""
    V, E, H, C, A = cfg.vocab_size, cfg.emb, cfg.hidden, cfg.context_size, cfg.attn_size
    gru = lambda i, h: 3 * (i * h + h * h + 2 * h)  # noqa: E731  (weights and both biases of one GRU layer)
    n = V * E + gru(E, H) * (2 if cfg.bidirectional else 1)  # encoder
    n += C * H + H + V * E + gru(E + C, H) + (H + C) * V + V  # init, decoder embedding, GRU, output layer
    n += {"none": 0, "dot": 0, "general": H * C, "additive": H * A + C * A + A}[cfg.attention]
    return n


def sized_to(cfg: Seq2SeqConfig, n_params: int) -> Seq2SeqConfig:
    """`cfg` with the `hidden` size (attn_size follows it) whose parameter count is closest to `n_params`."""
    def with_hidden(h: int) -> Seq2SeqConfig:
        return replace(cfg, hidden=h, attn_size=h)

    return min((with_hidden(h) for h in range(4, 1025)), key=lambda c: abs(count_parameters(c) - n_params))


class Encoder(nn.Module):
    """A GRU over the source characters: one state per character, plus a summary of the whole input."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.emb = nn.Embedding(cfg.vocab_size, cfg.emb, padding_idx=0)
        self.gru = nn.GRU(cfg.emb, cfg.hidden, batch_first=True, bidirectional=cfg.bidirectional)

    def forward(self, src: torch.Tensor, src_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.emb(src)  # (B, S, E)
        packed = nn.utils.rnn.pack_padded_sequence(x, src_len.cpu(), batch_first=True, enforce_sorted=False)
        out, h = self.gru(packed)  # h: (directions, B, H) the final state of each direction
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])  # (B, S, C)
        summary = torch.cat(list(h), dim=-1)  # (B, C): the one fixed-size vector of the whole input
        return out, summary


def decoder_step(y_prev: torch.Tensor, state: torch.Tensor, summary: torch.Tensor, *, emb: nn.Embedding,
                 cell: nn.GRUCell, out: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the decoder without attention (Cho et al. 2014): s_t = GRU([e(y_{t-1}); c], s_{t-1}),
    logits = W_o [s_t; c]. Returns (logits (B, V), new state (B, H))."""
    state = cell(torch.cat([emb(y_prev), summary], dim=-1), state)  # (B, E + C) -> (B, H)
    return out(torch.cat([state, summary], dim=-1)), state  # (B, V), (B, H)


_package_decoder_step = decoder_step  # the default inside Seq2Seq, whose argument of the same name shadows it


class Seq2Seq(nn.Module):
    """GRU encoder-decoder. The decoder reads the fixed summary at every step; with attention it also
    reads a fresh context, the attention-weighted sum of the encoder states for its new state.

    `decoder_step` (used by `step` without attention), `additive_score` and `attention_weights` default
    to the package's functions; the notebooks pass the learner's checked versions (`use("3.1", ...)`).
    """

    def __init__(self, cfg: Seq2SeqConfig, *, decoder_step: Callable | None = None,
                 additive_score: Callable | None = None, attention_weights: Callable | None = None):
        super().__init__()
        if cfg.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, not {cfg.attention!r}")
        if cfg.attention == "dot" and cfg.context_size != cfg.hidden:
            raise ValueError("Luong's dot score s . h needs encoder states as wide as the decoder state "
                             "(bidirectional=False), or use attention='general'.")
        self.cfg = cfg
        H, C = cfg.hidden, cfg.context_size  # decoder state size, context (encoder state) size
        self.encoder = Encoder(cfg)
        self.init = nn.Linear(C, H)  # summary -> first decoder state
        self.emb = nn.Embedding(cfg.vocab_size, cfg.emb, padding_idx=0)
        self.rnn = nn.GRU(cfg.emb + C, H, batch_first=True)  # all steps in one call under teacher forcing
        self.cell = nn.GRUCell(cfg.emb + C, H)  # the same weights, one step at a time (decoding)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            setattr(self.cell, name, getattr(self.rnn, name + "_l0"))  # shared Parameters, counted once
        self.out = nn.Linear(H + C, cfg.vocab_size)
        if cfg.attention == "general":  # score(s, h) = s^T W h  (Luong's "general")
            self.W = nn.Linear(C, H, bias=False)
        elif cfg.attention == "additive":  # score(s, h) = v . tanh(s W_q + h W_k)  (Bahdanau's "concat")
            self.W_q = nn.Linear(H, cfg.attn_size, bias=False)
            self.W_k = nn.Linear(C, cfg.attn_size, bias=False)
            self.v = nn.Linear(cfg.attn_size, 1, bias=False)
        self.decoder_step = decoder_step or _package_decoder_step
        self.additive_score = additive_score or attn_lib.additive_score
        self.attention_weights = attention_weights or attn_lib.attention_weights

    # -- the pieces a decoding loop needs -------------------------------------------------------
    def encode(self, src, src_len):
        """Encoder states (B, S, C), the summary (B, C) and a mask (B, S) that is True on real characters."""
        enc, summary = self.encoder(src, src_len)  # (B, S, C), (B, C)
        mask = padding_mask(src_len, src.shape[1])  # (B, S)
        return enc, summary, mask

    def init_state(self, summary: torch.Tensor) -> torch.Tensor:
        """The decoder's first state s_0 = tanh(W_0 c), (B, H)."""
        return torch.tanh(self.init(summary))

    def scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Attention scores (B, U, S) of decoder states (B, U, H) against encoder states (B, S, C)."""
        kind = self.cfg.attention
        if kind == "dot":
            return queries @ keys.transpose(1, 2)  # (B, U, H) @ (B, H, S)
        if kind == "general":
            return queries @ self.W(keys).transpose(1, 2)  # s^T (W h): (B, U, H) @ (B, H, S)
        # additive: the (B, Dq), (B, S, Dk) -> (B, S) score, mapped over the U queries with keys @ W_k computed once
        score = partial(self.additive_score, W_q=self.W_q.weight.T, W_k=self.W_k.weight.T, v=self.v.weight[0])
        try:
            return torch.vmap(score, in_dims=(1, None), out_dims=1)(queries, keys)
        except RuntimeError:  # a function vmap cannot map (data-dependent Python, in-place ops): one call per query
            return torch.stack([score(queries[:, u], keys) for u in range(queries.shape[1])], dim=1)

    def context(self, states: torch.Tensor, enc: torch.Tensor, summary: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the output layer reads besides the state: (B, U, C) and attention weights (B, U, S) or None."""
        if self.cfg.attention == "none":
            return summary[:, None, :].expand(-1, states.shape[1], -1), None  # the same vector every step
        weights = self.attention_weights(self.scores(states, enc), mask[:, None, :])  # (B, U, S), 0 on padding
        return weights @ enc, weights  # encoder states are keys and values: (B, U, S) @ (B, S, C)

    def step(self, y_prev, state, enc, summary, mask):
        """One decoder step: previous characters (B,) and state (B, H) -> logits (B, V), new state, weights (B, S)."""
        if self.cfg.attention == "none":
            logits, state = self.decoder_step(y_prev, state, summary, emb=self.emb, cell=self.cell, out=self.out)
            return logits, state, None
        state = self.cell(torch.cat([self.emb(y_prev), summary], dim=-1), state)  # (B, H)
        context, weights = self.context(state[:, None, :], enc, summary, mask)  # (B, 1, C), (B, 1, S)
        logits = self.out(torch.cat([state, context[:, 0]], dim=-1))  # (B, V)
        return logits, state, weights[:, 0]

    def forward(self, src, src_len, tgt_in) -> torch.Tensor:
        """Teacher forcing: logits (B, U, V) for every step at once.

        The decoder reads the true previous characters, all known in advance, and its GRU does not
        depend on the attention output, so all U steps run in one call instead of a Python loop.
        """
        enc, summary, mask = self.encode(src, src_len)
        U = tgt_in.shape[1]
        x = torch.cat([self.emb(tgt_in), summary[:, None, :].expand(-1, U, -1)], dim=-1)  # (B, U, E + C)
        states, _ = self.rnn(x, self.init_state(summary)[None])  # (B, U, H)
        context, _ = self.context(states, enc, summary, mask)  # (B, U, C)
        return self.out(torch.cat([states, context], dim=-1))  # (B, U, V)

    @torch.no_grad()
    def greedy_decode(self, src, src_len, max_len: int = 12) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Greedy ids (B, max_len) and attention weights (B, max_len, S) (None without attention)."""
        return _greedy(self, src, src_len, max_len)


# ----------------------------------------------------------------------------------------------
# The loss, and decoding
# ----------------------------------------------------------------------------------------------
def seq2seq_loss(model: Seq2Seq, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over every real (non-padding) target character of the batch, all steps at once."""
    logits = model(batch.src, batch.src_len, batch.tgt_in)  # (B, U, V)
    return F.cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD)


def teacher_forcing_loss(model: Seq2Seq, batch: Batch) -> torch.Tensor:
    """The same loss as `seq2seq_loss`, one decoder step at a time: at step t the decoder reads the
    true character t-1 (teacher forcing), and the loss is the mean over all real target characters."""
    enc, summary, mask = model.encode(batch.src, batch.src_len)
    state = model.init_state(summary)
    total, count = 0.0, (batch.tgt_out != PAD).sum()
    for t in range(batch.tgt_in.shape[1]):
        logits, state, _ = model.step(batch.tgt_in[:, t], state, enc, summary, mask)  # (B, V)
        total = total + F.cross_entropy(logits, batch.tgt_out[:, t], ignore_index=PAD, reduction="sum")
    return total / count


def _greedy(model: Seq2Seq, src, src_len, max_len: int):
    enc, summary, mask = model.encode(src, src_len)
    state = model.init_state(summary)
    y = torch.full((src.shape[0],), BOS, dtype=torch.long, device=src.device)
    done = torch.zeros_like(y, dtype=torch.bool)
    ids, weights = [], []
    for _ in range(max_len):
        logits, state, w = model.step(y, state, enc, summary, mask)
        y = logits.argmax(-1)  # (B,) the most likely next character, fed back next step
        ids.append(y.masked_fill(done, PAD))  # after <eos> a row only pads
        weights.append(w)
        done = done | (y == EOS)
        if done.all():
            break
    ids = torch.stack(ids, dim=1)  # (B, steps)
    ids = F.pad(ids, (0, max_len - ids.shape[1]), value=PAD)  # (B, max_len)
    attn = None if weights[0] is None else F.pad(torch.stack(weights, dim=1), (0, 0, 0, max_len - len(weights)))
    return ids, attn


@torch.no_grad()
def greedy_decode(model: Seq2Seq, src: torch.Tensor, src_len: torch.Tensor, max_len: int = 12) -> torch.Tensor:
    """Greedy decoding: start from <bos>, feed back the most likely character, `max_len` steps.

    Returns ids (B, max_len), int64; positions after a row's first <eos> hold <pad>.
    """
    return _greedy(model, src, src_len, max_len)[0]


@torch.no_grad()
def beam_search(model: Seq2Seq, src: torch.Tensor, src_len: torch.Tensor, beam_size: int = 4,
                max_len: int = 12) -> tuple[list[int], float]:
    """Beam search for one source (src (1, S)): the best output and its log-probability.

    A hypothesis's score is the sum of the log-probabilities of its characters (no length
    normalisation). Each step extends every live hypothesis by every character and keeps the
    `beam_size` best extensions; one that ends in <eos> is finished and leaves the beam. After
    `max_len` steps, or when the beam is empty, the best finished or live hypothesis wins.
    Returns (ids without <bos>, ending in <eos> when finished; its total log-probability).
    """
    enc, summary, mask = model.encode(src, src_len)
    state = model.init_state(summary)  # (1, H)
    live = [([], 0.0)]  # (ids, score) of the live hypotheses; their states are the rows of `state`
    finished = []
    for _ in range(max_len):
        k = len(live)
        y = torch.tensor([ids[-1] if ids else BOS for ids, _ in live], device=src.device)
        logits, new_state, _ = model.step(y, state, enc.expand(k, -1, -1), summary.expand(k, -1), mask.expand(k, -1))
        total = torch.tensor([score for _, score in live], device=src.device)[:, None] + logits.log_softmax(-1)  # (k, V)
        best = total.flatten().topk(min(beam_size, total.numel()))
        next_live, rows = [], []
        for score, index in zip(best.values.tolist(), best.indices.tolist()):
            row, char = divmod(index, total.shape[1])
            hypothesis = (live[row][0] + [char], score)
            if char == EOS:
                finished.append(hypothesis)  # complete: leaves the beam
            else:
                next_live.append(hypothesis)
                rows.append(row)
        live = next_live
        if not live:
            break
        state = new_state[rows]  # each kept hypothesis carries its parent's new state
    candidates = finished + live
    ids, score = max(candidates, key=lambda h: h[1])
    return ids, score


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------
def batch_sampler(splits: dict[str, list[dict[str, str]]], vocab: CharVocab, batch_size: int,
                  generator: torch.Generator | None = None, device=None):
    """`get_batch(split)` for `course_utils.train.train_loop`: a random padded batch of that split."""
    g = generator or torch.Generator().manual_seed(0)

    def get_batch(split: str):
        data = splits[split]
        idx = torch.randint(len(data), (batch_size,), generator=g).tolist()
        b = make_batch([data[i] for i in idx], vocab)
        return (b.to(device) if device is not None else b,)

    return get_batch


def train_seq2seq(model: Seq2Seq, splits: dict, vocab: CharVocab, *, steps: int, batch_size: int = 64,
                  lr: float = 3e-3, eval_every: int | None = None, generator: torch.Generator | None = None,
                  desc: str = "seq2seq", loss_fn: Callable = seq2seq_loss) -> dict:
    """Adam with gradient clipping and a cosine learning-rate decay (lr -> lr/20); returns the train_loop history."""
    from .train import train_loop

    device = next(model.parameters()).device
    get_batch = batch_sampler(splits, vocab, batch_size, generator, device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    adam_step, done = opt.step, [0]

    def step_and_decay(*args, **kwargs):  # after each update, move the learning rate along the cosine
        out = adam_step(*args, **kwargs)
        done[0] += 1
        for group in opt.param_groups:
            group["lr"] = lr / 20 + (lr - lr / 20) * 0.5 * (1 + math.cos(math.pi * done[0] / steps))
        return out

    opt.step = step_and_decay
    with one_cpu_thread(device):
        return train_loop(model, get_batch, loss_fn, steps=steps, optimizer=opt,
                          eval_every=eval_every or max(steps // 20, 1), eval_iters=5, clip_grad=1.0, desc=desc)


def experiment_sizes(task: str = "dates") -> dict:
    """Model and training sizes of this week's runs, per profile (one place for notebooks 01 and 02).

    `hidden` is the width of the model without attention; every other model of the comparison is
    sized to its parameter count (`sized_to`). `wide` is the capacity control's width. `max_len`
    bounds decoding (dates: 10 characters and <eos>; copy: the longest input and <eos>).
    """
    from .runtime import by_profile

    if task == "dates":
        return by_profile(smoke=dict(hidden=16, steps=30, batch_size=32, eval_examples=200, max_len=12),
                          cpu=dict(hidden=64, steps=2000, batch_size=64, eval_examples=None, max_len=12),
                          gpu=dict(hidden=128, steps=4000, batch_size=64, eval_examples=None, max_len=12))
    return by_profile(smoke=dict(hidden=16, wide=32, steps=20, batch_size=32, eval_examples=120, max_len=41),
                      cpu=dict(hidden=64, wide=256, steps=1000, batch_size=64, eval_examples=None, max_len=41),
                      gpu=dict(hidden=128, wide=512, steps=4000, batch_size=64, eval_examples=None, max_len=41))


def train_or_load(cfg: Seq2SeqConfig, splits: dict, vocab: CharVocab, *, steps: int, batch_size: int = 64,
                  seed: int = 0, retrain: bool = False, device=None, task: str = "dates",
                  functions: dict[str, Callable] | None = None, loss_fn: Callable = seq2seq_loss,
                  ) -> tuple[Seq2Seq, dict]:
    """Train a Seq2Seq with `cfg` on `task` for `steps` steps, or load the same run from the course cache.

    Notebook 01 trains the models without attention (retrain=True) and notebook 02 reuses them. The
    cache key holds every setting, so a changed setting trains a new model. `functions` (e.g. the
    learner's `additive_score` and `attention_weights`) go to `Seq2Seq`.
    """
    from .runtime import cache_dir

    key = "_".join(f"{k}{v}" for k, v in sorted(vars(cfg).items())) + f"_steps{steps}_bs{batch_size}_seed{seed}"
    path = cache_dir("week3") / f"v2_{task}_{key}.pt"
    torch.manual_seed(seed)
    model = Seq2Seq(cfg, **(functions or {})).to(device or "cpu")
    if path.exists() and not retrain:
        saved = torch.load(path, map_location=device or "cpu")
        model.load_state_dict(saved["state"])
        print(f"loaded the trained {cfg.attention!r} {task} model from the course cache")
        return model.eval(), saved["history"]
    history = train_seq2seq(model, splits, vocab, steps=steps, batch_size=batch_size, loss_fn=loss_fn,
                            generator=torch.Generator().manual_seed(seed), desc=f"{task}, attention={cfg.attention}")
    torch.save({"state": model.state_dict(), "history": history}, path)
    return model.eval(), history


@torch.no_grad()
def translate(model: Seq2Seq, texts: Sequence[str], vocab: CharVocab, *, max_len: int = 12,
              decode: Callable = greedy_decode, batch_size: int = 256) -> list[str]:
    """Translations of a list of source strings by `decode(model, src, src_len, max_len)` (greedy by default)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    with one_cpu_thread(device):
        for i in range(0, len(texts), batch_size):
            b = make_batch([{"src": t, "tgt": ""} for t in texts[i:i + batch_size]], vocab).to(device)
            ids = decode(model, b.src, b.src_len, max_len)
            out += [vocab.decode(row) for row in ids.tolist()]
    return out


@torch.no_grad()
def beam_translate(model: Seq2Seq, texts: Sequence[str], vocab: CharVocab, *, beam_size: int = 4,
                   max_len: int = 12, search: Callable = beam_search) -> tuple[list[str], list[float]]:
    """Beam-search translations of each text (one at a time) and their log-probabilities."""
    model.eval()
    device = next(model.parameters()).device
    outs, scores = [], []
    with one_cpu_thread(device):
        for text in texts:
            b = make_batch([{"src": text, "tgt": ""}], vocab).to(device)
            ids, score = search(model, b.src, b.src_len, beam_size, max_len)
            outs.append(vocab.decode(ids))
            scores.append(float(score))
    return outs, scores


@torch.no_grad()
def sequence_log_prob(model: Seq2Seq, examples: Sequence[dict[str, str]], vocab: CharVocab) -> list[float]:
    """log p(tgt + <eos> | src) of each example under the model (teacher-forced, summed over characters)."""
    model.eval()
    out = []
    with one_cpu_thread(next(model.parameters()).device):
        for i in range(0, len(examples), 256):
            b = make_batch(examples[i:i + 256], vocab).to(next(model.parameters()).device)
            logp = model(b.src, b.src_len, b.tgt_in).log_softmax(-1)  # (B, U, V)
            picked = logp.gather(-1, b.tgt_out[..., None])[..., 0] * (b.tgt_out != PAD)  # (B, U)
            out += picked.sum(-1).tolist()
    return out


def exact_match(model: Seq2Seq, examples: Sequence[dict[str, str]], vocab: CharVocab, *, max_len: int = 12,
                decode: Callable = greedy_decode) -> float:
    """Fraction of examples whose decoded output equals the target exactly."""
    preds = translate(model, [e["src"] for e in examples], vocab, max_len=max_len, decode=decode)
    return sum(p == e["tgt"] for p, e in zip(preds, examples)) / max(len(examples), 1)


def symbol_accuracy(pred: str, target: str) -> float:
    """Fraction of the target's positions where the output has the same character (a missing one is wrong)."""
    return sum(a == b for a, b in zip(pred, target)) / max(len(target), 1)


def accuracy_by_length(model: Seq2Seq, examples: Sequence[dict[str, str]], vocab: CharVocab,
                       edges: Sequence[int] = tuple(range(5, 61, 5)), *, max_len: int = 12,
                       decode: Callable = greedy_decode) -> dict[str, list[float]]:
    """Per input-length bucket (edges[i], edges[i+1]]: exact match ("accuracy"), per-position
    "symbol_accuracy", the bucket centre ("length") and its size ("n")."""
    preds = translate(model, [e["src"] for e in examples], vocab, max_len=max_len, decode=decode)
    res: dict[str, list[float]] = {"length": [], "accuracy": [], "symbol_accuracy": [], "n": []}
    for lo, hi in zip(edges[:-1], edges[1:]):
        pairs = [(p, e["tgt"]) for p, e in zip(preds, examples) if lo < len(e["src"]) <= hi]
        if pairs:
            res["length"].append((lo + hi) / 2)
            res["accuracy"].append(sum(p == t for p, t in pairs) / len(pairs))
            res["symbol_accuracy"].append(sum(symbol_accuracy(p, t) for p, t in pairs) / len(pairs))
            res["n"].append(len(pairs))
    return res


def plot_accuracy_by_length(curves: dict[str, dict], *, train_lengths: Sequence[int] | None = None, ax=None,
                            key: str = "accuracy", title: str = "exact match against input length"):
    """One line per model ({label: accuracy_by_length(...)}); optionally a histogram of training lengths."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots()[1]
    if train_lengths is not None:
        ax2 = ax.twinx()
        ax2.hist(train_lengths, bins=range(0, 62, 2), color="grey", alpha=0.25)
        ax2.set_ylabel("training examples", color="grey")
        ax2.grid(False)
    for label, c in curves.items():
        ax.plot(c["length"], c[key], marker="o", label=label)
    ax.set_xlabel("input length (characters)")
    ax.set_ylabel(key.replace("_", " ").replace("accuracy", "exact match") if key == "accuracy" else key.replace("_", " "))
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower left")
    return ax


# ----------------------------------------------------------------------------------------------
# Looking inside: alignment heatmaps and a browser
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def alignment(model: Seq2Seq, text: str, vocab: CharVocab, max_len: int = 12) -> tuple[str, torch.Tensor]:
    """The greedy translation of `text` and its attention weights (output chars incl. EOS, input chars)."""
    model.eval()
    device = next(model.parameters()).device
    b = make_batch([{"src": text, "tgt": ""}], vocab).to(device)
    ids, attn = model.greedy_decode(b.src, b.src_len, max_len)
    pred = vocab.decode(ids[0].tolist())
    return pred, attn[0, :len(pred) + 1, :len(text)].cpu()  # (U, S)


def plot_alignment(model: Seq2Seq, text: str, vocab: CharVocab, ax=None, title: str | None = None,
                   max_len: int = 12):
    """Heatmap of which input characters each output character attended to."""
    from .plots import plot_heatmap

    pred, w = alignment(model, text, vocab, max_len)
    return plot_heatmap(w, xlabels=list(text), ylabels=list(pred) + ["<eos>"], ax=ax,
                        title=title if title is not None else f"{text!r} -> {pred}")


def attention_browser(model: Seq2Seq, examples: Sequence[dict[str, str]], vocab: CharVocab, max_len: int = 12):
    """An ipywidgets slider that draws the alignment of example i (returns the widget)."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    slider = widgets.IntSlider(value=0, min=0, max=len(examples) - 1, description="example")
    out = widgets.Output()

    def show(change=None):
        with out:
            out.clear_output(wait=True)
            ex = examples[slider.value]
            fig, ax = plt.subplots(figsize=(max(4, 0.2 * len(ex["src"])), 3.2))
            plot_alignment(model, ex["src"], vocab, ax=ax, title=f"target {ex['tgt']}", max_len=max_len)
            plt.show()

    slider.observe(show, names="value")
    show()
    return widgets.VBox([slider, out])
