"""Week 5 part B (notebooks 03-05): the checks of 5.6-5.10 fail on plausible wrong answers and pass correct
alternatives; quantization, GGUF decoding, distillation and the memory tricks match their references."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from course_utils import distill as D
from course_utils import quantize as Q

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# 5.6 / 5.7 absmax int8
# ----------------------------------------------------------------------------------------------
def int8_truncates(w):  # .to(int8) truncates toward zero instead of rounding
    scale = w.abs().max() / 127
    return (w / scale).to(torch.int8), scale


def int8_uses_max_not_absmax(w):
    scale = w.max() / 127
    scale = scale if scale != 0 else torch.tensor(1.0)
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale


def int8_scale_128(w):  # 128 levels: the largest weight overflows int8 and wraps to -128
    scale = w.abs().max() / 128
    return torch.round(w / scale).to(torch.int8), scale


def int8_returns_float_codes(w):
    scale = w.abs().max().clamp(min=1e-12) / 127
    return torch.round(w / scale), scale


def int8_zero_divides(w):  # forgets the all-zero tensor: 0 / 0 -> NaN codes
    scale = w.abs().max() / 127
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale


def int8_per_row_in_per_tensor(w):  # one scale per row where the task asks for one per tensor
    if w.dim() == 1:
        return per_channel_alt_loop(w[None])[0][0], per_channel_alt_loop(w[None])[1][0]
    rows = w.reshape(w.shape[0], -1)
    q, scale = per_channel_alt_loop(rows)
    return q.reshape(w.shape), scale.reshape(w.shape[0], *[1] * (w.dim() - 1))


def int8_alt_where(w):
    absmax = torch.max(torch.abs(w))
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones(()))
    return torch.clamp(torch.round(w * (1.0 / scale) * 1.0), -127, 127).to(torch.int8), scale


def int8_alt_numpy_style(w):
    m = float(w.abs().max())
    scale = m / 127 if m > 0 else 1.0
    return (w / scale).round().clamp(min=-127, max=127).char(), torch.tensor(scale)


def per_channel_over_columns(w):  # one scale per COLUMN (input feature)
    scale = w.abs().amax(dim=0, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale


def per_channel_one_scale(w):  # per-tensor scale repeated per row: same shape, wrong values
    scale = (w.abs().max() / 127).expand(w.shape[0], 1)
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale


def per_channel_flat_scale(w):  # right values, scale of shape (rows,): does not broadcast against w
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def per_channel_no_zero_row(w):
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale


def per_channel_alt_loop(w):
    qs, scales = [], []
    for row in w:
        m = row.abs().max()
        s = m / 127 if m > 0 else torch.tensor(1.0)
        qs.append(torch.round(row / s).clamp(-127, 127).to(torch.int8))
        scales.append(s.reshape(1))
    return torch.stack(qs), torch.stack(scales)


def per_channel_alt_norm(w):
    absmax = torch.linalg.vector_norm(w, ord=float("inf"), dim=1, keepdim=True)
    scale = absmax.clamp(min=torch.finfo(torch.float32).tiny) / 127
    scale = torch.where(absmax == 0, torch.ones_like(scale), scale)
    return (w / scale).round().clamp(-127, 127).to(torch.int8), scale


# ----------------------------------------------------------------------------------------------
# 5.8 group-wise 4-bit
# ----------------------------------------------------------------------------------------------
def _groups_of(w, gs):
    if not isinstance(gs, int) or gs < 1 or w.shape[-1] % gs:
        raise ValueError(f"group_size {gs} must divide the width {w.shape[-1]}")
    return w.reshape(*w.shape[:-1], w.shape[-1] // gs, gs)


def groups_symmetric(w, gs):  # absmax 4-bit around zero, stored as code + 8
    g = _groups_of(w, gs)
    scale = g.abs().amax(-1) / 7
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(g / scale[..., None]).clamp(-7, 7) + 8
    return q.to(torch.uint8).reshape(w.shape), scale, -8 * scale


def groups_16_levels(w, gs):  # (max - min) / 16: off by one level
    g = _groups_of(w, gs)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = torch.where(hi > lo, (hi - lo) / 16, torch.ones_like(hi))
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15)
    return q.to(torch.uint8).reshape(w.shape), scale, lo


def groups_over_columns(w, gs):  # groups run down the columns of a 2-D weight
    q, s, m = groups_alt_unflatten(w.transpose(-1, -2), gs)
    return q.transpose(-1, -2), s, m


def groups_floor(w, gs):
    g = _groups_of(w, gs)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi))
    q = torch.floor((g - lo[..., None]) / scale[..., None]).clamp(0, 15)
    return q.to(torch.uint8).reshape(w.shape), scale, lo


def groups_no_argument_check(w, gs):  # torch's reshape error instead of a clear ValueError
    g = w.reshape(*w.shape[:-1], -1, gs)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi))
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15)
    return q.to(torch.uint8).reshape(w.shape), scale, lo


def groups_row_minimum(w, gs):  # minimum of the whole row, scale per group
    g = _groups_of(w, gs)
    lo = w.amin(-1, keepdim=True).expand(*w.shape[:-1], g.shape[-2])
    hi = g.amax(-1)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi))
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15)
    return q.to(torch.uint8).reshape(w.shape), scale, lo


def groups_constant_nan(w, gs):  # a constant group divides 0 by 0
    g = _groups_of(w, gs)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15)
    return q.to(torch.uint8).reshape(w.shape), scale, lo


def groups_alt_unflatten(w, group_size):
    if not isinstance(group_size, int) or group_size <= 0 or w.shape[-1] % group_size != 0:
        raise ValueError("bad group size")
    g = w.unflatten(-1, (-1, group_size))
    lo = g.min(dim=-1).values
    span = g.max(dim=-1).values - lo
    scale = span / 15
    scale[span == 0] = 1.0
    q = ((g - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 15).to(torch.uint8)
    return q.flatten(-2), scale, lo


def groups_alt_2d_view(w, gs):
    if type(gs) is not int or gs < 1 or w.shape[-1] % gs:
        raise ValueError(f"{gs} does not divide {w.shape[-1]}")
    flat = w.reshape(-1, gs)  # (rows * G, gs)
    lo = flat.min(1, keepdim=True).values
    hi = flat.max(1, keepdim=True).values
    scale = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / 15.0)
    q = torch.clamp(torch.round((flat - lo) / scale), 0, 15).to(torch.uint8).reshape(w.shape)
    out_shape = (*w.shape[:-1], w.shape[-1] // gs)
    return q, scale.reshape(out_shape), lo.reshape(out_shape)


# ----------------------------------------------------------------------------------------------
# 5.9 distillation loss
# ----------------------------------------------------------------------------------------------
def kd_no_t_squared(s, t, T):
    p = F.softmax(t / T, -1)
    return (p * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).sum(-1).mean()


def kd_reversed(s, t, T):  # KL(student || teacher)
    q = F.softmax(s / T, -1)
    return T * T * (q * (F.log_softmax(s / T, -1) - F.log_softmax(t / T, -1))).sum(-1).mean()


def kd_mean_over_vocab(s, t, T):  # reduction="mean" divides by the vocabulary too
    p = F.softmax(t / T, -1)
    return T * T * (p * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).mean()


def kd_teacher_not_softened(s, t, T):
    p = F.softmax(t, -1)
    return T * T * (p * (F.log_softmax(t, -1) - F.log_softmax(s / T, -1))).sum(-1).mean()


def kd_sum_over_positions(s, t, T):
    p = F.softmax(t / T, -1)
    return T * T * (p * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).sum()


def kd_times_t(s, t, T):
    p = F.softmax(t / T, -1)
    return T * (p * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).sum(-1).mean()


def kd_naive_log(s, t, T):  # log(softmax) underflows to -inf for large logits
    p = F.softmax(t / T, -1)
    return T * T * (p * (torch.log(p) - torch.log(F.softmax(s / T, -1)))).sum(-1).mean()


def kd_alt_cross_entropy(s, t, T):  # KL = cross-entropy(p, q) - entropy(p)
    V = s.shape[-1]
    p = F.softmax(t.reshape(-1, V) / T, -1)
    ce = F.cross_entropy(s.reshape(-1, V) / T, p)
    ent = -(p * F.log_softmax(t.reshape(-1, V) / T, -1)).sum(-1).mean()
    return (ce - ent) * T ** 2


def kd_alt_logsumexp(s, t, T):
    ls = s / T - torch.logsumexp(s / T, -1, keepdim=True)
    lt = t / T - torch.logsumexp(t / T, -1, keepdim=True)
    per_pos = torch.sum(lt.exp() * (lt - ls), dim=-1)
    return per_pos.sum() / per_pos.numel() * T * T


# ----------------------------------------------------------------------------------------------
# 5.10 gradient accumulation
# ----------------------------------------------------------------------------------------------
def acc_no_scaling(model, opt, micro, loss_fn):  # sum of the micro-batch means
    opt.zero_grad()
    total = 0.0
    for x, y in micro:
        loss = loss_fn(model(x), y)
        loss.backward()
        total += loss.item()
    opt.step()
    return total / len(micro)


def acc_divide_by_count(model, opt, micro, loss_fn):  # right only when all micro-batches are equal
    opt.zero_grad()
    total = 0.0
    for x, y in micro:
        loss = loss_fn(model(x), y) / len(micro)
        loss.backward()
        total += loss.item()
    opt.step()
    return total


def acc_zero_inside(model, opt, micro, loss_fn):  # keeps only the last micro-batch's gradient
    n = sum(len(x) for x, _ in micro)
    total = 0.0
    for x, y in micro:
        opt.zero_grad()
        loss = loss_fn(model(x), y) * len(x) / n
        loss.backward()
        total += loss.item()
    opt.step()
    return total


def acc_no_zero_grad(model, opt, micro, loss_fn):  # stale gradients from before the call are added
    n = sum(len(x) for x, _ in micro)
    total = 0.0
    for x, y in micro:
        loss = loss_fn(model(x), y) * len(x) / n
        loss.backward()
        total += loss.item()
    opt.step()
    return total


def acc_step_each(model, opt, micro, loss_fn):  # an optimizer step per micro-batch
    n = sum(len(x) for x, _ in micro)
    total = 0.0
    for x, y in micro:
        opt.zero_grad()
        loss = loss_fn(model(x), y) * len(x) / n
        loss.backward()
        opt.step()
        total += loss.item()
    return total


def acc_alt_sum_then_divide(model, opt, micro, loss_fn):
    opt.zero_grad(set_to_none=True)
    n = 0
    total = 0.0
    for x, y in micro:
        loss = loss_fn(model(x), y) * x.shape[0]  # the micro-batch's summed loss
        loss.backward()
        n += x.shape[0]
        total += loss.item()
    for p in model.parameters():
        p.grad /= n
    opt.step()
    return total / n


def acc_alt_one_graph(model, opt, micro, loss_fn):
    for p in model.parameters():
        p.grad = None
    sizes = torch.tensor([float(len(x)) for x, _ in micro])
    losses = torch.stack([loss_fn(model(x), y) for x, y in micro])
    loss = (losses * sizes).sum() / sizes.sum()
    loss.backward()
    opt.step()
    return loss.item()


WRONG_IMPLEMENTATIONS = {
    "5.6": [int8_truncates, int8_uses_max_not_absmax, int8_scale_128, int8_returns_float_codes, int8_zero_divides,
            int8_per_row_in_per_tensor],
    "5.7": [per_channel_over_columns, per_channel_one_scale, per_channel_flat_scale, per_channel_no_zero_row,
            int8_alt_where],
    "5.8": [groups_symmetric, groups_16_levels, groups_over_columns, groups_floor, groups_no_argument_check,
            groups_row_minimum, groups_constant_nan],
    "5.9": [kd_no_t_squared, kd_reversed, kd_mean_over_vocab, kd_teacher_not_softened, kd_sum_over_positions,
            kd_times_t, kd_naive_log],
    "5.10": [acc_no_scaling, acc_divide_by_count, acc_zero_inside, acc_no_zero_grad, acc_step_each],
}
CORRECT_ALTERNATIVES = {
    "5.6": [int8_alt_where, int8_alt_numpy_style],
    "5.7": [per_channel_alt_loop, per_channel_alt_norm],
    "5.8": [groups_alt_unflatten, groups_alt_2d_view],
    "5.9": [kd_alt_cross_entropy, kd_alt_logsumexp],
    "5.10": [acc_alt_sum_then_divide, acc_alt_one_graph],
}


# ----------------------------------------------------------------------------------------------
# Unit tests of the package
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_absmax_error_is_at_most_half_a_step(bits, per_channel):
    w = torch.randn(16, 40)
    q, scale = Q.absmax_quantize(w, bits=bits, per_channel=per_channel)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and int(q.abs().max()) == qmax
    assert torch.all((Q.absmax_dequantize(q, scale) - w).abs() <= scale / 2 + 1e-7)


def test_more_bits_less_error_and_per_channel_beats_per_tensor():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 1, 32)[:, None]
    errs = [(Q.absmax_dequantize(*Q.absmax_quantize(w, bits=b)) - w).pow(2).mean() for b in (2, 4, 6, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    per_row = (Q.absmax_dequantize(*Q.absmax_quantize(w, per_channel=True)) - w).pow(2).mean()
    assert per_row < errs[-1] / 3  # the small rows no longer round to zero


@pytest.mark.parametrize("group_size", [4, 16, 64])
def test_groupwise_roundtrip_error_and_packing(group_size):
    w = torch.randn(3, 64)
    q, scale, minimum = Q.quantize_groupwise(w, group_size)
    assert q.dtype == torch.uint8 and q.shape == w.shape and scale.shape == (3, 64 // group_size)
    assert torch.all((Q.dequantize_groupwise(q, scale, minimum, group_size) - w).abs()
                     <= scale.repeat_interleave(group_size, -1) / 2 + 1e-6)
    packed = Q.pack_int4(q)
    assert packed.shape == (3, 32) and torch.equal(Q.unpack_int4(packed), q)


def test_groupwise_recovers_values_already_on_its_grid():
    codes = torch.randint(0, 16, (4, 32), dtype=torch.uint8)
    codes[:, 0], codes[:, 1] = 0, 15  # every group uses both ends of the grid
    w = codes.float() * 0.125 - 1.0
    q, s, m = Q.quantize_groupwise(w, 32)
    assert torch.equal(q, codes) and torch.allclose(Q.dequantize_groupwise(q, s, m, 32), w)


@pytest.mark.parametrize("call, message", [
    (lambda: Q.quantize_groupwise(torch.randn(2, 576), 40), "does not divide the width 576"),
    (lambda: Q.quantize_groupwise(torch.randn(2, 64), 0), "positive integer"),
    (lambda: Q.quantize_groupwise(torch.randn(2, 64), 32, bits=9), "bits must be"),
    (lambda: Q.absmax_quantize(torch.arange(6)), "floating-point"),
    (lambda: Q.absmax_quantize([1.0, 2.0]), "torch.Tensor"),
    (lambda: Q.absmax_quantize(torch.randn(5), per_channel=True), "at least 2-D"),
    (lambda: Q.absmax_quantize(torch.empty(0, 3)), "empty"),
    (lambda: Q.pack_int4(torch.tensor([1, 2, 3], dtype=torch.uint8)), "even"),
    (lambda: Q.QuantScheme(granularity="row"), "granularity"),
    (lambda: Q.quantize_model(nn.Linear(4, 4), "int8"), "QuantScheme"),
    (lambda: Q.quantize_model(nn.ReLU(), Q.QuantScheme()), "no nn.Linear"),
    (lambda: D.distillation_loss(torch.randn(2, 5), torch.randn(2, 6)), "same shape"),
    (lambda: D.distillation_loss(torch.randn(2, 5), torch.randn(2, 5), 0.0), "temperature"),
    (lambda: D.accumulation_step(nn.Linear(2, 2), None, [], F.mse_loss), "empty"),
])
def test_misuse_gets_a_clear_message(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


@pytest.mark.parametrize("scheme", [Q.QuantScheme(8, "tensor"), Q.QuantScheme(8, "channel"), Q.QuantScheme(4, "channel"),
                                    Q.QuantScheme(4, "group", 16), Q.QuantScheme(3, "group", 8)])
def test_quantize_model_matches_fake_quantized_weights(scheme):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    x = torch.randn(5, 32)
    expected_weights = []
    for m in (model[0], model[2]):
        w = m.weight.detach()
        if scheme.granularity == "group":
            q, s, mn = Q.quantize_groupwise(w, scheme.group_size, bits=scheme.bits)
            expected_weights.append(Q.dequantize_groupwise(q, s.half().float(), mn.half().float(), scheme.group_size))
        else:
            expected_weights.append(Q.absmax_dequantize(*Q.absmax_quantize(w, bits=scheme.bits,
                                                                           per_channel=scheme.granularity == "channel")))
    expected = F.linear(F.relu(F.linear(x, expected_weights[0], model[0].bias)), expected_weights[1], model[2].bias)
    before = Q.model_bytes(model)
    assert Q.quantize_model(model, scheme) == 2
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert Q.model_bytes(model) < before
    assert isinstance(model[0], Q.QuantLinear) and scheme.name in repr(model[0])
    if scheme.bits == 4:  # two codes per byte
        assert model[0].codes.numel() == model[0].in_features * model[0].out_features // 2


def test_model_bytes_counts_a_tied_weight_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert Q.model_bytes(nn.ModuleList([emb, head])) == 10 * 4 * 4


def test_distillation_loss_matches_kl_div_and_is_zero_for_equal_logits():
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    for T in (0.5, 1.0, 3.0):
        ref = F.kl_div(F.log_softmax(s.reshape(-1, 7) / T, -1), F.log_softmax(t.reshape(-1, 7) / T, -1),
                       log_target=True, reduction="batchmean") * T * T
        assert torch.allclose(D.distillation_loss(s, t, T), ref, atol=1e-6)
    assert float(D.distillation_loss(t, t.clone())) == pytest.approx(0.0, abs=1e-7)


def test_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    big, small = nn.Linear(5, 3), nn.Linear(5, 3)
    small.load_state_dict(big.state_dict())
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    opt_big, opt_small = torch.optim.SGD(big.parameters(), lr=0.5), torch.optim.SGD(small.parameters(), lr=0.5)
    opt_big.zero_grad()
    F.cross_entropy(big(x), y).backward()
    opt_big.step()
    D.accumulation_step(small, opt_small, [(x[:3], y[:3]), (x[3:], y[3:])], F.cross_entropy)
    for a, b in zip(big.parameters(), small.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_random_windows_are_reproducible_and_in_range():
    ids = torch.arange(100)
    a = D.random_windows(ids, seq_len=8, batch_size=3, steps=4, generator=torch.Generator().manual_seed(1))
    b = D.random_windows(ids, seq_len=8, batch_size=3, steps=4, generator=torch.Generator().manual_seed(1))
    assert len(a) == 4 and a[0].shape == (3, 8) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(w[:, 1:] - w[:, :-1], torch.ones(3, 7, dtype=torch.long)) for w in a)


def test_every_other_layer():
    assert D.every_other_layer(30) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 29]
    assert D.every_other_layer(5) == [0, 2, 4]


def test_dequantize_q4_1_decodes_a_handmade_block():
    d, m = np.float16(0.5), np.float16(-1.0)
    codes = np.arange(32) % 16
    qs = (codes[:16] | (codes[16:] << 4)).astype(np.uint8)  # code j low nibble, code j+16 high nibble
    raw = np.concatenate([np.frombuffer(d.tobytes(), np.uint8), np.frombuffer(m.tobytes(), np.uint8), qs])
    out = Q.dequantize_q4_1(raw, (1, 32))
    assert np.allclose(out[0], codes * 0.5 - 1.0)


# ----------------------------------------------------------------------------------------------
# With the real model (slow: they load SmolLM2 or its GGUF)
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gguf_q4_1_decoder_matches_gguf_and_the_cached_weights():
    import gguf.quants
    from safetensors import safe_open

    from course_utils import data

    t = Q.read_gguf_q4_1("blk.3.ffn_up.weight")
    ref = gguf.quants.dequantize(t["raw"], gguf.GGMLQuantizationType.Q4_1).reshape(t["shape"])
    assert np.array_equal(t["values"], ref)
    data.load_smollm2  # the cached safetensors were converted from this very file
    folder = data._smollm2_dir()
    with safe_open(folder / "model.safetensors", "pt") as f:
        w = f.get_tensor("model.layers.3.mlp.up_proj.weight")
    assert torch.equal(w, torch.from_numpy(t["values"]))
    assert t["n_bytes"] == w.numel() // 32 * 20


@pytest.mark.slow
def test_student_by_layer_dropping_runs_and_keeps_teacher_weights():
    from course_utils import data

    teacher, _ = data.load_smollm2()
    student = D.drop_layers(teacher, [0, 29])
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[29].mlp.up_proj.weight)
    assert student.model.layers[1].mlp.up_proj.weight is not teacher.model.layers[29].mlp.up_proj.weight
    x = torch.randint(0, 1000, (1, 6))
    with torch.no_grad():
        assert student(x).logits.shape == (1, 6, teacher.config.vocab_size)
        out = student.generate(x, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 8)
    with pytest.raises(ValueError, match="increasing"):
        D.drop_layers(teacher, [3, 1])


def test_intents_files_are_what_the_generator_writes(tmp_path):
    folder = ROOT / "datasets" / "intents"
    subprocess.run([sys.executable, str(folder / "make_intents.py"), "--out", str(tmp_path)], check=True)
    for split in ("train", "val", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (folder / f"{split}.jsonl").read_bytes()
    test = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    train = {json.loads(line)["text"] for line in (folder / "train.jsonl").read_text().splitlines()}
    assert len(test) >= 200 and not train & {ex["text"] for ex in test}
