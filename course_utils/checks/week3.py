"""Week 3 exercises, in notebook order. 01: the decoder step, the teacher-forced loss, greedy decoding and
beam search of a seq2seq model. 02: the additive attention score and masked attention weights.
03: scaled dot-product attention, causal masks, multi-head attention and rotary position embeddings.

Expected values come from independent references: `nn.GRU` run for one step, a decoder evaluated one
unpadded example at a time, exhaustive search over every output, explicit loops and closed forms,
complex-number rotations, `F.scaled_dot_product_attention` and `torch.nn.MultiheadAttention`.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..exercises import Case, case_rng, exercise, randn
from ..seq2seq import BOS, EOS, PAD, Seq2Seq, Seq2SeqConfig

SOFTMAX_CALLS = ("torch.softmax", "torch.nn.functional.softmax", "torch.Tensor.softmax", "torch.special.softmax",
                 "torch.log_softmax", "torch.nn.functional.log_softmax", "torch.Tensor.log_softmax")
ATTENTION_CALLS = ("torch.nn.functional.scaled_dot_product_attention",
                   "torch.nn.functional.multi_head_attention_forward")


def _lengths_mask(lengths: list[int], S: int) -> torch.Tensor:
    return torch.tensor([[s < n for s in range(S)] for n in lengths])  # (B, S) True on real keys


def _seed(g: torch.Generator) -> int:
    return int(torch.randint(2**31 - 1, (1,), generator=g))


# ----------------------------------------------------------------------------------------------
# Small random seq2seq models and batches (inputs of the 01 exercises)
# ----------------------------------------------------------------------------------------------
def _model(g: torch.Generator, *, attention: str = "none", bidirectional: bool = False, V: int = 9, E: int = 5,
           H: int = 6, eos_bias: float = -4.0, out_scale: float = 4.0) -> Seq2Seq:
    """A random model built without touching torch's global RNG. The decoder's embedding and output layer are
    scaled up (the output layer by `out_scale`), so outputs are peaked and depend on the fed-back character; <pad> and <bos> are never predicted;
    the <eos> logit's bias is `eos_bias` (higher: outputs end sooner)."""
    with torch.random.fork_rng():
        torch.manual_seed(_seed(g))
        cfg = Seq2SeqConfig(vocab_size=V, emb=E, hidden=H, attention=attention, attn_size=H, bidirectional=bidirectional)
        model = Seq2Seq(cfg)
        with torch.no_grad():
            model.emb.weight.mul_(3.0)
            model.out.weight.mul_(out_scale)
            model.out.bias[PAD] = model.out.bias[BOS] = -30.0
            model.out.bias[EOS] = eos_bias
    return model.eval()


def _batch(g: torch.Generator, V: int, src_lengths: list[int], tgt_lengths: list[int]):
    """A padded batch of random symbols (ids 4..V-1) with the decoder's inputs and labels."""
    from ..seq2seq import Batch

    B, S, U = len(src_lengths), max(src_lengths), max(tgt_lengths) + 1
    src = torch.full((B, S), PAD)
    tgt_in, tgt_out = torch.full((B, U), PAD), torch.full((B, U), PAD)
    for i, (n, m) in enumerate(zip(src_lengths, tgt_lengths)):
        src[i, :n] = torch.randint(4, V, (n,), generator=g)
        t = torch.randint(4, V, (m,), generator=g)
        tgt_in[i, :m + 1] = torch.cat([torch.tensor([BOS]), t])
        tgt_out[i, :m + 1] = torch.cat([t, torch.tensor([EOS])])
    return Batch(src, torch.tensor(src_lengths), tgt_in, tgt_out)


def _one(src: torch.Tensor, src_len: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Example i of a padded batch on its own, without padding: src (1, n), src_len (1,)."""
    n = int(src_len[i])
    return src[i:i + 1, :n], src_len[i:i + 1]


# ----------------------------------------------------------------------------------------------
# 01 — the decoder step, teacher forcing, greedy decoding, beam search
# ----------------------------------------------------------------------------------------------
def _step_expected(y, state, summary, emb, cell, out):
    """The same step through `nn.GRU` (the sequence module, not GRUCell) and explicit matrix products."""
    with torch.random.fork_rng():
        gru = nn.GRU(cell.input_size, cell.hidden_size, batch_first=True)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(gru, name + "_l0").copy_(getattr(cell, name))
        x = torch.cat([F.one_hot(y, emb.num_embeddings).float() @ emb.weight, summary], dim=-1)  # (B, E + C)
        _, h = gru(x[:, None, :], state[None])  # one step
        new = h[0]  # (B, H)
        logits = torch.cat([new, summary], dim=-1) @ out.weight.T + out.bias  # (B, V)
    return logits, new


@exercise("3.1", "Decoder step without attention", reference="course_utils.seq2seq:decoder_step",
          hint="The GRU cell reads [e(y_prev); summary] (embedding first) and the old state; the output layer "
               "reads [new state; summary]. Return (logits, new state).")
def _():
    g = case_rng(301)
    for name, B, V, E, H, C in [("batch of one", 1, 7, 3, 4, 4), ("batch of 5", 5, 11, 6, 8, 8),
                                ("summary wider than the state (C=10, H=6)", 3, 9, 5, 6, 10),
                                ("embedding wider than the summary (E=8, C=3)", 4, 6, 8, 5, 3)]:
        with torch.random.fork_rng():
            emb, cell, out = nn.Embedding(V, E), nn.GRUCell(E + C, H), nn.Linear(H + C, V)
        with torch.no_grad():
            for p in (*emb.parameters(), *cell.parameters(), *out.parameters()):
                p.copy_(randn(g, *p.shape, scale=0.7))
        y, state, summary = torch.randint(V, (B,), generator=g), randn(g, B, H).tanh(), randn(g, B, C)
        yield Case(f"{name}: y_prev ({B},), state ({B}, {H}), summary ({B}, {C}), vocabulary {V}, embedding {E}",
                   args=(y, state, summary), kwargs=dict(emb=emb, cell=cell, out=out),
                   expected=lambda a=(y, state, summary, emb, cell, out): _step_expected(*a),
                   names=("logits", "new state"))
    a = (y, state, summary, emb, cell, out)
    yield Case("gradients reach the embedding, the GRU cell, the output layer and the state", atol=1e-5,
               run=lambda fn, a=a: _step_grads(fn, *a), expected=lambda a=a: _step_grads(_step_by_gru, *a),
               names=("logits", "new state", "d embedding", "d cell.weight_ih", "d out.weight", "d state"))


def _step_by_gru(y, state, summary, *, emb, cell, out):
    """The step through `nn.GRU` sharing the cell's Parameters (so gradients land on them), and F.embedding/F.linear."""
    with torch.random.fork_rng():
        gru = nn.GRU(cell.input_size, cell.hidden_size, batch_first=True)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        setattr(gru, name + "_l0", getattr(cell, name))
    x = torch.cat([F.embedding(y, emb.weight), summary], dim=-1)  # (B, E + C)
    new = gru(x[:, None, :], state[None])[1][0]  # (B, H)
    return F.linear(torch.cat([new, summary], dim=-1), out.weight, out.bias), new


def _step_grads(fn, y, state, summary, emb, cell, out):
    """Outputs of fn and the gradients of a fixed weighting of them, on private copies of the modules."""
    import copy

    emb, cell, out = (copy.deepcopy(m) for m in (emb, cell, out))
    state = state.detach().clone().requires_grad_(True)
    result = fn(y.clone(), state, summary.clone(), emb=emb, cell=cell, out=out)
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and all(isinstance(t, torch.Tensor) for t in result)):
        return result  # the comparison explains what is wrong with it
    logits, new = result
    if not (logits.requires_grad and new.requires_grad):
        return logits, new, None, None, None, None
    loss = (logits * torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)).sum() + (new * 0.5).sum()
    loss.backward()
    return logits.detach(), new.detach(), emb.weight.grad, cell.weight_ih.grad, out.weight.grad, state.grad


@contextlib.contextmanager
def _only_step_by_step(model: Seq2Seq):
    """While the learner's code runs, the model's whole-sequence shortcuts raise: the exercise is the loop."""
    def shortcut(*args, **kwargs):
        raise RuntimeError("this exercise is the step-by-step loop: use model.encode, model.init_state and "
                           "model.step, not model(...) or model.greedy_decode")

    for name in ("forward", "greedy_decode"):
        setattr(model, name, shortcut)
    try:
        yield model
    finally:
        for name in ("forward", "greedy_decode"):
            delattr(model, name)


def _loss_and_grads(fn, model: Seq2Seq, batch):
    """Run the learner's loss, backpropagate, return the loss and two gradients (plain tensors)."""
    from ..seq2seq import Batch

    model.zero_grad(set_to_none=True)
    with _only_step_by_step(model):
        loss = fn(model, Batch(*(t.clone() for t in (batch.src, batch.src_len, batch.tgt_in, batch.tgt_out))))
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        return loss, None, None  # the comparison reports the wrong type, or a loss cut off from the model
    loss.backward()
    grads = model.out.weight.grad, model.encoder.emb.weight.grad
    model.zero_grad(set_to_none=True)
    return (loss.detach(), *(None if gr is None else gr.clone() for gr in grads))


def _loss_expected(model: Seq2Seq, batch):
    """Sum of each example's loss computed alone (no padding, all steps at once), over the real target count."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for i in range(batch.src.shape[0]):
        src, src_len = _one(batch.src, batch.src_len, i)
        m = int((batch.tgt_out[i] != PAD).sum())
        logits = model(src, src_len, batch.tgt_in[i:i + 1, :m])[0]  # (m, V)
        total = total + F.cross_entropy(logits, batch.tgt_out[i, :m], reduction="sum")
    loss = total / int((batch.tgt_out != PAD).sum())
    loss.backward()
    grads = model.out.weight.grad.clone(), model.encoder.emb.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    return (loss.detach(), *grads)


@exercise("3.2", "Teacher-forced loss, one decoder step at a time", reference="course_utils.seq2seq:teacher_forcing_loss",
          hint="Start from model.init_state(summary); at step t feed batch.tgt_in[:, t] (the true previous character); "
               "sum the cross-entropy of batch.tgt_out[:, t] over non-<pad> labels and divide by their total count.")
def _():
    g = case_rng(302)
    names = ("loss", "gradient of the output layer's weight", "gradient of the encoder's embedding")
    for name, kw, src_lengths, tgt_lengths in [
            ("no attention, batch of one", {}, [5], [4]),
            ("no attention, 4 examples of different lengths (padding)", {}, [7, 3, 5, 1], [2, 6, 4, 1]),
            ("additive attention, bidirectional encoder, padded batch", dict(attention="additive", bidirectional=True),
             [6, 2, 4], [5, 1, 3]),
            ("dot attention, targets of length 1 and 7", dict(attention="dot"), [4, 6], [1, 7])]:
        model = _model(g, **kw)
        batch = _batch(g, model.cfg.vocab_size, src_lengths, tgt_lengths)
        yield Case(f"{name}: source lengths {src_lengths}, target lengths {tgt_lengths}",
                   run=lambda fn, m=model, b=batch: _loss_and_grads(fn, m, b),
                   expected=lambda m=model, b=batch: _loss_expected(m, b), names=names, atol=1e-5)


@torch.no_grad()
def _greedy_expected(model: Seq2Seq, src, src_len, max_len: int) -> torch.Tensor:
    """Each example alone (batch of one, no padding): argmax, fed back, <pad> after <eos>."""
    rows = []
    for i in range(src.shape[0]):
        enc, summary, mask = model.encode(*_one(src, src_len, i))
        state, y, row = model.init_state(summary), torch.tensor([BOS]), []
        while len(row) < max_len:
            logits, state, _ = model.step(y, state, enc, summary, mask)
            y = logits.argmax(-1)
            row.append(int(y))
            if row[-1] == EOS:
                break
        rows.append(row + [PAD] * (max_len - len(row)))
    return torch.tensor(rows, dtype=torch.long)


@exercise("3.3", "Greedy decoding", reference="course_utils.seq2seq:greedy_decode",
          hint="Start with y = <bos> for every row and model.init_state(summary); each step y = logits.argmax(-1) is "
               "both the output and the next input. Return (B, max_len) int64 with <pad> after a row's first <eos>.")
def _():
    g = case_rng(303)
    for name, kw, lengths, max_len in [
            ("no attention, batch of one", {}, [5], 6),
            ("no attention, 5 sources of different lengths, some rows end early", dict(eos_bias=0.0), [7, 3, 5, 1, 6], 10),
            ("additive attention, bidirectional encoder, padded batch", dict(attention="additive", bidirectional=True),
             [6, 2, 4, 5], 8),
            ("general attention, max_len=1", dict(attention="general"), [3, 5], 1),
            ("a model that ends almost at once (<pad> fills the rest)", dict(eos_bias=3.0), [4, 2, 6], 7)]:
        model = _model(g, **kw)
        b = _batch(g, model.cfg.vocab_size, lengths, [1] * len(lengths))
        yield Case(f"{name}: source lengths {lengths}, max_len={max_len}", names="ids",
                   run=lambda fn, a=(model, b.src, b.src_len, max_len): _decode_step_by_step(fn, *a),
                   expected=lambda a=(model, b.src, b.src_len, max_len): _greedy_expected(*a))


def _decode_step_by_step(fn, model, *args):
    """fn(model, *args) with fresh copies of the tensor arguments and the model's shortcuts blocked."""
    with _only_step_by_step(model):
        return fn(model, *(a.clone() if isinstance(a, torch.Tensor) else a for a in args))


@torch.no_grad()
def _expansions(model: Seq2Seq, src, src_len, hypotheses):
    """Every one-character extension (ids, score, state) of each (ids, score, state) hypothesis, one model call each."""
    enc, summary, mask = model.encode(src, src_len)
    out = []
    for ids, score, state in hypotheses:
        if state is None:
            state = model.init_state(summary)
        y = torch.tensor([ids[-1] if ids else BOS])
        logits, new_state, _ = model.step(y, state, enc, summary, mask)
        logp = logits[0].double().log_softmax(-1)
        out += [(ids + [c], score + float(logp[c]), new_state) for c in range(logp.shape[0])]
    return out


def _beam_expected(model: Seq2Seq, src, src_len, beam_size: int, max_len: int):
    """Beam search written out with Python lists and sorting (exhaustive search when the beam is wide enough)."""
    live, finished = [([], 0.0, None)], []
    for _ in range(max_len):
        best = sorted(_expansions(model, src, src_len, live), key=lambda h: -h[1])[:beam_size]
        finished += [h for h in best if h[0][-1] == EOS]
        live = [h for h in best if h[0][-1] != EOS]
        if not live:
            break
    ids, score, _ = max(finished + live, key=lambda h: h[1])
    return ids, score


def _normalise_beam(result):
    """(ids, score) with ids as a list of ints and score as a float, whatever tensor types the learner used."""
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        return result
    ids, score = result
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    if isinstance(ids, (list, tuple)):
        ids = [int(i) for i in ids]
    if isinstance(score, torch.Tensor) and score.numel() == 1:
        score = score.item()
    return ids, score


class _TableModel(nn.Module):
    """A stand-in decoder with the model interface whose next-character distribution depends only on the
    previous character: probabilities from a table. Used to build beam-search cases by hand."""

    def __init__(self, V: int, rows: dict[int, dict[int, float]]):
        super().__init__()
        probs = torch.full((V, V), 1e-6)
        for prev, nxt in rows.items():
            for char, p in nxt.items():
                probs[prev, char] = p
        self.logits = nn.Parameter((probs / probs.sum(-1, keepdim=True)).log(), requires_grad=False)

    def encode(self, src, src_len):
        B, S = src.shape
        return torch.zeros(B, S, 1), torch.zeros(B, 1), torch.ones(B, S, dtype=torch.bool)

    def init_state(self, summary):
        return torch.zeros_like(summary)

    def step(self, y_prev, state, enc, summary, mask):
        return self.logits[y_prev], state, None


# After <bos>: a .6, b .25, c .15. After a: x .55, y .45; after b: z .9. x ends with p .5, y and z with .99.
# A beam of 2 keeps "ax" (.33) and "ay" (.27) and returns "ay<eos>" (.267); ranking extensions by their last
# character alone keeps "bz" (.9) and "ax" instead and returns "bz<eos>" (.223); greedy returns "ax<eos>" (.165).
_A, _B, _C, _X, _Y, _Z = range(4, 10)
_TABLE = {BOS: {_A: .6, _B: .25, _C: .15}, _A: {_X: .55, _Y: .45}, _B: {_Z: .9, _X: .1}, _C: {EOS: .5, _X: .5},
          _X: {EOS: .5, _A: .5}, _Y: {EOS: .99, _A: .01}, _Z: {EOS: .99, _A: .01}}
# Stopping at once (<eos> first, p .5) beats "axy<eos>" (.45 x .9^3 = .33) by total log-probability, though
# the longer output is more likely per character: a length-normalised choice returns the longer one.
_SHORT_WINS = {BOS: {EOS: .5, _A: .45, _B: .05}, _A: {_X: .9, _B: .1}, _X: {_Y: .9, _B: .1}, _Y: {EOS: .9, _B: .1},
               _B: {EOS: .5, _B: .5}}


@exercise("3.4", "Beam search", reference="course_utils.seq2seq:beam_search",
          hint="Score = sum of log-probabilities. Each step extend every live hypothesis by every character and keep "
               "the beam_size best extensions over all of them; an extension ending in <eos> is finished and leaves "
               "the beam. At the end return the best of the finished and still-live hypotheses.")
def _():
    g = case_rng(304)
    for name, kw, n, beam_size, max_len in [
            ("a beam of one is greedy decoding", dict(eos_bias=-1.0), 5, 1, 6),
            ("no attention, beam 3", dict(eos_bias=-1.0, out_scale=1.5), 6, 3, 6),
            ("additive attention, bidirectional encoder, beam 4", dict(attention="additive", bidirectional=True,
                                                                       eos_bias=-1.0, out_scale=1.5), 4, 4, 5),
            ("beam wider than every possibility: the exact best output", dict(V=6, eos_bias=0.0, out_scale=1.5),
             3, 1000, 3),
            ("an early <eos> competes with longer outputs, beam 2", dict(eos_bias=0.5, out_scale=1.5), 5, 2, 8),
            ("a table decoder (next character depends on the last one only), beam 2", "table", 3, 2, 4),
            ("the same table decoder, beam 3", "table", 3, 3, 4),
            ("a table decoder whose best output is empty (<eos> at once), beam 2", "short", 3, 2, 5),
            ("general attention, beam 3", dict(attention="general", eos_bias=-1.0, out_scale=1.5), 5, 3, 7),
            ("dot attention, beam 5", dict(attention="dot", eos_bias=-1.0, out_scale=1.5), 6, 5, 6)]:
        tables = {"table": _TABLE, "short": _SHORT_WINS}
        table = tables.get(kw) if isinstance(kw, str) else None
        model = _model(g, **kw) if table is None else _TableModel(10, table)
        b = _batch(g, 10 if table is not None else model.cfg.vocab_size, [n], [1])
        yield Case(f"{name}: source length {n}, beam_size={beam_size}, max_len={max_len}",
                   run=lambda fn, a=(model, b.src, b.src_len, beam_size, max_len):
                       _normalise_beam(_decode_step_by_step(fn, *a)),
                   expected=lambda a=(model, b.src, b.src_len, beam_size, max_len): _beam_expected(*a),
                   names=("ids", "log-probability"), atol=1e-4, check_dtype=False)


# ----------------------------------------------------------------------------------------------
# 02 — attention scores and weights
# ----------------------------------------------------------------------------------------------
@exercise("3.5", "Additive (Bahdanau) attention score", reference="course_utils.attention:additive_score",
          hint="scores[b, s] = v . tanh(query[b] @ W_q + keys[b, s] @ W_k): tanh inside, then the dot product with v.")
def _():
    g = case_rng(305)
    for B, S, Dq, Dk, A, scale in [(1, 1, 3, 3, 2, 1.0), (2, 5, 4, 6, 8, 1.0), (3, 7, 16, 8, 5, 1.0),
                                   (2, 4, 5, 5, 6, 20.0)]:
        q, k = randn(g, B, Dq, scale=scale), randn(g, B, S, Dk, scale=scale)
        W_q, W_k, v = randn(g, Dq, A) / math.sqrt(Dq), randn(g, Dk, A) / math.sqrt(Dk), randn(g, A)
        name = f"query ({B},{Dq}), keys ({B},{S},{Dk}), A={A}" + (", large inputs (tanh saturates)" if scale > 1 else "")
        yield Case(name, args=(q, k, W_q, W_k, v), names="scores", atol=1e-5,
                   expected=lambda a=(q, k, W_q, W_k, v): _additive_loop(*a))  # explicit loop over every (example, key)
    a = (randn(g, 2, 4), randn(g, 2, 5, 3), randn(g, 4, 6) / 2, randn(g, 3, 6) / 2, randn(g, 6))
    yield Case("gradients reach query, keys, W_q, W_k and v (the trained model learns through them)",
               run=lambda fn, a=a: _output_and_grads(fn, a, range(5)), atol=1e-5,
               names=("scores", "d query", "d keys", "d W_q", "d W_k", "d v"),
               expected=lambda a=a: _output_and_grads(_additive_loop, a, range(5)))


def _additive_loop(q, k, W_q, W_k, v):
    B, S = k.shape[:2]
    return torch.stack([torch.stack([v @ torch.tanh(q[b] @ W_q + k[b, s] @ W_k) for s in range(S)]) for b in range(B)])


def _softmax_rows(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over each row's allowed keys only, in float64, written out row by row; zeros elsewhere."""
    out = torch.zeros_like(scores)
    rows = scores.reshape(-1, scores.shape[-1])
    keep = (torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.expand_as(scores)).reshape(rows.shape)
    flat = out.view(rows.shape)
    for r in range(rows.shape[0]):
        e = torch.exp(rows[r, keep[r]].double() - rows[r, keep[r]].double().max())
        flat[r, keep[r]] = (e / e.sum()).to(scores.dtype)
    return out


@exercise("3.6", "Attention weights with a padding mask (a softmax written by hand)",
          reference="course_utils.attention:attention_weights", forbid=SOFTMAX_CALLS,
          hint="Masked keys (mask False) need score -inf, not 0. Subtract each ROW's own maximum before exp (one global "
               "maximum flushes rows of smaller scores to 0/0), then divide by the row sum over the LAST axis.")
def _():
    g = case_rng(306)
    scales = torch.tensor([0.0, 400.0, -400.0])[:, None]  # three rows hundreds apart
    cases = [("scores (3, 5), no mask", randn(g, 3, 5), None),
             ("scores (3, 6), key lengths [6, 4, 1]", randn(g, 3, 6), _lengths_mask([6, 4, 1], 6)),
             ("one key: scores (2, 1)", randn(g, 2, 1), torch.ones(2, 1, dtype=torch.bool)),
             ("very negative scores (-50 ± 5), key lengths [2, 5]", randn(g, 2, 5, scale=5) - 50,
              _lengths_mask([2, 5], 5)),
             ("large scores (x1000): exp must not overflow", randn(g, 2, 4, scale=1000), None),
             ("rows on very different scales (around 0, +400, -400): each row needs its own maximum",
              randn(g, 3, 6) + scales, None),
             ("padding keys hold the largest scores (+1e4) and must not set the maximum", randn(g, 2, 5),
              _lengths_mask([3, 5], 5)),
             ("scores (2, 3, 5) with mask (2, 1, 5) broadcast over queries", randn(g, 2, 3, 5),
              _lengths_mask([3, 5], 5)[:, None, :]),
             ("float64 scores (2, 4): keep the dtype", randn(g, 2, 4).double(), _lengths_mask([4, 2], 4))]
    for name, scores, mask in cases:
        if "padding keys" in name:
            scores = scores.masked_fill(~mask, 1e4)
        yield Case(name, args=(scores, mask), names="weights", atol=1e-6,
                   expected=lambda a=(scores, mask): _softmax_rows(*a))
    a = (randn(g, 3, 6, scale=3), _lengths_mask([6, 4, 2], 6))
    yield Case("gradients flow back to the scores (0 for masked keys), key lengths [6, 4, 2]",
               run=lambda fn, a=a: _output_and_grads(fn, a, (0,)), names=("weights", "d scores"), atol=1e-6,
               expected=lambda a=a: _output_and_grads(
                   lambda s_, m_: torch.softmax(s_.masked_fill(~m_, float("-inf")), dim=-1), a, (0,)))


# ----------------------------------------------------------------------------------------------
# 03 — scaled dot-product attention, causal masks, multi-head attention, RoPE
# ----------------------------------------------------------------------------------------------
def _output_and_grads(fn, args, wrt):
    """fn(*args) and the gradients of sum(output * w), w a fixed ramp, with respect to args[i] for i in `wrt`."""
    args = [a.detach().clone().requires_grad_(i in wrt) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    out = fn(*args)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        return (out, *([None] * len(wrt)))  # the comparison names the missing gradient
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * w).sum().backward()
    return (out.detach(), *(args[i].grad for i in wrt))


@exercise("3.7", "Scaled dot-product attention", reference="course_utils.attention:scaled_dot_product_attention",
          forbid=ATTENTION_CALLS,
          hint="Scores compare every query with every key and are divided by sqrt(d_k) (the query/key width, not d_v); "
               "keys where the mask is False get weight 0; the weights of each query sum to 1 over the keys.")
def _():
    g = case_rng(307)
    shapes = [("length one: q, k (1, 1, 4), v (1, 1, 4)", (1,), 1, 1, 4, 4, None),
              ("q (2, 5, 8), k (2, 7, 8), v (2, 7, 3)", (2,), 5, 7, 8, 3, None),
              ("heads: (2, 3, 6, 16) with a causal mask (6, 6)", (2, 3), 6, 6, 16, 16, "causal"),
              ("padding: (3, 2, 4, 16), mask (3, 1, 1, 6) from key lengths [6, 2, 4]", (3, 2), 4, 6, 16, 16, "pad"),
              ("a random mask (5, 7), T != S: rows index queries, columns keys", (2,), 5, 7, 8, 4, "random"),
              ("large values (x4), d_k=64, causal", (1, 2), 5, 5, 64, 8, "causal")]
    for name, lead, T, S, dk, dv, kind in shapes:
        scale = 4.0 if "large" in name else 1.0
        q, k, v = randn(g, *lead, T, dk, scale=scale), randn(g, *lead, S, dk, scale=scale), randn(g, *lead, S, dv)
        mask = None
        if kind == "causal":
            mask = torch.ones(T, S, dtype=torch.bool).tril()
        elif kind == "pad":
            mask = _lengths_mask([6, 2, 4], S)[:, None, None, :]
        elif kind == "random":
            mask = torch.rand(T, S, generator=g) < 0.6
            mask[:, 0] = True  # every query may see at least one key
        yield Case(name, args=(q, k, v, mask), names="output", atol=1e-5,
                   expected=lambda a=(q, k, v, mask): F.scaled_dot_product_attention(*a[:3], attn_mask=a[3]))
    q, k, v = randn(g, 2, 4, 8), randn(g, 2, 6, 8), randn(g, 2, 6, 5)
    mask = _lengths_mask([6, 3], 6)[:, None, :]
    yield Case("gradients flow to q, k and v: (2, 4, 8), (2, 6, 8), (2, 6, 5), key lengths [6, 3]",
               run=lambda fn, a=(q, k, v, mask): _output_and_grads(fn, a, (0, 1, 2)), names=("output", "dq", "dk", "dv"),
               atol=1e-5, expected=lambda a=(q, k, v, mask): _output_and_grads(
                   lambda q_, k_, v_, m_: F.scaled_dot_product_attention(q_, k_, v_, attn_mask=m_), a, (0, 1, 2)))


@exercise("3.8", "Causal mask (also for queries that are the last T of S keys)",
          reference="course_utils.attention:causal_mask",
          hint="Query i sits at absolute position i + (S - T); it may see every key j <= i + (S - T). Return dtype torch.bool.")
def _():
    for T, S in [(1, None), (2, None), (5, None), (16, None), (1, 7), (3, 8)]:
        S_ = T if S is None else S
        label = f"T={T}" if S is None else f"T={T} new queries after {S - T} cached keys (S={S})"
        yield Case(label, args=(T,) if S is None else (T, S), names="mask",
                   expected=lambda T=T, S_=S_: torch.arange(S_)[None, :] <= torch.arange(T)[:, None] + (S_ - T))


def _mha_expected(x, params, n_head, kwargs):
    """`torch.nn.MultiheadAttention` with the same parameters."""
    B, T, C = x.shape
    with torch.random.fork_rng():
        mha = nn.MultiheadAttention(C, n_head, batch_first=True)
    with torch.no_grad():
        for p, value in zip((mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias), params):
            p.copy_(value)
        return mha(x, x, x, need_weights=False, **kwargs)[0]


@exercise("3.9", "Multi-head self-attention (matches nn.MultiheadAttention)",
          reference="course_utils.attention:multi_head_attention", forbid=ATTENTION_CALLS,
          hint="Split q, k, v with view(B, T, nh, hs).transpose(1, 2); scale by sqrt(hs), not sqrt(C); merge with "
               "transpose(1, 2).reshape(B, T, C); finish with the output projection.")
def _():
    g = case_rng(309)
    for B, T, C, nh, kind in [(1, 1, 8, 2, None), (2, 5, 16, 4, None), (3, 7, 12, 3, "causal"),
                              (2, 6, 16, 1, None), (3, 5, 16, 4, "pad")]:
        params = (randn(g, 3 * C, C) / math.sqrt(C), randn(g, 3 * C), randn(g, C, C) / math.sqrt(C), randn(g, C))
        x = randn(g, B, T, C)
        mask, kwargs = None, {}
        if kind == "causal":
            mask = torch.ones(T, T, dtype=torch.bool).tril()
            kwargs = {"attn_mask": ~mask}  # nn.MultiheadAttention: True means "may NOT attend"
        elif kind == "pad":
            keep = _lengths_mask([5, 2, 3], T)
            mask = keep[:, None, None, :]  # (B, 1, 1, T)
            kwargs = {"key_padding_mask": ~keep}
        label = {None: "", "causal": ", causal mask", "pad": ", key lengths [5, 2, 3]"}[kind]
        yield Case(f"x ({B},{T},{C}), {nh} heads{label}", args=(x, *params, nh, mask), names="output", atol=1e-5,
                   expected=lambda a=(x, params, nh, kwargs): _mha_expected(*a))


def _rope_complex(x, positions, base=10000.0):
    """Each pair (x_i, x_{i+hs/2}) as one complex number, multiplied by e^{i m theta_i}."""
    hs = x.shape[-1]
    theta = 1.0 / base ** (torch.arange(hs // 2, dtype=torch.float64) * 2 / hs)
    angle = positions.double()[:, None] * theta  # (T, hs/2)
    z = torch.complex(x[..., : hs // 2].double(), x[..., hs // 2:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1).float()


@exercise("3.10", "Rotary position embedding (RoPE)", reference="course_utils.attention:rope",
          hint="theta_i = base ** (-2i / hs) for i < hs/2; pair x[..., i] with x[..., i + hs/2] (Llama layout) and "
               "rotate it by the angle positions[t] * theta_i.")
def _():
    g = case_rng(310)
    cases = [("x (1, 1, 2) at position 0 (no rotation)", (1, 1, 2), torch.tensor([0]), {}, 1e-5),
             ("x (2, 5, 8), positions 0..4", (2, 5, 8), torch.arange(5), {}, 1e-5),
             ("x (1, 3, 4, 16), positions 7..10 (a continuation)", (1, 3, 4, 16), torch.arange(7, 11), {}, 1e-4),
             ("x (2, 3, 6), positions [3, 0, 5], base=500", (2, 3, 6), torch.tensor([3, 0, 5]), {"base": 500.0}, 1e-5),
             ("x (1, 2, 32), large positions [1000, 4000]", (1, 2, 32), torch.tensor([1000, 4000]), {}, 3e-3)]
    for name, shape, pos, kwargs, atol in cases:
        x = randn(g, *shape)
        yield Case(name, args=(x, pos), kwargs=kwargs, names="rotated x", atol=atol,
                   expected=lambda a=(x, pos), kw=kwargs: _rope_complex(*a, **kw))
