"""Plotting helpers shared by every week: one style, loss curves, decision boundaries, heatmaps."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch


def use_course_style() -> None:
    """A readable default style for every figure in the course."""
    plt.rcParams.update({"figure.figsize": (6.4, 3.8), "figure.dpi": 100, "axes.grid": True,
                         "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
                         "font.size": 10})


def plot_history(history: Mapping[str, Sequence[float]], *, x: str = "step", keys: Sequence[str] | None = None,
                 title: str = "", logy: bool = False, ax: plt.Axes | None = None) -> plt.Axes:
    """Draw the curves of a training history ({"step": [...], "train_loss": [...], ...})."""
    ax = ax or plt.subplots()[1]
    keys = keys or [k for k in history if k != x and len(history[k]) == len(history[x])]
    for key in keys:
        ax.plot(history[x], history[key], label=key.replace("_", " "))
    ax.set_xlabel(x)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    return ax


def plot_decision_boundary(predict: Callable[[torch.Tensor], torch.Tensor], X: np.ndarray | torch.Tensor,
                           y: np.ndarray | torch.Tensor, *, ax: plt.Axes | None = None, title: str = "",
                           resolution: int = 200) -> plt.Axes:
    """Shade the class that `predict` (points (N, 2) -> class scores or labels) gives each point of the plane."""
    ax = ax or plt.subplots(figsize=(4.5, 4.5))[1]
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    pad = 0.5
    xs = np.linspace(X[:, 0].min() - pad, X[:, 0].max() + pad, resolution)
    ys = np.linspace(X[:, 1].min() - pad, X[:, 1].max() + pad, resolution)
    gx, gy = np.meshgrid(xs, ys)
    grid = torch.tensor(np.stack([gx.ravel(), gy.ravel()], axis=1), dtype=torch.float32)
    with torch.no_grad():
        out = predict(grid)
    out = torch.as_tensor(out)
    labels = out.argmax(-1) if out.dim() == 2 and out.shape[1] > 1 else (out.reshape(-1) > 0).long()
    ax.contourf(gx, gy, labels.reshape(gx.shape).numpy(), alpha=0.3, cmap="coolwarm", levels=np.arange(-0.5, y.max() + 1))
    ax.scatter(X[:, 0], X[:, 1], c=y, cmap="coolwarm", s=12, edgecolors="k", linewidths=0.3)
    ax.set_title(title)
    ax.set_aspect("equal")
    return ax


def plot_heatmap(matrix: Any, *, xlabels: Sequence[str] | None = None, ylabels: Sequence[str] | None = None,
                 ax: plt.Axes | None = None, title: str = "", cmap: str = "viridis", colorbar: bool = True) -> plt.Axes:
    """A labelled heatmap, e.g. attention weights (rows: queries, columns: keys)."""
    m = matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix)
    ax = ax or plt.subplots()[1]
    im = ax.imshow(m, cmap=cmap, aspect="auto")
    if xlabels is not None:
        ax.set_xticks(range(len(xlabels)), xlabels, rotation=90, fontsize=8)
    if ylabels is not None:
        ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
    ax.grid(False)
    ax.set_title(title)
    if colorbar:
        plt.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return ax
