"""Week 5: supervised fine-tuning (SFT) of a chat model, from the chat template to the evaluation.

Reading order: ChatML, the text SmolLM2 was trained on (`format_chatml`, with role validation) ->
tokens and labels with assistant-only loss masking (`chat_features`) -> batches: padding
(`pad_batch`) or packing several conversations into one row with restarting position ids
(`pack_features`, `packed_attention_mask`) -> the SFT loss (`sft_loss`: next-token cross-entropy on
labelled tokens only) -> a training loop (`train_sft`) -> evaluation: batched greedy generation with
left padding (`generate_replies`), exact match and the clean-stop rate (`evaluate`), held-out
perplexity for forgetting (`perplexity`), measured peak memory (`PeakMemory`).

Labels use -100 for "no loss here", as PyTorch's cross-entropy and Hugging Face do. A production
trainer (TRL's SFTTrainer) adds gradient accumulation, mixed precision, schedulers, logging and
checkpointing around the same core; notebook 01 compares the two on one batch.
"""
from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100  # label of a token that is not trained on
ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# SmolLM2's template inserts this system turn when a conversation has none.
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


# ----------------------------------------------------------------------------------------------
# Chat templates: a conversation -> ChatML text
# ----------------------------------------------------------------------------------------------
def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check a conversation's shape; raise a ValueError/TypeError that says what is wrong and how to fix it."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError(f"a conversation is a non-empty list of {{'role': ..., 'content': ...}} dicts, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TypeError(f"message {i} must be a dict with keys 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has unknown role {m['role']!r}; ChatML here knows {', '.join(ROLES)} "
                             f"(rename it, e.g. 'human' -> 'user', 'bot' -> 'assistant')")
        if not isinstance(m["content"], str):
            raise TypeError(f"message {i} ({m['role']}) content must be a string, got {type(m['content']).__name__}")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"message {i} is a system message: only the first message may be one")
    return list(messages)


def format_chatml(messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    """The ChatML text of a conversation, exactly as SmolLM2's chat template renders it.

    Each turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`; a conversation without a system turn
    gets SmolLM2's default one; `add_generation_prompt` appends the open assistant header.
    """
    messages = validate_messages(messages)
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def prompt_messages(item: dict) -> list[dict[str, str]]:
    """The conversation of a data-set item without its final assistant turn (what the model is asked)."""
    msgs = item["messages"]
    return msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs


# ----------------------------------------------------------------------------------------------
# Tokens and labels: the loss only on what the assistant says
# ----------------------------------------------------------------------------------------------
def chat_features(tokenizer, messages: Sequence[dict[str, str]], *, max_length: int | None = None,
                  assistant_only: bool = True, train_on_eos: bool = True) -> dict[str, list[int]]:
    """Token ids and labels of one conversation: {"input_ids", "labels"}.

    Labels equal the ids on every assistant turn's body (after the `<|im_start|>assistant\\n` header, up to
    and including `<|im_end|>` and the newline after it, as TRL's completion mask) and are IGNORE elsewhere.
    `assistant_only=False` trains on every token; `train_on_eos=False` shows the classic bug of leaving
    `<|im_end|>` out of the loss. Raises ValueError when the conversation is longer than `max_length`.
    """
    text = format_chatml(messages)
    spans, pos = [], 0
    for m in ([] if messages[0]["role"] == "system" else [None]) + list(messages):
        role, content = ("system", DEFAULT_SYSTEM) if m is None else (m["role"], m["content"])
        start = pos + len(f"{IM_START}{role}\n")
        pos = start + len(content) + len(f"{IM_END}\n")
        if role == "assistant":
            end = pos if train_on_eos else start + len(content)
            spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"this conversation is {len(ids)} tokens, longer than max_length={max_length}: raise "
                         f"max_length or drop/shorten the example (it starts {text[:60]!r})")
    labels = []
    for tok_id, (a, _) in zip(ids, enc["offset_mapping"], strict=True):
        inside = any(s <= a < e for s, e in spans)
        labels.append(tok_id if (inside or not assistant_only) else IGNORE)
    return {"input_ids": ids, "labels": labels}


def assistant_labels(input_ids: torch.Tensor, header: Sequence[int], im_start: int) -> torch.Tensor:
    """Token-level assistant-only labels: (T,) ids -> (T,) labels.

    A token is labelled (label = its id) when it lies after an assistant header (the token ids of
    `<|im_start|>assistant\n`) and before the next `<|im_start|>` (so the turn's `<|im_end|>` and the newline
    after it are trained on); every other token, the headers included, gets IGNORE.
    """
    ids = input_ids.tolist()
    labels = torch.full_like(input_ids, IGNORE)
    h, inside = len(header), False
    for t in range(len(ids)):
        if ids[t] == im_start:
            inside = False
            if ids[t:t + h] == list(header):
                inside, skip_until = True, t + h
        if inside and t >= skip_until:
            labels[t] = input_ids[t]
    return labels


# ----------------------------------------------------------------------------------------------
# Batches: padding, or packing with restarting positions
# ----------------------------------------------------------------------------------------------
def pad_batch(features: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of features to the longest: input_ids, attention_mask, labels (B, T)."""
    T = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), T), pad_id, dtype=torch.long)
    labels = torch.full((len(features), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(features), T), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_features(features: Sequence[dict[str, list[int]]], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack conversations into rows of `max_length` tokens (in order, never splitting one): input_ids,
    labels, position_ids (B, max_length) and a block-diagonal causal attention_mask (B, 1, T, T) bool.

    Position ids restart at 0 with every conversation (RoPE sees each one from position 0), and the mask
    lets a token attend only inside its own conversation. Both are needed: with transformers' default
    (sdpa) attention, restarting position ids alone do not stop attention across conversations
    (notebook 01 measures it). The tail of a row is padding: a conversation of its own, IGNORE labels.
    """
    rows: list[list[dict[str, list[int]]]] = [[]]
    for f in features:
        if len(f["input_ids"]) > max_length:
            raise ValueError(f"a conversation of {len(f['input_ids'])} tokens does not fit max_length={max_length}")
        if sum(len(g["input_ids"]) for g in rows[-1]) + len(f["input_ids"]) > max_length:
            rows.append([])
        rows[-1].append(f)
    ids = torch.full((len(rows), max_length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), max_length), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), max_length), dtype=torch.long)
    for i, row in enumerate(rows):
        t = 0
        for f in row:
            n = len(f["input_ids"])
            ids[i, t:t + n], labels[i, t:t + n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"])
            pos[i, t:t + n] = torch.arange(n)
            t += n
        pos[i, t:] = torch.arange(max_length - t)  # the padding tail restarts too: it sees only itself
    return {"input_ids": ids, "labels": labels, "position_ids": pos,
            "attention_mask": packed_attention_mask(pos)[:, None]}  # (B, 1, T, T): one mask for all heads


def packed_attention_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids that restart at 0 per sequence -> (B, T, T) bool, True where query i may see key j:
    same sequence and j <= i (block-diagonal causal)."""
    seq = (position_ids == 0).cumsum(-1)  # (B, T) which packed sequence each token belongs to
    T = position_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()  # (T, T)
    return (seq[:, :, None] == seq[:, None, :]) & causal  # (B, T, T)


# ----------------------------------------------------------------------------------------------
# The loss and the training loop
# ----------------------------------------------------------------------------------------------
def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens of the whole batch.

    logits (B, T, V) at position t predict labels[t + 1]; IGNORE labels contribute nothing. Averaging over
    all labelled tokens of the batch (not per sequence first) is what transformers and TRL do.
    """
    logits, targets = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The keys a causal LM takes (labels left out: `sft_loss` computes the loss)."""
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}


def train_sft(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], *, steps: int, lr: float = 1e-4,
              weight_decay: float = 0.0, log_every: int = 10, warmup: int = 0, device: str | torch.device = "cpu",
              progress: bool = True) -> dict[str, list[float]]:
    """Fine-tune the trainable parameters of `model` for `steps` batches (AdamW, linear warmup then
    constant); return the history {"step", "loss", "seconds"} (seconds per step, measured)."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: unfreeze some, or apply LoRA first")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)))
    model.train()
    history: dict[str, list[float]] = {"step": [], "loss": [], "seconds": []}
    it = iter(batches)
    bar = tqdm(range(steps), desc="SFT", disable=not progress)
    for step in bar:
        batch = next(it)
        t0 = time.perf_counter()
        loss = sft_loss(model(**model_inputs(batch, device)).logits, batch["labels"].to(device))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        history["step"].append(step)
        history["loss"].append(loss.item())
        history["seconds"].append(time.perf_counter() - t0)
        if step % log_every == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return history


def batches_forever(features: Sequence[dict[str, list[int]]], batch_size: int, pad_id: int, *, seed: int = 0,
                    pack_length: int | None = None):
    """Shuffled padded batches (or packed rows of `pack_length` when given), epoch after epoch."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(features), generator=g).tolist()
        if pack_length is None:
            for i in range(0, len(order) - batch_size + 1, batch_size):
                yield pad_batch([features[j] for j in order[i:i + batch_size]], pad_id)
        else:
            packed = pack_features([features[j] for j in order], pack_length, pad_id)
            for i in range(0, packed["input_ids"].shape[0] - batch_size + 1, batch_size):
                yield {k: v[i:i + batch_size] for k, v in packed.items()}


# ----------------------------------------------------------------------------------------------
# Evaluation: generation, exact match, clean stops, perplexity, memory
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_replies(model, tokenizer, conversations: Sequence[Sequence[dict[str, str]]], *, max_new_tokens: int = 32,
                     batch_size: int = 16, raw_prompt: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Greedy replies to prompts, batched with left padding: [{"reply", "clean_stop", "n_tokens"}].

    `clean_stop` is True when the model ended its turn with `<|im_end|>` within `max_new_tokens`.
    `raw_prompt=True` skips the chat template and feeds only the last user message's text (the mistake
    notebook 01 shows).
    """
    from tqdm.auto import tqdm

    eos = tokenizer.convert_tokens_to_ids(IM_END)
    texts = [conv[-1]["content"] if raw_prompt else format_chatml(conv, add_generation_prompt=True)
             for conv in conversations]
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[dict[str, Any]] = []
    model.eval()
    try:
        for i in tqdm(range(0, len(texts), batch_size), desc="generate", disable=not progress):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc.to(device), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id, top_p=None, top_k=None, temperature=None)
            for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                stop = row.index(eos) if eos in row else None
                body = row if stop is None else row[:stop]
                out.append({"reply": tokenizer.decode(body, skip_special_tokens=False).strip(),
                            "clean_stop": stop is not None, "n_tokens": len(body)})
    finally:
        tokenizer.padding_side = side
    return out


def evaluate(model, tokenizer, items: Sequence[dict], *, max_new_tokens: int = 32, batch_size: int = 16,
             progress: bool = True) -> dict[str, Any]:
    """Exact match (by the task's verifier) and clean-stop rate on data-set items.

    Returns {"correct": [bool], "clean_stop": [bool], "replies": [str], "accuracy", "clean_rate"}: keep
    the per-item lists for paired before/after intervals (`metrics.paired_difference`).
    """
    from .tasks import is_correct

    gens = generate_replies(model, tokenizer, [prompt_messages(it) for it in items], max_new_tokens=max_new_tokens,
                            batch_size=batch_size, progress=progress)
    correct = [is_correct(it, g["reply"]) for it, g in zip(items, gens, strict=True)]
    clean = [g["clean_stop"] for g in gens]
    n = max(len(items), 1)
    return {"correct": correct, "clean_stop": clean, "replies": [g["reply"] for g in gens],
            "accuracy": sum(correct) / n, "clean_rate": sum(clean) / n}


@torch.no_grad()
def perplexity(model, tokenizer, text: str, *, block: int = 256, max_blocks: int = 8) -> float:
    """exp(mean next-token loss) of plain `text` in non-overlapping blocks (a forgetting probe)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n_blocks = min(max_blocks, len(ids) // block)
    if n_blocks == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one block of {block}")
    device = next(model.parameters()).device
    x = ids[: n_blocks * block].view(n_blocks, block).to(device)  # (n_blocks, block)
    model.eval()
    return float(torch.exp(sft_loss(model(input_ids=x).logits, x)))


class PeakMemory:
    """Measured peak memory of a block: CUDA's allocator peak on GPU, the process's peak RSS on CPU.

    On Linux the RSS peak (VmHWM) is reset at the start by writing 5 to /proc/self/clear_refs, so
    blocks measured one after another do not inherit each other's peak; elsewhere it is the process peak
    so far. `with PeakMemory() as m: ...` then `m.mb`.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.mb = self.start_mb = float("nan")  # peak during the block; resident at its start

    @staticmethod
    def _status_kb(field: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
        except (OSError, StopIteration):
            return None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        kb = self._status_kb("VmRSS")
        self.start_mb = kb / 1024 if kb is not None else float("nan")
        if os.path.exists("/proc/self/clear_refs"):
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            kb = self._status_kb("VmHWM")
            self.mb = (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


# ----------------------------------------------------------------------------------------------
# Reporting: every score with its item count and 95% interval
# ----------------------------------------------------------------------------------------------
GENERAL_PROMPTS = [  # forgetting probes: nothing like the fine-tuning tasks
    "What is the capital of France?",
    "Give me one tip for sleeping better.",
    "Write a haiku about the sea.",
]


def record_eval(name: str, result: dict[str, Any]) -> str:
    """Record exact match (Wilson 95% interval) and clean-stop rate of an `evaluate` result; return a summary."""
    from .metrics import format_ci, proportion_ci, record

    n = len(result["correct"])
    acc, clean = proportion_ci(result["correct"]), proportion_ci(result["clean_stop"])
    for key, (m, lo, hi) in (("exact_match", acc), ("clean_stop", clean)):
        record(f"{name}.{key}", m, show=False)
        record(f"{name}.{key}_low", lo, show=False)
        record(f"{name}.{key}_high", hi, show=False)
    record(f"{name}.n_items", n, show=False)
    return f"{name}: exact match {format_ci(acc, n)}, clean stops {format_ci(clean, n)}"


def record_gain(name: str, before: dict[str, Any], after: dict[str, Any]) -> str:
    """Record the paired before -> after exact-match gain on the same items, with its 95% interval."""
    from .metrics import format_ci, paired_difference, record

    diff = paired_difference(after["correct"], before["correct"])
    for key, v in zip(("", "_low", "_high"), diff, strict=True):
        record(f"{name}.gain{key}", v, show=False)
    return f"{name}: gain {format_ci(diff, len(after['correct']))} (paired, same items)"


def by_task(items: Sequence[dict], result: dict[str, Any]) -> dict[str, float]:
    """Exact match per task kind."""
    out: dict[str, list[bool]] = {}
    for it, ok in zip(items, result["correct"], strict=True):
        out.setdefault(it["task"], []).append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(out.items())}


def heldout_text(chars: int = 20000) -> str:
    """General English text the fine-tunes never see (the end of the Shakespeare corpus): a perplexity probe."""
    from .data import load_shakespeare

    return load_shakespeare()[-chars:]
