"""Week 2 checks: RNN step, BPTT loss, gradient clipping, LSTM and GRU cells, temperature sampling.

Every expected value comes from PyTorch itself (nn.RNNCell/RNN, nn.LSTMCell, nn.GRUCell,
torch.nn.utils.clip_grad_norm_, F.softmax) loaded with the same weights, not from our reference.
The math convention of the exercises is row vectors (x @ W), so torch's weight_ih is W_x.T.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..exercises import Case, exercise, randn


@torch.no_grad()
def _load(module: nn.Module, W_x: torch.Tensor, W_h: torch.Tensor, b_x: torch.Tensor, b_h: torch.Tensor,
          sfx: str = "") -> nn.Module:
    """Copy row-vector weights (W_x (I, G*H)) into a torch RNN module (weight_ih (G*H, I))."""
    getattr(module, "weight_ih" + sfx).copy_(W_x.T)
    getattr(module, "weight_hh" + sfx).copy_(W_h.T)
    getattr(module, "bias_ih" + sfx).copy_(b_x)
    getattr(module, "bias_hh" + sfx).copy_(b_h)
    return module


# ----------------------------------------------------------------------------------------------
# 2.1 RNN cell step
# ----------------------------------------------------------------------------------------------
@exercise("2.1", "RNN cell step", reference="course_utils.rnn:rnn_cell_step",
          hint="h_t = tanh(x @ W_xh + h @ W_hh + b): x is (B, I), W_xh (I, H), W_hh (H, H), b (H,).")
def _rnn_cell_step():
    g = torch.Generator().manual_seed(21)
    for B, I, H, scale, name in [(1, 3, 4, 1.0, "batch of one"), (5, 7, 16, 0.5, "random"),
                                 (4, 1, 6, 0.5, "input size 1"), (3, 5, 8, 5.0, "large values (tanh saturates)"),
                                 (2, 6, 6, 0.5, "I == H (a transposed W_hh still has the right shape)")]:
        x, h = randn(g, B, I, scale=scale), randn(g, B, H)
        W_xh, W_hh, b = randn(g, I, H, scale=scale), randn(g, H, H, scale=scale), randn(g, H)
        cell = _load(nn.RNNCell(I, H), W_xh, W_hh, b, torch.zeros(H))
        with torch.no_grad():
            expected = cell(x, h)
        yield Case(f"{name}: x ({B}, {I}), h ({B}, {H})", args=(x, h, W_xh, W_hh, b), expected=expected)


# ----------------------------------------------------------------------------------------------
# 2.2 BPTT loss over a sequence
# ----------------------------------------------------------------------------------------------
def _bptt_expected(tokens, h0, W_xh, W_hh, b_h, W_hy, b_y):
    """Loss and final state from nn.RNN on one-hot inputs and an nn.Linear head."""
    V, H = W_xh.shape
    rnn = _load(nn.RNN(V, H, batch_first=True), W_xh, W_hh, b_h, torch.zeros(H), sfx="_l0")
    head = nn.Linear(H, W_hy.shape[1])
    with torch.no_grad():
        head.weight.copy_(W_hy.T), head.bias.copy_(b_y)
    x = F.one_hot(tokens[:, :-1], V).float()  # (B, T, V)
    out, h_T = rnn(x, h0[None])  # (B, T, H), (1, B, H)
    logits = head(out)  # (B, T, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    return loss, h_T[0], rnn


@exercise("2.2", "BPTT loss over a sequence", reference="course_utils.rnn:bptt_loss",
          hint="Inputs are tokens[:, :-1], targets tokens[:, 1:]; carry h from step to step; "
               "return (mean cross-entropy over all steps, last h).")
def _bptt_loss():
    g = torch.Generator().manual_seed(22)
    for B, T, V, H, scale, name, zero_h in [(1, 1, 5, 3, 0.5, "batch of one, one step", True),
                                            (4, 8, 11, 16, 0.5, "random", True),
                                            (3, 6, 7, 8, 0.5, "non-zero initial state", False),
                                            (2, 12, 6, 10, 3.0, "large weights", False)]:
        tokens = torch.randint(V, (B, T + 1), generator=g)
        h0 = torch.zeros(B, H) if zero_h else torch.randn(B, H, generator=g).tanh()
        params = (randn(g, V, H, scale=scale), randn(g, H, H, scale=scale / H ** 0.5 * 2), randn(g, H, scale=0.1),
                  randn(g, H, V, scale=scale), randn(g, V, scale=0.1))
        with torch.no_grad():
            loss, h_T, _ = _bptt_expected(tokens, h0, *params)
        yield Case(f"{name}: tokens ({B}, {T + 1}), vocabulary {V}, hidden {H}", args=(tokens, h0, *params),
                   expected=(loss, h_T), atol=1e-5)
    # The gradient must flow back through every step (no detach inside the loop).
    B, T, V, H = 3, 10, 6, 8
    tokens = torch.randint(V, (B, T + 1), generator=g)
    h0 = torch.zeros(B, H)
    params = [randn(g, V, H), randn(g, H, H, scale=0.7 / H ** 0.5 * 2), randn(g, H, scale=0.1),
              randn(g, H, V), randn(g, V, scale=0.1)]
    loss, _, rnn = _bptt_expected(tokens, h0, *params)
    loss.backward()
    expected_grad = rnn.weight_hh_l0.grad.T.clone()  # dL/dW_hh in the row-vector convention

    def run(fn, tokens=tokens, h0=h0, params=params):
        ps = [p.detach().clone().requires_grad_(True) for p in params]
        out = fn(tokens.clone(), h0.clone(), *ps)
        out[0].backward()
        return ps[1].grad if ps[1].grad is not None else torch.zeros_like(ps[1])

    yield Case(f"gradient dL/dW_hh through {T} steps (backpropagation through time)", run=run,
               expected=expected_grad, atol=1e-5,
               hint="The loss must stay differentiable through every step: do not detach h or call .item().")


# ----------------------------------------------------------------------------------------------
# 2.3 Gradient clipping by global norm
# ----------------------------------------------------------------------------------------------
def _grads(g: torch.Generator, shapes: list[tuple[int, ...]], scale: float) -> list[torch.Tensor | None]:
    return [None if s == () else randn(g, *s, scale=scale) for s in shapes]


def _clip_case(name: str, grads: list[torch.Tensor | None], max_norm: float, as_generator: bool = False) -> Case:
    def make():
        params = []
        for gr in grads:
            p = nn.Parameter(torch.zeros_like(gr) if gr is not None else torch.zeros(3))
            p.grad = gr.clone() if gr is not None else None
            params.append(p)
        return params

    ref_params = make()
    total = float(torch.nn.utils.clip_grad_norm_(ref_params, max_norm))
    expected = (total, [p.grad if p.grad is not None else torch.zeros(0) for p in ref_params])

    def run(fn):
        params = make()
        norm = fn(iter(params) if as_generator else params, max_norm)
        return norm, [p.grad if p.grad is not None else torch.zeros(0) for p in params]

    return Case(name, run=run, expected=expected, atol=1e-5, rtol=1e-4)


@exercise("2.3", "Gradient clipping by global norm", reference="course_utils.rnn:clip_grad_norm",
          hint="One norm over ALL gradients: sqrt(sum of every squared entry). If it exceeds max_norm, multiply "
               "every gradient by max_norm / (norm + 1e-6) in place; return the norm before clipping.")
def _clip_grad_norm():
    g = torch.Generator().manual_seed(23)
    yield _clip_case("three parameters, global norm far above max_norm=1", _grads(g, [(4, 3), (3,), (2, 2)], 3.0), 1.0)
    yield _clip_case("global norm below max_norm=100: gradients must stay unchanged",
                     _grads(g, [(5, 5), (5,)], 0.5), 100.0)
    yield _clip_case("one parameter, max_norm=0.5", _grads(g, [(6,)], 2.0), 0.5)
    yield _clip_case("each parameter below max_norm alone, together above it (max_norm=2.5)",
                     _grads(g, [(1,)] * 12, 1.0), 2.5)
    yield _clip_case("a parameter without a gradient (grad is None) is skipped", _grads(g, [(3, 3), (), (4,)], 2.0), 1.0)
    yield _clip_case("huge gradients (an explosion), max_norm=5", _grads(g, [(8, 8), (8,)], 1e4), 5.0)
    yield _clip_case("parameters passed as a generator, like model.parameters()", _grads(g, [(3, 2), (2,)], 4.0), 1.0,
                     as_generator=True)


# ----------------------------------------------------------------------------------------------
# 2.4 LSTM cell
# ----------------------------------------------------------------------------------------------
@exercise("2.4", "LSTM cell step", reference="course_utils.rnn:lstm_cell_step",
          hint="gates = x @ W_x + h @ W_h + b, split into i, f, g, o (PyTorch's order); "
               "c = sigmoid(f) * c + sigmoid(i) * tanh(g); h = sigmoid(o) * tanh(c); return (h, c).")
def _lstm_cell_step():
    g = torch.Generator().manual_seed(24)
    for B, I, H, scale, name in [(1, 3, 4, 0.5, "batch of one"), (5, 7, 16, 0.5, "random"),
                                 (3, 4, 1, 0.5, "hidden size 1"), (4, 6, 8, 4.0, "large values (gates saturate)"),
                                 (2, 5, 5, 1.0, "I == H")]:
        x, h, c = randn(g, B, I, scale=scale), randn(g, B, H).tanh(), randn(g, B, H, scale=2.0)
        W_x, W_h, b = randn(g, I, 4 * H, scale=scale), randn(g, H, 4 * H, scale=scale), randn(g, 4 * H)
        cell = _load(nn.LSTMCell(I, H), W_x, W_h, b, torch.zeros(4 * H))
        with torch.no_grad():
            expected = cell(x, (h, c))
        yield Case(f"{name}: x ({B}, {I}), h and c ({B}, {H})", args=(x, (h, c), W_x, W_h, b),
                   expected=tuple(expected))


# ----------------------------------------------------------------------------------------------
# 2.5 GRU cell
# ----------------------------------------------------------------------------------------------
@exercise("2.5", "GRU cell step", reference="course_utils.rnn:gru_cell_step",
          hint="Split x @ W_x + b_x and h @ W_h + b_h into r, z, n parts; r, z = sigmoid(x_r + h_r), sigmoid(x_z + h_z); "
               "n = tanh(x_n + r * h_n) (r multiplies h @ W_hn + b_hn); h_new = (1 - z) * n + z * h.")
def _gru_cell_step():
    g = torch.Generator().manual_seed(25)
    for B, I, H, scale, name in [(1, 3, 4, 0.5, "batch of one"), (5, 7, 16, 0.5, "random"),
                                 (3, 4, 1, 0.5, "hidden size 1"), (4, 6, 8, 4.0, "large values (gates saturate)"),
                                 (2, 5, 5, 1.0, "I == H")]:
        x, h = randn(g, B, I, scale=scale), randn(g, B, H).tanh()
        W_x, W_h = randn(g, I, 3 * H, scale=scale), randn(g, H, 3 * H, scale=scale)
        b_x, b_h = randn(g, 3 * H), randn(g, 3 * H)
        cell = _load(nn.GRUCell(I, H), W_x, W_h, b_x, b_h)
        with torch.no_grad():
            expected = cell(x, h)
        yield Case(f"{name}: x ({B}, {I}), h ({B}, {H})", args=(x, h, W_x, W_h, b_x, b_h), expected=expected)


# ----------------------------------------------------------------------------------------------
# 2.6 Temperature sampling
# ----------------------------------------------------------------------------------------------
@exercise("2.6", "Sampling distribution with temperature", reference="course_utils.rnn:temperature_probs",
          hint="Divide the logits by T, then softmax over the LAST axis (torch.softmax(logits / T, dim=-1)); "
               "for T == 0 put all the probability on the argmax (a one-hot vector).")
def _temperature_probs():
    g = torch.Generator().manual_seed(26)
    cases = [("one distribution (V,), T=1", (10,), 1.0, 1.0), ("batch (4, 10), T=0.5 sharpens", (4, 10), 0.5, 1.0),
             ("batch (3, 7), T=2 flattens", (3, 7), 2.0, 1.0), ("(B, T, V) = (2, 5, 6), T=0.7", (2, 5, 6), 0.7, 1.0),
             ("large logits (~1000), T=1: subtract the max or use torch.softmax", (3, 8), 1.0, 1000.0),
             ("tiny temperature T=1e-3: nearly greedy", (4, 9), 1e-3, 1.0)]
    for name, shape, T, scale in cases:
        logits = randn(g, *shape, scale=scale)
        yield Case(name, args=(logits, T), expected=F.softmax(logits / T, dim=-1), atol=1e-6)
    logits = randn(g, 5, 6)
    greedy = (logits == logits.max(dim=-1, keepdim=True).values).float()  # one-hot of the argmax (closed form)
    yield Case("T=0 means greedy: all mass on the argmax", args=(logits, 0.0), expected=greedy)
    logits = randn(g, 2, 5).double()
    yield Case("float64 logits keep their dtype", args=(logits, 0.8), expected=F.softmax(logits / 0.8, dim=-1))
