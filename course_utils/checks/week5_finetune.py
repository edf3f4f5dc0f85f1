"""Week 5 exercises (notebooks 01-02): assistant-only labels, the packed attention mask, the SFT loss,
a LoRA linear layer and merging its update.

Expected values come from independent references computed in the trusted checker: labels built from
the known role of every segment a case is assembled from, block-diagonal masks from `torch.block_diag`
of lower-triangular blocks, the loss from `log_softmax` + `gather`, and LoRA outputs from `F.linear`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..exercises import Case, case_rng, exercise, randn

IGNORE = -100


# ----------------------------------------------------------------------------------------------
# 5.1 assistant-only labels (notebook 01)
# ----------------------------------------------------------------------------------------------
# A toy vocabulary: 1 = <|im_start|>, 2 = <|im_end|>, 3 = "\n", 4/5/6 = the role words; content ids 7..60.
IM_START, IM_END, NL = 1, 2, 3
ROLE_IDS = {"system": 4, "user": 5, "assistant": 6}


def _conversation(g: torch.Generator, roles: list[str], *, header_nl: bool = True, open_end: bool = False,
                  inject: list[int] | None = None) -> list[tuple[list[int], bool]]:
    """Segments (token ids, labelled?) of a toy ChatML conversation. `open_end`: the last assistant turn is cut
    before its <|im_end|>; `inject`: tokens put inside the first user turn's content (a trap)."""
    segs: list[tuple[list[int], bool]] = []
    for i, role in enumerate(roles):
        header = [IM_START, ROLE_IDS[role]] + ([NL] if header_nl else [])
        body = torch.randint(7, 61, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        if inject and role == "user":
            body = body[:1] + inject + body[1:]
            inject = None
        tail = [] if (open_end and i == len(roles) - 1) else [IM_END, NL]
        segs.append((header, False))
        segs.append((body + tail, role == "assistant"))
    return segs


def _labels_case(name: str, segs: list[tuple[list[int], bool]], header: list[int], hint: str | None = None) -> Case:
    ids = torch.tensor([t for s, _ in segs for t in s])

    def expected():
        return torch.tensor([t if lab else IGNORE for s, lab in segs for t in s])

    return Case(name, args=(ids, header, IM_START), expected=expected, names="labels", hint=hint)


@exercise("5.1", "Assistant-only labels", reference="course_utils.finetune:assistant_labels",
          hint="Label a token with its own id when it comes after an assistant header (the ids of "
               "'<|im_start|>assistant\\n', passed as `header`) and before the next <|im_start|> token; "
               "every other token, the header itself included, gets -100. The turn's <|im_end|> and the newline "
               "after it ARE labelled (the model must learn to stop). Do not shift: sft_loss shifts.")
def _():
    g = case_rng(51)
    hdr = [IM_START, ROLE_IDS["assistant"], NL]
    yield _labels_case("system, user, assistant (one reply)", _conversation(g, ["system", "user", "assistant"]), hdr)
    yield _labels_case("user, assistant, user, assistant: every assistant turn is labelled",
                       _conversation(g, ["system", "user", "assistant", "user", "assistant"]), hdr,
                       hint="label EVERY assistant turn, not only the last one")
    yield _labels_case("the reply's <|im_end|> and newline are labelled", _conversation(g, ["user", "assistant"]), hdr,
                       hint="train on <|im_end|> (and the newline after it): the model must learn to end its turn")
    yield _labels_case("a user message containing the tokens 'assistant\\n' (without <|im_start|>)",
                       _conversation(g, ["system", "user", "assistant"], inject=[ROLE_IDS["assistant"], NL]), hdr,
                       hint="an assistant turn starts only at the full header, <|im_start|> included")
    yield _labels_case("an assistant turn cut before its <|im_end|> (truncated): label to the end",
                       _conversation(g, ["user", "assistant"], open_end=True), hdr)
    yield _labels_case("a conversation with no assistant turn: nothing labelled", _conversation(g, ["system", "user"]),
                       hdr)
    yield _labels_case("a 2-token header (no newline token): use `header`, do not assume its length",
                       _conversation(g, ["user", "assistant", "user", "assistant"], header_nl=False),
                       [IM_START, ROLE_IDS["assistant"]])


# ----------------------------------------------------------------------------------------------
# 5.2 the attention mask of packed sequences (notebook 01)
# ----------------------------------------------------------------------------------------------
def _positions(lengths_per_row: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])


def _packed_case(name: str, lengths_per_row: list[list[int]], hint: str | None = None) -> Case:
    pos = _positions(lengths_per_row)

    def expected():
        return torch.stack([torch.block_diag(*[torch.ones(n, n).tril() for n in row]).bool()
                            for row in lengths_per_row])

    return Case(name, args=(pos,), expected=expected, names="mask", hint=hint)


@exercise("5.2", "Attention mask of packed sequences", reference="course_utils.finetune:packed_attention_mask",
          hint="position_ids (B, T) restart at 0 where a new sequence starts. Return a bool tensor (B, T, T), True "
               "where query i may attend to key j: i and j in the SAME sequence and j <= i (the diagonal included).")
def _():
    yield _packed_case("one row, one sequence of 6: plain causal", [[6]])
    yield _packed_case("one row, sequences of 3, 2, 4: no attention across boundaries", [[3, 2, 4]],
                       hint="a token must not see the previous sequence: build the mask per sequence")
    yield _packed_case("two rows packed differently", [[2, 5, 1], [4, 4]])
    yield _packed_case("sequences of length 1 (each token sees only itself)", [[1, 1, 3, 1]])
    yield _packed_case("one token", [[1]])
    g = case_rng(52)
    rows = []
    for _ in range(3):  # random lengths filling 12 positions per row
        row: list[int] = []
        while sum(row) < 12:
            row.append(min(int(torch.randint(1, 7, (1,), generator=g)), 12 - sum(row)))
        rows.append(row)
    yield _packed_case(f"three rows of random lengths {rows}", rows)


# ----------------------------------------------------------------------------------------------
# 5.3 the SFT loss (notebook 01)
# ----------------------------------------------------------------------------------------------
def _loss_case(name: str, logits: torch.Tensor, labels: torch.Tensor, hint: str | None = None) -> Case:
    def harness(fn):
        x = logits.clone().requires_grad_(True)
        loss = fn(x, labels.clone())
        if not isinstance(loss, torch.Tensor):
            return loss
        if not loss.requires_grad:
            return (loss, "the loss is detached from the logits: no gradient")
        loss.backward()
        return (loss.detach(), x.grad)

    def reference(x, y):
        logp = torch.log_softmax(x[:, :-1], dim=-1)  # (B, T-1, V): position t predicts token t + 1
        tgt = y[:, 1:]
        keep = tgt != IGNORE
        picked = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        return -(picked * keep).sum() / keep.sum()

    return Case(name, run=harness, expected=lambda: harness(reference), names=("loss", "dloss/dlogits"),
                atol=1e-5, rtol=1e-4, hint=hint)


def _labels(g: torch.Generator, B: int, T: int, V: int, keep: list[list[int]]) -> torch.Tensor:
    y = torch.full((B, T), IGNORE)
    for b, (lo, hi) in enumerate(keep):
        y[b, lo:hi] = torch.randint(0, V, (hi - lo,), generator=g)
    return y


@exercise("5.3", "SFT loss: shifted cross-entropy on labelled tokens", reference="course_utils.finetune:sft_loss",
          hint="logits[:, t] predict labels[:, t + 1]: drop the last logit and the first label, then cross-entropy "
               "over the tokens whose label is not -100, averaged over ALL such tokens of the batch (not per row "
               "first). Return a scalar tensor connected to the logits.")
def _():
    g = case_rng(53)
    yield _loss_case("B=2, T=6, V=11, answer tokens 3..5 labelled", randn(g, 2, 6, 11), _labels(g, 2, 6, 11, [[3, 6], [3, 6]]))
    yield _loss_case("rows with different numbers of labelled tokens (1 and 6)", randn(g, 2, 8, 7),
                     _labels(g, 2, 8, 7, [[7, 8], [2, 8]]),
                     hint="average over all labelled tokens of the batch, not per row and then over rows")
    yield _loss_case("batch of one, every token labelled", randn(g, 1, 5, 9), _labels(g, 1, 5, 9, [[0, 5]]),
                     hint="the first label has no logit before it; the last logit has no label after it")
    yield _loss_case("labels -100 in the middle (a user turn between two replies)", randn(g, 1, 9, 6),
                     torch.tensor([[-100, 3, 4, -100, -100, -100, 1, 2, 5]]))
    yield _loss_case("large logits (B=3, T=4, V=50) ~ 30", randn(g, 3, 4, 50, scale=30.0),
                     _labels(g, 3, 4, 50, [[1, 4], [2, 4], [1, 3]]))


# ----------------------------------------------------------------------------------------------
# 5.4 a LoRA linear layer (notebook 02)
# ----------------------------------------------------------------------------------------------
def _lora_case(name: str, g: torch.Generator, d_in: int, d_out: int, r: int, alpha: float, shape: tuple[int, ...],
               bias: bool = True, dtype: torch.dtype = torch.float32, hint: str | None = None) -> Case:
    W, b = randn(g, d_out, d_in).to(dtype) / math.sqrt(d_in), randn(g, d_out).to(dtype)
    A, Bm = randn(g, r, d_in).to(dtype), randn(g, d_out, r).to(dtype)
    x, up = randn(g, *shape, d_in).to(dtype), randn(g, *shape, d_out).to(dtype)

    def harness(cls):
        base = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
        with torch.no_grad():
            base.weight.copy_(W)
            if bias:
                base.bias.copy_(b)
        layer = cls(base, r=r, alpha=alpha)
        y0 = layer(x.clone()).detach()  # at initialisation: B = 0, so exactly the base layer
        params = dict(layer.named_parameters())
        if "lora_A" not in params or "lora_B" not in params:
            return f"no parameters named lora_A and lora_B: found {sorted(params)}"
        if base.weight.requires_grad or (bias and base.bias.requires_grad):
            return "the base layer is not frozen (its weight still requires grad)"
        shapes = (tuple(layer.lora_A.shape), tuple(layer.lora_B.shape))
        b_zero, a_nonzero = bool((layer.lora_B == 0).all()), bool((layer.lora_A != 0).any())
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(Bm)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * up).sum().backward()
        return (y0, shapes, b_zero, a_nonzero, y.detach(), xi.grad, layer.lora_A.grad, layer.lora_B.grad)

    def expected():
        y0 = F.linear(x, W, b if bias else None)
        xi, Ai, Bi = (t.clone().requires_grad_(True) for t in (x, A, Bm))
        y = F.linear(xi, W, b if bias else None) + (alpha / r) * F.linear(F.linear(xi, Ai), Bi)
        (y * up).sum().backward()
        return (y0, ((r, d_in), (d_out, r)), True, True, y.detach(), xi.grad, Ai.grad, Bi.grad)

    return Case(name, run=harness, expected=expected, atol=1e-5, rtol=1e-4, hint=hint,
                names=("output at init", "(lora_A shape, lora_B shape)", "lora_B all zero at init",
                       "lora_A random (non-zero) at init", "output", "dL/dx", "dL/dlora_A", "dL/dlora_B"))


@exercise("5.4", "A LoRA linear layer", reference="course_utils.lora:LoRALinear",
          hint="__init__(base, r, alpha): freeze base (requires_grad_(False)); lora_A = Parameter (r, in_features), "
               "random (nn.init.kaiming_uniform_(a=sqrt(5))); lora_B = Parameter (out_features, r) of zeros; "
               "forward: base(x) + (alpha / r) * x @ A^T @ B^T, in the base layer's dtype.")
def _():
    g = case_rng(54)
    yield _lora_case("in 16, out 12, r 4, alpha 8, x (2, 5, 16)", g, 16, 12, 4, 8.0, (2, 5))
    yield _lora_case("r 2, alpha 16 (scaling 8, not alpha and not r/alpha)", g, 10, 10, 2, 16.0, (3, 10),
                     hint="scale the update by alpha / r")
    yield _lora_case("rank 1, no bias, x (1, 1, 8)", g, 8, 6, 1, 1.0, (1, 1), bias=False)
    yield _lora_case("out 20 > in 6: shapes tell A and B apart", g, 6, 20, 3, 6.0, (4,),
                     hint="lora_A is (r, in_features), lora_B is (out_features, r)")
    yield _lora_case("float64 base layer", g, 8, 8, 2, 4.0, (2, 3), dtype=torch.float64,
                     hint="create lora_A and lora_B with the base weight's dtype")


# ----------------------------------------------------------------------------------------------
# 5.5 merging a LoRA update into the weight (notebook 02)
# ----------------------------------------------------------------------------------------------
def _merge_case(name: str, g: torch.Generator, d_in: int, d_out: int, r: int, scaling: float,
                dtype: torch.dtype = torch.float32, hint: str | None = None) -> Case:
    W, A, Bm = randn(g, d_out, d_in).to(dtype), randn(g, r, d_in).to(dtype), randn(g, d_out, r).to(dtype)
    return Case(name, args=(W, A, Bm, scaling), expected=lambda: W + scaling * torch.einsum("or,ri->oi", Bm, A),
                names="merged weight", hint=hint)


@exercise("5.5", "Merge a LoRA update into the weight", reference="course_utils.lora:merged_weight",
          hint="Return a NEW tensor W + scaling * (B @ A), shape (out, in), same dtype as W; do not modify W in "
               "place (unmerging must be able to subtract the same update from the original).")
def _():
    g = case_rng(55)
    yield _merge_case("W (12, 16), r 4, scaling 2", g, 16, 12, 4, 2.0)
    yield _merge_case("W (20, 6): out > in", g, 6, 20, 3, 0.5, hint="B A is (out, r) @ (r, in)")
    yield _merge_case("square W (8, 8), r 8", g, 8, 8, 8, 1.5, hint="B @ A, not A^T @ B^T or A @ B")
    yield _merge_case("rank 1, scaling 16", g, 5, 7, 1, 16.0)
    yield _merge_case("float64", g, 6, 4, 2, 3.0, dtype=torch.float64)
