"""Week 2: every check rejects plausible wrong answers; the package's RNN pieces match PyTorch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_utils import rnn, text


# ----------------------------------------------------------------------------------------------
# Plausible wrong implementations, one list per exercise
# ----------------------------------------------------------------------------------------------
def rnn_sigmoid(x, h, W_xh, W_hh, b):
    return torch.sigmoid(x @ W_xh + h @ W_hh + b)


def rnn_no_bias(x, h, W_xh, W_hh, b):
    return torch.tanh(x @ W_xh + h @ W_hh)


def rnn_transposed_W_hh(x, h, W_xh, W_hh, b):
    return torch.tanh(x @ W_xh + h @ W_hh.T + b)


def rnn_forgets_h(x, h, W_xh, W_hh, b):
    return torch.tanh(x @ W_xh + b)


def rnn_detached(x, h, W_xh, W_hh, b):
    """Right values, but cut from the graph: BPTT (2.2) would then get no gradient."""
    return torch.tanh(x @ W_xh + h @ W_hh + b).detach()


def rnn_no_grad(x, h, W_xh, W_hh, b):
    with torch.no_grad():
        return torch.tanh(x @ W_xh + h @ W_hh + b)


def rnn_rebuilt_from_values(x, h, W_xh, W_hh, b):
    return torch.tensor(torch.tanh(x @ W_xh + h @ W_hh + b).tolist())


def rnn_in_place(x, h, W_xh, W_hh, b):
    """Overwrites the caller's h with the new state."""
    new = torch.tanh(x @ W_xh + h @ W_hh + b)
    with torch.no_grad():
        h.copy_(new)
    return new


def rnn_with_torch_cell(x, h, W_xh, W_hh, b):
    """Right values and gradients, but torch's RNN cell does the exercise."""
    return torch.rnn_tanh_cell(x, h, W_xh.T, W_hh.T, b, torch.zeros_like(b))


def _bptt(tokens, h, W_xh, W_hh, b_h, W_hy, b_y, *, carry=True, shift=1, reduce="mean", detach=False, item=False):
    h0 = h
    T = tokens.shape[1] - 1
    losses = []
    for t in range(T):
        prev = h if carry else h0
        prev = prev.detach() if detach else prev
        h = torch.tanh(W_xh[tokens[:, t]] + prev @ W_hh + b_h)
        losses.append(F.cross_entropy(h @ W_hy + b_y, tokens[:, t + shift]))
    loss = torch.stack(losses)
    loss = loss.mean() if reduce == "mean" else loss.sum()
    return (loss.item() if item else loss), h


def bptt_not_carrying_h(*args):
    return _bptt(*args, carry=False)


def bptt_target_not_shifted(*args):
    return _bptt(*args, shift=0)


def bptt_sum_over_time(*args):
    return _bptt(*args, reduce="sum")


def bptt_detached_every_step(*args):
    return _bptt(*args, detach=True)


def bptt_returns_item(*args):
    return _bptt(*args, item=True)


def bptt_with_torch_rnn(tokens, h, W_xh, W_hh, b_h, W_hy, b_y):
    x = F.one_hot(tokens[:, :-1], W_xh.shape[0]).to(W_xh.dtype)  # (B, T, V)
    out, h_T = torch.rnn_tanh(x, h[None], [W_xh.T, W_hh.T, b_h, torch.zeros_like(b_h)], True, 1, 0.0, False,
                              False, True)
    logits = out @ W_hy + b_y
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()), h_T[0]


def clip_per_parameter(parameters, max_norm):
    params = [p for p in parameters if p.grad is not None]
    for p in params:
        n = p.grad.norm()
        if n > max_norm:
            p.grad.mul_(max_norm / (n + 1e-6))
    return torch.sqrt(sum((p.grad ** 2).sum() for p in params))


def clip_always(parameters, max_norm):
    params = [p for p in parameters if p.grad is not None]
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    for p in params:
        p.grad.mul_(max_norm / (total + 1e-6))
    return total


def clip_returns_clipped_norm(parameters, max_norm):
    params = [p for p in parameters if p.grad is not None]
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    if total > max_norm:
        for p in params:
            p.grad.mul_(max_norm / (total + 1e-6))
    return torch.sqrt(sum((p.grad ** 2).sum() for p in params))


def clip_without_sqrt(parameters, max_norm):
    params = [p for p in parameters if p.grad is not None]
    total = sum((p.grad ** 2).sum() for p in params)
    if total > max_norm:
        for p in params:
            p.grad.mul_(max_norm / (total + 1e-6))
    return total


def clip_rebinds_a_local(parameters, max_norm):
    """Scales a local name, not the gradients: nothing changes."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.sqrt(sum((g ** 2).sum() for g in grads))
    if total > max_norm:
        for g in grads:
            g = g * (max_norm / (total + 1e-6))  # noqa: F841
    return total


def clip_reads_the_parameters_twice(parameters, max_norm):
    """Fine for a list; a generator (model.parameters()) is empty the second time."""
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in parameters if p.grad is not None))
    if total > max_norm:
        for p in parameters:
            if p.grad is not None:
                p.grad.mul_(max_norm / (total + 1e-6))
    return total


def clip_zero_fills_missing(parameters, max_norm):
    """Gives parameters without a gradient a zero gradient: they were meant to stay None."""
    params = list(parameters)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    if total > max_norm:
        for p in params:
            p.grad.mul_(max_norm / (total + 1e-6))
    return total


def clip_with_torch(parameters, max_norm):
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def _lstm(x, state, W_x, W_h, b, *, order="ifgo", tanh_c=True, forget=True, detach=False):
    h, c = state
    parts = dict(zip(order, (x @ W_x + h @ W_h + b).chunk(4, dim=-1)))
    i, f, g, o = (parts[k] for k in "ifgo")
    c = (torch.sigmoid(f) * c if forget else c) + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * (torch.tanh(c) if tanh_c else c)
    return (h.detach(), c.detach()) if detach else (h, c)


def lstm_gate_order_ifog(*args):
    return _lstm(*args, order="ifog")


def lstm_no_tanh_on_c(*args):
    return _lstm(*args, tanh_c=False)


def lstm_no_forget_gate(*args):
    return _lstm(*args, forget=False)


def lstm_detached(*args):
    return _lstm(*args, detach=True)


def lstm_in_place_c(x, state, W_x, W_h, b):
    h, c = state
    i, f, g, o = (x @ W_x + h @ W_h + b).chunk(4, dim=-1)
    c.mul_(torch.sigmoid(f)).add_(torch.sigmoid(i) * torch.tanh(g))  # overwrites the caller's c
    return torch.sigmoid(o) * torch.tanh(c), c


def lstm_with_torch_cell(x, state, W_x, W_h, b):
    return torch.lstm_cell(x, state, W_x.T, W_h.T, b, torch.zeros_like(b))


def _gru(x, h, W_x, W_h, b_x, b_h, *, reset_inside=True, swap_z=False, merged_bias=False):
    H = h.shape[-1]
    xr, xz, xn = (x @ W_x + b_x).chunk(3, dim=-1)
    hr, hz, hn = (h @ W_h + b_h).chunk(3, dim=-1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    if not reset_inside:  # the original paper's variant: reset h before multiplying by W_hn
        n = torch.tanh(xn + (r * h) @ W_h[:, 2 * H:] + b_h[2 * H:])
    elif merged_bias:
        n = torch.tanh(xn + b_h[2 * H:] + r * (h @ W_h[:, 2 * H:]))
    else:
        n = torch.tanh(xn + r * hn)
    return z * n + (1 - z) * h if swap_z else (1 - z) * n + z * h


def gru_reset_outside_W_hn(*args):
    return _gru(*args, reset_inside=False)


def gru_z_swapped(*args):
    return _gru(*args, swap_z=True)


def gru_hidden_bias_outside_reset(*args):
    return _gru(*args, merged_bias=True)


def gru_detached(*args):
    return _gru(*args).detach()


def gru_with_torch_cell(x, h, W_x, W_h, b_x, b_h):
    return torch.gru_cell(x, h, W_x.T, W_h.T, b_x, b_h)


def temperature_multiplied(logits, temperature):
    return torch.softmax(logits * temperature, dim=-1)


def temperature_softmax_dim0(logits, temperature):
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return torch.softmax(logits / temperature, dim=0)


def temperature_naive_exp(logits, temperature):
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    e = torch.exp(logits / temperature)
    return e / e.sum(-1, keepdim=True)


def temperature_zero_not_handled(logits, temperature):
    return torch.softmax(logits / temperature, dim=-1)


def temperature_greedy_long(logits, temperature):
    """The greedy branch returns one_hot's int64."""
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1])
    return torch.softmax(logits / temperature, dim=-1)


def temperature_greedy_float32(logits, temperature):
    """The greedy branch always returns float32, even for float64 logits."""
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits / temperature, dim=-1)


def temperature_greedy_flat_argmax(logits, temperature):
    """argmax over the flattened tensor: right for one distribution, wrong for a batch."""
    if temperature == 0:
        out = torch.zeros_like(logits)
        out.view(-1)[logits.argmax()] = 1.0
        return out
    return torch.softmax(logits / temperature, dim=-1)


def temperature_in_place(logits, temperature):
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    logits /= temperature  # changes the caller's logits
    return torch.softmax(logits, dim=-1)


def _birnn(x, fwd, bwd, *, unflip=True, same_weights=False, order="fb", carry_back_from_forward=False):
    B, T, _ = x.shape
    bwd = fwd if same_weights else bwd
    h_f, h_b = x.new_zeros(B, fwd[1].shape[0]), x.new_zeros(B, bwd[1].shape[0])
    outs_f, outs_b = [], []
    for t in range(T):
        h_f = rnn.rnn_cell_step(x[:, t], h_f, *fwd)
        outs_f.append(h_f)
    if carry_back_from_forward:
        h_b = h_f
    for t in reversed(range(T)):
        h_b = rnn.rnn_cell_step(x[:, t], h_b, *bwd)
        outs_b.append(h_b)
    f, b = torch.stack(outs_f, 1), torch.stack(outs_b[::-1] if unflip else outs_b, 1)
    return torch.cat([f, b] if order == "fb" else [b, f], dim=-1)


def birnn_backward_not_reordered(*args):
    return _birnn(*args, unflip=False)


def birnn_same_weights_both_ways(*args):
    return _birnn(*args, same_weights=True)


def birnn_backward_first(*args):
    return _birnn(*args, order="bf")


def birnn_backward_starts_from_forward_state(*args):
    return _birnn(*args, carry_back_from_forward=True)


def birnn_detached(x, fwd, bwd):
    return _birnn(x, fwd, bwd).detach()


def birnn_with_torch(x, fwd, bwd):
    out, _ = torch.rnn_tanh(x, x.new_zeros(2, x.shape[0], fwd[1].shape[0]),
                            [fwd[0].T, fwd[1].T, fwd[2], torch.zeros_like(fwd[2]),
                             bwd[0].T, bwd[1].T, bwd[2], torch.zeros_like(bwd[2])], True, 1, 0.0, False, True, True)
    return out


WRONG_IMPLEMENTATIONS = {
    "2.1": [rnn_sigmoid, rnn_no_bias, rnn_transposed_W_hh, rnn_forgets_h, rnn_detached, rnn_no_grad,
            rnn_rebuilt_from_values, rnn_in_place, rnn_with_torch_cell],
    "2.2": [bptt_not_carrying_h, bptt_target_not_shifted, bptt_sum_over_time, bptt_detached_every_step,
            bptt_returns_item, bptt_with_torch_rnn],
    "2.3": [clip_per_parameter, clip_always, clip_returns_clipped_norm, clip_without_sqrt, clip_rebinds_a_local,
            clip_reads_the_parameters_twice, clip_zero_fills_missing, clip_with_torch],
    "2.4": [lstm_gate_order_ifog, lstm_no_tanh_on_c, lstm_no_forget_gate, lstm_detached, lstm_in_place_c,
            lstm_with_torch_cell],
    "2.5": [gru_reset_outside_W_hn, gru_z_swapped, gru_hidden_bias_outside_reset, gru_detached, gru_with_torch_cell],
    "2.6": [temperature_multiplied, temperature_softmax_dim0, temperature_naive_exp, temperature_zero_not_handled,
            temperature_greedy_long, temperature_greedy_float32, temperature_greedy_flat_argmax, temperature_in_place],
    "2.7": [birnn_backward_not_reordered, birnn_same_weights_both_ways, birnn_backward_first,
            birnn_backward_starts_from_forward_state, birnn_detached, birnn_with_torch],
}


# ----------------------------------------------------------------------------------------------
# Correct answers written differently from the reference: every check must accept them
# ----------------------------------------------------------------------------------------------
def rnn_one_matmul(x, h, W_xh, W_hh, b):
    """[x, h] @ [W_xh; W_hh]: one product on the concatenation."""
    return torch.tanh(torch.cat([x, h], dim=-1) @ torch.cat([W_xh, W_hh], dim=0) + b)


def rnn_einsum_addmm(x, h, W_xh, W_hh, b):
    return torch.addmm(b, h, W_hh).add(torch.einsum("bi,ih->bh", x, W_xh)).tanh()


def bptt_all_states_then_one_loss(tokens, h, W_xh, W_hh, b_h, W_hy, b_y):
    """Collect every state, then one cross-entropy over (B*T, V)."""
    x = F.one_hot(tokens[:, :-1], W_xh.shape[0]).to(W_xh.dtype)  # (B, T, V)
    states = []
    for t in range(x.shape[1]):
        h = torch.tanh(x[:, t] @ W_xh + h @ W_hh + b_h)
        states.append(h)
    logits = torch.stack(states, dim=1) @ W_hy + b_y  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)), h


def bptt_log_softmax_sum(tokens, h, W_xh, W_hh, b_h, W_hy, b_y):
    """Sum of negative log-probabilities, divided by the number of predictions."""
    B, T1 = tokens.shape
    total = 0.0
    for t in range(T1 - 1):
        h = torch.tanh(W_xh.index_select(0, tokens[:, t]) + h @ W_hh + b_h)
        logp = torch.log_softmax(h @ W_hy + b_y, dim=-1)
        total = total - logp.gather(1, tokens[:, t + 1:t + 2]).sum()
    return total / (B * (T1 - 1)), h


def clip_with_clamped_coefficient(parameters, max_norm):
    """torch's formulation: always multiply by min(1, max_norm / (norm + 1e-6))."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)
    return total


def clip_by_reassigning_grad(parameters, max_norm):
    """Assign a new tensor to p.grad instead of scaling in place; return a Python float."""
    params = [p for p in parameters if p.grad is not None]
    total = math.sqrt(sum(float((p.grad * p.grad).sum()) for p in params))
    if total > max_norm:
        for p in params:
            p.grad = p.grad * (max_norm / (total + 1e-6))
    return total


def lstm_sliced_weights(x, state, W_x, W_h, b):
    h, c = state
    H = h.shape[-1]
    gate = lambda k: x @ W_x[:, k * H:(k + 1) * H] + h @ W_h[:, k * H:(k + 1) * H] + b[k * H:(k + 1) * H]  # noqa: E731
    i, f, g, o = torch.sigmoid(gate(0)), torch.sigmoid(gate(1)), torch.tanh(gate(2)), torch.sigmoid(gate(3))
    c_new = f * c + i * g
    return o * torch.tanh(c_new), c_new


def lstm_one_matmul_split(x, state, W_x, W_h, b):
    h, c = state
    z = torch.cat([x, h], -1) @ torch.cat([W_x, W_h], 0) + b  # (B, 4H)
    i, f, g, o = torch.split(z, h.shape[-1], dim=-1)
    c_new = torch.addcmul(torch.sigmoid(f) * c, torch.sigmoid(i), torch.tanh(g))
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def gru_sliced_weights(x, h, W_x, W_h, b_x, b_h):
    H = h.shape[-1]
    s = lambda k: slice(k * H, (k + 1) * H)  # noqa: E731
    r = torch.sigmoid(x @ W_x[:, s(0)] + b_x[s(0)] + h @ W_h[:, s(0)] + b_h[s(0)])
    z = torch.sigmoid(x @ W_x[:, s(1)] + b_x[s(1)] + h @ W_h[:, s(1)] + b_h[s(1)])
    n = torch.tanh(x @ W_x[:, s(2)] + b_x[s(2)] + r * (h @ W_h[:, s(2)] + b_h[s(2)]))
    return n + z * (h - n)


def gru_einsum(x, h, W_x, W_h, b_x, b_h):
    gx = torch.einsum("bi,ig->bg", x, W_x) + b_x  # (B, 3H)
    gh = torch.einsum("bh,hg->bg", h, W_h) + b_h  # (B, 3H)
    xr, xz, xn = gx.split(h.shape[-1], dim=-1)
    hr, hz, hn = gh.split(h.shape[-1], dim=-1)
    z = torch.sigmoid(xz + hz)
    return (1 - z) * torch.tanh(xn + torch.sigmoid(xr + hr) * hn) + z * h


def temperature_log_softmax_scatter(logits, temperature):
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return (logits / temperature).log_softmax(dim=-1).exp()


def temperature_manual_stable(logits, temperature):
    if temperature == 0:
        return (logits == logits.amax(-1, keepdim=True)).to(logits.dtype)
    z = logits / temperature
    e = (z - z.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def birnn_flip(x, fwd, bwd):
    """Run the backward direction on the flipped sequence, flip its outputs back."""
    def run(seq, W_xh, W_hh, b):
        h, outs = seq.new_zeros(seq.shape[0], W_hh.shape[0]), []
        for t in range(seq.shape[1]):
            h = torch.tanh(seq[:, t] @ W_xh + h @ W_hh + b)
            outs.append(h)
        return torch.stack(outs, 1)

    return torch.cat([run(x, *fwd), run(x.flip(1), *bwd).flip(1)], dim=-1)


def birnn_index_fill(x, fwd, bwd):
    """Write each direction's states into preallocated (B, T, H) tensors by index."""
    B, T, _ = x.shape
    H = fwd[1].shape[0]
    out_f, out_b = [None] * T, [None] * T
    h_f, h_b = x.new_zeros(B, H), x.new_zeros(B, H)
    for t in range(T):
        h_f = torch.tanh(x[:, t] @ fwd[0] + h_f @ fwd[1] + fwd[2])
        out_f[t] = h_f
        s = T - 1 - t
        h_b = torch.tanh(x[:, s] @ bwd[0] + h_b @ bwd[1] + bwd[2])
        out_b[s] = h_b
    return torch.stack([torch.cat([f, b], -1) for f, b in zip(out_f, out_b)], dim=1)


CORRECT_ALTERNATIVES = {
    "2.1": [rnn_one_matmul, rnn_einsum_addmm],
    "2.2": [bptt_all_states_then_one_loss, bptt_log_softmax_sum],
    "2.3": [clip_with_clamped_coefficient, clip_by_reassigning_grad],
    "2.4": [lstm_sliced_weights, lstm_one_matmul_split],
    "2.5": [gru_sliced_weights, gru_einsum],
    "2.6": [temperature_log_softmax_scatter, temperature_manual_stable],
    "2.7": [birnn_flip, birnn_index_fill],
}


def test_week2_exercises_registered():
    from course_utils import list_exercises

    assert list_exercises(2) == ["2.1", "2.2", "2.3", "2.4", "2.5", "2.6", "2.7"]


# ----------------------------------------------------------------------------------------------
# The concept module against PyTorch
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_recurrent_matches_torch(kind, layers, bidirectional):
    torch.manual_seed(0)
    ref = rnn.TORCH_LAYERS[kind](5, 7, layers, batch_first=True, bidirectional=bidirectional)
    ours = rnn.Recurrent(kind, 5, 7, layers, bidirectional).load_torch(ref)
    x = torch.randn(3, 6, 5)
    out_ref, state_ref = ref(x)
    out, state = ours(x)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state, state_ref, atol=1e-5, rtol=1e-4)
    out2_ref, _ = ref(x, state_ref)  # continuing from a carried state
    out2, _ = ours(x, state)
    torch.testing.assert_close(out2, out2_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_cells_match_torch_cells(kind):
    torch.manual_seed(1)
    ref = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}[kind](4, 6)
    ours = rnn.CELLS[kind](4, 6).load_torch(ref)
    x = torch.randn(2, 4)
    state = ours.init_state(2)
    torch.testing.assert_close(ours(x, state), ref(x, state))


@pytest.mark.parametrize("B, T", [(1, 1), (3, 6)])
def test_bidirectional_rnn_matches_torch(B, T):
    torch.manual_seed(2)
    ref = nn.RNN(4, 5, batch_first=True, bidirectional=True)
    w = {n: p.detach() for n, p in ref.named_parameters()}
    fwd = (w["weight_ih_l0"].T, w["weight_hh_l0"].T, w["bias_ih_l0"] + w["bias_hh_l0"])
    bwd = (w["weight_ih_l0_reverse"].T, w["weight_hh_l0_reverse"].T, w["bias_ih_l0_reverse"] + w["bias_hh_l0_reverse"])
    x = torch.randn(B, T, 4)
    torch.testing.assert_close(rnn.bidirectional_rnn(x, fwd, bwd), ref(x)[0])


def test_bidirectional_charlm_has_a_head_over_both_directions():
    model = rnn.CharLM(rnn.CharLMConfig(vocab_size=9, kind="gru", n_embd=4, hidden_size=6, bidirectional=True))
    logits, state = model(torch.randint(9, (2, 5)))
    assert logits.shape == (2, 5, 9) and state.shape == (2, 2, 6)


@pytest.mark.parametrize("kind", ["rnn", "gru"])
def test_hidden_size_for_matches_a_parameter_budget(kind):
    build = lambda h: rnn.recall_classifier(kind, h)  # noqa: E731
    target = rnn.count_parameters(rnn.recall_classifier("lstm", 64))
    h = rnn.hidden_size_for(target, build)
    counts = {k: rnn.count_parameters(build(k)) for k in (h - 1, h, h + 1)}
    assert abs(counts[h] - target) == min(abs(c - target) for c in counts.values())
    assert abs(counts[h] - target) / target < 0.02


def test_lstm_gates_rebuild_the_cell_state():
    torch.manual_seed(3)
    ref = nn.LSTM(3, 4, batch_first=True)
    cell = rnn.LSTMCell(3, 4).load_torch(ref)
    x = torch.randn(2, 5, 3)
    gates = rnn.lstm_gates(cell, x)
    assert set(gates) == set("ifgo") and gates["f"].shape == (2, 5, 4)
    c = torch.zeros(2, 4)
    for t in range(5):  # c_t = f * c_{t-1} + i * g, then h_t = o * tanh(c_t) must be torch's output
        c = gates["f"][:, t] * c + gates["i"][:, t] * gates["g"][:, t]
    out, (h_n, c_n) = ref(x)
    torch.testing.assert_close(c, c_n[0])
    torch.testing.assert_close(gates["o"][:, -1] * torch.tanh(c), out[:, -1])


def test_charlm_scratch_matches_fused():
    torch.manual_seed(0)
    cfg = rnn.CharLMConfig(vocab_size=11, kind="lstm", n_embd=8, hidden_size=12, n_layers=2)
    fused = rnn.CharLM(cfg)
    scratch = rnn.CharLM(rnn.CharLMConfig(**{**cfg.__dict__, "from_scratch": True}))
    scratch.load_state_dict(fused.state_dict(), strict=False)
    scratch.rnn.load_torch(fused.rnn)
    idx = torch.randint(11, (2, 9))
    torch.testing.assert_close(scratch(idx)[0], fused(idx)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batch_size, block_size", [(1, 1000), (1, 7), (3, 5)])
def test_text_loss_scores_every_position_once_with_the_state_carried(batch_size, block_size):
    torch.manual_seed(4)
    model = rnn.CharLM(rnn.CharLMConfig.tiny(9)).eval()
    data = torch.randint(9, (batch_size * 20 + 1,))
    n = (len(data) - 1) // batch_size
    expected = []
    for b in range(batch_size):  # each stream read in one piece from a zero state
        x, y = data[b * n:(b + 1) * n], data[b * n + 1:(b + 1) * n + 1]
        with torch.no_grad():
            expected.append(F.cross_entropy(model(x[None])[0][0], y, reduction="sum"))
    got = rnn.text_loss(model, data, batch_size=batch_size, block_size=block_size)
    assert got == pytest.approx(float(sum(expected)) / (n * batch_size), rel=1e-5)


def test_hidden_grad_norms_with_a_readout():
    torch.manual_seed(0)
    cell = rnn.GRUCell(3, 4)
    x = torch.randn(2, 5, 3)
    w = torch.randn(4)
    norms = rnn.hidden_grad_norms(cell, x, readout=lambda h: (h * w).sum())
    assert math.isclose(float(norms[-1]), float(w.norm()), rel_tol=1e-6)


def test_bptt_loss_of_a_uniform_model_is_log_v():
    V, H = 7, 4
    tokens = torch.randint(V, (3, 6))
    zeros = [torch.zeros(V, H), torch.zeros(H, H), torch.zeros(H), torch.zeros(H, V), torch.zeros(V)]
    loss, h = rnn.bptt_loss(tokens, torch.zeros(3, H), *zeros)
    assert math.isclose(float(loss), math.log(V), rel_tol=1e-6)


def test_generate_is_reproducible_and_greedy_is_deterministic():
    torch.manual_seed(0)
    model = rnn.CharLM(rnn.CharLMConfig.tiny(9))
    idx = torch.zeros(2, 1, dtype=torch.long)
    a = rnn.generate(model, idx, 12, generator=torch.Generator().manual_seed(3))
    b = rnn.generate(model, idx, 12, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 13) and torch.equal(a, b)
    g1 = rnn.generate(model, idx, 12, temperature=0.0, generator=torch.Generator().manual_seed(1))
    g2 = rnn.generate(model, idx, 12, temperature=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(g1, g2)


def test_generate_with_state_equals_rereading_the_prefix():
    torch.manual_seed(0)
    model = rnn.CharLM(rnn.CharLMConfig.tiny(9)).eval()
    out = rnn.generate(model, torch.tensor([[1, 2]]), 5, temperature=0.0)
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    assert torch.equal(logits.argmax(-1)[0, 1:], out[0, 2:])


def test_hidden_grad_norms_vanish_for_small_weights_and_explode_for_large():
    torch.manual_seed(0)
    x = torch.randn(4, 40, 3)
    norms = {}
    for scale in (0.5, 3.0):
        cell = rnn.RNNCell(3, 32)
        with torch.no_grad():
            cell.W_hh.copy_(scale * torch.randn(32, 32) / 32 ** 0.5)
        norms[scale] = rnn.hidden_grad_norms(cell, x)
    assert norms[0.5][0] < 1e-6 * norms[0.5][-1]
    assert norms[3.0][0] > 1e3 * norms[3.0][-1]


def test_hidden_grad_norms_match_autograd():
    torch.manual_seed(0)
    cell = rnn.LSTMCell(3, 5)
    x = torch.randn(2, 6, 3, requires_grad=True)
    norms = rnn.hidden_grad_norms(cell, x)
    assert norms.shape == (6,)
    assert math.isclose(float(norms[-1]), math.sqrt(5), rel_tol=1e-6)  # dL/dh_T is all ones


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(3, 3)) for _ in range(3)]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    for pa, pb in zip(a, b):
        pa.grad = torch.randn(3, 3) * 5
        pb.grad = pa.grad.clone()
    n_ours = rnn.clip_grad_norm(a, 1.0)
    n_ref = torch.nn.utils.clip_grad_norm_(b, 1.0)
    torch.testing.assert_close(n_ours, n_ref)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa.grad, pb.grad)
    assert math.isclose(rnn.global_grad_norm(a), 1.0, rel_tol=1e-4)


def test_recall_batch_layout():
    x, y = rnn.recall_batch(5, delay=7, n_symbols=4, n_distractors=3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 9) and y.shape == (5,)
    assert torch.equal(x[:, 0], y)
    assert ((x[:, 1:-1] >= 4) & (x[:, 1:-1] < 7)).all() and (x[:, -1] == 7).all()


def test_train_recall_learns_a_short_delay():
    assert rnn.train_recall("lstm", 2, steps=150, n_symbols=4, eval_size=200) > 0.9


# ----------------------------------------------------------------------------------------------
# The text pipeline
# ----------------------------------------------------------------------------------------------
def test_vocab_roundtrip_and_unknown_characters():
    v = text.CharVocab("hello world")
    assert v.decode(v.encode("low")) == "low" and len(v) == 8
    assert v.encode("dh").dtype == torch.long
    with pytest.raises(KeyError):
        v.encode("xyz")


def test_random_windows_are_shifted_by_one():
    data = torch.arange(100)
    x, y = text.random_windows(data, 4, 10, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 10)
    assert torch.equal(y, x + 1)


def test_stream_batches_continue_each_row():
    data = torch.arange(101)
    it = text.stream_batches(data, batch_size=2, block_size=5)
    x1, y1 = next(it)
    x2, _ = next(it)
    assert x1.shape == (2, 5) and torch.equal(y1, x1 + 1)
    assert torch.equal(x2[:, 0], x1[:, -1] + 1)  # row b of batch 2 continues row b of batch 1


def _play(names: list[str], speeches: int) -> str:
    return "".join(f"{names[i % len(names)]}:\nline {i} of a speech.\n\n" for i in range(speeches))


def test_held_out_play_split_finds_where_the_cast_changes():
    first = _play(["ROMEO", "JULIET", "NURSE", "SERVANT"], 400)
    second = _play(["PROSPERO", "MIRANDA", "ARIEL", "SERVANT"], 60)  # a shared generic role
    corpus = first + second
    cut = text.held_out_play_split(corpus, val_fraction=0.1, window=20)
    assert cut == len(first) and corpus[cut:].startswith("PROSPERO:")
    assert text.cast_overlap(corpus[:cut], corpus[cut:]) == pytest.approx(0.25)  # only SERVANT speaks in both
    assert text.speeches("A:\nhi\n\nB C:\nho\n") == [(0, "A"), (7, "B C")]


def test_masked_windows_hide_characters_and_score_only_the_blanks():
    data = torch.arange(3, 200)
    x, y = text.masked_windows(data, 8, 16, mask_id=0, mask_rate=0.3, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16)
    blank = y != -100
    assert blank.any() and (~blank).any()
    assert (x[blank] == 0).all() and (x[~blank] > 0).all()
    full = torch.where(blank, y, x)  # the blanks filled back in: consecutive windows of the data
    assert (full[:, 1:] - full[:, :-1] == 1).all()


def test_split_and_context_windows():
    data = torch.arange(50)
    train, val = text.train_val_split(data, 0.2)
    assert len(train) == 40 and len(val) == 10 and int(val[0]) == 40
    X, y = text.context_windows(data, 3)
    assert X.shape == (47, 3) and torch.equal(X[0], torch.tensor([0, 1, 2])) and int(y[0]) == 3
    assert torch.equal(y, X[:, -1] + 1)
