"""Week 2 checks: RNN step, BPTT loss, gradient clipping, LSTM and GRU cells, temperature sampling,
a bidirectional RNN layer.

Every expected value comes from PyTorch itself (nn.RNNCell/RNN, nn.LSTMCell, nn.GRUCell,
torch.nn.utils.clip_grad_norm_, F.softmax) loaded with the same weights, never from our reference,
and is computed lazily (`expected=lambda: ...`) by the trusted checker. The math convention of the
exercises is row vectors (x @ W), so torch's weight_ih is W_x.T.

The cell exercises are also checked *backwards*: a harness backpropagates a random upstream gradient
through the learner's output and compares every input's gradient with torch.autograd on torch's cell,
so a detached, `.item()`-ed or rebuilt output fails at the exercise that caused it, not two exercises later.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..exercises import Case, case_rng, exercise, randn

_DETACHED_HINT = ("The output must stay connected to the autograd graph of the inputs: no .detach(), .item(), "
                  "torch.no_grad(), .data, or new tensors built from values (torch.tensor(...), numpy).")


# ----------------------------------------------------------------------------------------------
# Helpers: weights into torch modules, and a harness that returns outputs and input gradients
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def _load(module: nn.Module, W_x: torch.Tensor, W_h: torch.Tensor, b_x: torch.Tensor, b_h: torch.Tensor,
          sfx: str = "") -> nn.Module:
    """Copy row-vector weights (W_x (I, G*H)) into a torch RNN module (weight_ih (G*H, I))."""
    getattr(module, "weight_ih" + sfx).copy_(W_x.T)
    getattr(module, "weight_hh" + sfx).copy_(W_h.T)
    getattr(module, "bias_ih" + sfx).copy_(b_x)
    getattr(module, "bias_hh" + sfx).copy_(b_h)
    return module


def _flat(out) -> list:
    """A learner's output as a flat list: a tensor -> [tensor]; a (h, c) tuple -> [h, c]."""
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _forward_backward(fn: Callable, inputs: Sequence[torch.Tensor], pack: Callable[[list], tuple],
                      upstream: Sequence[torch.Tensor]) -> tuple:
    """Call fn(*pack(leaves)) on fresh copies of `inputs` (float ones require grad), backpropagate
    `upstream` (one tensor per output) and return (outputs..., gradient of each input...).

    Plain data only. A missing gradient (the output was detached) comes back as None, which the
    comparison reports against the expected tensor. Changing an input in place is an error.
    """
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    before = [t.detach().clone() for t in leaves]
    outs = _flat(fn(*pack(leaves)))
    for i, (leaf, old) in enumerate(zip(leaves, before)):
        if not torch.equal(leaf.detach(), old):
            raise RuntimeError(f"the function changed input number {i + 1} in place; build new tensors instead "
                               "(the caller still needs its inputs)")
    n_grads = sum(t.requires_grad for t in leaves)
    ok = (len(outs) == len(upstream)
          and all(isinstance(o, torch.Tensor) and o.shape == u.shape and o.is_floating_point()
                  for o, u in zip(outs, upstream)))
    if not ok:  # wrong type or shape: return the outputs as they are, the comparison explains
        return (*outs, *([None] * n_grads))
    values = tuple(o.detach() for o in outs)
    pairs = [(o, u.to(o.dtype)) for o, u in zip(outs, upstream) if o.requires_grad]
    wanted = [t for t in leaves if t.requires_grad]
    if not pairs:
        return (*values, *([None] * n_grads))
    grads = torch.autograd.grad([o for o, _ in pairs], wanted, [u for _, u in pairs], allow_unused=True)
    return (*values, *grads)


def _grad_names(outputs: Sequence[str], inputs: Sequence[str]) -> tuple[str, ...]:
    return (*outputs, *(f"the gradient of {name}" for name in inputs))


# ----------------------------------------------------------------------------------------------
# 2.1 RNN cell step
# ----------------------------------------------------------------------------------------------
_RNN_FORBID = ("torch.nn.RNNCell", "torch.nn.RNN", "torch.rnn_tanh_cell", "torch.rnn_tanh",
               "torch.nn.functional.rnn_tanh_cell")


def _torch_rnn_step(x, h, W_xh, W_hh, b, upstream=None):
    """nn.RNNCell with our weights: the new h, and (with `upstream`) the gradients of x, h, W_xh, W_hh, b."""
    I, H = W_xh.shape
    cell = _load(nn.RNNCell(I, H), W_xh, W_hh, b, torch.zeros(H))
    x, h = x.clone().requires_grad_(True), h.clone().requires_grad_(True)
    out = cell(x, h)
    if upstream is None:
        return out.detach()
    out.backward(upstream)
    return (out.detach(), x.grad, h.grad, cell.weight_ih.grad.T, cell.weight_hh.grad.T, cell.bias_ih.grad)


@exercise("2.1", "RNN cell step", reference="course_utils.rnn:rnn_cell_step", forbid=_RNN_FORBID,
          hint="h_t = tanh(x @ W_xh + h @ W_hh + b): x is (B, I), W_xh (I, H), W_hh (H, H), b (H,).")
def _rnn_cell_step():
    g = case_rng(21)
    for B, I, H, scale, name in [(1, 3, 4, 1.0, "batch of one"), (5, 7, 16, 0.5, "random"),
                                 (4, 1, 6, 0.5, "input size 1"), (3, 5, 8, 5.0, "large values (tanh saturates)"),
                                 (2, 6, 6, 0.5, "I == H (a transposed W_hh still has the right shape)")]:
        x, h = randn(g, B, I, scale=scale), randn(g, B, H)
        W_xh, W_hh, b = randn(g, I, H, scale=scale), randn(g, H, H, scale=scale), randn(g, H)
        yield Case(f"{name}: x ({B}, {I}), h ({B}, {H})", args=(x, h, W_xh, W_hh, b),
                   expected=lambda a=(x, h, W_xh, W_hh, b): _torch_rnn_step(*a), names="the new hidden state h")
    # Backwards: the gradient must reach every input (notebook 01 trains with these gradients).
    for B, I, H, name in [(3, 4, 5, "x (3, 4), h (3, 5)"), (1, 6, 6, "batch of one, I == H")]:
        inputs = (randn(g, B, I), randn(g, B, H), randn(g, I, H, scale=0.5), randn(g, H, H, scale=0.5), randn(g, H))
        up = randn(g, B, H)
        yield Case(f"gradients: backpropagate a random upstream gradient through h_new; {name}",
                   run=lambda fn, a=inputs, u=up: _forward_backward(fn, a, tuple, [u]),
                   expected=lambda a=inputs, u=up: _torch_rnn_step(*a, upstream=u),
                   names=_grad_names(["the new hidden state h"], ["x", "h", "W_xh", "W_hh", "b"]),
                   hint=_DETACHED_HINT)


# ----------------------------------------------------------------------------------------------
# 2.2 BPTT loss over a sequence
# ----------------------------------------------------------------------------------------------
def _bptt_expected(tokens, h0, W_xh, W_hh, b_h, W_hy, b_y, *, grads: bool = False):
    """Loss and final state from nn.RNN on one-hot inputs and an nn.Linear head (and every gradient)."""
    V, H = W_xh.shape
    rnn = _load(nn.RNN(V, H, batch_first=True), W_xh, W_hh, b_h, torch.zeros(H), sfx="_l0")
    head = nn.Linear(H, W_hy.shape[1])
    with torch.no_grad():
        head.weight.copy_(W_hy.T), head.bias.copy_(b_y)
    h0 = h0.clone().requires_grad_(True)
    x = F.one_hot(tokens[:, :-1], V).float()  # (B, T, V)
    out, h_T = rnn(x, h0[None])  # (B, T, H), (1, B, H)
    logits = head(out)  # (B, T, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    if not grads:
        return loss.detach(), h_T[0].detach()
    loss.backward()
    return (loss.detach(), h_T[0].detach(), h0.grad, rnn.weight_ih_l0.grad.T, rnn.weight_hh_l0.grad.T,
            rnn.bias_ih_l0.grad, head.weight.grad.T, head.bias.grad)


_BPTT_INPUTS = ["h0", "W_xh", "W_hh", "b_h", "W_hy", "b_y"]


@exercise("2.2", "BPTT loss over a sequence", reference="course_utils.rnn:bptt_loss", forbid=_RNN_FORBID,
          hint="Inputs are tokens[:, :-1], targets tokens[:, 1:]; carry h from step to step; "
               "return (mean cross-entropy over all steps, last h).")
def _bptt_loss():
    g = case_rng(22)
    for B, T, V, H, scale, name, zero_h in [(1, 1, 5, 3, 0.5, "batch of one, one step", True),
                                            (4, 8, 11, 16, 0.5, "random", True),
                                            (3, 6, 7, 8, 0.5, "non-zero initial state", False),
                                            (2, 12, 6, 10, 3.0, "large weights", False)]:
        tokens = torch.randint(V, (B, T + 1), generator=g)
        h0 = torch.zeros(B, H) if zero_h else torch.randn(B, H, generator=g).tanh()
        params = (randn(g, V, H, scale=scale), randn(g, H, H, scale=scale / H ** 0.5 * 2), randn(g, H, scale=0.1),
                  randn(g, H, V, scale=scale), randn(g, V, scale=0.1))
        yield Case(f"{name}: tokens ({B}, {T + 1}), vocabulary {V}, hidden {H}", args=(tokens, h0, *params),
                   expected=lambda a=(tokens, h0, *params): _bptt_expected(*a), atol=1e-5,
                   names=("the mean loss", "the last hidden state h"))
    # The gradient must flow back through every step (no detach inside the loop) to every parameter.
    B, T, V, H = 3, 10, 6, 8
    tokens = torch.randint(V, (B, T + 1), generator=g)
    h0 = torch.randn(B, H, generator=g).tanh()
    params = (randn(g, V, H), randn(g, H, H, scale=0.7 / H ** 0.5 * 2), randn(g, H, scale=0.1),
              randn(g, H, V), randn(g, V, scale=0.1))

    def run(fn, tokens=tokens, h0=h0, params=params):
        ins = (h0, *params)
        return _forward_backward(fn, ins, lambda leaves: (tokens.clone(), *leaves), [torch.tensor(1.0), torch.zeros(B, H)])

    yield Case(f"gradients of the loss through {T} steps (backpropagation through time)", run=run,
               expected=lambda a=(tokens, h0, *params): _bptt_expected(*a, grads=True), atol=1e-5,
               names=_grad_names(["the mean loss", "the last hidden state h"], _BPTT_INPUTS),
               hint="The loss must stay differentiable through every step to every parameter and to h0: "
                    "do not detach h, call .item(), or use torch.no_grad() inside the loop.")


# ----------------------------------------------------------------------------------------------
# 2.3 Gradient clipping by global norm
# ----------------------------------------------------------------------------------------------
def _grads(g: torch.Generator, shapes: list[tuple[int, ...]], scale: float) -> list[torch.Tensor | None]:
    return [None if s == () else randn(g, *s, scale=scale) for s in shapes]


def _make_params(grads: list[torch.Tensor | None]) -> list[nn.Parameter]:
    params = []
    for gr in grads:
        p = nn.Parameter(torch.zeros_like(gr) if gr is not None else torch.zeros(3))
        p.grad = gr.clone() if gr is not None else None
        params.append(p)
    return params


def _after_clipping(params: list[nn.Parameter]) -> list:
    return [p.grad.detach().clone() if p.grad is not None else None for p in params]


def _torch_clip(grads: list[torch.Tensor | None], max_norm: float) -> tuple:
    params = _make_params(grads)
    total = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return (total, *_after_clipping(params))


def _clip_case(name: str, grads: list[torch.Tensor | None], max_norm: float, as_generator: bool = False) -> Case:
    def run(fn):
        params = _make_params(grads)
        weights = [p.detach().clone() for p in params]
        norm = fn(iter(params) if as_generator else params, max_norm)
        if any(not torch.equal(p.detach(), w) for p, w in zip(params, weights)):
            raise RuntimeError("the function changed a parameter's values; clipping changes only p.grad")
        return ((norm.detach() if isinstance(norm, torch.Tensor) else norm), *_after_clipping(params))

    names = ("the returned total norm (before clipping)",
             *(f"the gradient of parameter {i + 1} after clipping" for i in range(len(grads))))
    return Case(name, run=run, expected=lambda: _torch_clip(grads, max_norm), atol=1e-5, rtol=1e-4, names=names)


@exercise("2.3", "Gradient clipping by global norm", reference="course_utils.rnn:clip_grad_norm",
          # torch's clip_grad_norm_ is Python; what a call-watcher sees of it are its private foreach kernels.
          forbid=("torch.nn.utils.clip_grad_norm_", "torch.nn.utils.clip_grad_norm",
                  "torch.nn.utils.clip_grads_with_norm_", "torch.nn.utils.get_total_norm",
                  "torch._foreach_norm", "torch._foreach_mul_"),
          hint="One norm over ALL gradients: sqrt(sum of every squared entry). If it exceeds max_norm, multiply "
               "every gradient by max_norm / (norm + 1e-6) in place; return the norm before clipping.")
def _clip_grad_norm():
    g = case_rng(23)
    yield _clip_case("three parameters, global norm far above max_norm=1", _grads(g, [(4, 3), (3,), (2, 2)], 3.0), 1.0)
    yield _clip_case("global norm below max_norm=100: gradients must stay unchanged",
                     _grads(g, [(5, 5), (5,)], 0.5), 100.0)
    yield _clip_case("one parameter, max_norm=0.5", _grads(g, [(6,)], 2.0), 0.5)
    yield _clip_case("each parameter below max_norm alone, together above it (max_norm=2.5)",
                     _grads(g, [(1,)] * 12, 1.0), 2.5)
    yield _clip_case("a parameter without a gradient (grad is None) is skipped and stays None",
                     _grads(g, [(3, 3), (), (4,)], 2.0), 1.0)
    yield _clip_case("huge gradients (an explosion), max_norm=5", _grads(g, [(8, 8), (8,)], 1e4), 5.0)
    yield _clip_case("parameters passed as a generator, like model.parameters() (it can be read only once)",
                     _grads(g, [(3, 2), (2,)], 4.0), 1.0, as_generator=True)


# ----------------------------------------------------------------------------------------------
# 2.4 LSTM cell
# ----------------------------------------------------------------------------------------------
def _torch_lstm_step(x, h, c, W_x, W_h, b, upstream=None):
    I, H4 = W_x.shape
    cell = _load(nn.LSTMCell(I, H4 // 4), W_x, W_h, b, torch.zeros(H4))
    x, h, c = (t.clone().requires_grad_(True) for t in (x, h, c))
    h_new, c_new = cell(x, (h, c))
    if upstream is None:
        return h_new.detach(), c_new.detach()
    torch.autograd.backward([h_new, c_new], list(upstream))
    return (h_new.detach(), c_new.detach(), x.grad, h.grad, c.grad, cell.weight_ih.grad.T, cell.weight_hh.grad.T,
            cell.bias_ih.grad)


@exercise("2.4", "LSTM cell step", reference="course_utils.rnn:lstm_cell_step",
          forbid=("torch.nn.LSTMCell", "torch.nn.LSTM", "torch.lstm_cell", "torch.lstm",
                  "torch.nn.functional.lstm_cell"),
          hint="gates = x @ W_x + h @ W_h + b, split into i, f, g, o (PyTorch's order); "
               "c = sigmoid(f) * c + sigmoid(i) * tanh(g); h = sigmoid(o) * tanh(c); return (h, c).")
def _lstm_cell_step():
    g = case_rng(24)
    for B, I, H, scale, name in [(1, 3, 4, 0.5, "batch of one"), (5, 7, 16, 0.5, "random"),
                                 (3, 4, 1, 0.5, "hidden size 1"), (4, 6, 8, 4.0, "large values (gates saturate)"),
                                 (2, 5, 5, 1.0, "I == H")]:
        x, h, c = randn(g, B, I, scale=scale), randn(g, B, H).tanh(), randn(g, B, H, scale=2.0)
        W_x, W_h, b = randn(g, I, 4 * H, scale=scale), randn(g, H, 4 * H, scale=scale), randn(g, 4 * H)
        yield Case(f"{name}: x ({B}, {I}), h and c ({B}, {H})", args=(x, (h, c), W_x, W_h, b),
                   expected=lambda a=(x, h, c, W_x, W_h, b): _torch_lstm_step(*a),
                   names=("the new hidden state h", "the new cell state c"))
    B, I, H = 3, 4, 5
    inputs = (randn(g, B, I), randn(g, B, H).tanh(), randn(g, B, H), randn(g, I, 4 * H, scale=0.5),
              randn(g, H, 4 * H, scale=0.5), randn(g, 4 * H))
    up = (randn(g, B, H), randn(g, B, H))
    yield Case(f"gradients: backpropagate random upstream gradients through (h, c); x ({B}, {I}), h and c ({B}, {H})",
               run=lambda fn, a=inputs, u=up: _forward_backward(fn, a, lambda l: (l[0], (l[1], l[2]), *l[3:]), u),
               expected=lambda a=inputs, u=up: _torch_lstm_step(*a, upstream=u),
               names=_grad_names(["the new hidden state h", "the new cell state c"], ["x", "h", "c", "W_x", "W_h", "b"]),
               hint=_DETACHED_HINT)


# ----------------------------------------------------------------------------------------------
# 2.5 GRU cell
# ----------------------------------------------------------------------------------------------
def _torch_gru_step(x, h, W_x, W_h, b_x, b_h, upstream=None):
    I, H3 = W_x.shape
    cell = _load(nn.GRUCell(I, H3 // 3), W_x, W_h, b_x, b_h)
    x, h = x.clone().requires_grad_(True), h.clone().requires_grad_(True)
    out = cell(x, h)
    if upstream is None:
        return out.detach()
    out.backward(upstream)
    return (out.detach(), x.grad, h.grad, cell.weight_ih.grad.T, cell.weight_hh.grad.T, cell.bias_ih.grad,
            cell.bias_hh.grad)


@exercise("2.5", "GRU cell step", reference="course_utils.rnn:gru_cell_step",
          forbid=("torch.nn.GRUCell", "torch.nn.GRU", "torch.gru_cell", "torch.gru", "torch.nn.functional.gru_cell"),
          hint="Split x @ W_x + b_x and h @ W_h + b_h into r, z, n parts; r, z = sigmoid(x_r + h_r), sigmoid(x_z + h_z); "
               "n = tanh(x_n + r * h_n) (r multiplies h @ W_hn + b_hn); h_new = (1 - z) * n + z * h.")
def _gru_cell_step():
    g = case_rng(25)
    for B, I, H, scale, name in [(1, 3, 4, 0.5, "batch of one"), (5, 7, 16, 0.5, "random"),
                                 (3, 4, 1, 0.5, "hidden size 1"), (4, 6, 8, 4.0, "large values (gates saturate)"),
                                 (2, 5, 5, 1.0, "I == H")]:
        x, h = randn(g, B, I, scale=scale), randn(g, B, H).tanh()
        W_x, W_h = randn(g, I, 3 * H, scale=scale), randn(g, H, 3 * H, scale=scale)
        b_x, b_h = randn(g, 3 * H), randn(g, 3 * H)
        yield Case(f"{name}: x ({B}, {I}), h ({B}, {H})", args=(x, h, W_x, W_h, b_x, b_h),
                   expected=lambda a=(x, h, W_x, W_h, b_x, b_h): _torch_gru_step(*a), names="the new hidden state h")
    B, I, H = 3, 4, 5
    inputs = (randn(g, B, I), randn(g, B, H).tanh(), randn(g, I, 3 * H, scale=0.5), randn(g, H, 3 * H, scale=0.5),
              randn(g, 3 * H), randn(g, 3 * H))
    up = randn(g, B, H)
    yield Case(f"gradients: backpropagate a random upstream gradient through h_new; x ({B}, {I}), h ({B}, {H})",
               run=lambda fn, a=inputs, u=up: _forward_backward(fn, a, tuple, [u]),
               expected=lambda a=inputs, u=up: _torch_gru_step(*a, upstream=u),
               names=_grad_names(["the new hidden state h"], ["x", "h", "W_x", "W_h", "b_x", "b_h"]),
               hint=_DETACHED_HINT)


# ----------------------------------------------------------------------------------------------
# 2.6 Temperature sampling
# ----------------------------------------------------------------------------------------------
def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """One-hot of the argmax in the logits' dtype (closed form; random logits have no ties)."""
    return (logits == logits.max(dim=-1, keepdim=True).values).to(logits.dtype)


@exercise("2.6", "Sampling distribution with temperature", reference="course_utils.rnn:temperature_probs",
          hint="Divide the logits by T, then softmax over the LAST axis (torch.softmax(logits / T, dim=-1)); "
               "for T == 0 put all the probability on the argmax (a one-hot vector). Both branches return "
               "the dtype of the logits.")
def _temperature_probs():
    g = case_rng(26)
    cases = [("one distribution (V,), T=1", (10,), 1.0, 1.0), ("batch (4, 10), T=0.5 sharpens", (4, 10), 0.5, 1.0),
             ("batch (3, 7), T=2 flattens", (3, 7), 2.0, 1.0), ("(B, T, V) = (2, 5, 6), T=0.7", (2, 5, 6), 0.7, 1.0),
             ("large logits (~1000), T=1: subtract the max or use torch.softmax", (3, 8), 1.0, 1000.0),
             ("tiny temperature T=1e-3: nearly greedy", (4, 9), 1e-3, 1.0)]
    names = "the probabilities"
    for name, shape, T, scale in cases:
        logits = randn(g, *shape, scale=scale)
        yield Case(name, args=(logits, T), expected=lambda l=logits, T=T: F.softmax(l / T, dim=-1), atol=1e-6,
                   names=names)
    logits = randn(g, 5, 6)
    yield Case("T=0 means greedy: all mass on the argmax, float32 logits -> float32 one-hot", args=(logits, 0.0),
               expected=lambda l=logits: _greedy(l), names=names)
    logits = randn(g, 2, 3, 7)
    yield Case("T=0 on (B, T, V) = (2, 3, 7): one-hot over the last axis", args=(logits, 0),
               expected=lambda l=logits: _greedy(l), names=names)
    logits = randn(g, 2, 5).double()
    yield Case("float64 logits keep their dtype (T=0.8)", args=(logits, 0.8),
               expected=lambda l=logits: F.softmax(l / 0.8, dim=-1), names=names)
    logits = randn(g, 3, 5).double()
    yield Case("float64 logits keep their dtype on the greedy branch too (T=0)", args=(logits, 0.0),
               expected=lambda l=logits: _greedy(l), names=names,
               hint="The one-hot of the greedy branch must have the logits' dtype: .to(logits.dtype).")


# ----------------------------------------------------------------------------------------------
# 2.7 A bidirectional RNN layer
# ----------------------------------------------------------------------------------------------
def _torch_birnn(x, fwd, bwd, upstream=None):
    """nn.RNN(bidirectional=True) with our row-vector weights: outputs (B, T, 2H) (and every gradient)."""
    (W_f, U_f, b_f), (W_b, U_b, b_b) = fwd, bwd
    I, H = W_f.shape
    layer = nn.RNN(I, H, batch_first=True, bidirectional=True)
    _load(layer, W_f, U_f, b_f, torch.zeros(H), sfx="_l0")
    _load(layer, W_b, U_b, b_b, torch.zeros(H), sfx="_l0_reverse")
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    if upstream is None:
        return out.detach()
    out.backward(upstream)
    grads = [x.grad]
    for sfx in ("_l0", "_l0_reverse"):
        grads += [getattr(layer, "weight_ih" + sfx).grad.T, getattr(layer, "weight_hh" + sfx).grad.T,
                  getattr(layer, "bias_ih" + sfx).grad]
    return (out.detach(), *grads)


@exercise("2.7", "Bidirectional RNN layer", reference="course_utils.rnn:bidirectional_rnn",
          forbid=_RNN_FORBID + ("torch.nn.GRU", "torch.nn.LSTM"),
          hint="Run the cell left to right with fwd = (W_xh, W_hh, b) and right to left with bwd, both from h = 0; "
               "output[:, t] = cat(forward h at t, backward h at t), so the backward states must be put back "
               "in reading order before concatenating.")
def _bidirectional_rnn():
    g = case_rng(27)
    for B, T, I, H, name in [(1, 1, 3, 4, "batch of one, length one"), (2, 5, 3, 4, "random"),
                             (3, 7, 6, 6, "I == H"), (1, 9, 2, 3, "batch of one, length 9")]:
        x = randn(g, B, T, I)
        fwd = (randn(g, I, H, scale=0.7), randn(g, H, H, scale=0.7), randn(g, H, scale=0.3))
        bwd = (randn(g, I, H, scale=0.7), randn(g, H, H, scale=0.7), randn(g, H, scale=0.3))
        yield Case(f"{name}: x ({B}, {T}, {I}), hidden {H} per direction", args=(x, fwd, bwd),
                   expected=lambda a=(x, fwd, bwd): _torch_birnn(*a),
                   names="the outputs (B, T, 2H): [forward h_t, backward h_t]")
    B, T, I, H = 2, 4, 3, 5
    x = randn(g, B, T, I)
    fwd = (randn(g, I, H, scale=0.7), randn(g, H, H, scale=0.7), randn(g, H, scale=0.3))
    bwd = (randn(g, I, H, scale=0.7), randn(g, H, H, scale=0.7), randn(g, H, scale=0.3))
    up = randn(g, B, T, 2 * H)
    yield Case(f"gradients: backpropagate a random upstream gradient through the outputs; x ({B}, {T}, {I})",
               run=lambda fn, a=(x, *fwd, *bwd), u=up: _forward_backward(
                   fn, a, lambda l: (l[0], tuple(l[1:4]), tuple(l[4:7])), [u]),
               expected=lambda u=up, a=(x, fwd, bwd): _torch_birnn(*a, upstream=u),
               names=_grad_names(["the outputs (B, T, 2H)"], ["x", "forward W_xh", "forward W_hh", "forward b",
                                                              "backward W_xh", "backward W_hh", "backward b"]),
               hint=_DETACHED_HINT)
