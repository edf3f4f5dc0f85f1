"""Knowledge distillation and the memory tricks of training: a smaller student learns from a teacher's logits.

Reading order: the distillation loss (Hinton et al. 2015: KL between temperature-softened distributions,
times T^2) -> a student made by dropping layers of the teacher (initialised from it, as in DistilBERT) ->
one training loop that runs either on the teacher's logits or on the hard next-token labels, over the
very same batches (equal tokens) -> gradient accumulation (a big batch in small pieces) and gradient
checkpointing (recompute activations instead of storing them), each measured.

Production distillation (trl's GKD, MiniLLM) adds on-policy samples from the student and other
divergences; the loss here is the classic one.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0
                      ) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over every position.

    Logits are (..., V); the sum runs over the vocabulary, the mean over all leading axes. The T^2 keeps
    the gradient's size comparable across temperatures (the softened gradients shrink as 1/T^2).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (same batch, positions, vocabulary)")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # student (..., V)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)  # teacher (..., V)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (...,)
    return temperature ** 2 * kl.mean()


# ----------------------------------------------------------------------------------------------
# A student: the teacher with layers dropped
# ----------------------------------------------------------------------------------------------
def drop_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A deep copy of a transformers decoder (e.g. LlamaForCausalLM) that keeps only the blocks in `keep`.

    The kept blocks start from the teacher's weights; embeddings, final norm and head are copied too.
    """
    layers = model.model.layers
    keep = list(keep)
    if not keep or sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= len(layers):
        raise ValueError(f"keep must be increasing, distinct layer indices in 0..{len(layers) - 1}, got {keep}")
    student = copy.deepcopy(model)
    student.model.layers = nn.ModuleList([student.model.layers[i] for i in keep])
    for new_index, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = new_index  # the KV cache is indexed by position in the stack
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def every_other_layer(n_layers: int) -> list[int]:
    """Layers 0, 2, 4, ... and always the last one: a student of about half the depth."""
    return sorted(set(range(0, n_layers, 2)) | {n_layers - 1})


# ----------------------------------------------------------------------------------------------
# Training at equal tokens: the same batches, soft targets or hard labels
# ----------------------------------------------------------------------------------------------
def random_windows(ids: torch.Tensor, *, seq_len: int, batch_size: int, steps: int, generator: torch.Generator
                   ) -> list[torch.Tensor]:
    """`steps` batches of random (batch_size, seq_len) windows of a 1-D token tensor, drawn once."""
    if ids.numel() <= seq_len:
        raise ValueError(f"need more than seq_len={seq_len} tokens, got {ids.numel()}")
    starts = torch.randint(0, ids.numel() - seq_len, (steps, batch_size), generator=generator)
    return [torch.stack([ids[s:s + seq_len] for s in row.tolist()]) for row in starts]  # steps x (B, T)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def train_student(student: nn.Module, batches: Sequence[torch.Tensor], *, teacher: nn.Module | None = None,
                  temperature: float = 2.0, alpha: float = 1.0, lr: float = 1e-4, progress: bool = True,
                  desc: str = "train") -> dict[str, list[float]]:
    """Train `student` in place on `batches` (each (B, T) token ids); returns {"step", "loss"}.

    Without a teacher: next-token cross-entropy on the hard labels. With one: alpha * distillation loss
    on the teacher's logits + (1 - alpha) * the hard-label loss. Both see the same tokens.
    """
    from tqdm.auto import tqdm

    if teacher is not None:
        teacher.eval()
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    history: dict[str, list[float]] = {"step": [], "loss": []}
    for step, x in enumerate(tqdm(batches, desc=desc, disable=not progress)):
        logits = _logits(student, x)[:, :-1]  # (B, T-1, V): predict tokens 1..T-1
        hard = F.cross_entropy(logits.transpose(1, 2), x[:, 1:])
        if teacher is None:
            loss = hard
        else:
            with torch.no_grad():
                t_logits = _logits(teacher, x)[:, :-1]
            loss = alpha * distillation_loss(logits, t_logits, temperature) + (1 - alpha) * hard
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history["step"].append(step)
        history["loss"].append(float(loss))
    student.eval()
    return history


@torch.no_grad()
def next_token_hits(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4,
                    reference: nn.Module | None = None) -> torch.Tensor:
    """Per window, the fraction of positions whose top-1 prediction is the next token (or, with `reference`,
    agrees with the reference model's top-1): (N,)."""
    model.eval()
    out = []
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size]
        pred = _logits(model, x)[:, :-1].argmax(-1)  # (b, T-1)
        target = x[:, 1:] if reference is None else _logits(reference, x)[:, :-1].argmax(-1)
        out.append((pred == target).float().mean(dim=1))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# Memory tricks: gradient accumulation and gradient checkpointing
# ----------------------------------------------------------------------------------------------
def accumulation_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                      micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
    """Exercise 5.10: one optimizer step whose gradient equals that of the whole batch's mean loss.

    `loss_fn(model(x), y)` is a mean over the micro-batch's len(x) examples; micro-batches may differ in
    size, so each loss is weighted by len(x) / total before backward. Returns the whole batch's mean loss.
    """
    total = sum(len(x) for x, _ in micro_batches)
    if total == 0:
        raise ValueError("micro_batches is empty: nothing to accumulate")
    optimizer.zero_grad(set_to_none=True)
    whole = 0.0
    for x, y in micro_batches:
        loss = loss_fn(model(x), y) * (len(x) / total)  # this micro-batch's share of the big batch's mean
        loss.backward()  # gradients add up in .grad until the step
        whole += float(loss.detach())
    optimizer.step()
    return whole


def step_cost(model: nn.Module, x: torch.Tensor, *, checkpointing: bool, repeats: int = 1) -> dict[str, float]:
    """Measured peak extra memory (bytes) and seconds of one forward + backward of a transformers causal LM on
    `x` (B, T), with or without gradient checkpointing. Gradients are cleared afterwards."""
    from .accounting import measure_peak_memory

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    model.config.use_cache = False

    def one_step():
        loss = model(x, labels=x).loss
        loss.backward()

    one_step()  # warm-up: kernels, thread pools, gradient buffers exist before we measure
    model.zero_grad(set_to_none=False)
    seconds = []
    peak = 0
    for _ in range(repeats):
        start = time.perf_counter()
        peak = max(peak, measure_peak_memory(one_step, x.device))
        seconds.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=False)
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_disable()
    model.eval()
    return {"peak_bytes": float(peak), "seconds": min(seconds)}
