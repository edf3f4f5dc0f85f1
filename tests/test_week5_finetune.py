"""Week 5 part A (notebooks 01-02): every check fails on plausible wrong answers and passes correct
alternatives; the instruction data, chat formatting, masking, packing, SFT loss and LoRA match their
references (SmolLM2's chat template, transformers, TRL, PEFT)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from course_utils import finetune as ft
from course_utils import lora as L
from course_utils import tasks

ROOT = Path(__file__).resolve().parent.parent
IGNORE = -100


# ----------------------------------------------------------------------------------------------
# 5.1 assistant-only labels
# ----------------------------------------------------------------------------------------------
def _spans(ids, header, im_start, *, include_header=False, stop_at_im_end=False, im_end=2, last_only=False,
           ignore_im_start=False):
    """Shared skeleton of the wrong versions below: which tokens count as assistant body."""
    ids_l = ids.tolist()
    labels = torch.full_like(ids, IGNORE)
    h = len(header)
    turns = []
    t = 0
    while t < len(ids_l):
        match = ids_l[t:t + h] == list(header) if not ignore_im_start else ids_l[t + 1:t + h] == list(header[1:])
        if match:
            start = t if include_header else t + h
            end = t + h
            while end < len(ids_l) and ids_l[end] != im_start and not (stop_at_im_end and ids_l[end] == im_end):
                end += 1
            turns.append((start, end))
            t = end
        else:
            t += 1
    for s, e in turns[-1:] if last_only else turns:
        labels[s:e] = ids[s:e]
    return labels


def labels_with_header(ids, header, im_start):
    return _spans(ids, header, im_start, include_header=True)


def labels_without_im_end(ids, header, im_start):  # the classic bug: <|im_end|> not trained, replies never stop
    return _spans(ids, header, im_start, stop_at_im_end=True)


def labels_last_turn_only(ids, header, im_start):
    return _spans(ids, header, im_start, last_only=True)


def labels_role_word_only(ids, header, im_start):  # matches "assistant\n" anywhere, even inside a user message
    return _spans(ids, header, im_start, ignore_im_start=True)


def labels_pre_shifted(ids, header, im_start):  # shifts here AND the loss shifts again
    lab = _spans(ids, header, im_start)
    return torch.cat([lab[1:], torch.tensor([IGNORE])])


def labels_header_length_3(ids, header, im_start):  # assumes a 3-token header
    return _spans(ids, [im_start, header[1], 3], im_start)


def labels_state_machine(ids, header, im_start):
    out, h, state = [], list(header), "out"
    buf = ids.tolist()
    for t, tok in enumerate(buf):
        if tok == im_start:
            state = "header" if buf[t:t + len(h)] == h else "out"
            left = len(h)
        if state == "header":
            left -= 1
            out.append(IGNORE)
            if left == 0:
                state = "in"
            continue
        out.append(tok if state == "in" else IGNORE)
    return torch.tensor(out, dtype=ids.dtype)


def labels_vectorised(ids, header, im_start):
    h = len(header)
    starts = (ids == im_start).long().cumsum(0)  # which turn each token belongs to (0 before the first)
    labels = torch.full_like(ids, IGNORE)
    for turn_start in (ids == im_start).nonzero().flatten().tolist():
        if ids[turn_start:turn_start + h].tolist() == list(header):
            same_turn = starts == starts[turn_start]
            pos = torch.arange(len(ids))
            keep = same_turn & (pos >= turn_start + h)
            labels[keep] = ids[keep]
    return labels


# ----------------------------------------------------------------------------------------------
# 5.2 packed attention mask
# ----------------------------------------------------------------------------------------------
def mask_plain_causal(pos):
    T = pos.shape[-1]
    return torch.ones(T, T, dtype=torch.bool).tril().expand(pos.shape[0], T, T).clone()


def mask_not_causal(pos):
    seq = (pos == 0).cumsum(-1)
    return seq[:, :, None] == seq[:, None, :]


def mask_strict(pos):  # forgets the diagonal: a token cannot see itself
    seq = (pos == 0).cumsum(-1)
    T = pos.shape[-1]
    return (seq[:, :, None] == seq[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril(-1)


def mask_transposed(pos):  # keys after the query instead of before
    return ft.packed_attention_mask(pos).transpose(1, 2)


def mask_float_additive(pos):  # an additive float mask (0 / -inf) instead of booleans
    m = ft.packed_attention_mask(pos)
    return torch.zeros(m.shape).masked_fill(~m, float("-inf"))


def mask_by_position_diff(pos):
    first = pos[:, :1] - 1
    seq = (torch.diff(pos, prepend=first, dim=-1) != 1).cumsum(-1)
    T = pos.shape[-1]
    return (seq.unsqueeze(2) == seq.unsqueeze(1)) & torch.tril(torch.ones(T, T, dtype=torch.bool))


def mask_loops(pos):
    B, T = pos.shape
    out = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            start = i - int(pos[b, i])  # the sequence started pos[i] tokens ago
            out[b, i, start:i + 1] = True
    return out


# ----------------------------------------------------------------------------------------------
# 5.3 SFT loss
# ----------------------------------------------------------------------------------------------
def loss_not_shifted(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def loss_per_row_mean(logits, labels):
    rows = [F.cross_entropy(logits[b, :-1], labels[b, 1:], ignore_index=IGNORE) for b in range(logits.shape[0])]
    return torch.stack(rows).mean()


def loss_shift_wrong_way(logits, labels):
    return F.cross_entropy(logits[:, 1:].reshape(-1, logits.shape[-1]), labels[:, :-1].reshape(-1),
                           ignore_index=IGNORE)


def loss_sum(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def loss_detached(logits, labels):
    return ft.sft_loss(logits.detach(), labels)


def loss_manual(logits, labels):
    targets = labels[:, 1:]
    mask = targets != IGNORE
    lp = logits[:, :-1].log_softmax(-1)[mask]  # (N, V)
    return -lp[torch.arange(lp.shape[0]), targets[mask]].mean()


def loss_nll(logits, labels):
    B, T, V = logits.shape
    return F.nll_loss(F.log_softmax(logits[:, :-1], -1).transpose(1, 2), labels[:, 1:], ignore_index=IGNORE)


# ----------------------------------------------------------------------------------------------
# 5.4 LoRA linear layer
# ----------------------------------------------------------------------------------------------
class _LoRABase(nn.Module):
    def __init__(self, base, r=8, alpha=16.0, *, b_zero=True, freeze=True, scaling=None):
        super().__init__()
        self.base = base
        if freeze:
            base.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if not b_zero:
            nn.init.normal_(self.lora_B)
        self.scaling = alpha / r if scaling is None else scaling(alpha, r)

    def forward(self, x):
        return self.base(x) + self.scaling * (x @ self.lora_A.T @ self.lora_B.T)


class LoRAPlaceholder(nn.Module):
    def __init__(self, base, r=8, alpha=16.0):
        super().__init__()
        self.base = base

    def forward(self, x):
        raise NotImplementedError("complete forward")


class LoRAScaleAlpha(_LoRABase):  # scales by alpha, forgets to divide by r
    def __init__(self, base, r=8, alpha=16.0):
        super().__init__(base, r, alpha, scaling=lambda a, r: a)


class LoRAScaleInverted(_LoRABase):
    def __init__(self, base, r=8, alpha=16.0):
        super().__init__(base, r, alpha, scaling=lambda a, r: r / a)


class LoRARandomB(_LoRABase):  # B random: the model changes before any training
    def __init__(self, base, r=8, alpha=16.0):
        super().__init__(base, r, alpha, b_zero=False)


class LoRANotFrozen(_LoRABase):  # trains the whole base layer too
    def __init__(self, base, r=8, alpha=16.0):
        super().__init__(base, r, alpha, freeze=False)


class LoRAZeroA(_LoRABase):  # both zero: no gradient ever reaches B... and A gets none either
    def __init__(self, base, r=8, alpha=16.0):
        super().__init__(base, r, alpha)
        nn.init.zeros_(self.lora_A)


class LoRAFloat32(_LoRABase):  # adapters always float32
    def __init__(self, base, r=8, alpha=16.0):
        nn.Module.__init__(self)
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) * 0.01)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + self.scaling * (x.float() @ self.lora_A.T @ self.lora_B.T)


class LoRAEinsum(nn.Module):
    def __init__(self, base, r=8, alpha=16.0):
        super().__init__()
        for p in base.parameters():
            p.requires_grad = False
        self.base, self.scale = base, alpha / r
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features, dtype=base.weight.dtype) / math.sqrt(r))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x) + self.scale * torch.einsum("...i,ri,or->...o", x, self.lora_A, self.lora_B)


class LoRAMergedMatrix(nn.Module):  # builds W + s B A on every call
    def __init__(self, base, r=8, alpha=16.0):
        super().__init__()
        base.requires_grad_(False)
        self.base, self.s = base, alpha / r
        self.lora_A = nn.Parameter(nn.init.kaiming_uniform_(base.weight.new_empty(r, base.in_features), a=math.sqrt(5)))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, r))

    def forward(self, x):
        return F.linear(x, self.base.weight + self.s * self.lora_B @ self.lora_A, self.base.bias)


# ----------------------------------------------------------------------------------------------
# 5.5 merge
# ----------------------------------------------------------------------------------------------
def merge_in_place(W, A, B, scaling):
    W += scaling * B @ A
    return W


def merge_no_scaling(W, A, B, scaling):
    return W + B @ A


def merge_wrong_order(W, A, B, scaling):  # A^T B^T is (in, out): only "works" for square W, and wrongly
    return W + scaling * (A.T @ B.T)


def merge_float32(W, A, B, scaling):
    return (W.float() + scaling * B.float() @ A.float())


def merge_einsum(W, A, B, scaling):
    return torch.einsum("or,ri->oi", B, A).mul(scaling).add(W)


def merge_addmm(W, A, B, scaling):
    return torch.addmm(W, B, A, alpha=scaling)


WRONG_IMPLEMENTATIONS = {
    "5.1": [labels_with_header, labels_without_im_end, labels_last_turn_only, labels_role_word_only,
            labels_pre_shifted, labels_header_length_3],
    "5.2": [mask_plain_causal, mask_not_causal, mask_strict, mask_transposed, mask_float_additive],
    "5.3": [loss_not_shifted, loss_per_row_mean, loss_shift_wrong_way, loss_sum, loss_detached],
    "5.4": [LoRAScaleAlpha, LoRAScaleInverted, LoRARandomB, LoRANotFrozen, LoRAZeroA, LoRAFloat32],
    "5.5": [merge_in_place, merge_no_scaling, merge_wrong_order, merge_float32],
}
CORRECT_ALTERNATIVES = {
    "5.1": [labels_state_machine, labels_vectorised],
    "5.2": [mask_by_position_diff, mask_loops],
    "5.3": [loss_manual, loss_nll],
    "5.4": [LoRAEinsum, LoRAMergedMatrix],
    "5.5": [merge_einsum, merge_addmm],
}
PLACEHOLDERS = {"5.4": LoRAPlaceholder}


def test_week5_part_a_exercises_registered():
    from course_utils import list_exercises
    assert {"5.1", "5.2", "5.3", "5.4", "5.5"} <= set(list_exercises(5))


# ----------------------------------------------------------------------------------------------
# The data set and its verifiers
# ----------------------------------------------------------------------------------------------
def test_instruct_files_match_the_generator_and_are_held_out():
    for split in ("train", "val", "test"):
        on_disk = (ROOT / "datasets" / "instruct" / f"{split}.jsonl").read_text().splitlines()
        assert on_disk == [json.dumps(it) for it in tasks.generate_split(split)], split
    key = lambda it: json.dumps(it["messages"][:-1])  # noqa: E731
    train = {key(it) for it in tasks.load_instruct("train")}
    test = tasks.load_instruct("test")
    assert len(test) >= 200 and not any(key(it) in train for it in test)
    assert all(tasks.is_correct(it, it["answer"]) for it in test)


@pytest.mark.parametrize("reply,answer,ok", [
    ("2500", "2500", True), ("2500.0", "2500", True), ("The answer is 2500", "2500", False), ("2501", "2500", False),
    (" 12<|im_end|>", "12", True), ('{"age": 3, "name": "A", "city": "B"}', '{"name": "A", "age": 3, "city": "B"}', True),
    ('{"name": "A", "age": "3", "city": "B"}', '{"name": "A", "age": 3, "city": "B"}', False), ("not json", "{}", False),
    ("1999-01-02", "1999-01-02", True), ("1999-1-2", "1999-01-02", False), ("1, 2, 3", "1, 2, 3", True),
    ("1,2,3", "1, 2, 3", False), (tasks.REFUSAL, tasks.REFUSAL, True), ("No.", tasks.REFUSAL, False)])
def test_verify(reply, answer, ok):
    assert tasks.verify(reply, answer) is ok


def test_load_instruct_rejects_unknown_split_and_task():
    with pytest.raises(ValueError, match="unknown split"):
        tasks.load_instruct("dev")
    with pytest.raises(ValueError, match="unknown task kinds"):
        tasks.load_instruct("test", tasks=("poetry",))


# ----------------------------------------------------------------------------------------------
# Chat formatting and masking against SmolLM2's own template (tokenizer only: fast)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from course_utils import data
    data._ensure_smollm2()
    return AutoTokenizer.from_pretrained(data._smollm2_dir())


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_format_chatml_matches_the_template(tok, n):
    items = tasks.load_instruct("val")
    conv = [it for it in items if (it["task"] == "refuse") == (n % 2 == 1)][n]["messages"]
    for gen in (False, True):
        msgs = conv[:-1] if gen else conv
        assert ft.format_chatml(msgs, add_generation_prompt=gen) == tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=gen)


def test_chat_features_labels_equal_token_level_labels_and_trl_completion_mask(tok):
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    multi = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    for conv in [it["messages"] for it in tasks.load_instruct("val", n=10)] + [multi]:
        f = ft.chat_features(tok, conv)
        ids = torch.tensor(f["input_ids"])
        assert f["input_ids"] == list(tok.apply_chat_template(conv, tokenize=True)["input_ids"])
        assert f["labels"] == ft.assistant_labels(ids, header, im_start).tolist()
        if conv is not multi:  # TRL's prompt-completion mask: everything after the generation prompt
            prompt = tok.apply_chat_template(conv[:-1], tokenize=True, add_generation_prompt=True)["input_ids"]
            want = [IGNORE] * len(prompt) + f["input_ids"][len(prompt):]
            assert f["labels"] == want
    body = [t for t, lab in zip(f["input_ids"], ft.chat_features(tok, multi, train_on_eos=False)["labels"]) if lab != IGNORE]
    assert tok.convert_tokens_to_ids("<|im_end|>") not in body


@pytest.mark.parametrize("bad,match", [
    ([{"role": "human", "content": "hi"}], "unknown role 'human'"),
    ([{"role": "user"}], "keys 'role' and 'content'"),
    ([{"role": "user", "content": 3}], "must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only the first"),
    ([], "non-empty list"),
])
def test_bad_conversations_get_clear_messages(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ft.format_chatml(bad)


def test_too_long_example_gets_a_clear_message(tok):
    conv = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(ValueError, match="longer than max_length=64"):
        ft.chat_features(tok, conv, max_length=64)
    with pytest.raises(ValueError, match="does not fit max_length=8"):
        ft.pack_features([ft.chat_features(tok, conv)], 8, 0)


def test_pad_and_pack_keep_every_labelled_token():
    feats = [{"input_ids": list(range(1, n + 1)), "labels": [IGNORE] * (n // 2) + list(range(n // 2 + 1, n + 1))}
             for n in (5, 3, 7, 2)]
    padded = ft.pad_batch(feats, pad_id=0)
    packed = ft.pack_features(feats, 10, pad_id=0)
    assert padded["input_ids"].shape == (4, 7)
    assert packed["input_ids"].shape == (2, 10)  # [5, 3] [7, 2]
    assert (padded["labels"] != IGNORE).sum() == (packed["labels"] != IGNORE).sum()
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]


def test_sft_loss_equals_transformers_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 13, generator=g)
    labels = torch.randint(0, 13, (3, 7), generator=g)
    labels[0, :4] = IGNORE
    labels[2, 5:] = IGNORE
    assert torch.allclose(ft.sft_loss(logits, labels), ForCausalLMLoss(logits, labels, vocab_size=13), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# LoRA: formula, merge/unmerge, errors, PEFT parity (a tiny random Llama: fast)
# ----------------------------------------------------------------------------------------------
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
                                     ("gate_proj", "up_proj", "down_proj")])
@pytest.mark.parametrize("r", [1, 4])
def test_lora_param_count_formula_equals_model_and_peft(targets, r):
    from peft import LoraConfig, get_peft_model
    model = _tiny_llama()
    L.apply_lora(model, targets, r=r)
    assert L.count_trainable(model) == L.lora_param_count(model.config, targets, r)
    peft_model = get_peft_model(_tiny_llama(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                          lora_dropout=0.0))
    assert L.count_trainable(peft_model) == L.lora_param_count(model.config, targets, r)


def test_lora_forward_and_training_match_peft():
    from peft import LoraConfig, get_peft_model
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    ours = _tiny_llama()
    L.apply_lora(ours, targets, r=4, alpha=8)
    assert L.copy_lora_weights(peft_model, ours) == 2 * len(targets)
    with torch.no_grad():  # a non-zero B so the LoRA branch matters
        for m in L.lora_modules(ours):
            m.lora_B.normal_(0, 0.1)
        for name, m in peft_model.named_modules():
            if hasattr(m, "lora_B") and isinstance(m.lora_B, nn.ModuleDict):
                m.lora_B["default"].weight.copy_(ours.get_submodule(name.removeprefix("base_model.model.")).lora_B)
    x = torch.randint(0, 64, (2, 9))
    assert torch.allclose(ours(x).logits, peft_model(x).logits, atol=1e-5)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, peft_model)]
    for _ in range(3):
        for m, opt in zip((ours, peft_model), opts):
            loss = ft.sft_loss(m(x).logits, x)
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert torch.allclose(ours(x).logits, peft_model(x).logits, atol=1e-4)


def test_merge_unmerge_round_trip_and_output():
    model = _tiny_llama()
    x = torch.randint(0, 64, (1, 7))
    L.apply_lora(model, ("q_proj", "o_proj"), r=2)
    with torch.no_grad():
        for m in L.lora_modules(model):
            m.lora_B.normal_()
        before = model(x).logits
        w0 = model.model.layers[0].self_attn.q_proj.base.weight.clone()
        L.merge_lora(model)
        assert torch.allclose(model(x).logits, before, atol=1e-4)
        L.unmerge_lora(model)
        assert torch.allclose(model.model.layers[0].self_attn.q_proj.base.weight, w0, atol=1e-6)
        assert torch.allclose(model(x).logits, before, atol=1e-5)


def test_lora_bad_target_gets_a_clear_message():
    with pytest.raises(ValueError, match="'qproj' matches no nn.Linear.*q_proj"):
        L.apply_lora(_tiny_llama(), ("qproj",))
    with pytest.raises(ValueError, match="unknown Llama module"):
        L.lora_param_count(_tiny_llama().config, ("qkv",), 4)


def test_packed_forward_equals_separate_forwards():
    model = _tiny_llama()
    seqs = [torch.randint(0, 64, (n,)).tolist() for n in (5, 3, 6)]
    feats = [{"input_ids": s, "labels": s} for s in seqs]
    packed = ft.pack_features(feats, 14, pad_id=0)
    with torch.no_grad():
        out = model(**ft.model_inputs(packed, "cpu")).logits[0]
        t = 0
        for s in seqs:
            alone = model(input_ids=torch.tensor([s])).logits[0]
            assert torch.allclose(out[t:t + len(s)], alone, atol=1e-5)
            t += len(s)
        naive = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]  # no mask
        assert not torch.allclose(naive[5:8], out[5:8], atol=1e-3)  # attends across sequences


def test_peak_memory_is_measured_and_reset_between_blocks():
    """In a fresh process: in a long test session freed memory stays resident and hides a new peak."""
    script = """
import json, torch
from course_utils import finetune as ft
with ft.PeakMemory() as big:
    x = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    x += 1
    del x
with ft.PeakMemory() as small:
    y = torch.ones(1024)
    del y
print(json.dumps([big.start_mb, big.mb, small.start_mb, small.mb]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    big_start, big_peak, small_start, small_peak = json.loads(out.strip().splitlines()[-1])
    assert big_peak - big_start > 200
    if Path("/proc/self/clear_refs").exists():
        assert small_peak - small_start < big_peak - big_start - 100