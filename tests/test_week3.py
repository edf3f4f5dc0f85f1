"""Week 3: every check rejects plausible wrong answers and accepts correct ones written differently;
the attention and seq2seq modules match torch, brute force and each other."""
from __future__ import annotations

import dataclasses
import heapq
import math

import pytest
import torch
import torch.nn.functional as F

from course_utils import attention as A
from course_utils import seq2seq as S
from course_utils.seq2seq import BOS, EOS, PAD


# ----------------------------------------------------------------------------------------------
# 3.1 decoder step
# ----------------------------------------------------------------------------------------------
def step_swapped_input(y_prev, state, summary, *, emb, cell, out):  # [summary; e(y)] instead of [e(y); summary]
    new = cell(torch.cat([summary, emb(y_prev)], -1), state)
    return out(torch.cat([new, summary], -1)), new


def step_output_reads_old_state(y_prev, state, summary, *, emb, cell, out):
    new = cell(torch.cat([emb(y_prev), summary], -1), state)
    return out(torch.cat([state, summary], -1)), new


def step_returns_state_first(y_prev, state, summary, *, emb, cell, out):
    new = cell(torch.cat([emb(y_prev), summary], -1), state)
    return new, out(torch.cat([new, summary], -1))


def step_output_without_summary(y_prev, state, summary, *, emb, cell, out):
    new = cell(torch.cat([emb(y_prev), summary], -1), state)
    return F.linear(new, out.weight[:, :new.shape[-1]], out.bias), new


def step_detached(y_prev, state, summary, *, emb, cell, out):  # right values, cut from the graph
    with torch.no_grad():
        new = cell(torch.cat([emb(y_prev), summary], -1), state)
        return out(torch.cat([new, summary], -1)), new


def step_gates_by_hand(y_prev, state, summary, *, emb, cell, out):
    """The GRU equations written out (Cho et al. 2014), and the output layer split into its two halves."""
    x = torch.cat([emb.weight[y_prev], summary], -1)
    gi = x @ cell.weight_ih.T + cell.bias_ih  # (B, 3H): reset, update, new
    gh = state @ cell.weight_hh.T + cell.bias_hh
    H = state.shape[-1]
    r = torch.sigmoid(gi[:, :H] + gh[:, :H])
    z = torch.sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
    n = torch.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
    new = (1 - z) * n + z * state
    logits = new @ out.weight[:, :H].T + summary @ out.weight[:, H:].T + out.bias
    return logits, new


def step_with_one_step_gru(y_prev, state, summary, *, emb, cell, out):
    """torch's functional GRU cell, and F.embedding / F.linear."""
    x = torch.cat([F.embedding(y_prev, emb.weight), summary], dim=1)
    new = torch.gru_cell(x, state, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    return F.linear(torch.cat([new, summary], dim=1), out.weight, out.bias), new


# ----------------------------------------------------------------------------------------------
# 3.2 teacher-forced loss
# ----------------------------------------------------------------------------------------------
def _tf(model, batch, *, feed=None, reduce="tokens", detach=False, zero_state=False):
    enc, summary, mask = model.encode(batch.src, batch.src_len)
    state = torch.zeros_like(model.init_state(summary)) if zero_state else model.init_state(summary)
    inputs = batch.tgt_in if feed is None else feed(batch)
    per_step, total = [], 0.0
    for t in range(batch.tgt_in.shape[1]):
        logits, state, _ = model.step(inputs[:, t], state, enc, summary, mask)
        if detach:
            state = state.detach()
        if reduce == "with_padding":
            total = total + F.cross_entropy(logits, batch.tgt_out[:, t], reduction="sum")
        else:
            total = total + F.cross_entropy(logits, batch.tgt_out[:, t], ignore_index=PAD, reduction="sum")
        real = (batch.tgt_out[:, t] != PAD).sum()
        if real > 0:
            per_step.append(F.cross_entropy(logits, batch.tgt_out[:, t], ignore_index=PAD))
    if reduce == "sum":
        return total
    if reduce == "per_step":
        return torch.stack(per_step).mean()
    if reduce == "with_padding":
        return total / batch.tgt_out.numel()
    return total / (batch.tgt_out != PAD).sum()


def tf_feeds_the_labels(model, batch):  # reads the character it must predict: off by one
    return _tf(model, batch, feed=lambda b: b.tgt_out)


def tf_mean_of_step_means(model, batch):  # short targets weigh as much as long ones
    return _tf(model, batch, reduce="per_step")


def tf_counts_padding(model, batch):
    return _tf(model, batch, reduce="with_padding")


def tf_sums(model, batch):
    return _tf(model, batch, reduce="sum")


def tf_detaches_the_state(model, batch):  # truncated backprop: no gradient through the recurrence
    return _tf(model, batch, detach=True)


def tf_zero_initial_state(model, batch):
    return _tf(model, batch, zero_state=True)


def tf_stack_then_one_loss(model, batch):
    """Collect every step's logits, then one cross-entropy over the (B * U) positions."""
    enc, summary, mask = model.encode(batch.src, batch.src_len)
    state, logits = model.init_state(summary), []
    for t in range(batch.tgt_in.shape[1]):
        step_logits, state, _ = model.step(batch.tgt_in[:, t], state, enc, summary, mask)
        logits.append(step_logits)
    logits = torch.stack(logits, dim=1)  # (B, U, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.tgt_out.reshape(-1), ignore_index=PAD)


def tf_log_probs_by_hand(model, batch):
    """Log-softmax, pick the label's log-probability, mask the padding, divide by the number of real labels."""
    enc, summary, mask = model.encode(batch.src, batch.src_len)
    state = model.init_state(summary)
    nll = []
    for t, y in enumerate(batch.tgt_in.unbind(1)):
        logits, state, _ = model.step(y, state, enc, summary, mask)
        nll.append(-logits.log_softmax(-1).gather(1, batch.tgt_out[:, t:t + 1])[:, 0])
    nll = torch.stack(nll, 1)  # (B, U)
    real = batch.tgt_out != PAD
    return (nll * real).sum() / real.sum()


# ----------------------------------------------------------------------------------------------
# 3.3 greedy decoding
# ----------------------------------------------------------------------------------------------
def _greedy(model, src, src_len, max_len, *, pad_after_eos=True, feed_bos=False, with_bos=False, zero_state=False):
    enc, summary, mask = model.encode(src, src_len)
    state = model.init_state(summary)
    if zero_state:
        state = torch.zeros_like(state)
    y = torch.full((src.shape[0],), BOS)
    done = torch.zeros(src.shape[0], dtype=torch.bool)
    out = [y] if with_bos else []
    for _ in range(max_len - (1 if with_bos else 0)):
        logits, state, _ = model.step(torch.full_like(y, BOS) if feed_bos else y, state, enc, summary, mask)
        y = logits.argmax(-1)
        out.append(y.masked_fill(done, PAD) if pad_after_eos else y)
        done |= y == EOS
    return torch.stack(out, 1)


def greedy_no_pad_after_eos(model, src, src_len, max_len):
    return _greedy(model, src, src_len, max_len, pad_after_eos=False)


def greedy_always_feeds_bos(model, src, src_len, max_len):
    return _greedy(model, src, src_len, max_len, feed_bos=True)


def greedy_output_starts_with_bos(model, src, src_len, max_len):
    return _greedy(model, src, src_len, max_len, with_bos=True)


def greedy_zero_initial_state(model, src, src_len, max_len):
    return _greedy(model, src, src_len, max_len, zero_state=True)


def greedy_returns_floats(model, src, src_len, max_len):
    return _greedy(model, src, src_len, max_len).float()


@torch.no_grad()
def greedy_fixed_steps_with_where(model, src, src_len, max_len):
    """Always max_len steps; torch.where writes <pad> once a row has finished."""
    enc, summary, mask = model.encode(src, src_len)
    state, y = model.init_state(summary), torch.full((src.shape[0],), BOS, dtype=torch.long)
    finished = torch.zeros(src.shape[0], dtype=torch.bool)
    cols = []
    for _ in range(max_len):
        logits, state, _ = model.step(y, state, enc, summary, mask)
        y = logits.max(dim=-1).indices
        cols.append(torch.where(finished, torch.full_like(y, PAD), y))
        finished = finished | (y == EOS)
    return torch.stack(cols, dim=1)


@torch.no_grad()
def greedy_one_example_at_a_time(model, src, src_len, max_len):
    """Each source alone, without its padding, stopping at <eos>; rows padded to max_len at the end."""
    out = torch.full((src.shape[0], max_len), PAD, dtype=torch.long)
    for i in range(src.shape[0]):
        n = int(src_len[i])
        enc, summary, mask = model.encode(src[i:i + 1, :n], src_len[i:i + 1])
        state, y = model.init_state(summary), torch.tensor([BOS])
        for t in range(max_len):
            logits, state, _ = model.step(y, state, enc, summary, mask)
            y = logits.argmax(-1)
            out[i, t] = y
            if y.item() == EOS:
                break
    return out


# ----------------------------------------------------------------------------------------------
# 3.4 beam search
# ----------------------------------------------------------------------------------------------
def _next_log_probs(model, src, src_len, hyps):
    """log p(next | prefix) (k, V) and new states for hypotheses [(ids, score, state)]."""
    enc, summary, mask = model.encode(src, src_len)
    k = len(hyps)
    state = torch.cat([model.init_state(summary) if h[2] is None else h[2] for h in hyps])
    y = torch.tensor([h[0][-1] if h[0] else BOS for h in hyps])
    logits, new, _ = model.step(y, state, enc.expand(k, -1, -1), summary.expand(k, -1), mask.expand(k, -1))
    return logits.log_softmax(-1), new


@torch.no_grad()
def _beam(model, src, src_len, beam_size, max_len, *, rank="total", final="total", keep_finished=True):
    live, finished = [([], 0.0, None)], []
    for _ in range(max_len):
        logp, new = _next_log_probs(model, src, src_len, live)
        ext = [(ids + [c], score + float(logp[r, c]), new[r:r + 1], float(logp[r, c]))
               for r, (ids, score, _) in enumerate(live) for c in range(logp.shape[1])]
        ext.sort(key=lambda h: -(h[3] if rank == "last" else h[1]))
        best = ext[:beam_size]
        finished += [h[:3] for h in best if h[0][-1] == EOS] if keep_finished else []
        live = [h[:3] for h in best if h[0][-1] != EOS]
        if not live:
            break
    pool = finished + live or [([], 0.0, None)]
    key = (lambda h: h[1] / max(len(h[0]), 1)) if final == "per_char" else (lambda h: h[1])
    ids, score, _ = max(pool, key=key)
    return ids, score


def beam_ignores_beam_size(model, src, src_len, beam_size, max_len):
    return _beam(model, src, src_len, 1, max_len)


def beam_length_normalised(model, src, src_len, beam_size, max_len):
    return _beam(model, src, src_len, beam_size, max_len, final="per_char")


def beam_ranks_by_last_character(model, src, src_len, beam_size, max_len):
    return _beam(model, src, src_len, beam_size, max_len, rank="last")


def beam_forgets_finished(model, src, src_len, beam_size, max_len):
    return _beam(model, src, src_len, beam_size, max_len, keep_finished=False)


@torch.no_grad()
def beam_with_a_heap_and_early_stop(model, src, src_len, beam_size, max_len):
    """heapq.nlargest for the beam; stops as soon as no live hypothesis can beat the best finished one
    (log-probabilities are <= 0, so a score can only fall)."""
    live, best_done = [([], 0.0, None)], None
    for _ in range(max_len):
        logp, new = _next_log_probs(model, src, src_len, live)
        cand = [(score + float(logp[r, c]), ids + [c], r) for r, (ids, score, _) in enumerate(live)
                for c in range(logp.shape[1])]
        top = heapq.nlargest(beam_size, cand, key=lambda t: t[0])
        for score, ids, _ in top:
            if ids[-1] == EOS and (best_done is None or score > best_done[1]):
                best_done = (ids, score)
        live = [(ids, score, new[r:r + 1]) for score, ids, r in top if ids[-1] != EOS]
        if not live or (best_done is not None and best_done[1] >= max(h[1] for h in live)):
            break
    pool = ([best_done] if best_done else []) + [(ids, score) for ids, score, _ in live]
    ids, score = max(pool, key=lambda h: h[1])
    return torch.tensor(ids), torch.tensor(score)


@torch.no_grad()
def beam_rescoring_prefixes_in_float64(model, src, src_len, beam_size, max_len):
    """Keeps only the ids of each hypothesis and re-runs the decoder over the whole prefix every step."""
    enc, summary, mask = model.encode(src, src_len)

    def next_logp(ids):
        state, y = model.init_state(summary), torch.tensor([BOS])
        for c in [BOS] + ids:
            logits, state, _ = model.step(torch.tensor([c]), state, enc, summary, mask)
        return logits[0].double().log_softmax(-1)

    live, finished = [([], 0.0)], []
    for _ in range(max_len):
        ext = []
        for ids, score in live:
            logp = next_logp(ids)
            ext += [(ids + [c], score + logp[c].item()) for c in range(len(logp))]
        ext = sorted(ext, key=lambda h: h[1], reverse=True)[:beam_size]
        finished += [h for h in ext if h[0][-1] == EOS]
        live = [h for h in ext if h[0][-1] != EOS]
        if not live:
            break
    return max(finished + live, key=lambda h: h[1])


# ----------------------------------------------------------------------------------------------
# 3.5 additive score
# ----------------------------------------------------------------------------------------------
def additive_no_tanh(query, keys, W_q, W_k, v):
    return ((query @ W_q)[:, None, :] + keys @ W_k) @ v


def additive_tanh_outside(query, keys, W_q, W_k, v):
    return torch.tanh(((query @ W_q)[:, None, :] + keys @ W_k) @ v)


def additive_returns_softmax(query, keys, W_q, W_k, v):
    return torch.softmax(torch.tanh((query @ W_q)[:, None, :] + keys @ W_k) @ v, dim=-1)


def additive_detached(query, keys, W_q, W_k, v):  # right scores, but the model could not learn W_q, W_k, v
    return (torch.tanh((query @ W_q)[:, None, :] + keys @ W_k) @ v).detach()


def additive_einsum(query, keys, W_q, W_k, v):
    hidden = torch.tanh(torch.einsum("bq,qa->ba", query, W_q).unsqueeze(1) + torch.einsum("bsk,ka->bsa", keys, W_k))
    return torch.einsum("bsa,a->bs", hidden, v)


def additive_loop_over_keys(query, keys, W_q, W_k, v):
    q = query @ W_q  # (B, A)
    return torch.stack([torch.tanh(q + keys[:, s] @ W_k) @ v for s in range(keys.shape[1])], dim=1)


# ----------------------------------------------------------------------------------------------
# 3.6 attention weights (a softmax by hand)
# ----------------------------------------------------------------------------------------------
def _manual(scores, mask, *, fill=float("-inf"), dim=-1, shift="row", renormalise=True, mask_first=True):
    s = scores
    if mask is not None and mask_first:
        s = s.masked_fill(~mask, fill)
    if shift == "row":
        s = s - s.amax(dim=dim, keepdim=True)
    elif shift == "global":
        s = s - s.max()
    e = torch.exp(s)
    if mask is not None and not mask_first:
        e = e * mask
    return e / e.sum(dim=dim, keepdim=True) if renormalise else e


def weights_mask_with_zero(scores, mask):
    return _manual(scores, mask, fill=0.0)


def weights_wrong_axis(scores, mask):
    return _manual(scores, mask, dim=0)


def weights_global_max(scores, mask):  # one maximum for the whole tensor: smaller rows underflow to 0 / 0
    return _manual(scores, mask, shift="global")


def weights_naive_exp(scores, mask):  # no maximum subtracted: overflows on large scores
    return _manual(scores, mask, shift="none")


def weights_max_before_masking(scores, mask):  # the padding's scores set the maximum, then they are zeroed
    e = torch.exp(scores - scores.amax(-1, keepdim=True))
    if mask is not None:
        e = e * mask
    return e / e.sum(-1, keepdim=True)


def weights_in_float32(scores, mask):
    return _manual(scores.float(), mask)


def weights_with_library_softmax(scores, mask):  # right numbers, but the library does the exercise
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return F.softmax(scores, dim=-1)


def weights_rebuilt_from_values(scores, mask):  # right numbers, but no gradient reaches the scores
    return torch.tensor(_manual(scores, mask).tolist(), dtype=scores.dtype)


def weights_logsumexp(scores, mask):
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.exp(scores - torch.logsumexp(scores, dim=-1, keepdim=True))


def weights_with_where_and_finite_fill(scores, mask):
    """The most negative finite number instead of -inf, and torch.where to zero the masked keys."""
    keep = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.expand_as(scores)
    s = torch.where(keep, scores, torch.finfo(scores.dtype).min)
    e = torch.where(keep, torch.exp(s - s.max(dim=-1, keepdim=True).values), 0.0)
    return e / e.sum(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# 3.7 scaled dot-product attention
# ----------------------------------------------------------------------------------------------
def _sdpa(q, k, v, mask, *, scale=None, axis=-1, fill=float("-inf"), detach=False, transpose_mask=False):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1] if scale is None else scale)
    if mask is not None:
        m = mask.transpose(-2, -1) if transpose_mask else mask
        s = s.masked_fill(~m, fill) if fill is not None else s * m
    out = torch.softmax(s, axis).nan_to_num(0.0) @ v
    return out.detach() if detach else out


def sdpa_no_scale(q, k, v, mask=None):
    return _sdpa(q, k, v, mask, scale=1)


def sdpa_scale_by_dv(q, k, v, mask=None):
    return _sdpa(q, k, v, mask, scale=v.shape[-1])


def sdpa_softmax_over_queries(q, k, v, mask=None):
    return _sdpa(q, k, v, mask, axis=-2)


def sdpa_mask_with_zero(q, k, v, mask=None):
    return _sdpa(q, k, v, mask, fill=None)


def sdpa_mask_transposed(q, k, v, mask=None):
    return _sdpa(q, k, v, mask, transpose_mask=True)


def sdpa_detached(q, k, v, mask=None):  # right numbers, but no gradient reaches q, k, v
    return _sdpa(q, k, v, mask, detach=True)


def sdpa_with_the_fused_kernel(q, k, v, mask=None):  # right numbers, but the library does the exercise
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_einsum_with_hand_softmax(q, k, v, mask=None):
    scores = torch.einsum("...td,...sd->...ts", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("...ts,...sd->...td", A.attention_weights(scores, mask), v)


def sdpa_scale_queries_first_and_large_negative_fill(q, k, v, mask=None):
    s = (q / math.sqrt(q.shape[-1])) @ k.mT
    if mask is not None:
        s = torch.where(mask, s, torch.tensor(-1e9))
    return s.softmax(dim=-1) @ v


# ----------------------------------------------------------------------------------------------
# 3.8 causal mask
# ----------------------------------------------------------------------------------------------
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


def causal_by_comparison(T, S=None):
    S = T if S is None else S
    return torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]


def causal_not_strictly_upper(T, S=None):
    S = T if S is None else S
    return ~torch.ones(T, S, dtype=torch.bool).triu(diagonal=S - T + 1)


# ----------------------------------------------------------------------------------------------
# 3.9 multi-head attention
# ----------------------------------------------------------------------------------------------
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


def mha_loop_over_heads(x, w_in, b_in, w_out, b_out, n_head, mask=None):
    """One head at a time, each with its own slices of W_q, W_k, W_v; concatenate; project."""
    C = x.shape[-1]
    hs = C // n_head
    heads = []
    for h in range(n_head):
        rows = [slice(i * C + h * hs, i * C + (h + 1) * hs) for i in range(3)]
        q, k, v = (x @ w_in[r].T + b_in[r] for r in rows)  # (B, T, hs)
        m = None if mask is None else mask[..., 0, :, :] if mask.dim() == 4 else mask
        heads.append(A.scaled_dot_product_attention(q, k, v, m))
    return torch.cat(heads, dim=-1) @ w_out.T + b_out


def mha_einsum(x, w_in, b_in, w_out, b_out, n_head, mask=None):
    B, T, C = x.shape
    w = w_in.view(3, n_head, C // n_head, C)  # (3, nh, hs, C)
    q, k, v = (torch.einsum("btc,hdc->bhtd", x, w[i]) + b_in.view(3, n_head, 1, -1)[i] for i in range(3))
    y = A.scaled_dot_product_attention(q, k, v, mask)  # (B, nh, T, hs)
    return torch.einsum("bhtd,ohd->bto", y, w_out.view(C, n_head, C // n_head)) + b_out


# ----------------------------------------------------------------------------------------------
# 3.10 RoPE
# ----------------------------------------------------------------------------------------------
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


def rope_ignores_positions(x, positions, base=10000.0):  # rotates by the index t instead of positions[t]
    cos, sin = A.rope_cos_sin(torch.arange(x.shape[-2]), x.shape[-1], base)
    return x * cos + A.rotate_half(x) * sin


def rope_wrong_direction(x, positions, base=10000.0):
    cos, sin = A.rope_cos_sin(positions, x.shape[-1], base)
    return x * cos - A.rotate_half(x) * sin


def rope_complex(x, positions, base=10000.0):
    hs = x.shape[-1]
    freqs = torch.exp(-math.log(base) * torch.arange(hs // 2, dtype=torch.float64) * 2 / hs)
    rot = torch.polar(torch.ones(len(positions), hs // 2, dtype=torch.float64), positions[:, None].double() * freqs)
    z = torch.view_as_complex(torch.stack([x[..., :hs // 2], x[..., hs // 2:]], dim=-1).double().contiguous()) * rot
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def rope_pair_by_pair(x, positions, base=10000.0):
    hs = x.shape[-1]
    out = x.clone()
    for i in range(hs // 2):
        angle = positions.float() * base ** (-2 * i / hs)  # (T,)
        a, b = x[..., i], x[..., i + hs // 2]
        out[..., i] = a * torch.cos(angle) - b * torch.sin(angle)
        out[..., i + hs // 2] = a * torch.sin(angle) + b * torch.cos(angle)
    return out


WRONG_IMPLEMENTATIONS = {
    "3.1": [step_swapped_input, step_output_reads_old_state, step_returns_state_first, step_output_without_summary,
            step_detached],
    "3.2": [tf_feeds_the_labels, tf_mean_of_step_means, tf_counts_padding, tf_sums, tf_detaches_the_state,
            tf_zero_initial_state],
    "3.3": [greedy_no_pad_after_eos, greedy_always_feeds_bos, greedy_output_starts_with_bos,
            greedy_zero_initial_state, greedy_returns_floats],
    "3.4": [beam_ignores_beam_size, beam_length_normalised, beam_ranks_by_last_character, beam_forgets_finished],
    "3.5": [additive_no_tanh, additive_tanh_outside, additive_returns_softmax, additive_detached],
    "3.6": [weights_mask_with_zero, weights_wrong_axis, weights_global_max, weights_naive_exp,
            weights_max_before_masking, weights_in_float32, weights_with_library_softmax, weights_rebuilt_from_values],
    "3.7": [sdpa_no_scale, sdpa_scale_by_dv, sdpa_softmax_over_queries, sdpa_mask_with_zero, sdpa_mask_transposed,
            sdpa_detached, sdpa_with_the_fused_kernel],
    "3.8": [causal_upper, causal_no_diagonal, causal_ignores_cache, causal_float],
    "3.9": [mha_heads_mixed, mha_scale_by_model_width, mha_no_output_projection, mha_kqv_order],
    "3.10": [rope_interleaved, rope_wrong_frequencies, rope_ignores_positions, rope_wrong_direction],
}

CORRECT_ALTERNATIVES = {
    "3.1": [step_gates_by_hand, step_with_one_step_gru],
    "3.2": [tf_stack_then_one_loss, tf_log_probs_by_hand],
    "3.3": [greedy_fixed_steps_with_where, greedy_one_example_at_a_time],
    "3.4": [beam_with_a_heap_and_early_stop, beam_rescoring_prefixes_in_float64],
    "3.5": [additive_einsum, additive_loop_over_keys],
    "3.6": [weights_logsumexp, weights_with_where_and_finite_fill],
    "3.7": [sdpa_einsum_with_hand_softmax, sdpa_scale_queries_first_and_large_negative_fill],
    "3.8": [causal_by_comparison, causal_not_strictly_upper],
    "3.9": [mha_loop_over_heads, mha_einsum],
    "3.10": [rope_complex, rope_pair_by_pair],
}


def test_ten_exercises_registered_in_notebook_order():
    from course_utils import list_exercises

    assert list_exercises(3) == [f"3.{i}" for i in range(1, 11)]


def test_softmax_exercise_forbids_library_softmax_and_attention_forbids_sdpa():
    from course_utils.exercises import get_exercise

    assert "torch.nn.functional.softmax" in get_exercise("3.6").forbid and "torch.softmax" in get_exercise("3.6").forbid
    for exercise_id in ("3.7", "3.9"):
        assert "torch.nn.functional.scaled_dot_product_attention" in get_exercise(exercise_id).forbid


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


@pytest.mark.parametrize("shape, lengths", [((3, 5), None), ((2, 4, 6), [6, 2]), ((1, 1), [1])])
def test_attention_weights_match_softmax(shape, lengths):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(*shape, generator=g) * 30
    mask = None if lengths is None else A.padding_mask(torch.tensor(lengths), shape[-1]).view(
        len(lengths), *[1] * (len(shape) - 2), shape[-1])
    ref = torch.softmax(scores if mask is None else scores.masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(A.attention_weights(scores, mask), ref)


def test_attention_weights_rows_on_different_scales():
    scores = torch.tensor([[0.0, 1.0, 2.0], [1000.0, 1001.0, 999.0], [-1000.0, -999.0, -1001.0]])
    torch.testing.assert_close(A.attention_weights(scores), torch.softmax(scores, -1))


def test_general_score_is_query_W_key():
    g = torch.Generator().manual_seed(0)
    q, keys, W = torch.randn(2, 3, generator=g), torch.randn(2, 4, 5, generator=g), torch.randn(3, 5, generator=g)
    torch.testing.assert_close(A.general_score(q, keys, W)[1, 2], q[1] @ W @ keys[1, 2])


def test_sdpa_dropout_zero_is_identity_and_dropout_scales_survivors():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(A.scaled_dot_product_attention(q, k, v, dropout_p=0.0),
                               A.scaled_dot_product_attention(q, k, v))
    _, w = A.scaled_dot_product_attention(q, k, v, return_weights=True)
    _, wd = A.scaled_dot_product_attention(q, k, v, return_weights=True, dropout_p=0.25,
                                           generator=torch.Generator().manual_seed(1))
    kept = wd != 0
    assert 0.6 < kept.float().mean() < 0.9
    torch.testing.assert_close(wd[kept], w[kept] / 0.75)


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


@pytest.mark.parametrize("fused", [True, False])
def test_cross_attention_matches_torch(fused):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    ours = A.MultiHeadAttention(8, 2, fused=fused).load_from_torch(mha)
    x, enc = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    keep = A.padding_mask(torch.tensor([5, 2]), 5)
    ref = mha(x, enc, enc, key_padding_mask=~keep, need_weights=False)[0]
    torch.testing.assert_close(ours(x, context=enc, mask=keep[:, None, None, :]), ref, atol=1e-5, rtol=1e-4)


def test_multihead_dropout_only_in_training():
    torch.manual_seed(0)
    mha = A.MultiHeadAttention(8, 2, dropout=0.5, fused=False)
    x = torch.randn(1, 6, 8)
    mha.eval()
    torch.testing.assert_close(mha(x), mha(x))
    mha.train()
    _, w = mha(x, return_weights=True)
    assert (w == 0).any() and not torch.allclose(w.sum(-1), torch.ones(1, 2, 6))


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


def test_peak_memory_is_measured():
    mib = 2**20
    assert A.peak_memory(lambda: torch.ones(2 * mib // 4)) >= 2 * mib  # a 2 MiB tensor is allocated
    assert A.peak_memory(lambda: None) < mib


def test_attention_cost_compares_equal_work_and_measures_memory():
    res = A.attention_cost([64, 128], repeats=1)
    assert res["T"] == [64, 128] and res["weights_bytes"] == [4 * 64 * 64 * 4, 4 * 128 * 128 * 4]
    for name in ("naive", "fused", "fused_causal"):
        assert all(t > 0 for t in res[f"{name}_s"]) and all(b > 0 for b in res[f"{name}_peak_bytes"])
    assert res["naive_peak_bytes"][-1] >= res["weights_bytes"][-1]  # the naive version holds the weights
    assert res["fused_causal_peak_bytes"][-1] < res["weights_bytes"][-1]
    assert "fused_causal_s" not in A.attention_cost([32], repeats=1, causal=False)


# ----------------------------------------------------------------------------------------------
# The data sets and the seq2seq models
# ----------------------------------------------------------------------------------------------
def test_dates_files_match_generator():
    from course_utils.data import project_dataset_dir

    if not (project_dataset_dir("dates") / "val.jsonl").exists():
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


def test_copy_files_match_generator_and_are_sane():
    from pathlib import Path

    folder = Path(S.__file__).resolve().parent.parent / "datasets" / "copy"
    if not (folder / "train.jsonl").exists():
        pytest.skip("datasets/copy not present (installed package)")
    for split in ("val", "test"):
        assert S.load_copy(split) == S.generate_copy_split(split)
    train, test = S.load_copy("train"), S.load_copy("test")
    assert len(train) == S.COPY_SIZES["train"] and len(test) == S.COPY_SIZES["test"]
    lengths = [len(e["src"]) for e in test]
    assert min(lengths) == 5 and max(lengths) == 40 and all(lengths.count(L) == 20 for L in range(5, 41))
    assert {len(e["src"]) for e in train} == set(range(5, 41))  # every test length also occurs in training
    assert not {e["src"] for e in test} & {e["src"] for e in train}
    assert all(e["src"] == e["tgt"] for e in test)
    assert all(e["tgt"] == e["src"][::-1] for e in S.load_copy("val", task="reverse"))
    assert all(S.UNK not in S.symbol_vocab().encode(e["src"]).tolist() for e in test)


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


KINDS = [("none", False), ("dot", False), ("general", False), ("additive", True), ("general", True), ("additive", False)]


def _small(attention, bidirectional, V=14):
    torch.manual_seed(0)
    cfg = S.Seq2SeqConfig(vocab_size=V, emb=8, hidden=12, attention=attention, bidirectional=bidirectional, attn_size=10)
    return S.Seq2Seq(cfg).eval()


EXAMPLES = [{"src": "abcdeabc", "tgt": "abcdeabc"}, {"src": "jjiab", "tgt": "jjiab"},
            {"src": "abcdefghijabcdefghij", "tgt": "abcdefghijabcdefghij"}]


@pytest.mark.parametrize("attention, bidirectional", KINDS)
def test_parameter_count_closed_form(attention, bidirectional):
    model = _small(attention, bidirectional)
    assert sum(p.numel() for p in model.parameters()) == S.count_parameters(model.cfg)


def test_sized_to_matches_a_budget():
    base = S.Seq2SeqConfig(vocab_size=14, emb=32, hidden=64)
    target = S.count_parameters(base)
    for cfg in (dataclasses.replace(base, attention="general"), S.Seq2SeqConfig.bahdanau(vocab_size=14, emb=32)):
        sized = S.sized_to(cfg, target)
        assert abs(S.count_parameters(sized) - target) / target < 0.02 and sized.attn_size == sized.hidden


def test_dot_needs_equal_widths():
    with pytest.raises(ValueError, match="dot"):
        S.Seq2Seq(S.Seq2SeqConfig(attention="dot", bidirectional=True))


@pytest.mark.parametrize("attention, bidirectional", KINDS)
def test_forward_equals_the_step_by_step_decoder(attention, bidirectional):
    model = _small(attention, bidirectional)
    b = S.make_batch(EXAMPLES, S.symbol_vocab())
    torch.testing.assert_close(S.seq2seq_loss(model, b), S.teacher_forcing_loss(model, b), atol=1e-6, rtol=1e-5)
    logits = model(b.src, b.src_len, b.tgt_in)
    enc, summary, mask = model.encode(b.src, b.src_len)
    state = model.init_state(summary)
    for t in range(b.tgt_in.shape[1]):
        step_logits, state, _ = model.step(b.tgt_in[:, t], state, enc, summary, mask)
        torch.testing.assert_close(step_logits, logits[:, t], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention, bidirectional", KINDS)
def test_padding_invariance_and_weights(attention, bidirectional):
    model = _small(attention, bidirectional)
    vocab = S.symbol_vocab()
    b = S.make_batch(EXAMPLES, vocab)
    logits = model(b.src, b.src_len, b.tgt_in)
    alone = S.make_batch(EXAMPLES[1:2], vocab)  # the short example without padding gives the same logits
    torch.testing.assert_close(model(alone.src, alone.src_len, alone.tgt_in)[0], logits[1, :6], atol=1e-5, rtol=1e-4)
    ids, w = model.greedy_decode(b.src, b.src_len, max_len=9)
    assert ids.shape == (3, 9) and ids.dtype == torch.long
    torch.testing.assert_close(ids, S.greedy_decode(model, b.src, b.src_len, 9))
    if attention == "none":
        assert w is None
    else:
        assert w.shape == (3, 9, b.src.shape[1])
        assert torch.all(w[1, :, 5:] == 0)  # no weight on padding


def test_greedy_pads_after_eos():
    model = _small("none", False)
    with torch.no_grad():
        model.out.bias[EOS] += 5.0  # makes <eos> likely early
    b = S.make_batch(EXAMPLES, S.symbol_vocab())
    ids = S.greedy_decode(model, b.src, b.src_len, 8)
    for row in ids.tolist():
        assert EOS in row
        assert all(i == PAD for i in row[row.index(EOS) + 1:])


@pytest.mark.parametrize("attention, bidirectional", [("none", False), ("additive", True)])
def test_beam_search_brute_force_and_greedy(attention, bidirectional):
    model = _small(attention, bidirectional, V=6)
    vocab = S.CharVocab("ab", specials=S.SPECIALS)
    b = S.make_batch([{"src": "abba", "tgt": ""}], vocab)
    ids, score = S.beam_search(model, b.src, b.src_len, beam_size=1, max_len=4)
    greedy = [i for i in S.greedy_decode(model, b.src, b.src_len, 4)[0].tolist()]
    assert ids == greedy[:len(ids)]
    # every output of at most 3 characters, scored by the teacher-forced model: the wide beam finds the best
    import itertools

    best = -math.inf
    for n in range(1, 4):
        for seq in itertools.product(range(6), repeat=n):
            if EOS in seq[:-1] or (n < 3 and seq[-1] != EOS):
                continue
            tgt_in, tgt_out = torch.tensor([[BOS, *seq[:-1]]]), torch.tensor([list(seq)])
            logp = model(b.src, b.src_len, tgt_in).log_softmax(-1).gather(-1, tgt_out[..., None]).sum().item()
            best = max(best, logp)
    _, wide = S.beam_search(model, b.src, b.src_len, beam_size=10_000, max_len=3)
    assert wide == pytest.approx(best, abs=1e-4)


def test_learner_functions_are_used_and_vmap_falls_back():
    calls = {"score": 0, "weights": 0}

    def my_score(query, keys, W_q, W_k, v):
        calls["score"] += 1
        if query.shape[0] != keys.shape[0]:
            raise AssertionError("query and keys must share the batch")
        float(query.detach().sum())  # data-dependent Python: torch.vmap cannot map this, so the model loops over queries
        return A.additive_score(query, keys, W_q, W_k, v)

    def my_weights(scores, mask):
        calls["weights"] += 1
        return A.attention_weights(scores, mask)

    torch.manual_seed(0)
    cfg = S.Seq2SeqConfig(vocab_size=14, emb=8, hidden=12, attention="additive", attn_size=10)
    mine = S.Seq2Seq(cfg, additive_score=my_score, attention_weights=my_weights)
    ref = S.Seq2Seq(cfg)
    ref.load_state_dict(mine.state_dict())
    b = S.make_batch(EXAMPLES, S.symbol_vocab())
    torch.testing.assert_close(S.seq2seq_loss(mine, b), S.seq2seq_loss(ref, b))
    assert calls["score"] > 0 and calls["weights"] > 0


def test_metrics_and_translation_helpers():
    model = _small("dot", False)
    vocab = S.symbol_vocab()
    assert S.symbol_accuracy("abcx", "abcd") == 0.75 and S.symbol_accuracy("ab", "abcd") == 0.5
    res = S.accuracy_by_length(model, EXAMPLES, vocab, edges=(0, 10, 20), max_len=21)
    assert res["n"] == [2, 1] and len(res["symbol_accuracy"]) == 2
    outs, scores = S.beam_translate(model, [e["src"] for e in EXAMPLES], vocab, beam_size=2, max_len=21)
    assert len(outs) == 3 and all(s <= 0 for s in scores)
    logp = S.sequence_log_prob(model, EXAMPLES, vocab)
    assert len(logp) == 3 and all(x < 0 for x in logp)


def test_seq2seq_learns_a_little():
    torch.manual_seed(0)
    vocab = S.default_vocab()
    data = S.load_dates("val")
    model = S.Seq2Seq(S.Seq2SeqConfig(vocab_size=len(vocab), hidden=32, emb=8, attention="general"))
    hist = S.train_seq2seq(model, {"train": data, "val": data}, vocab, steps=40, batch_size=32, eval_every=20)
    assert hist["train_loss"][-1] < hist["train_loss"][0] < 4.5
    assert 0.0 <= S.exact_match(model, data[:50], vocab) <= 1.0
