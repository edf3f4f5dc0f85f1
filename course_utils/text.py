"""Character-level text pipeline: vocabulary, encode/decode, train/val split and batches of windows.

Week 2 builds its language models on this; later weeks reuse it (week 4 swaps the character
vocabulary for a BPE tokenizer and keeps the batching). Two ways to cut batches:
`random_windows` (independent windows, the usual choice) and `stream_batches` (consecutive chunks
of B parallel streams, so a recurrent model can carry its hidden state from one batch to the next:
truncated backpropagation through time). Two ways to hold text out: `train_val_split` (the tail)
and `held_out_play_split` (the tail, starting where a new play's cast takes over, so no play is in
both parts). `masked_windows` makes fill-in-the-blank batches.
"""
from __future__ import annotations

import re
from typing import Callable, Iterator, Sequence

import torch


class CharVocab:
    """The sorted set of characters of a text, with string <-> integer id maps.

    Optional `specials` (e.g. "<pad>", "<bos>", "<eos>", "<unk>" for a seq2seq decoder) take the first
    ids. With "<unk>" among them unknown characters map to it; without, they raise a KeyError.
    """

    def __init__(self, text: str, specials: Sequence[str] = ()):
        self.specials: list[str] = list(specials)
        self.chars: list[str] = sorted(set(text))
        tokens = self.specials + self.chars
        self.stoi: dict[str, int] = {tok: i for i, tok in enumerate(tokens)}
        self.itos: dict[int, str] = dict(enumerate(tokens))

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def size(self) -> int:
        return len(self)

    def encode(self, text: str) -> torch.Tensor:
        """'hi' -> tensor([ids]) (int64)."""
        unk = self.stoi.get("<unk>")
        if unk is None:
            unknown = sorted(set(text) - set(self.chars))
            if unknown:
                raise KeyError(f"characters not in the vocabulary: {unknown}")
        return torch.tensor([self.stoi.get(ch, unk) for ch in text], dtype=torch.long)

    def decode(self, ids) -> str:
        """A sequence of ids (tensor or list) -> the string; special tokens are dropped, "<eos>" ends it."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            token = self.itos[int(i)]
            if token == "<eos>":
                break
            if token not in self.specials:
                out.append(token)
        return "".join(out)

    def __repr__(self) -> str:
        return f"CharVocab({len(self)} tokens: {self.specials} + {''.join(self.chars)!r})"


def train_val_split(data: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 1-D token tensor into a head (train) and a tail (val); no shuffling, so no leakage."""
    n_val = max(1, int(len(data) * val_fraction))
    return data[:-n_val], data[-n_val:]


_SPEECH = re.compile(r"(?:^|\n\n)([A-Za-z][A-Za-z' ,&-]*):\n")  # "\n\nFIRST CITIZEN:\n" (tiny-shakespeare format)


def speeches(corpus: str) -> list[tuple[int, str]]:
    """(character offset, SPEAKER) of every speech in a play text of the tiny-shakespeare format."""
    return [(m.start(1), m.group(1).upper()) for m in _SPEECH.finditer(corpus)]


def held_out_play_split(corpus: str, val_fraction: float = 0.1, *, window: int = 100) -> int:
    """Character offset where a held-out tail made of whole plays begins (near `1 - val_fraction`).

    The corpus marks no play boundaries, but each play has its own cast: at a boundary the speakers
    of the `window` speeches before and the `window` speeches after have (almost) no name in common,
    inside a play they share many. Among speech starts within +-10% of the target, take the one with
    the fewest shared names, nearest the target. Check the result with `cast_overlap`.
    """
    marks = speeches(corpus)
    target = len(corpus) * (1 - val_fraction)
    best: tuple[int, float, int] | None = None
    for i in range(window, len(marks) - window):
        offset = marks[i][0]
        if abs(offset - target) > 0.1 * len(corpus):
            continue
        shared = len({s for _, s in marks[i - window:i]} & {s for _, s in marks[i:i + window]})
        key = (shared, abs(offset - target), offset)
        best = key if best is None or key < best else best
    if best is None:
        raise ValueError("too few speeches to find a play boundary; use train_val_split")
    return best[2]


def cast_overlap(train_text: str, val_text: str) -> float:
    """Share of the speeches in `val_text` whose speaker also speaks in `train_text` (0 = unseen cast)."""
    seen = {s for _, s in speeches(train_text)}
    val = [s for _, s in speeches(val_text)]
    return sum(s in seen for s in val) / max(1, len(val))


def random_windows(data: torch.Tensor, batch_size: int, block_size: int, *,
                   generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """B random windows of length T and the same windows shifted by one (the next-token targets).

    Returns x, y of shape (B, T) with y[:, t] = data[start + t + 1].
    """
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offsets = torch.arange(block_size)
    x = data[starts[:, None] + offsets]  # (B, T)
    y = data[starts[:, None] + offsets + 1]  # (B, T)
    if device is not None:
        x, y = x.to(device), y.to(device)
    return x, y


def masked_windows(data: torch.Tensor, batch_size: int, block_size: int, mask_id: int, *, mask_rate: float = 0.15,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill-in-the-blank batches: B random windows with a `mask_rate` share of positions replaced by `mask_id`.

    Returns x (B, T) with the blanks, and y (B, T) holding the hidden character at each blank and
    -100 elsewhere (F.cross_entropy ignores -100), so the loss scores only the blanks.
    """
    starts = torch.randint(len(data) - block_size + 1, (batch_size,), generator=generator)
    windows = data[starts[:, None] + torch.arange(block_size)]  # (B, T)
    blank = torch.rand(windows.shape, generator=generator) < mask_rate  # (B, T) bool
    x = windows.masked_fill(blank, mask_id)
    y = windows.masked_fill(~blank, -100)
    return x, y


def make_get_batch(train: torch.Tensor, val: torch.Tensor, batch_size: int, block_size: int, *,
                   generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> Callable[[str], tuple[torch.Tensor, torch.Tensor]]:
    """`get_batch(split)` for `course_utils.train.train_loop`: random windows of train or val."""
    splits = {"train": train, "val": val}

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return random_windows(splits[split], batch_size, block_size, generator=generator, device=device)

    return get_batch


def stream_batches(data: torch.Tensor, batch_size: int, block_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive chunks of B parallel streams, forever (for truncated BPTT with a carried state).

    The text is cut into B equal streams; batch k holds chunk k of every stream, so row b of batch k+1
    continues row b of batch k, and the hidden state at the end of one batch is the right start for
    the next. Yields x, y of shape (B, T); a new epoch starts over (reset the state then).
    """
    n = (len(data) - 1) // batch_size
    streams_x = data[: n * batch_size].view(batch_size, n)  # (B, n)
    streams_y = data[1: n * batch_size + 1].view(batch_size, n)  # (B, n)
    while True:
        for start in range(0, n - block_size + 1, block_size):
            yield streams_x[:, start:start + block_size], streams_y[:, start:start + block_size]


def context_windows(data: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (previous `context` tokens, next token) pair of a 1-D tensor: X (N, context), y (N,)."""
    X = data.unfold(0, context, 1)[:-1]  # (N, context): windows starting at 0 .. len-context-1
    y = data[context:]  # (N,)
    return X, y
