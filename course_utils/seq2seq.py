"""Week 3: sequence-to-sequence translation of human-written dates to ISO dates, with and without attention.

Reading order: the dates data set (generated, deterministic) -> a character vocabulary -> batches ->
a GRU encoder -> a GRU decoder that reads either one fixed summary vector (Cho et al. 2014, Sutskever
et al. 2014) or an attention-weighted sum of every encoder state (Bahdanau et al. 2015, additive;
Luong et al. 2015, dot-product) -> teacher-forced loss -> greedy decoding -> exact-match accuracy by
input length -> alignment pictures and a small browser widget.

A production translator adds beam search, subword vocabularies and a Transformer instead of GRUs
(week 4); the ideas here carry over unchanged.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import additive_score, attention_weights, dot_product_score, padding_mask
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


def dates_dir() -> Path | None:
    """`datasets/dates/` of the repository, when running from a checkout."""
    here = Path(__file__).resolve().parent.parent / "datasets" / "dates"
    return here if (here / "train.jsonl").exists() else None


def load_dates(split: str) -> list[dict[str, str]]:
    """The `split` ("train", "val", "test") of the dates data set as a list of {"src", "tgt"} dicts.

    Reads `datasets/dates/<split>.jsonl` from the repository; outside a checkout (e.g. Colab after
    `pip install`) the same files are regenerated deterministically into the course cache.
    """
    from .runtime import cache_dir

    folder = dates_dir()
    if folder is None:
        folder = cache_dir("dates")
        if not (folder / f"{split}.jsonl").exists():
            write_split(folder, split)
    with open(folder / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_splits(eval_examples: int | None = None) -> dict[str, list[dict[str, str]]]:
    """{"train", "val", "test"}: all of train, and the first `eval_examples` of val and test (all when None)."""
    return {split: load_dates(split)[: eval_examples if split != "train" else None] for split in SPLIT_SIZES}


def write_split(folder: Path, split: str) -> Path:
    path = Path(folder) / f"{split}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for ex in generate_split(split):
            f.write(json.dumps(ex) + "\n")
    return path


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
# The models
# ----------------------------------------------------------------------------------------------
@dataclass
class Seq2SeqConfig:
    vocab_size: int = 75  # characters incl. the 4 specials (len(default_vocab()))
    emb: int = 32  # character embedding size
    hidden: int = 64  # GRU state size (encoder: per direction)
    attention: str = "none"  # "none" (one fixed summary vector), "additive" (Bahdanau) or "dot" (Luong)
    attn_size: int = 64  # width of the additive scorer's hidden layer
    bidirectional: bool = False  # encoder reads both ways (Bahdanau) or left to right only (Cho, Sutskever)

    @property
    def context_size(self) -> int:
        """Width of one encoder state, and so of the context vector the decoder reads."""
        return self.hidden * (2 if self.bidirectional else 1)


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


class Seq2Seq(nn.Module):
    """GRU encoder-decoder. The decoder reads a context vector at every step: the fixed summary
    (attention="none") or an attention-weighted sum of the encoder states ("additive" / "dot")."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.cfg = cfg
        H, C = cfg.hidden, cfg.context_size  # decoder state size, context (encoder state) size
        self.encoder = Encoder(cfg)
        self.init = nn.Linear(C, H)  # summary -> first decoder state
        self.emb = nn.Embedding(cfg.vocab_size, cfg.emb, padding_idx=0)
        self.cell = nn.GRUCell(cfg.emb + C, H)
        self.out = nn.Linear(H + C, cfg.vocab_size)
        if cfg.attention == "additive":  # score(s, h) = v . tanh(W_q s + W_k h)
            self.W_q = nn.Linear(H, cfg.attn_size, bias=False)
            self.W_k = nn.Linear(C, cfg.attn_size, bias=False)
            self.v = nn.Linear(cfg.attn_size, 1, bias=False)
        elif cfg.attention == "dot":  # score(s, h) = (W s) . h
            self.W_q = nn.Linear(H, C, bias=False)
        elif cfg.attention != "none":
            raise ValueError(f"attention must be 'none', 'additive' or 'dot', not {cfg.attention!r}")

    def attend(self, state: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Context (B, C) and weights (B, S) for the decoder state `state` (B, H)."""
        if self.cfg.attention == "additive":
            scores = additive_score(state, keys, self.W_q.weight.T, self.W_k.weight.T, self.v.weight[0])  # (B, S)
        else:
            scores = dot_product_score(self.W_q(state), keys, scale=False)  # (B, S), Luong's "general" score
        weights = attention_weights(scores, mask)  # (B, S), zero on padding
        return torch.einsum("bs,bsc->bc", weights, values), weights  # (B, C)

    def encode(self, src, src_len):
        """Encoder states (B, S, C), the summary (B, C) and a mask (B, S) that is True on real characters."""
        enc, summary = self.encoder(src, src_len)  # (B, S, C), (B, C)
        mask = padding_mask(src_len, src.shape[1])  # (B, S)
        return enc, summary, mask

    def step(self, y_prev, state, enc, summary, mask):
        """One decoder step: previous character and state -> logits, new state, attention weights."""
        if self.cfg.attention == "none":
            context, weights = summary, None  # the same vector at every step: the bottleneck
        else:
            context, weights = self.attend(state, enc, enc, mask)  # encoder states are the keys and the values
        state = self.cell(torch.cat([self.emb(y_prev), context], dim=-1), state)  # (B, H)
        logits = self.out(torch.cat([state, context], dim=-1))  # (B, V)
        return logits, state, weights

    def forward(self, src, src_len, tgt_in) -> torch.Tensor:
        """Teacher forcing: the decoder reads the true previous character. Returns logits (B, U, V)."""
        enc, summary, mask = self.encode(src, src_len)
        state = torch.tanh(self.init(summary))  # (B, H)
        logits = []
        for t in range(tgt_in.shape[1]):
            step_logits, state, _ = self.step(tgt_in[:, t], state, enc, summary, mask)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)  # (B, U, V)

    @torch.no_grad()
    def greedy_decode(self, src, src_len, max_len: int = 12) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed back the most likely character each step. Returns ids (B, max_len) and weights (B, max_len, S)."""
        enc, summary, mask = self.encode(src, src_len)
        state = torch.tanh(self.init(summary))
        y = torch.full((src.shape[0],), BOS, dtype=torch.long, device=src.device)
        ids, weights = [], []
        for _ in range(max_len):
            logits, state, w = self.step(y, state, enc, summary, mask)
            y = logits.argmax(-1)
            ids.append(y)
            weights.append(w)
        attn = torch.stack(weights, dim=1) if weights[0] is not None else None
        return torch.stack(ids, dim=1), attn


def seq2seq_loss(model: Seq2Seq, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of the teacher-forced predictions, ignoring padding."""
    logits = model(batch.src, batch.src_len, batch.tgt_in)  # (B, U, V)
    return F.cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD)


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
                  desc: str = "seq2seq") -> dict:
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
    with one_cpu_thread(next(model.parameters()).device):
        return train_loop(model, get_batch, seq2seq_loss, steps=steps, optimizer=opt,
                          eval_every=eval_every or max(steps // 20, 1), eval_iters=5, clip_grad=1.0, desc=desc)


def experiment_sizes() -> dict:
    """Model and training sizes of this week's translation runs, per profile (one place for notebooks 01 and 02)."""
    from .runtime import by_profile

    return by_profile(smoke=dict(hidden=16, steps=30, batch_size=32, eval_examples=200),
                      cpu=dict(hidden=64, steps=2000, batch_size=64, eval_examples=None),
                      gpu=dict(hidden=128, steps=4000, batch_size=64, eval_examples=None))


def train_or_load(cfg: Seq2SeqConfig, splits: dict, vocab: CharVocab, *, steps: int, batch_size: int = 64,
                  seed: int = 0, retrain: bool = False, device=None) -> tuple[Seq2Seq, dict]:
    """Train a Seq2Seq with `cfg` for `steps` steps, or load the same run from the course cache.

    Notebook 01 trains the model without attention (retrain=True) and notebook 02 reuses it. The cache
    key holds every setting, so a changed setting trains a new model.
    """
    from .runtime import cache_dir

    key = "_".join(f"{k}{v}" for k, v in sorted(vars(cfg).items())) + f"_steps{steps}_bs{batch_size}_seed{seed}"
    path = cache_dir("week3") / f"seq2seq_{key}.pt"
    torch.manual_seed(seed)
    model = Seq2Seq(cfg).to(device or "cpu")
    if path.exists() and not retrain:
        saved = torch.load(path, map_location=device or "cpu")
        model.load_state_dict(saved["state"])
        print(f"loaded the trained {cfg.attention!r} model from {path}")
        return model.eval(), saved["history"]
    history = train_seq2seq(model, splits, vocab, steps=steps, batch_size=batch_size,
                            generator=torch.Generator().manual_seed(seed), desc=f"attention={cfg.attention}")
    torch.save({"state": model.state_dict(), "history": history}, path)
    return model.eval(), history


@torch.no_grad()
def translate(model: Seq2Seq, texts: Sequence[str], vocab: CharVocab, batch_size: int = 256) -> list[str]:
    """Greedy translations of a list of source strings."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    with one_cpu_thread(next(model.parameters()).device):
        for i in range(0, len(texts), batch_size):
            b = make_batch([{"src": t, "tgt": ""} for t in texts[i:i + batch_size]], vocab).to(device)
            ids, _ = model.greedy_decode(b.src, b.src_len)
            out += [vocab.decode(row) for row in ids.tolist()]
    return out


def exact_match(model: Seq2Seq, examples: Sequence[dict[str, str]], vocab: CharVocab) -> float:
    """Fraction of examples whose greedy translation equals the target exactly."""
    preds = translate(model, [e["src"] for e in examples], vocab)
    return sum(p == e["tgt"] for p, e in zip(preds, examples)) / max(len(examples), 1)


def accuracy_by_length(model: Seq2Seq, examples: Sequence[dict[str, str]], vocab: CharVocab,
                       edges: Sequence[int] = tuple(range(5, 61, 5))) -> dict[str, list[float]]:
    """Exact match per input-length bucket (edges[i], edges[i+1]]: {"length": centres, "accuracy": ..., "n": ...}."""
    preds = translate(model, [e["src"] for e in examples], vocab)
    res: dict[str, list[float]] = {"length": [], "accuracy": [], "n": []}
    for lo, hi in zip(edges[:-1], edges[1:]):
        hits = [p == e["tgt"] for p, e in zip(preds, examples) if lo < len(e["src"]) <= hi]
        if hits:
            res["length"].append((lo + hi) / 2)
            res["accuracy"].append(sum(hits) / len(hits))
            res["n"].append(len(hits))
    return res


def plot_accuracy_by_length(curves: dict[str, dict], *, train_lengths: Sequence[int] | None = None, ax=None,
                            title: str = "exact match against input length"):
    """One line per model ({label: accuracy_by_length(...)}); optionally a histogram of training lengths."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots()[1]
    if train_lengths is not None:
        ax2 = ax.twinx()
        ax2.hist(train_lengths, bins=range(0, 62, 2), color="grey", alpha=0.25)
        ax2.set_ylabel("training examples", color="grey")
        ax2.grid(False)
    for label, c in curves.items():
        ax.plot(c["length"], c["accuracy"], marker="o", label=label)
    ax.set_xlabel("input length (characters)")
    ax.set_ylabel("exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower left")
    return ax


# ----------------------------------------------------------------------------------------------
# Looking inside: alignment heatmaps and a browser
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def alignment(model: Seq2Seq, text: str, vocab: CharVocab) -> tuple[str, torch.Tensor]:
    """The greedy translation of `text` and its attention weights (output chars incl. EOS, input chars)."""
    model.eval()
    device = next(model.parameters()).device
    b = make_batch([{"src": text, "tgt": ""}], vocab).to(device)
    ids, attn = model.greedy_decode(b.src, b.src_len)
    pred = vocab.decode(ids[0].tolist())
    return pred, attn[0, :len(pred) + 1, :len(text)].cpu()  # (U, S)


def plot_alignment(model: Seq2Seq, text: str, vocab: CharVocab, ax=None, title: str | None = None):
    """Heatmap of which input characters each output character attended to."""
    from .plots import plot_heatmap

    pred, w = alignment(model, text, vocab)
    return plot_heatmap(w, xlabels=list(text), ylabels=list(pred) + ["<eos>"], ax=ax,
                        title=title if title is not None else f"{text!r} -> {pred}")


def attention_browser(model: Seq2Seq, examples: Sequence[dict[str, str]], vocab: CharVocab):
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
            plot_alignment(model, ex["src"], vocab, ax=ax, title=f"target {ex['tgt']}")
            plt.show()

    slider.observe(show, names="value")
    show()
    return widgets.VBox([slider, out])
