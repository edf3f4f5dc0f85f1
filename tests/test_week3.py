"""Week 3: every check fails on plausible wrong answers; the attention and seq2seq modules match torch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from course_utils import attention as A
from course_utils import seq2seq as S


# ----------------------------------------------------------------------------------------------
# Plausible wrong implementations, one list per exercise
# ----------------------------------------------------------------------------------------------
def additive_no_tanh(query, keys, W_q, W_k, v):
    return ((query @ W_q)[:, None, :] + keys @ W_k) @ v


def additive_tanh_outside(query, keys, W_q, W_k, v):
    return torch.tanh(((query @ W_q)[:, None, :] + keys @ W_k) @ v)


def additive_returns_softmax(query, keys, W_q, W_k, v):
    return torch.softmax(torch.tanh((query @ W_q)[:, None, :] + keys @ W_k) @ v, dim=-1)


def weights_mask_with_zero(scores, mask):
    if mask is not None:
        scores = scores.masked_fill(~mask, 0.0)
    return torch.softmax(scores, dim=-1)


def weights_wrong_axis(scores, mask):
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=0)


def weights_multiply_after_softmax(scores, mask):  # zeroes masked keys but forgets to renormalise
    w = torch.softmax(scores, dim=-1)
    return w if mask is None else w * mask


def weights_naive_exp(scores, mask):  # exp without subtracting the max: overflows on large scores
    e = torch.exp(scores)
    if mask is not None:
        e = e * mask
    return e / e.sum(-1, keepdim=True)


def sdpa_no_scale(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def sdpa_scale_by_dv(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(v.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def sdpa_softmax_over_queries(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -2).nan_to_num(0.0) @ v


def sdpa_mask_with_zero(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s * mask
    return torch.softmax(s, -1) @ v


def causal_upper(T, S=None):
    S = T if S is None else S
    return torch.ones(T, S, dtype=torch.bool).triu(diagonal=S - T)


def causal_no_diagonal(T, S=None):
    S = T if S is None else S
    return torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T - 1)


def causal_ignores_cache(T, S=None):
    S = T if S is None else S
    return torch.ones(T, S, dtype=torch.bool).tril()


def causal_float(T, S=None):
    S = T if S is None else S
    return torch.ones(T, S).tril(diagonal=S - T)


def _mha(x, w_in, b_in, w_out, b_out, n_head, mask, *, split, scale_by_c=False, out_proj=True):
    B, T, C = x.shape
    q, k, v = F.linear(x, w_in, b_in).chunk(3, dim=-1)
    q, k, v = (split(t, B, T, C, n_head) for t in (q, k, v))
    s = q @ k.transpose(-2, -1) / math.sqrt(C if scale_by_c else C // n_head)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    y = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, C)
    return F.linear(y, w_out, b_out) if out_proj else y


def _split_ok(t, B, T, C, nh):
    return t.view(B, T, nh, C // nh).transpose(1, 2)


def _split_no_transpose(t, B, T, C, nh):  # heads mixed up: reshape straight to (B, nh, T, hs)
    return t.reshape(B, nh, T, C // nh)


def mha_heads_mixed(x, w_in, b_in, w_out, b_out, n_head, mask=None):
    return _mha(x, w_in, b_in, w_out, b_out, n_head, mask, split=_split_no_transpose)


def mha_scale_by_model_width(x, w_in, b_in, w_out, b_out, n_head, mask=None):
    return _mha(x, w_in, b_in, w_out, b_out, n_head, mask, split=_split_ok, scale_by_c=True)


def mha_no_output_projection(x, w_in, b_in, w_out, b_out, n_head, mask=None):
    return _mha(x, w_in, b_in, w_out, b_out, n_head, mask, split=_split_ok, out_proj=False)


def mha_kqv_order(x, w_in, b_in, w_out, b_out, n_head, mask=None):
    C = x.shape[-1]
    perm = torch.cat([torch.arange(C, 2 * C), torch.arange(C), torch.arange(2 * C, 3 * C)])
    return _mha(x, w_in[perm], b_in[perm], w_out, b_out, n_head, mask, split=_split_ok)


def rope_interleaved(x, positions, base=10000.0):  # GPT-J layout: pairs (0,1), (2,3), ... not Llama's
    hs = x.shape[-1]
    theta = base ** (-torch.arange(0, hs, 2).float() / hs)
    ang = positions.float()[:, None] * theta
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], dim=-1)
    return out.flatten(-2)


def rope_wrong_frequencies(x, positions, base=10000.0):  # base^(-i/hs) instead of base^(-2i/hs)
    hs = x.shape[-1]
    theta = base ** (-torch.arange(hs // 2).float() / hs)
    ang = positions.float()[:, None] * theta
    ang = torch.cat([ang, ang], -1)
    return x * ang.cos() + A.rotate_half(x) * ang.sin()


def rope_ignores_positions(x, positions, base=10000.0):
    return A.rope(x, torch.arange(x.shape[-2]), base)


def rope_wrong_direction(x, positions, base=10000.0):
    cos, sin = A.rope_cos_sin(positions, x.shape[-1], base)
    return x * cos - A.rotate_half(x) * sin


WRONG_IMPLEMENTATIONS = {
    "3.1": [additive_no_tanh, additive_tanh_outside, additive_returns_softmax],
    "3.2": [weights_mask_with_zero, weights_wrong_axis, weights_multiply_after_softmax, weights_naive_exp],
    "3.3": [sdpa_no_scale, sdpa_scale_by_dv, sdpa_softmax_over_queries, sdpa_mask_with_zero],
    "3.4": [causal_upper, causal_no_diagonal, causal_ignores_cache, causal_float],
    "3.5": [mha_heads_mixed, mha_scale_by_model_width, mha_no_output_projection, mha_kqv_order],
    "3.6": [rope_interleaved, rope_wrong_frequencies, rope_ignores_positions, rope_wrong_direction],
}



def test_six_exercises_registered():
    from course_utils import list_exercises

    assert list_exercises(3) == ["3.1", "3.2", "3.3", "3.4", "3.5", "3.6"]


# ----------------------------------------------------------------------------------------------
# The attention module against torch
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("T", [1, 9])
def test_sdpa_matches_torch(masked, T):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, 3, T, 8, generator=g) for _ in range(3))
    mask = A.causal_mask(T) if masked else None
    out, w = A.scaled_dot_product_attention(q, k, v, mask, return_weights=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, T))


def test_causal_mask_matches_torch_is_causal():
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    torch.testing.assert_close(A.scaled_dot_product_attention(q, k, v, A.causal_mask(6)),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_padding_mask():
    m = A.padding_mask(torch.tensor([3, 1]), 4)
    assert m.tolist() == [[True, True, True, False], [True, False, False, False]]


def test_split_merge_roundtrip():
    x = torch.randn(2, 5, 12)
    h = A.split_heads(x, 3)
    assert h.shape == (2, 3, 5, 4)
    torch.testing.assert_close(h[:, 1], x[..., 4:8])  # head 1 owns channels 4..7
    torch.testing.assert_close(A.merge_heads(h), x)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_multihead_module_matches_torch(fused, causal):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    ours = A.MultiHeadAttention(16, 4, fused=fused).load_from_torch(mha)
    x = torch.randn(3, 7, 16)
    mask = A.causal_mask(7) if causal else None
    ref = mha(x, x, x, attn_mask=None if mask is None else ~mask, need_weights=False)[0]
    torch.testing.assert_close(ours(x, mask=mask), ref, atol=1e-5, rtol=1e-4)
    out, w = ours(x, mask=mask, return_weights=True)
    _, ref_w = mha(x, x, x, attn_mask=None if mask is None else ~mask, average_attn_weights=False)
    torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-4)


def test_cross_attention_shapes():
    mha = A.MultiHeadAttention(8, 2)
    assert mha(torch.randn(2, 3, 8), context=torch.randn(2, 5, 8)).shape == (2, 3, 8)


def test_rope_matches_transformers_llama():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    torch.manual_seed(0)
    B, nh, T, hs = 2, 3, 6, 16
    q, k = torch.randn(B, nh, T, hs), torch.randn(B, nh, T, hs)
    pos = torch.arange(4, 4 + T)
    cos, sin = A.rope_cos_sin(pos, hs)
    q_ref, k_ref = llama.apply_rotary_pos_emb(q, k, cos[None], sin[None])
    torch.testing.assert_close(A.rope(q, pos), q_ref)
    torch.testing.assert_close(A.rope(k, pos), k_ref)


def test_rope_relative_property():
    torch.manual_seed(0)
    q, k = torch.randn(16), torch.randn(16)
    dots = {}
    for m, n in [(3, 1), (10, 8), (102, 100)]:
        qm = A.rope(q[None], torch.tensor([m]))[0]
        kn = A.rope(k[None], torch.tensor([n]))[0]
        dots[(m, n)] = float(qm @ kn)
    vals = list(dots.values())
    assert max(vals) - min(vals) < 1e-4
    assert abs(float(A.rope(q[None], torch.tensor([5]))[0] @ A.rope(k[None], torch.tensor([0]))[0]) - vals[0]) > 1e-3


def test_sinusoidal_positions():
    pe = A.sinusoidal_positions(50, 16)
    assert pe.shape == (50, 16)
    torch.testing.assert_close(pe[:, 0], torch.sin(torch.arange(50.0)))
    torch.testing.assert_close(pe[:, 1], torch.cos(torch.arange(50.0)))
    torch.testing.assert_close(pe[7, 2], torch.sin(torch.tensor(7.0) / 10000 ** (2 / 16)))


def test_learned_positions_shape():
    lp = A.LearnedPositions(10, 4)
    x = torch.zeros(2, 6, 4)
    torch.testing.assert_close(lp(x)[0], lp.table.weight[:6])


def test_additive_score_matches_loop():
    torch.manual_seed(0)
    q, k, Wq, Wk, v = torch.randn(2, 3), torch.randn(2, 4, 5), torch.randn(3, 6), torch.randn(5, 6), torch.randn(6)
    s = A.additive_score(q, k, Wq, Wk, v)
    assert s.shape == (2, 4)
    torch.testing.assert_close(s[1, 2], v @ torch.tanh(q[1] @ Wq + k[1, 2] @ Wk))


def test_attention_cost_shapes():
    res = A.attention_cost([8, 16], repeats=1)
    assert res["T"] == [8, 16] and res["weights_bytes"] == [4 * 8 * 8 * 4, 4 * 16 * 16 * 4]
    assert all(t > 0 for t in res["naive_s"] + res["fused_s"])


# ----------------------------------------------------------------------------------------------
# The dates data set and the seq2seq models
# ----------------------------------------------------------------------------------------------
def test_dates_files_match_generator():
    folder = S.dates_dir()
    if folder is None:
        pytest.skip("datasets/dates not present (installed package)")
    for split in ("val", "test"):
        assert S.load_dates(split) == S.generate_split(split)


def test_dates_splits_are_sane():
    import datetime as dt

    test = S.load_dates("test")
    train = S.load_dates("train")
    assert len(train) == S.SPLIT_SIZES["train"] and len(test) == S.SPLIT_SIZES["test"]
    assert max(len(e["src"]) for e in train) <= S.TRAIN_MAX_LEN
    assert sum(len(e["src"]) > 40 for e in test) > 500  # long held-out inputs exist
    assert not {e["tgt"] for e in test} & {e["tgt"] for e in train}
    for e in test[:200]:
        dt.date.fromisoformat(e["tgt"])
    vocab = S.default_vocab()
    assert all(S.UNK not in vocab.encode(e["src"]).tolist() for e in test)


def test_weekday_is_correct():
    import datetime as dt
    import random

    rng = random.Random(0)
    for _ in range(300):
        d = S._random_date(rng)
        ex = S.make_date_example(d, rng)
        for i, name in enumerate(S.WEEKDAYS):
            if name[:3].lower() in ex["src"].lower().split(",")[0].split()[:4] or name.lower() in ex["src"].lower():
                assert d.weekday() == i, ex


def test_batch_and_vocab_roundtrip():
    vocab = S.default_vocab()
    b = S.make_batch([{"src": "3 mar 1997", "tgt": "1997-03-03"}, {"src": "03/03/97", "tgt": "1997-03-03"}], vocab)
    assert b.src.shape == (2, 10) and b.src_len.tolist() == [10, 8]
    assert b.tgt_in[0, 0] == S.BOS and b.tgt_out[0, 10] == S.EOS
    assert vocab.decode(b.tgt_out[0].tolist()) == "1997-03-03"


@pytest.mark.parametrize("attention", ["none", "additive", "dot"])
def test_seq2seq_shapes_and_padding_invariance(attention):
    torch.manual_seed(0)
    vocab = S.default_vocab()
    model = S.Seq2Seq(S.Seq2SeqConfig(vocab_size=len(vocab), hidden=16, emb=8, attention=attention)).eval()
    ex = [{"src": "on the 3rd of March, 1997", "tgt": "1997-03-03"}, {"src": "3/3/97", "tgt": "1997-03-03"}]
    b = S.make_batch(ex, vocab)
    logits = model(b.src, b.src_len, b.tgt_in)
    assert logits.shape == (2, 11, len(vocab))
    alone = S.make_batch(ex[1:], vocab)  # the short example without padding gives the same logits
    torch.testing.assert_close(model(alone.src, alone.src_len, alone.tgt_in)[0], logits[1], atol=1e-5, rtol=1e-4)
    ids, w = model.greedy_decode(b.src, b.src_len)
    assert ids.shape == (2, 12)
    if attention == "none":
        assert w is None
    else:
        assert w.shape == (2, 12, b.src.shape[1])
        assert torch.all(w[1, :, 6:] == 0)  # no weight on padding
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 12))


def test_seq2seq_learns_a_little():
    torch.manual_seed(0)
    vocab = S.default_vocab()
    data = S.load_dates("val")
    model = S.Seq2Seq(S.Seq2SeqConfig(vocab_size=len(vocab), hidden=32, emb=8, attention="dot"))
    hist = S.train_seq2seq(model, {"train": data, "val": data}, vocab, steps=40, batch_size=32, eval_every=20)
    assert hist["train_loss"][-1] < hist["train_loss"][0] < 4.5
    assert 0.0 <= S.exact_match(model, data[:50], vocab) <= 1.0
