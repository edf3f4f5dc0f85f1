"""A scalar reverse-mode autograd engine, built in week 1 (after Karpathy's micrograd).

`Value -> backward -> Neuron -> Layer -> MLP`, plus `draw_graph`, a matplotlib-only picture of a
computation graph. Every node remembers its inputs (`_prev`), the operation that made it (`_op`) and a
closure (`_backward`) that adds its share of the output's gradient into its inputs (chain rule).
PyTorch's autograd does the same on tensors, records the graph in C++ and frees it after `backward`.
"""
from __future__ import annotations

import math
import random
from typing import Callable

import torch

import matplotlib.pyplot as plt


class Value:
    """A scalar that records how it was computed, so `backward()` can fill in d(output)/d(self)."""

    def __init__(self, data: float, _children: tuple = (), _op: str = "", label: str = ""):
        self.data = float(data)
        self.grad = 0.0  # d(root)/d(self), filled in by backward()
        self._backward: Callable[[], None] = lambda: None  # leaves have nothing to propagate
        self._prev = tuple(_children)  # the inputs this value was computed from
        self._op = _op  # the operation that produced it, for drawing
        self.label = label

    def __repr__(self) -> str:
        name = f"{self.label}: " if self.label else ""
        return f"Value({name}data={self.data:.4g}, grad={self.grad:.4g})"

    def _lift(self, other) -> "Value":
        # type(self): a subclass keeps building nodes of its own class
        return other if isinstance(other, Value) else type(self)(other)

    # --- operations: forward value now, local derivative in a closure for later -------------
    def __add__(self, other) -> "Value":
        other = self._lift(other)
        out = type(self)(self.data + other.data, (self, other), "+")

        def _backward():
            self.grad += out.grad  # d(a+b)/da = 1; += because a node may feed several others
            other.grad += out.grad

        out._backward = _backward
        return out

    def __mul__(self, other) -> "Value":
        other = self._lift(other)
        out = type(self)(self.data * other.data, (self, other), "*")

        def _backward():
            self.grad += other.data * out.grad  # d(ab)/da = b
            other.grad += self.data * out.grad

        out._backward = _backward
        return out

    def __pow__(self, n: float) -> "Value":
        assert isinstance(n, (int, float)), "only constant exponents"
        out = type(self)(self.data ** n, (self,), f"**{n:g}")

        def _backward():
            self.grad += n * self.data ** (n - 1) * out.grad  # d(a^n)/da = n a^(n-1)

        out._backward = _backward
        return out

    def exp(self) -> "Value":
        out = type(self)(math.exp(self.data), (self,), "exp")

        def _backward():
            self.grad += out.data * out.grad  # d(e^a)/da = e^a

        out._backward = _backward
        return out

    def log(self) -> "Value":
        out = type(self)(math.log(self.data), (self,), "log")

        def _backward():
            self.grad += out.grad / self.data  # d(ln a)/da = 1/a

        out._backward = _backward
        return out

    def tanh(self) -> "Value":
        t = math.tanh(self.data)
        out = type(self)(t, (self,), "tanh")

        def _backward():
            self.grad += (1 - t * t) * out.grad  # d(tanh a)/da = 1 - tanh(a)^2

        out._backward = _backward
        return out

    def relu(self) -> "Value":
        out = type(self)(max(0.0, self.data), (self,), "relu")

        def _backward():
            self.grad += (self.data > 0) * out.grad  # slope 1 where active, 0 elsewhere

        out._backward = _backward
        return out

    # --- everything else is built from the operations above ---------------------------------
    def __neg__(self) -> "Value":
        return self * -1

    def __sub__(self, other) -> "Value":
        return self + (-self._lift(other))

    def __truediv__(self, other) -> "Value":
        return self * self._lift(other) ** -1

    def __radd__(self, other) -> "Value":
        return self + other

    def __rmul__(self, other) -> "Value":
        return self * other

    def __rsub__(self, other) -> "Value":
        return self._lift(other) - self

    def __rtruediv__(self, other) -> "Value":
        return self._lift(other) / self

    def backward(self) -> None:
        """Add d(self)/d(leaf) into `.grad` of every leaf this value depends on (see `backward`)."""
        backward(self)


def topological_order(root: Value) -> list[Value]:
    """Every node reachable from `root`, each listed after all of its inputs (depth-first post-order)."""
    order, seen = [], set()

    def visit(v: Value) -> None:
        if id(v) not in seen:
            seen.add(id(v))
            for child in v._prev:
                visit(child)
            order.append(v)

    visit(root)
    return order


def backward(root: Value) -> None:
    """Reverse-mode autodiff: add d(root)/d(leaf) into the `.grad` of every leaf `root` depends on.

    Like `torch.Tensor.backward`: gradients *accumulate* in leaves (nodes with no inputs: parameters,
    inputs), so two backward passes add up, which is why training loops call `zero_grad()` before each
    one. A non-leaf node's grad is scratch space for this pass: it starts at 0, collects the share of
    every node that uses it, then is passed on. Reverse topological order guarantees a node's grad is
    complete (every consumer has added its share) before the node runs its own `_backward`.
    """
    order = topological_order(root)
    for v in order:
        if v._prev:
            v.grad = 0.0  # intermediate results start every pass empty (PyTorch does not even keep them)
    root.grad += 1.0  # d(root)/d(root) = 1
    for v in reversed(order):
        v._backward()


# ----------------------------------------------------------------------------------------------
# Neuron -> Layer -> MLP, on Values
# ----------------------------------------------------------------------------------------------
class Module:
    """Shared helpers: list parameters, reset their gradients."""

    def parameters(self) -> list[Value]:
        return []

    def zero_grad(self) -> None:
        """Reset every parameter's grad to 0: `backward` adds into it, so call this before each step."""
        for p in self.parameters():
            p.grad = 0.0


class Neuron(Module):
    """act(w . x + b): a weighted sum of the inputs, a bias and a nonlinearity."""

    def __init__(self, n_in: int, *, nonlin: bool = True, rng: random.Random | None = None):
        rng = rng or random.Random(0)
        self.w = [Value(rng.uniform(-1, 1) / math.sqrt(n_in)) for _ in range(n_in)]
        self.b = Value(0.0)
        self.nonlin = nonlin

    def __call__(self, x: list) -> Value:
        act = sum((wi * xi for wi, xi in zip(self.w, x)), self.b)
        return act.tanh() if self.nonlin else act

    def parameters(self) -> list[Value]:
        return self.w + [self.b]


class Layer(Module):
    """n_out neurons that all read the same inputs."""

    def __init__(self, n_in: int, n_out: int, **kwargs):
        self.neurons = [Neuron(n_in, **kwargs) for _ in range(n_out)]

    def __call__(self, x: list) -> list[Value]:
        return [n(x) for n in self.neurons]

    def parameters(self) -> list[Value]:
        return [p for n in self.neurons for p in n.parameters()]


class MLP(Module):
    """Layers of tanh neurons; the last layer is linear so it can output any score."""

    def __init__(self, n_in: int, n_outs: list[int], *, seed: int = 0):
        rng = random.Random(seed)
        sizes = [n_in] + list(n_outs)
        self.layers = [Layer(sizes[i], sizes[i + 1], nonlin=i < len(n_outs) - 1, rng=rng) for i in range(len(n_outs))]

    def __call__(self, x: list) -> list[Value]:
        for layer in self.layers:
            x = layer(x)
        return x

    def parameters(self) -> list[Value]:
        return [p for layer in self.layers for p in layer.parameters()]


def numerical_grad(f: Callable[[torch.Tensor], float], x: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    """Central differences: df/dx_i ~ (f(x + h e_i) - f(x - h e_i)) / 2h, error O(h^2) (vs O(h) one-sided).

    `x` is perturbed in place one entry at a time and restored afterwards; use float64 so the
    difference of two nearly equal numbers keeps enough digits.
    """
    grad = torch.zeros_like(x)
    flat, gflat = x.view(-1), grad.view(-1)  # views: writing flat[i] perturbs x
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + h
        f_plus = float(f(x))
        flat[i] = old - h
        f_minus = float(f(x))
        flat[i] = old  # restore, or every later entry is measured at a shifted point
        gflat[i] = (f_plus - f_minus) / (2 * h)
    return grad


# ----------------------------------------------------------------------------------------------
# Drawing a computation graph with matplotlib only (no graphviz binary needed)
# ----------------------------------------------------------------------------------------------
def _depths(order: list[Value]) -> dict[int, int]:
    """Layer of each node: leaves at 0, every other node one right of its deepest input."""
    depth: dict[int, int] = {}
    for v in order:  # topological order: inputs come first
        depth[id(v)] = 1 + max((depth[id(c)] for c in v._prev), default=-1)
    return depth


def draw_graph(root: Value, *, ax: plt.Axes | None = None, title: str = "") -> plt.Axes:
    """Draw the graph that produced `root`: one box per Value (label, data, grad), inputs on the left.

    Nodes sit in columns by topological depth; the operation that made a node is written on the
    edge into it (e.g. `*`, `tanh`).
    """
    order = topological_order(root)
    depth = _depths(order)
    columns: dict[int, list[Value]] = {}
    for v in order:
        columns.setdefault(depth[id(v)], []).append(v)
    pos = {}
    for d, nodes in columns.items():
        for i, v in enumerate(nodes):
            pos[id(v)] = (d * 2.6, -(i - (len(nodes) - 1) / 2) * 1.25)
    n_cols, n_rows = len(columns), max(len(c) for c in columns.values())
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 2.3 * n_cols), max(2.0, 0.95 * n_rows + 0.8)))
    for v in order:
        x, y = pos[id(v)]
        for c in v._prev:
            cx, cy = pos[id(c)]
            ax.annotate("", xy=(x - 0.85, y), xytext=(cx + 0.85, cy),
                        arrowprops=dict(arrowstyle="->", color="0.55", lw=1, shrinkA=0, shrinkB=0))
        if v._op:
            ax.text(x - 1.05, y, v._op, ha="center", va="center", fontsize=8, zorder=3,
                    bbox=dict(boxstyle="circle,pad=0.25", fc="#fff2cc", ec="#b59b2d"))
        name = f"{v.label}\n" if v.label else ""
        ax.text(x, y, f"{name}data {v.data:.3g}\ngrad {v.grad:.3g}", ha="center", va="center", fontsize=8, zorder=3,
                bbox=dict(boxstyle="round,pad=0.3", fc="#dbe9f6" if v._prev else "#e2f0d9", ec="0.4"))
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 1.4, max(xs) + 1.1)
    ax.set_ylim(min(ys) - 0.8, max(ys) + 0.8)
    ax.axis("off")
    if title:
        ax.set_title(title)
    return ax

