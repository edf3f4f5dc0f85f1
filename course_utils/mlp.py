"""Multi-layer perceptrons in torch: the model week 1 builds by hand, packaged for reuse.

Week 1 derives every piece of this (weighted sums, nonlinearities, backprop); later weeks import
`MLP` from here instead of redefining it (week 2 uses it as a fixed-context character model).
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


class MLP(nn.Module):
    """A stack of Linear layers with an activation (and optional dropout) between them.

    Args:
        sizes: layer widths, input first and output last, e.g. ``(64, 128, 10)``.
        activation: one of ``"relu"``, ``"tanh"``, ``"sigmoid"``, ``"gelu"``.
        dropout: probability of zeroing a hidden unit during training (0 disables it).
        norm: a normalisation layer class such as ``nn.BatchNorm1d`` (or week 1's ``BatchNorm1d``),
            called with the width and inserted between each hidden Linear layer and its activation.

    Nothing follows the last Linear layer: the output is raw logits (or a regression value).
    """

    def __init__(self, sizes: Sequence[int], *, activation: str = "relu", dropout: float = 0.0,
                 norm: Callable[[int], nn.Module] | None = None):
        super().__init__()
        sizes = list(sizes)
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least an input and an output size, got {sizes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.sizes = sizes
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < len(sizes) - 2:  # hidden layers only: the output stays linear
                if norm is not None:
                    layers.append(norm(fan_out))
                layers.append(ACTIVATIONS[activation]())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, sizes[0]) -> (B, sizes[-1]); extra leading dimensions are kept."""
        return self.net(x)

    @property
    def linears(self) -> list[nn.Linear]:
        """The Linear layers in order (handy for init experiments and activation statistics)."""
        return [m for m in self.net if isinstance(m, nn.Linear)]


# ----------------------------------------------------------------------------------------------
# The pieces week 1 writes by hand (references for its exercises)
# ----------------------------------------------------------------------------------------------
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy, -log softmax(logits)[target], stable for any logit size.

    log softmax(z)_k = z_k - logsumexp(z), and logsumexp(z) = m + log sum exp(z - m) with m = max(z):
    subtracting the max keeps every exp() in (0, 1], so logits of 1000 do not overflow.
    """
    m = logits.max(dim=-1, keepdim=True).values  # (B, 1)
    lse = m + (logits - m).exp().sum(dim=-1, keepdim=True).log()  # (B, 1)
    logprobs = logits - lse  # (B, C)
    return -logprobs[torch.arange(len(targets)), targets].mean()


def mlp_backward(X: torch.Tensor, y: torch.Tensor, W1: torch.Tensor, b1: torch.Tensor,
                 W2: torch.Tensor, b2: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of mean cross-entropy(relu(X W1 + b1) W2 + b2, y), by hand (no autograd).

    Shapes: X (B, D), W1 (D, H), b1 (H,), W2 (H, C), b2 (C,). Returns the gradient with respect to each
    parameter ("W1", "b1", "W2", "b2") and to each intermediate ("logits", "h", "h_pre"); each line is one
    chain-rule step.
    """
    B = X.shape[0]
    h_pre = X @ W1 + b1  # (B, H)
    h = h_pre.clamp(min=0)  # (B, H)
    logits = h @ W2 + b2  # (B, C)
    probs = torch.softmax(logits, dim=-1)  # (B, C)
    dlogits = probs.clone()
    dlogits[torch.arange(B), y] -= 1
    dlogits /= B  # the loss is a mean over the batch
    dW2 = h.T @ dlogits  # (H, C)
    db2 = dlogits.sum(0)  # (C,)
    dh = dlogits @ W2.T  # (B, H)
    dh_pre = dh * (h_pre > 0)  # ReLU passes gradient only where it was active
    dW1 = X.T @ dh_pre  # (D, H)
    db1 = dh_pre.sum(0)  # (H,)
    return {"logits": dlogits, "W2": dW2, "b2": db2, "h": dh, "h_pre": dh_pre, "W1": dW1, "b1": db1}


def dropout(x: torch.Tensor, p: float, training: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverted dropout (Srivastava et al. 2014): zero each entry with probability p, scale survivors by 1/(1-p).

    The convention the checks use: `u = torch.rand(x.shape, generator=generator)`, keep where `u >= p`.
    Scaling at training time keeps E[output] = x, so evaluation (training=False) is the identity.
    """
    if not training or p == 0:
        return x
    if p >= 1:
        return x * 0  # everything dropped (1/(1-p) would divide by zero); x * 0 keeps the graph, like F.dropout
    keep = torch.rand(x.shape, generator=generator) >= p  # a new tensor: x itself is never modified
    return x * keep / (1 - p)


class BatchNorm1d(nn.Module):
    """Batch normalisation (Ioffe & Szegedy 2015) of (B, C) inputs, with `nn.BatchNorm1d`'s conventions.

    Training: each feature is normalised with the batch's mean and *biased* variance,
    y = (x - mean) / sqrt(var + eps) * weight + bias, and the running estimates move towards the batch's:
    running = (1 - momentum) * running + momentum * batch statistic (torch keeps the *unbiased* variance).
    Evaluation: the running estimates replace the batch's, so an example's output no longer depends on
    the rest of its batch. The running statistics are buffers: they move with `.to()` and are saved.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))  # gamma: the scale the layer may learn back
        self.bias = nn.Parameter(torch.zeros(num_features))  # beta: the shift
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def extra_repr(self) -> str:
        return f"{len(self.weight)}, eps={self.eps:g}, momentum={self.momentum:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean = x.mean(dim=0)  # (C,) one mean per feature, over the batch
            var = x.var(dim=0, unbiased=False)  # (C,) biased: the variance of this batch itself
            n = x.shape[0]
            with torch.no_grad():  # running estimates are bookkeeping, not part of the graph
                self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * mean
                self.running_var = (1 - self.momentum) * self.running_var + self.momentum * var * n / (n - 1)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias  # (B, C)


# ----------------------------------------------------------------------------------------------
# Training a small classifier on in-memory tensors, and looking inside it
# ----------------------------------------------------------------------------------------------
def split_digits(seed: int = 0) -> dict[str, torch.Tensor]:
    """scikit-learn's 8x8 digits, split once at random: 70% train, 15% validation, 15% test.

    Returns X, y (1257 training digits), X_val, y_val (269) and X_test, y_test (271): X float32 (N, 64)
    in [0, 1], y int64 (N,).
    """
    from .data import load_digits

    X_np, y_np = load_digits()
    X, y = torch.from_numpy(X_np), torch.from_numpy(y_np)  # (1797, 64), (1797,)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(0.7 * len(X)), int(0.15 * len(X))
    parts = {"": perm[:n_train], "_val": perm[n_train:n_train + n_val], "_test": perm[n_train + n_val:]}
    return {f"{name}{suffix}": t[idx] for suffix, idx in parts.items() for name, t in (("X", X), ("y", y))}


def minibatches(X: torch.Tensor, y: torch.Tensor, batch_size: int,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch: shuffle once, then yield consecutive (X, y) batches (the last one may be smaller)."""
    order = torch.randperm(len(X), generator=generator)
    for i in range(0, len(X), batch_size):
        idx = order[i:i + batch_size]
        yield X[idx], y[idx]  # (batch, ...), (batch,)

@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> float:
    """Fraction of rows of X whose argmax logit equals y (model in eval mode)."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(X[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(X), batch_size))
    model.train(was_training)
    return correct / len(X)


def fit_classifier(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float,
                   batch_size: int = 64, optimizer: str = "adam", weight_decay: float = 0.0,
                   momentum: float = 0.9, X_val: torch.Tensor | None = None, y_val: torch.Tensor | None = None,
                   eval_every: int = 0, generator: torch.Generator | None = None, progress: bool = True,
                   desc: str = "training") -> dict[str, list[float]]:
    """Mini-batch training of a classifier with cross-entropy; returns a history for `plot_history`.

    Args:
        optimizer: "sgd" (with `momentum`), "adam" (both: `weight_decay` is L2 added to the gradient) or
            "adamw" (`weight_decay` shrinks the weights directly).
        eval_every: log train/val loss and accuracy every this many steps (0: only at the end).
    """
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "adamw":  # decoupled weight decay (Loshchilov & Hutter 2019)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    history: dict[str, list[float]] = {"step": [], "train_loss": [], "val_loss": [], "train_acc": [], "val_acc": []}
    generator = generator or torch.Generator().manual_seed(0)
    model.train()
    for step in tqdm(range(1, steps + 1), desc=desc, leave=False, disable=not progress):
        idx = torch.randint(0, len(X), (batch_size,), generator=generator)
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (eval_every and step % eval_every == 0) or step == steps:
            model.eval()
            with torch.no_grad():
                history["step"].append(step)
                history["train_loss"].append(float(nn.functional.cross_entropy(model(X), y)))
                history["train_acc"].append(accuracy(model, X, y))
                if X_val is not None:
                    history["val_loss"].append(float(nn.functional.cross_entropy(model(X_val), y_val)))
                    history["val_acc"].append(accuracy(model, X_val, y_val))
            model.train()
    if X_val is None:
        del history["val_loss"], history["val_acc"]
    return history


@torch.no_grad()
def hidden_activations(model: MLP, X: torch.Tensor) -> list[torch.Tensor]:
    """The output of every hidden activation function of an `MLP` on inputs X, one (B, H) tensor each."""
    outs, h = [], X
    for module in model.net:
        h = module(h)
        if isinstance(module, tuple(ACTIVATIONS.values())):
            outs.append(h)
    return outs


def layer_statistics(model: MLP, X: torch.Tensor, y: torch.Tensor, *, saturated: float = 0.97) -> dict[str, list[float]]:
    """Health of every hidden layer on one batch, after one backward pass of the cross-entropy loss.

    Returns lists with one entry per hidden layer: `act_std` (std of the activation output),
    `saturated` (share of |activation| > `saturated`: tanh units whose slope is below ~0.06),
    `act_grad_std` (std of d loss / d activation) and `weight_grad_norm` (norm of d loss / d W of the
    Linear layer feeding it). The model's gradients are left as they are (zero them before training).
    """
    acts, h = [], X
    for module in model.net:
        h = module(h)
        if isinstance(module, tuple(ACTIVATIONS.values())):
            h.retain_grad()  # keep d loss / d h of this non-leaf tensor after backward
            acts.append(h)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(h, y).backward()
    return {"act_std": [a.std().item() for a in acts],
            "saturated": [(a.abs() > saturated).float().mean().item() for a in acts],
            "act_grad_std": [a.grad.std().item() for a in acts],
            "weight_grad_norm": [lin.weight.grad.norm().item() for lin in model.linears[:len(acts)]]}


def plot_activation_histograms(acts: list[torch.Tensor], *, axes=None, title: str = "", bins: int = 60):
    """One histogram per hidden layer, with the layer's mean, std and share of saturated/dead units."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, len(acts), figsize=(2.6 * len(acts), 2.4), sharey=True)
    for i, (ax, a) in enumerate(zip(axes, acts)):
        a = a.flatten().float()
        ax.hist(a.numpy(), bins=bins, color="C0", alpha=0.8)
        ax.set_title(f"layer {i + 1}: mean {a.mean():.2f}, std {a.std():.2f}", fontsize=8)
        ax.set_yticks([])
    if title:
        axes[0].get_figure().suptitle(title, fontsize=10)
    return axes
