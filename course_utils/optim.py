"""Optimisers written from scratch (week 1): SGD with momentum and Adam, matching torch.optim.

Each update is a pure function on one parameter tensor and its state, so it can be read (and checked)
line by line; `SGD` and `Adam` wrap them into tiny optimizer objects for a training loop.
torch.optim adds what this leaves out: fused/foreach kernels, AMSGrad, sparse gradients, state saving.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def sgd_momentum_step(param: torch.Tensor, grad: torch.Tensor, velocity: torch.Tensor, *, lr: float,
                      momentum: float = 0.9, weight_decay: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of SGD with (heavy-ball) momentum, torch.optim.SGD's convention (dampening 0, no Nesterov).

    g = grad + wd * param;  v = momentum * v + g;  param = param - lr * v.  Returns (param, velocity).
    lr multiplies v at the step (not inside v), so changing lr mid-training acts at once (Sutskever et al.
    2013 put lr inside v; the two agree only while lr is constant).
    """
    g = grad + weight_decay * param
    velocity = momentum * velocity + g
    return param - lr * velocity, velocity


def adam_step(param: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, *, lr: float,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
              weight_decay: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam step (Kingma & Ba 2015, Algorithm 1), torch.optim.Adam's convention; `t` counts from 1.

    weight_decay here is L2 added to the gradient (torch.optim.Adam); AdamW instead decays the weights
    directly. Returns (param, m, v).
    """
    beta1, beta2 = betas
    g = grad + weight_decay * param
    m = beta1 * m + (1 - beta1) * g  # running mean of gradients
    v = beta2 * v + (1 - beta2) * g * g  # running mean of squared gradients
    m_hat = m / (1 - beta1 ** t)  # bias correction: m and v start at 0
    v_hat = v / (1 - beta2 ** t)
    return param - lr * m_hat / (v_hat.sqrt() + eps), m, v


class SGD:
    """SGD with momentum over a list of parameters, using `step_fn` (default: `sgd_momentum_step`)."""

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, step_fn: Callable = sgd_momentum_step):
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay, self.step_fn = lr, momentum, weight_decay, step_fn
        self.velocity = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            new, self.velocity[i] = self.step_fn(p.detach(), p.grad, self.velocity[i], lr=self.lr,
                                                 momentum=self.momentum, weight_decay=self.weight_decay)
            p.copy_(new)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


class Adam:
    """Adam over a list of parameters, using `step_fn` (default: `adam_step`)."""

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, step_fn: Callable = adam_step):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay, self.step_fn = lr, betas, eps, weight_decay, step_fn
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            new, self.m[i], self.v[i] = self.step_fn(p.detach(), p.grad, self.m[i], self.v[i], self.t, lr=self.lr,
                                                     betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)
            p.copy_(new)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
