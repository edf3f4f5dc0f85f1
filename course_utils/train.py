"""A small, readable training loop with progress bar, periodic evaluation and a history to plot."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from tqdm.auto import tqdm

History = dict[str, list[float]]


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, get_batch: Callable[[str], tuple], loss_fn: Callable,
                  splits: tuple[str, ...] = ("train", "val"), iters: int = 10) -> dict[str, float]:
    """Mean loss over `iters` batches of each split, with the model in eval mode."""
    was_training = model.training
    model.eval()
    out = {}
    for split in splits:
        out[split] = sum(float(loss_fn(model, *get_batch(split))) for _ in range(iters)) / iters
    model.train(was_training)
    return out


def train_loop(model: torch.nn.Module, get_batch: Callable[[str], tuple], loss_fn: Callable, *,
               steps: int, optimizer: torch.optim.Optimizer, eval_every: int = 100, eval_iters: int = 10,
               clip_grad: float | None = None, desc: str = "training") -> History:
    """Train `model` for `steps` steps on batches from `get_batch("train")`.

    `loss_fn(model, *batch)` returns a scalar loss. Every `eval_every` steps (and at the end) the mean
    train/val loss is logged. Returns a history dict: step, train_loss, val_loss, grad_norm, seconds.
    """
    history: History = {"step": [], "train_loss": [], "val_loss": [], "grad_norm": [], "seconds": []}
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(1, steps + 1), desc=desc, leave=False)
    grad_norm = float("nan")
    for step in bar:
        loss = loss_fn(model, *get_batch("train"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = clip_grad if clip_grad is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            losses = estimate_loss(model, get_batch, loss_fn, iters=eval_iters)
            history["step"].append(step)
            history["train_loss"].append(losses["train"])
            history["val_loss"].append(losses["val"])
            history["grad_norm"].append(grad_norm)
            history["seconds"].append(time.perf_counter() - start)
            bar.set_postfix(train=f"{losses['train']:.3f}", val=f"{losses['val']:.3f}")
    bar.close()
    return history
