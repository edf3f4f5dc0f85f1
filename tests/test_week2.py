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


def _bptt(tokens, h, W_xh, W_hh, b_h, W_hy, b_y, *, carry=True, shift=1, reduce="mean", detach=False):
    h0 = h
    T = tokens.shape[1] - 1
    losses = []
    for t in range(T):
        prev = h if carry else h0
        prev = prev.detach() if detach else prev
        h = torch.tanh(W_xh[tokens[:, t]] + prev @ W_hh + b_h)
        losses.append(F.cross_entropy(h @ W_hy + b_y, tokens[:, t + shift]))
    loss = torch.stack(losses)
    return (loss.mean() if reduce == "mean" else loss.sum()), h


def bptt_not_carrying_h(*args):
    return _bptt(*args, carry=False)


def bptt_target_not_shifted(*args):
    return _bptt(*args, shift=0)


def bptt_sum_over_time(*args):
    return _bptt(*args, reduce="sum")


def bptt_detached_every_step(*args):
    return _bptt(*args, detach=True)


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


def _lstm(x, state, W_x, W_h, b, *, order="ifgo", tanh_c=True, forget=True):
    h, c = state
    parts = dict(zip(order, (x @ W_x + h @ W_h + b).chunk(4, dim=-1)))
    i, f, g, o = (parts[k] for k in "ifgo")
    c = (torch.sigmoid(f) * c if forget else c) + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * (torch.tanh(c) if tanh_c else c)
    return h, c


def lstm_gate_order_ifog(*args):
    return _lstm(*args, order="ifog")


def lstm_no_tanh_on_c(*args):
    return _lstm(*args, tanh_c=False)


def lstm_no_forget_gate(*args):
    return _lstm(*args, forget=False)


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


WRONG_IMPLEMENTATIONS = {
    "2.1": [rnn_sigmoid, rnn_no_bias, rnn_transposed_W_hh, rnn_forgets_h],
    "2.2": [bptt_not_carrying_h, bptt_target_not_shifted, bptt_sum_over_time, bptt_detached_every_step],
    "2.3": [clip_per_parameter, clip_always, clip_returns_clipped_norm, clip_without_sqrt],
    "2.4": [lstm_gate_order_ifog, lstm_no_tanh_on_c, lstm_no_forget_gate],
    "2.5": [gru_reset_outside_W_hn, gru_z_swapped, gru_hidden_bias_outside_reset],
    "2.6": [temperature_multiplied, temperature_softmax_dim0, temperature_naive_exp, temperature_zero_not_handled],
}



def test_week2_exercises_registered():
    from course_utils import list_exercises

    assert list_exercises(2) == ["2.1", "2.2", "2.3", "2.4", "2.5", "2.6"]


# ----------------------------------------------------------------------------------------------
# The concept module against PyTorch
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("layers", [1, 2])
def test_recurrent_matches_torch(kind, layers):
    torch.manual_seed(0)
    ref = rnn.TORCH_LAYERS[kind](5, 7, layers, batch_first=True)
    ours = rnn.Recurrent(kind, 5, 7, layers).load_torch(ref)
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


def test_charlm_scratch_matches_fused():
    torch.manual_seed(0)
    cfg = rnn.CharLMConfig(vocab_size=11, kind="lstm", n_embd=8, hidden_size=12, n_layers=2)
    fused = rnn.CharLM(cfg)
    scratch = rnn.CharLM(rnn.CharLMConfig(**{**cfg.__dict__, "from_scratch": True}))
    scratch.load_state_dict(fused.state_dict(), strict=False)
    scratch.rnn.load_torch(fused.rnn)
    idx = torch.randint(11, (2, 9))
    torch.testing.assert_close(scratch(idx)[0], fused(idx)[0], atol=1e-5, rtol=1e-4)


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


def test_split_and_context_windows():
    data = torch.arange(50)
    train, val = text.train_val_split(data, 0.2)
    assert len(train) == 40 and len(val) == 10 and int(val[0]) == 40
    X, y = text.context_windows(data, 3)
    assert X.shape == (47, 3) and torch.equal(X[0], torch.tensor([0, 1, 2])) and int(y[0]) == 3
    assert torch.equal(y, X[:, -1] + 1)
