"""Week 4: pretraining a GPT on raw text with the next-token objective.

Reading order: random windows of a token stream -> AdamW written out (Loshchilov & Hutter 2019),
with decay and no-decay parameter groups -> linear warmup and cosine decay of the learning rate ->
one training step (mixed precision, gradient clipping) -> the loop (evaluation, tokens/s, a live
loss plot) -> checkpoints that resume exactly -> bits per character -> data parallelism.

Run it as a script, on one process or several (DistributedDataParallel, `torchrun`):
    python -m course_utils.pretrain --steps 200
    torchrun --standalone --nproc_per_node=2 -m course_utils.pretrain --steps 200
Production trainers add what this leaves out: gradient accumulation, sharded data loading,
FSDP / tensor parallelism, fault-tolerant checkpointing, torch.compile.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .rnn import clip_grad_norm
from .runtime import autocast, get_device, get_precision, grad_scaler
from .text import random_windows
from .transformer import GPT, GPTConfig


# ----------------------------------------------------------------------------------------------
# Data: random windows of one long token stream
# ----------------------------------------------------------------------------------------------
class WindowLoader:
    """Batches of B random windows of T tokens and their next-token targets, from train or val ids.

    Training windows come from one seeded generator, saved in checkpoints, so a resumed run sees
    the same batches. Under data parallelism every process draws the same global batch and keeps
    its own rows. Validation windows are the same at every evaluation (their own fixed seed).
    """

    def __init__(self, train: torch.Tensor, val: torch.Tensor, batch_size: int, block_size: int, *, seed: int = 0,
                 device: torch.device | str | None = None, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"the global batch size {batch_size} must be divisible by the {world_size} processes")
        if min(len(train), len(val)) <= block_size:
            raise ValueError(f"each split needs more than block_size={block_size} tokens "
                             f"(train has {len(train)}, val has {len(val)})")
        self.data = {"train": train, "val": val}
        self.batch_size, self.block_size, self.device = batch_size, block_size, device
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def get_batch(self, split: str = "train", generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = random_windows(self.data[split], self.batch_size, self.block_size, generator=generator or self.generator)
        rows = slice(self.rank * self.batch_size // self.world_size, (self.rank + 1) * self.batch_size // self.world_size)
        return x[rows].to(self.device), y[rows].to(self.device)  # this process's share: (B / world, T)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# ----------------------------------------------------------------------------------------------
# AdamW, written out, and which parameters it decays
# ----------------------------------------------------------------------------------------------
class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019, Algorithm 2), torch.optim.AdamW's convention.

    Per parameter, at step t (from 1):  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    p = p - lr wd p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
    The decay shrinks the weight directly instead of adding wd p to the gradient (where Adam's
    per-coordinate scaling would weaken it for parameters with large gradients). Each parameter
    group brings its own lr and weight_decay, so a schedule can set group["lr"] between steps.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)  # m = b1 m + (1 - b1) g
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)  # v = b2 v + (1 - b2) g^2
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)  # sqrt(v_hat) + eps
                p.mul_(1 - lr * wd)  # decoupled weight decay
                p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))  # p -= lr m_hat / (sqrt(v_hat) + eps)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (linear weights, embeddings) decay; biases and norm gains (1-D) do not.

    Decaying a norm's gain or a bias pulls it towards 0, which changes what the layer computes
    rather than limiting its capacity (nanoGPT, minGPT use the same split).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule
# ----------------------------------------------------------------------------------------------
def warmup_cosine_lr(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of update number `step` (1..total_steps): linear warmup, then a half cosine to min_lr.

    lr = max_lr step / warmup for step < warmup; then with p = (step - warmup) / (total - warmup),
    lr = min_lr + (max_lr - min_lr) (1 + cos(pi p)) / 2, which is max_lr at step = warmup and min_lr
    at step = total; min_lr after that (transformers' cosine-with-min-lr schedule).
    """
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything about how a model is trained (the model's own sizes live in GPTConfig)."""

    steps: int = 2000  # optimizer updates; the schedule ends here
    batch_size: int = 64  # windows per update, over all processes together
    lr: float = 1e-3  # peak learning rate, reached at the end of the warmup
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # linear warmup from 0 (Adam's early moment estimates are noisy)
    weight_decay: float = 0.1  # decoupled decay of the matrices only (see param_groups)
    betas: tuple[float, float] = (0.9, 0.99)  # Adam's moment decay rates; 0.99 suits small batches (nanoGPT)
    eps: float = 1e-8  # Adam's denominator guard
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    eval_every: int = 250  # evaluate train and val loss every this many steps (and at the end)
    eval_iters: int = 20  # batches per evaluation
    seed: int = 0  # seeds the training windows (the model's init is seeded by the caller)
    time_limit: float | None = None  # stop after this many seconds of wall time (the schedule still assumes `steps`)


History = dict[str, list[float]]


class LossPlot:
    """A loss plot that redraws in place in a notebook (and does nothing elsewhere)."""

    def __init__(self, title: str = ""):
        self.handle = None
        try:
            from IPython import get_ipython
            from IPython.display import display
            import matplotlib.pyplot as plt

            if get_ipython() is not None:
                self.fig, self.ax = plt.subplots(figsize=(6.4, 3.2))
                self.title = title
                self.handle = display(self.fig, display_id=True)
                plt.close(self.fig)  # shown through the handle only
        except ImportError:
            pass

    def update(self, history: History) -> None:
        if self.handle is None:
            return
        self.ax.clear()
        self.ax.plot(history["step"], history["loss"], alpha=0.35, label="train (each step)")
        self.ax.plot(history["eval_step"], history["val_loss"], "o-", label="validation")
        self.ax.set_xlabel("step")
        self.ax.set_ylabel("loss (nats / token)")
        self.ax.set_title(self.title)
        self.ax.legend()
        self.handle.update(self.fig)


class Trainer:
    """Trains a GPT with AdamW, warmup + cosine, clipping and mixed precision; saves and resumes exactly.

    Under `torchrun` (torch.distributed initialised) the model is wrapped in DistributedDataParallel:
    each process computes gradients on its rows of the global batch and DDP averages them.
    """

    def __init__(self, model: GPT, loader: WindowLoader, tcfg: TrainConfig, *, device: torch.device | None = None,
                 optimizer_cls: type[torch.optim.Optimizer] = AdamW, schedule: Callable[..., float] = warmup_cosine_lr):
        self.device = device or next(model.parameters()).device
        self.model, self.loader, self.tcfg, self.schedule = model, loader, tcfg, schedule
        self.ddp = dist.is_available() and dist.is_initialized()
        self.net = nn.parallel.DistributedDataParallel(model) if self.ddp else model
        self.optimizer = optimizer_cls(param_groups(model, tcfg.weight_decay), lr=tcfg.lr, betas=tcfg.betas,
                                       eps=tcfg.eps)
        self.precision = get_precision(self.device)
        self.scaler = grad_scaler(self.device)
        self.step = 0
        self.history: History = {"step": [], "loss": [], "lr": [], "grad_norm": [], "eval_step": [],
                                 "train_loss": [], "val_loss": [], "tokens_per_s": [], "seconds": []}
        self.train_seconds = 0.0  # time spent in training steps (evaluation excluded): for tokens/s
        self.wall_seconds = 0.0  # time since the first step, evaluations included: for the time budget

    def train_step(self) -> float:
        """One update on the next batch; returns the loss (averaged over processes under DDP)."""
        self.step += 1
        lr = self.schedule(self.step, max_lr=self.tcfg.lr, min_lr=self.tcfg.min_lr,
                           warmup_steps=self.tcfg.warmup_steps, total_steps=self.tcfg.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.loader.get_batch("train")
        with autocast(self.device):
            logits = self.net(x)  # (B, T, V)
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
        grad_norm = clip_grad_norm(self.model.parameters(), self.tcfg.grad_clip or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        loss = loss.detach()
        if self.ddp:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        for key, value in (("step", self.step), ("loss", loss.item()), ("lr", lr), ("grad_norm", float(grad_norm))):
            self.history[key].append(value)
        return self.history["loss"][-1]

    @torch.no_grad()
    def evaluate(self, iters: int | None = None) -> dict[str, float]:
        """Mean loss on the same `iters` batches of train and of val at every call (eval mode, no dropout)."""
        self.model.eval()
        out = {}
        for split in ("train", "val"):
            g = torch.Generator().manual_seed(1234)  # the same windows every evaluation
            losses = []
            for _ in range(iters or self.tcfg.eval_iters):
                x, y = self.loader.get_batch(split, generator=g)
                with autocast(self.device):
                    logits = self.model(x)
                losses.append(F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1)))
            loss = torch.stack(losses).mean()
            if self.ddp:
                dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            out[split] = loss.item()
        self.model.train()
        return out

    def tokens_per_step(self) -> int:
        return self.loader.batch_size * self.loader.block_size

    def run(self, until: int | None = None, *, progress: bool = True, plot: bool = False, desc: str = "pretraining") -> History:
        """Train up to step `until` (default: tcfg.steps), evaluating every eval_every steps and at the last step.

        With tcfg.time_limit the run also stops (after one last evaluation) once that many seconds of wall
        time, evaluations included, have passed since the first step; `history["seconds"]` counts them.
        """
        until = self.tcfg.steps if until is None else until
        live = LossPlot(desc) if plot else None
        self.model.train()
        bar = tqdm(total=until - self.step, desc=desc, leave=False, disable=not progress)
        start = time.perf_counter()
        wall_before = self.wall_seconds
        window_start, window_steps = start, 0
        while self.step < until:
            self.train_step()
            window_steps += 1
            bar.update(1)
            self.wall_seconds = wall_before + time.perf_counter() - start
            out_of_time = self.tcfg.time_limit is not None and self.wall_seconds >= self.tcfg.time_limit
            if self.step % self.tcfg.eval_every == 0 or self.step == self.tcfg.steps or out_of_time:
                elapsed = time.perf_counter() - window_start
                self.train_seconds += elapsed
                losses = self.evaluate()
                self.wall_seconds = wall_before + time.perf_counter() - start
                h = self.history
                h["eval_step"].append(self.step)
                h["train_loss"].append(losses["train"])
                h["val_loss"].append(losses["val"])
                h["tokens_per_s"].append(window_steps * self.tokens_per_step() / elapsed)
                h["seconds"].append(self.wall_seconds)
                bar.set_postfix(loss=f"{h['loss'][-1]:.3f}", val=f"{losses['val']:.3f}",
                                tok_s=f"{h['tokens_per_s'][-1]:.0f}")
                if live is not None:
                    live.update(h)
                if out_of_time:
                    break
                window_start, window_steps = time.perf_counter(), 0
        bar.close()
        return self.history

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model_config": dataclasses.asdict(self.model.config), "train_config": dataclasses.asdict(self.tcfg),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "loader": self.loader.state_dict(), "step": self.step,
                "history": self.history, "train_seconds": self.train_seconds, "wall_seconds": self.wall_seconds,
                "rng": torch.get_rng_state()}

    def save(self, path: str | Path) -> Path:
        """Write everything needed to continue exactly: weights, AdamW moments, data position, RNG, history."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.ddp or dist.get_rank() == 0:
            torch.save(self.state_dict(), path)
        return path

    def load(self, path: str | Path) -> "Trainer":
        """Continue from a checkpoint written by `save`; refuses one from another model configuration."""
        state = torch.load(path, map_location=self.device, weights_only=False)
        check_same_config(state["model_config"], dataclasses.asdict(self.model.config), str(path))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        self.step, self.history = state["step"], state["history"]
        self.train_seconds, self.wall_seconds = state["train_seconds"], state["wall_seconds"]
        torch.set_rng_state(state["rng"])
        return self


def check_same_config(saved: dict, current: dict, where: str = "checkpoint") -> None:
    """Raise a ValueError naming every field where a saved model configuration differs from the current one."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, model {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(f"{where} was saved from a different model configuration; differing fields: "
                         + "; ".join(diffs))


# ----------------------------------------------------------------------------------------------
# Held-out text in bits per character (fair across tokenizers)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def bits_per_char(model: GPT, ids: torch.Tensor, n_chars: int, *, batch_size: int = 32) -> float:
    """Total next-token loss over `ids` (a held-out text's tokens, n_chars characters long) in bits per character.

    The ids are cut into consecutive windows of block_size + 1; every token after the first of each
    window is predicted from the ones before it in its window. Tokens of any size cover the same
    characters, so models with different tokenizers can be compared on the same text.
    """
    T = model.config.block_size
    device = next(model.parameters()).device
    n = (len(ids) - 1) // T
    x = ids[: n * T].view(n, T)  # (N, T)
    y = ids[1: n * T + 1].view(n, T)  # (N, T)
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, n, batch_size):
        logits = model(x[i:i + batch_size].to(device)).float()
        total += F.cross_entropy(logits.view(-1, logits.shape[-1]), y[i:i + batch_size].reshape(-1).to(device),
                                 reduction="sum").item()
    model.train(was_training)
    covered = n_chars * (n * T) / len(ids)  # characters those n*T predicted tokens cover, pro rata
    return total / covered / math.log(2)


# ----------------------------------------------------------------------------------------------
# A script: one process or `torchrun --nproc_per_node=N` (DistributedDataParallel)
# ----------------------------------------------------------------------------------------------
def launch(nproc: int, args: list[str], *, timeout: float = 600) -> str:
    """Run this script (`python -m course_utils.pretrain *args`) on `nproc` CPU or GPU processes; returns its output.

    nproc > 1 goes through `torchrun` on this machine, with a free port for the processes to meet on.
    A failure raises a RuntimeError that ends with the script's own last lines of output.
    """
    import socket
    import subprocess
    import sys

    if nproc == 1:
        cmd = [sys.executable, "-m", "course_utils.pretrain", *args]
    else:
        with socket.socket() as s:  # a port no other program is using right now
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--nnodes=1", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={port}", "-m", "course_utils.pretrain", *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).replace("\r", "\n").splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {proc.returncode}:\n{tail}")
    return proc.stdout


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pretrain a character-level GPT (one process or under torchrun).")
    p.add_argument("--data", type=Path, help="a UTF-8 text file (default: the course's Shakespeare)")
    p.add_argument("--out", type=Path, help="write the loss history here as JSON (rank 0)")
    p.add_argument("--checkpoint", type=Path, help="save the final state here")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the best available)")
    for name, default in (("n_layer", 2), ("n_head", 4), ("n_embd", 64), ("block_size", 64)):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    p.add_argument("--dropout", type=float, default=0.0)
    for f in dataclasses.fields(TrainConfig):
        if f.type in ("int", "float") or f.type in (int, float):
            p.add_argument("--" + f.name.replace("_", "-"), type=float if "float" in str(f.type) else int,
                           default=f.default)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> History:
    """Train a character-level GPT; under torchrun on every process, with gloo on CPU and nccl on CUDA."""
    from .text import CharVocab, train_val_split

    args = _parse(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device(args.device) if args.device else get_device()
    rank, world = 0, 1
    if distributed:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if args.data:
            text = args.data.read_text(encoding="utf-8")
        else:
            from .data import load_shakespeare

            text = load_shakespeare()
        vocab = CharVocab(text)
        train, val = train_val_split(vocab.encode(text), 0.1)
        tcfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                              if hasattr(args, f.name)})
        torch.manual_seed(tcfg.seed)  # the same initial weights on every process (DDP also broadcasts them)
        cfg = GPTConfig(vocab_size=len(vocab), block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                        n_embd=args.n_embd, dropout=args.dropout)
        model = GPT(cfg).to(device)
        loader = WindowLoader(train, val, tcfg.batch_size, cfg.block_size, seed=tcfg.seed, device=device,
                              rank=rank, world_size=world)
        trainer = Trainer(model, loader, tcfg, device=device)
        history = trainer.run(progress=rank == 0, desc=f"rank {rank}/{world}")
        if rank == 0:
            print(f"step {trainer.step}: train loss {history['train_loss'][-1]:.4f}, "
                  f"val loss {history['val_loss'][-1]:.4f}, {history['tokens_per_s'][-1]:.0f} tokens/s, {world} process(es)")
            if args.out:
                args.out.write_text(json.dumps({"world_size": world, **history}))
        if args.checkpoint:
            trainer.save(args.checkpoint)
        return history
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
