"""Recurrent networks from scratch: RNN, LSTM and GRU cells, unrolled models, a character LM,
sampling with temperature, gradient clipping and gradient-norm measurement (week 2).

Built in teaching order: one cell step (`rnn_cell_step`) -> the loss of an unrolled sequence
(`bptt_loss`) -> gated cells (`lstm_cell_step`, `gru_cell_step`) -> a layer that reads both ways
(`bidirectional_rnn`) -> `nn.Module` cells that load PyTorch's weights -> `Recurrent` (stacked,
optionally bidirectional cells unrolled over time, drop-in for `nn.RNN`/`nn.LSTM`/`nn.GRU` with
`batch_first=True`) -> `CharLM` -> `generate`. Math convention: row vectors,
`x @ W`, so `W_x` is (input, gates*hidden); PyTorch stores the transpose (`weight_ih` is
(gates*hidden, input)) in the gate order i, f, g, o (LSTM) and r, z, n (GRU).
The production versions (cuDNN) fuse all time steps into one kernel; the maths is the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from .runtime import one_cpu_thread

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# The vanilla RNN and backpropagation through time
# ----------------------------------------------------------------------------------------------
def rnn_cell_step(x: torch.Tensor, h: torch.Tensor, W_xh: torch.Tensor, W_hh: torch.Tensor,
                  b: torch.Tensor) -> torch.Tensor:
    """One Elman RNN step (Elman 1990): h_t = tanh(x_t W_xh + h_{t-1} W_hh + b). x (B, I), h (B, H)."""
    return torch.tanh(x @ W_xh + h @ W_hh + b)


def bptt_loss(tokens: torch.Tensor, h: torch.Tensor, W_xh: torch.Tensor, W_hh: torch.Tensor, b_h: torch.Tensor,
              W_hy: torch.Tensor, b_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy of a character RNN unrolled over `tokens` (B, T+1), and the last h.

    Inputs are tokens[:, :-1] (one-hot, so x_t @ W_xh is the row W_xh[token]); targets tokens[:, 1:].
    Backward through this loss is backpropagation through time.
    """
    T = tokens.shape[1] - 1
    losses = []
    for t in range(T):
        x = W_xh[tokens[:, t]]  # (B, H): one-hot(token) @ W_xh
        h = torch.tanh(x + h @ W_hh + b_h)  # (B, H)
        logits = h @ W_hy + b_y  # (B, V)
        losses.append(F.cross_entropy(logits, tokens[:, t + 1]))
    return torch.stack(losses).mean(), h


def detach_state(state: State | None) -> State | None:
    """Cut the graph at a batch boundary (truncated BPTT): keep the values, drop the history."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


# ----------------------------------------------------------------------------------------------
# Exploding gradients: clipping by global norm
# ----------------------------------------------------------------------------------------------
def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Rescale all gradients together so their global L2 norm is at most `max_norm` (Pascanu et al. 2013).

    Returns the norm before clipping, like `torch.nn.utils.clip_grad_norm_`.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.sqrt(sum((g.detach() ** 2).sum() for g in grads)) if grads else torch.tensor(0.0)
    scale = max_norm / (total + 1e-6)
    if scale < 1:
        for g in grads:
            g.mul_(scale)
    return total


# ----------------------------------------------------------------------------------------------
# Gated cells: LSTM and GRU
# ----------------------------------------------------------------------------------------------
def lstm_cell_step(x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], W_x: torch.Tensor,
                   W_h: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step (Hochreiter & Schmidhuber 1997, with forget gate). Gate columns in PyTorch's order i, f, g, o.

    c_t = f * c_{t-1} + i * g;  h_t = o * tanh(c_t). x (B, I), h and c (B, H), W_x (I, 4H), W_h (H, 4H).
    """
    h, c = state
    i, f, g, o = (x @ W_x + h @ W_h + b).chunk(4, dim=-1)  # 4 x (B, H)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def gru_cell_step(x: torch.Tensor, h: torch.Tensor, W_x: torch.Tensor, W_h: torch.Tensor, b_x: torch.Tensor,
                  b_h: torch.Tensor) -> torch.Tensor:
    """One GRU step (Cho et al. 2014) as PyTorch defines it. Gate columns in the order r, z, n.

    n = tanh(x W_xn + b_xn + r * (h W_hn + b_hn));  h_t = (1 - z) * n + z * h_{t-1}.
    The reset gate multiplies the *result* of W_hn, so the hidden bias b_h must stay separate from b_x.
    """
    xr, xz, xn = (x @ W_x + b_x).chunk(3, dim=-1)  # 3 x (B, H)
    hr, hz, hn = (h @ W_h + b_h).chunk(3, dim=-1)  # 3 x (B, H)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def bidirectional_rnn(x: torch.Tensor, fwd: tuple[torch.Tensor, ...], bwd: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A bidirectional RNN layer (Schuster & Paliwal 1997): x (B, T, I) -> (B, T, 2H).

    One RNN reads left to right with fwd = (W_xh, W_hh, b), another right to left with bwd, both from
    h = 0; position t gets [forward h_t, backward h_t], so it sees the whole sequence on both sides.
    """
    B, T, _ = x.shape
    h_f = x.new_zeros(B, fwd[1].shape[0])
    h_b = x.new_zeros(B, bwd[1].shape[0])
    outs_f, outs_b = [], []
    for t in range(T):
        h_f = rnn_cell_step(x[:, t], h_f, *fwd)  # has read x_0 .. x_t
        h_b = rnn_cell_step(x[:, T - 1 - t], h_b, *bwd)  # has read x_{T-1} .. x_{T-1-t}
        outs_f.append(h_f)
        outs_b.append(h_b)
    return torch.cat([torch.stack(outs_f, dim=1), torch.stack(outs_b[::-1], dim=1)], dim=-1)  # (B, T, 2H)


# ----------------------------------------------------------------------------------------------
# Cells as modules (loadable from PyTorch's weights) and an unrolled multi-layer model
# ----------------------------------------------------------------------------------------------
def _torch_weights(module: nn.Module, layer: int = 0, reverse: bool = False) -> tuple[torch.Tensor, ...]:
    """(weight_ih, weight_hh, bias_ih, bias_hh) of an nn.*Cell, or of one layer (and direction) of nn.RNN/LSTM/GRU."""
    sfx = "" if hasattr(module, "weight_ih") else f"_l{layer}" + ("_reverse" if reverse else "")
    return tuple(getattr(module, name + sfx).detach() for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))


class RNNCell(nn.Module):
    """A vanilla RNN cell with parameters W_xh (I, H), W_hh (H, H), b (H)."""

    n_gates = 1

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        k = 1 / math.sqrt(hidden_size)  # PyTorch's init: U(-k, k)
        self.hidden_size = hidden_size
        self.W_xh = nn.Parameter(torch.empty(input_size, hidden_size).uniform_(-k, k))
        self.W_hh = nn.Parameter(torch.empty(hidden_size, hidden_size).uniform_(-k, k))
        self.b = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return rnn_cell_step(x, h, self.W_xh, self.W_hh, self.b)

    def init_state(self, batch_size: int) -> torch.Tensor:
        return self.W_hh.new_zeros(batch_size, self.hidden_size)

    @torch.no_grad()
    def load_torch(self, module: nn.Module, layer: int = 0, reverse: bool = False) -> "RNNCell":
        w_ih, w_hh, b_ih, b_hh = _torch_weights(module, layer, reverse)
        self.W_xh.copy_(w_ih.T), self.W_hh.copy_(w_hh.T), self.b.copy_(b_ih + b_hh)
        return self


class LSTMCell(nn.Module):
    """An LSTM cell with W_x (I, 4H), W_h (H, 4H), b (4H); gates i, f, g, o; state (h, c)."""

    n_gates = 4

    def __init__(self, input_size: int, hidden_size: int, forget_bias: float = 0.0):
        super().__init__()
        k = 1 / math.sqrt(hidden_size)
        self.hidden_size = hidden_size
        self.W_x = nn.Parameter(torch.empty(input_size, 4 * hidden_size).uniform_(-k, k))
        self.W_h = nn.Parameter(torch.empty(hidden_size, 4 * hidden_size).uniform_(-k, k))
        self.b = nn.Parameter(torch.zeros(4 * hidden_size))
        with torch.no_grad():  # a positive forget bias keeps the cell state (and its gradient) alive at init
            self.b[hidden_size:2 * hidden_size] = forget_bias

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return lstm_cell_step(x, state, self.W_x, self.W_h, self.b)

    def init_state(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = self.W_h.new_zeros(batch_size, self.hidden_size)
        return zeros, zeros.clone()

    @torch.no_grad()
    def load_torch(self, module: nn.Module, layer: int = 0, reverse: bool = False) -> "LSTMCell":
        w_ih, w_hh, b_ih, b_hh = _torch_weights(module, layer, reverse)
        self.W_x.copy_(w_ih.T), self.W_h.copy_(w_hh.T), self.b.copy_(b_ih + b_hh)
        return self


class GRUCell(nn.Module):
    """A GRU cell with W_x (I, 3H), W_h (H, 3H), b_x and b_h (3H); gates r, z, n."""

    n_gates = 3

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        k = 1 / math.sqrt(hidden_size)
        self.hidden_size = hidden_size
        self.W_x = nn.Parameter(torch.empty(input_size, 3 * hidden_size).uniform_(-k, k))
        self.W_h = nn.Parameter(torch.empty(hidden_size, 3 * hidden_size).uniform_(-k, k))
        self.b_x = nn.Parameter(torch.zeros(3 * hidden_size))
        self.b_h = nn.Parameter(torch.zeros(3 * hidden_size))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return gru_cell_step(x, h, self.W_x, self.W_h, self.b_x, self.b_h)

    def init_state(self, batch_size: int) -> torch.Tensor:
        return self.W_h.new_zeros(batch_size, self.hidden_size)

    @torch.no_grad()
    def load_torch(self, module: nn.Module, layer: int = 0, reverse: bool = False) -> "GRUCell":
        w_ih, w_hh, b_ih, b_hh = _torch_weights(module, layer, reverse)
        self.W_x.copy_(w_ih.T), self.W_h.copy_(w_hh.T), self.b_x.copy_(b_ih), self.b_h.copy_(b_hh)
        return self


CELLS = {"rnn": RNNCell, "lstm": LSTMCell, "gru": GRUCell}
TORCH_LAYERS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def unroll(cell: nn.Module, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
    """Run a cell over every time step of x (B, T, I): outputs (B, T, H) and the final state."""
    state = cell.init_state(x.shape[0]) if state is None else state
    outputs = []
    for t in range(x.shape[1]):
        state = cell(x[:, t], state)
        outputs.append(state[0] if isinstance(state, tuple) else state)
    return torch.stack(outputs, dim=1), state  # (B, T, H)


class Recurrent(nn.Module):
    """Stacked, optionally bidirectional from-scratch cells, unrolled in Python; same interface and state
    layout as `nn.RNN`/`nn.LSTM`/`nn.GRU(batch_first=True)`: state h (L*D, B, H) ordered layer 0 forward,
    layer 0 backward, layer 1 forward, ... (D = 2 directions if bidirectional), or (h, c) for the LSTM.

    Layer l+1 reads the outputs of layer l: (B, T, D*H), both directions concatenated.
    """

    def __init__(self, kind: str, input_size: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = False):
        super().__init__()
        self.kind, self.bidirectional = kind, bidirectional
        D = 2 if bidirectional else 1
        sizes = [input_size] + [D * hidden_size] * (num_layers - 1)
        self.cells = nn.ModuleList(CELLS[kind](i, hidden_size) for i in sizes)
        self.reverse_cells = nn.ModuleList(CELLS[kind](i, hidden_size) for i in sizes) if bidirectional else None

    def _state(self, state: State | None, k: int) -> State | None:
        """Entry k of a stacked state (torch's layout), or None."""
        if state is None:
            return None
        return (state[0][k], state[1][k]) if self.kind == "lstm" else state[k]

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        D = 2 if self.bidirectional else 1
        finals = []  # final state of every (layer, direction), in torch's order
        for layer, cell in enumerate(self.cells):
            out, last = unroll(cell, x, self._state(state, D * layer))  # (B, T, H)
            finals.append(last)
            if self.bidirectional:
                out_b, last_b = unroll(self.reverse_cells[layer], x.flip(1), self._state(state, D * layer + 1))
                out = torch.cat([out, out_b.flip(1)], dim=-1)  # (B, T, 2H): back in reading order
                finals.append(last_b)
            x = out
        if self.kind == "lstm":
            return x, (torch.stack([h for h, _ in finals]), torch.stack([c for _, c in finals]))
        return x, torch.stack(finals)  # (L*D, B, H)

    @torch.no_grad()
    def load_torch(self, module: nn.Module) -> "Recurrent":
        """Copy the weights of an nn.RNN/LSTM/GRU with the same sizes (and directions)."""
        for layer, cell in enumerate(self.cells):
            cell.load_torch(module, layer)
            if self.bidirectional:
                self.reverse_cells[layer].load_torch(module, layer, reverse=True)
        return self


def count_parameters(model: nn.Module) -> int:
    """Number of trainable numbers in a model."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def hidden_size_for(target_params: int, build: Callable[[int], nn.Module]) -> int:
    """The hidden size h whose model `build(h)` has the parameter count closest to `target_params`.

    For like-for-like comparisons: an RNN, a GRU and an LSTM of equal *parameter count* have different
    widths (a GRU unit has 3x, an LSTM unit 4x the weights of an RNN unit). Models are built on the
    meta device, so nothing is allocated.
    """
    def size(h: int) -> int:
        with torch.device("meta"):
            return count_parameters(build(h))

    lo, hi = 1, 2
    while size(hi) < target_params:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the count grows with h: bisect
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) < target_params else (lo, mid)
    return min((lo, hi), key=lambda h: abs(size(h) - target_params))


# ----------------------------------------------------------------------------------------------
# A character-level language model
# ----------------------------------------------------------------------------------------------
@dataclass
class CharLMConfig:
    """Sizes of a recurrent character language model."""

    vocab_size: int = 65  # number of distinct characters
    kind: str = "lstm"  # "rnn", "lstm" or "gru"
    n_embd: int = 64  # width of the character embedding fed to the first layer
    hidden_size: int = 256  # width of the hidden (and cell) state of every layer
    n_layers: int = 1  # stacked recurrent layers
    dropout: float = 0.0  # dropout between layers and before the output head
    bidirectional: bool = False  # True: also read right to left (sees the future: not for next-token prediction)
    from_scratch: bool = False  # True: our cells unrolled in Python (slow, for teaching); False: torch's fused layers

    @classmethod
    def tiny(cls, vocab_size: int) -> "CharLMConfig":
        return cls(vocab_size=vocab_size, n_embd=16, hidden_size=32)

    @classmethod
    def small(cls, vocab_size: int) -> "CharLMConfig":
        return cls(vocab_size=vocab_size, n_embd=64, hidden_size=256)

    @classmethod
    def large(cls, vocab_size: int) -> "CharLMConfig":
        """Karpathy's char-rnn scale: 2 layers of 512, reaches val loss ~1.5 on tiny Shakespeare."""
        return cls(vocab_size=vocab_size, n_embd=128, hidden_size=512, n_layers=2, dropout=0.2)


class CharLM(nn.Module):
    """Embedding -> recurrent layers -> linear head: logits for the next character at every position."""

    def __init__(self, config: CharLMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        if config.from_scratch:
            self.rnn = Recurrent(config.kind, config.n_embd, config.hidden_size, config.n_layers, config.bidirectional)
        else:
            self.rnn = TORCH_LAYERS[config.kind](config.n_embd, config.hidden_size, config.n_layers, batch_first=True,
                                                 dropout=config.dropout if config.n_layers > 1 else 0.0,
                                                 bidirectional=config.bidirectional)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size * (2 if config.bidirectional else 1), config.vocab_size)

    def forward(self, idx: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """idx (B, T) -> logits (B, T, V) and the final state (pass it back in to continue the text)."""
        out, state = self.rnn(self.embed(idx), state)  # (B, T, H), or (B, T, 2H) if bidirectional
        return self.head(self.drop(out)), state


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a model returning (logits, state); fits `train_loop`'s loss_fn.

    Targets equal to -100 are ignored (F.cross_entropy's ignore_index): a masked-token task scores
    only its masked positions with the same function.
    """
    logits, _ = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))  # (B*T, V) vs (B*T,)


@torch.no_grad()
def text_loss(model: nn.Module, data: torch.Tensor, *, batch_size: int = 16, block_size: int = 256) -> float:
    """Mean next-token cross-entropy over a whole text, every position scored once.

    The text is read as `batch_size` parallel streams in chunks of `block_size`, carrying the state
    from chunk to chunk, so each prediction sees everything before it in its stream. The same
    deterministic evaluation for every model, unlike a sample of random windows.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = (len(data) - 1) // batch_size
    xs = data[: n * batch_size].view(batch_size, n)  # (B, n): stream b is data[b*n : (b+1)*n]
    ys = data[1: n * batch_size + 1].view(batch_size, n)  # (B, n): the next characters
    state, total = None, 0.0
    for start in range(0, n, block_size):
        logits, state = model(xs[:, start:start + block_size].to(device), state)  # (B, T, V)
        y = ys[:, start:start + block_size].to(device)  # (B, T)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
    model.train(was_training)
    return total / (n * batch_size)


# ----------------------------------------------------------------------------------------------
# Sampling with temperature
# ----------------------------------------------------------------------------------------------
def temperature_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) over the last axis; T = 0 means greedy (all mass on the argmax).

    T < 1 sharpens the distribution (safer, more repetitive text), T > 1 flattens it (more surprising).
    """
    if temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
    return torch.softmax(logits / temperature, dim=-1)


@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue each row of idx (B, T) by `max_new_tokens` sampled tokens, carrying the recurrent state.

    The prompt is read once; then each new token is fed alone with the state (no re-reading).
    """
    was_training = model.training
    model.eval()
    logits, state = model(idx)
    out = [idx]
    for _ in range(max_new_tokens):
        probs = temperature_probs(logits[:, -1], temperature)  # (B, V)
        nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        out.append(nxt)
        logits, state = model(nxt, state)
    model.train(was_training)
    return torch.cat(out, dim=1)


# ----------------------------------------------------------------------------------------------
# Measuring vanishing and exploding gradients
# ----------------------------------------------------------------------------------------------
def hidden_grad_norms(cell: nn.Module, x: torch.Tensor, state: State | None = None, *,
                      readout: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """||dL/dh_t|| for every step t of x (B, T, I), where L = readout(h_T) (default: the sum of h_T).

    Read it backwards: entry T-1-k is how much a change k steps before the end still moves L. With a
    trained model pass its real loss as `readout` (e.g. the cross-entropy of its head on h_T).
    Mean over the batch. Returns (T,).
    """
    state = cell.init_state(x.shape[0]) if state is None else state
    hs = []
    for t in range(x.shape[1]):
        state = cell(x[:, t], state)
        h = state[0] if isinstance(state, tuple) else state
        h.retain_grad()
        hs.append(h)
    (hs[-1].sum() if readout is None else readout(hs[-1])).backward()
    return torch.stack([h.grad.norm(dim=-1).mean() for h in hs])


def global_grad_norm(parameters: Iterable[torch.Tensor]) -> float:
    """The L2 norm of all gradients together (what clipping looks at)."""
    grads = [p.grad.detach().flatten() for p in parameters if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


# ----------------------------------------------------------------------------------------------
# A long-range dependency task: recall the first symbol after a delay
# ----------------------------------------------------------------------------------------------
def recall_batch(batch_size: int, delay: int, n_symbols: int = 8, n_distractors: int = 8, *,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences [s, d_1 .. d_delay, GO] with s in 0..n_symbols-1 and random distractors; target s.

    Token ids: symbols 0..K-1, distractors K..K+M-1, GO = K+M (vocabulary K+M+1). Chance is 1/K.
    Returns x (B, delay + 2) and y (B,).
    """
    K, M = n_symbols, n_distractors
    y = torch.randint(K, (batch_size,), generator=generator)
    noise = torch.randint(K, K + M, (batch_size, delay), generator=generator)
    go = torch.full((batch_size, 1), K + M)
    return torch.cat([y[:, None], noise, go], dim=1), y


class SequenceClassifier(nn.Module):
    """Many-to-one: embed tokens, run a recurrent layer, classify from the last hidden state."""

    def __init__(self, kind: str, vocab_size: int, n_classes: int, hidden_size: int = 64, n_embd: int = 16,
                 keep_bias: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, n_embd)
        self.rnn = TORCH_LAYERS[kind](n_embd, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, n_classes)
        if kind in ("lstm", "gru"):  # open the "keep" gate at init: LSTM forget gate f, GRU update gate z
            with torch.no_grad():
                self.rnn.bias_ih_l0[hidden_size:2 * hidden_size] += keep_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))  # (B, T, H)
        return self.head(out[:, -1])  # (B, n_classes)


def recall_classifier(kind: str, hidden_size: int, n_symbols: int = 8, keep_bias: float = 0.0) -> SequenceClassifier:
    """The model of the recall task: vocabulary of 2K+1 tokens (symbols, distractors, GO), K classes."""
    return SequenceClassifier(kind, 2 * n_symbols + 1, n_symbols, hidden_size, keep_bias=keep_bias)


def fit_recall(kind: str, delay: int, *, steps: int, batch_size: int = 64, hidden_size: int = 64, lr: float = 3e-3,
               clip: float = 1.0, n_symbols: int = 8, keep_bias: float = 0.0, seed: int = 0,
               device: torch.device | None = None) -> SequenceClassifier:
    """Train a recall classifier of `kind` with this delay: Adam with gradient clipping, fresh batches each step.

    `keep_bias` is added to the bias of the LSTM's forget gate or the GRU's update gate at init (0 is
    PyTorch's default); it has no meaning for the vanilla RNN.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = device or torch.device("cpu")
    model = recall_classifier(kind, hidden_size, n_symbols, keep_bias).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with one_cpu_thread(device):  # a model this small is latency-bound: one thread beats several fighting over cores
        for _ in range(steps):
            x, y = recall_batch(batch_size, delay, n_symbols, n_symbols, generator=gen)
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
    return model


@torch.no_grad()
def recall_accuracy(model: nn.Module, delay: int, *, n_symbols: int = 8, eval_size: int = 1000, seed: int = 1) -> float:
    """Accuracy on `eval_size` fresh sequences (the same ones for every model with the same seed)."""
    device = next(model.parameters()).device
    x, y = recall_batch(eval_size, delay, n_symbols, n_symbols, generator=torch.Generator().manual_seed(seed))
    return float((model(x.to(device)).argmax(-1).cpu() == y).float().mean())


def train_recall(kind: str, delay: int, *, steps: int, batch_size: int = 64, hidden_size: int = 64, lr: float = 3e-3,
                 clip: float = 1.0, n_symbols: int = 8, keep_bias: float = 0.0, eval_size: int = 1000,
                 seed: int = 0, device: torch.device | None = None) -> float:
    """`fit_recall`, then the test accuracy on `eval_size` fresh sequences."""
    model = fit_recall(kind, delay, steps=steps, batch_size=batch_size, hidden_size=hidden_size, lr=lr, clip=clip,
                       n_symbols=n_symbols, keep_bias=keep_bias, seed=seed, device=device)
    return recall_accuracy(model, delay, n_symbols=n_symbols, eval_size=eval_size, seed=seed + 1)


@torch.no_grad()
def lstm_gates(cell: LSTMCell, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gate activations of an LSTM cell along x (B, T, I): {"i", "f", "g", "o"} -> (B, T, H) each."""
    state = cell.init_state(x.shape[0])
    gates: dict[str, list[torch.Tensor]] = {k: [] for k in "ifgo"}
    for t in range(x.shape[1]):
        h, c = state
        i, f, g, o = (x[:, t] @ cell.W_x + h @ cell.W_h + cell.b).chunk(4, dim=-1)  # 4 x (B, H)
        for k, v in zip("ifgo", (i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid())):
            gates[k].append(v)
        state = cell(x[:, t], state)
    return {k: torch.stack(v, dim=1) for k, v in gates.items()}


# ----------------------------------------------------------------------------------------------
# Pictures for this week
# ----------------------------------------------------------------------------------------------
def plot_grad_norms(curves: dict[str, torch.Tensor], *, ax: plt.Axes | None = None, title: str = "") -> plt.Axes:
    """||dL/dh_t|| against distance from the end (log y), one line per label."""
    ax = ax or plt.subplots()[1]
    for label, norms in curves.items():
        norms = torch.as_tensor(norms).detach().flip(0)  # index k = k steps before the last one
        ax.plot(range(len(norms)), norms.clamp_min(1e-30), label=label)
    ax.set_yscale("log")
    ax.set_xlabel("distance k (steps back from the output)")
    ax.set_ylabel(r"$\|\partial L / \partial h_{T-k}\|$")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


def plot_accuracy_vs_delay(delays: list[int], accuracy: dict[str, list[float]], *, chance: float | None = None,
                           ax: plt.Axes | None = None) -> plt.Axes:
    """Test accuracy of each model against the delay of the recall task."""
    ax = ax or plt.subplots()[1]
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", "--"), ("P", ":")]  # overlapping curves stay visible
    for (label, acc), (marker, ls) in zip(accuracy.items(), styles * len(accuracy)):
        ax.plot(delays, acc, marker=marker, ls=ls, label=label)
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
    ax.set_xlabel("delay (distractor steps)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend()
    return ax


def _box(ax, xy, text, color, w=0.9, h=0.5):
    x, y = xy
    ax.add_patch(plt.Rectangle((x - w / 2, y - h / 2), w, h, facecolor=color, edgecolor="k", lw=1, zorder=3))
    ax.text(x, y, text, ha="center", va="center", fontsize=10, zorder=4)


def _node(ax, xy, text):
    ax.add_patch(plt.Circle(xy, 0.22, facecolor="white", edgecolor="k", lw=1, zorder=3))
    ax.text(*xy, text, ha="center", va="center", fontsize=11, zorder=4)


def _arrow(ax, a, b, color="k"):
    ax.annotate("", xy=b, xytext=a, arrowprops=dict(arrowstyle="->", color=color, lw=1.2, shrinkA=8, shrinkB=8), zorder=2)


def draw_gated_cell(kind: str = "lstm", ax: plt.Axes | None = None) -> plt.Axes:
    """A schematic of one LSTM or GRU step: gates (boxes), elementwise ops (circles), state paths (arrows)."""
    ax = ax or plt.subplots(figsize=(8, 4))[1]
    sig, tanh = "#ffd58a", "#9ecbff"
    if kind == "lstm":
        _arrow(ax, (0, 3), (2, 3), "C3"), _node(ax, (2, 3), "×"), _arrow(ax, (2, 3), (4, 3), "C3")
        _node(ax, (4, 3), "+"), _arrow(ax, (4, 3), (8, 3), "C3")
        ax.text(0, 3.25, r"$c_{t-1}$", fontsize=11), ax.text(7.6, 3.25, r"$c_t$", fontsize=11)
        gates = [(2, r"$f=\sigma$", sig), (3.3, r"$i=\sigma$", sig), (4.6, r"$g=\tanh$", tanh), (6, r"$o=\sigma$", sig)]
        for x, label, color in gates:
            _box(ax, (x, 1), label, color)
            _arrow(ax, (x, 0.2), (x, 0.75))
        _arrow(ax, (2, 1.25), (2, 2.78)), _node(ax, (4, 2), "×")
        _arrow(ax, (3.3, 1.25), (4, 2)), _arrow(ax, (4.6, 1.25), (4, 2)), _arrow(ax, (4, 2), (4, 2.78))
        _box(ax, (6.8, 2.3), "tanh", tanh, w=0.7, h=0.4), _arrow(ax, (6.8, 3.2), (6.8, 2.35))
        _node(ax, (7, 1.4), "×"), _arrow(ax, (6.8, 2.1), (7, 1.4)), _arrow(ax, (6, 1.25), (7, 1.4))
        _arrow(ax, (7, 1.4), (8, 1.4), "C0"), ax.text(7.6, 1.55, r"$h_t$", fontsize=11)
        ax.text(0, 0.0, r"$[x_t, h_{t-1}]$ feeds every gate", fontsize=10)
        ax.set_title("LSTM step:  $c_t = f\\odot c_{t-1} + i\\odot g$,   $h_t = o\\odot\\tanh(c_t)$")
    elif kind == "gru":
        _arrow(ax, (0, 3), (2.5, 3), "C0"), _node(ax, (2.5, 3), "×"), _arrow(ax, (2.5, 3), (5.5, 3), "C0")
        _node(ax, (5.5, 3), "+"), _arrow(ax, (5.5, 3), (8, 3), "C0")
        ax.text(0, 3.25, r"$h_{t-1}$", fontsize=11), ax.text(7.6, 3.25, r"$h_t$", fontsize=11)
        _box(ax, (2.5, 1.6), r"$z=\sigma$", sig), _arrow(ax, (2.5, 0.2), (2.5, 1.35)), _arrow(ax, (2.5, 1.85), (2.5, 2.78))
        _box(ax, (3.8, 0.7), r"$r=\sigma$", sig), _arrow(ax, (3.8, 0.2), (3.8, 0.45)), _node(ax, (4.7, 1.1), "×")
        _arrow(ax, (4.25, 0.7), (4.7, 1.1)), ax.text(4.95, 0.75, r"$r\odot(W_{hn}h_{t-1}+b_{hn})$", fontsize=9)
        _box(ax, (5.5, 1.7), r"$n=\tanh$", tanh), _arrow(ax, (4.7, 1.1), (5.5, 1.45))
        _node(ax, (5.5, 2.45), "×"), _arrow(ax, (5.5, 1.95), (5.5, 2.45)), _arrow(ax, (5.5, 2.45), (5.5, 2.78))
        _arrow(ax, (2.95, 1.75), (5.5, 2.45)), ax.text(2.65, 2.2, r"$z$", fontsize=10), ax.text(3.9, 2.25, r"$1-z$", fontsize=10)
        ax.text(0, 0.0, r"$[x_t, h_{t-1}]$ feeds every gate", fontsize=10)
        ax.set_title("GRU step:  $h_t = (1-z)\\odot n + z\\odot h_{t-1}$")
    else:
        raise ValueError(f"kind must be 'lstm' or 'gru', got {kind!r}")
    ax.set_xlim(-0.3, 8.3)
    ax.set_ylim(-0.3, 3.7)
    ax.set_aspect("equal")
    ax.axis("off")
    return ax
