"""Week 1: the checks reject plausible wrong answers and accept correct ones written differently, and the
package's autograd engine, MLP pieces, batch norm and optimisers agree with torch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_utils.autograd import MLP as ValueMLP
from course_utils.autograd import Value, backward, draw_graph, numerical_grad, topological_order
from course_utils.mlp import (MLP, BatchNorm1d, cross_entropy, dropout, hidden_activations, layer_statistics,
                              minibatches, mlp_backward, split_digits)
from course_utils.optim import SGD, Adam, adam_step, sgd_momentum_step


# ----------------------------------------------------------------------------------------------
# 1.1 cross-entropy
# ----------------------------------------------------------------------------------------------
def ce_no_max_subtraction(logits, y):
    logprobs = logits - logits.exp().sum(-1, keepdim=True).log()
    return -logprobs[torch.arange(len(y)), y].mean()


def ce_sum_not_mean(logits, y):
    m = logits.max(-1, keepdim=True).values
    logprobs = logits - m - (logits - m).exp().sum(-1, keepdim=True).log()
    return -logprobs[torch.arange(len(y)), y].sum()


def ce_wrong_axis(logits, y):
    m = logits.max(0, keepdim=True).values
    logprobs = logits - m - (logits - m).exp().sum(0, keepdim=True).log()
    return -logprobs[torch.arange(len(y)), y].mean()


def ce_log_of_softmax(logits, y):
    return -torch.softmax(logits, -1)[torch.arange(len(y)), y].log().mean()


def ce_forgets_to_add_max_back(logits, y):
    m = logits.max(-1, keepdim=True).values
    logprobs = logits - (logits - m).exp().sum(-1, keepdim=True).log()
    return -logprobs[torch.arange(len(y)), y].mean()


def ce_in_float32(logits, y):
    logits = logits.float()
    m = logits.max(-1, keepdim=True).values
    logprobs = logits - m - (logits - m).exp().sum(-1, keepdim=True).log()
    return -logprobs[torch.arange(len(y)), y].mean()


def ce_calls_the_library(logits, y):
    return F.cross_entropy(logits, y)


def ce_uses_log_softmax(logits, y):
    return -F.log_softmax(logits, dim=-1)[torch.arange(len(y)), y].mean()


def ce_gather_amax(logits, targets):
    m = logits.amax(dim=1, keepdim=True)  # (B, 1)
    lse = m.squeeze(1) + torch.log(torch.sum(torch.exp(logits - m), dim=1))  # (B,)
    return (lse - logits.gather(1, targets[:, None]).squeeze(1)).mean()


def ce_row_by_row(logits, targets):
    losses = []
    for z, t in zip(logits, targets):
        m = z.max()
        losses.append(m + (z - m).exp().sum().log() - z[t])
    return torch.stack(losses).mean()


def ce_sorted_max(logits, targets):
    m = logits.sort(dim=-1).values[:, -1:]  # the row max, found another way
    shifted = logits - m
    picked = shifted[torch.arange(logits.shape[0]), targets]
    return (shifted.exp().sum(-1).log() - picked).sum() / logits.shape[0]


# ----------------------------------------------------------------------------------------------
# 1.2 backward closures
# ----------------------------------------------------------------------------------------------
def _unary(cls_name, method, derivative, *, assign=False):
    """A Value subclass whose `method` (exp or tanh) has the given local derivative (or assigns with =)."""
    forward = {"exp": math.exp, "tanh": math.tanh}[method]

    def op(self):
        out = type(self)(forward(self.data), (self,), method)

        def _backward():
            if assign:
                self.grad = derivative(self, out) * out.grad
            else:
                self.grad += derivative(self, out) * out.grad

        out._backward = _backward
        return out

    return type(cls_name, (Value,), {method: op})


def _mul(cls_name, backward_fn):
    def __mul__(self, other):
        other = self._lift(other)
        out = type(self)(self.data * other.data, (self, other), "*")
        out._backward = lambda: backward_fn(self, other, out)
        return out

    return type(cls_name, (Value,), {"__mul__": __mul__})


def _mul_overwrites(s, o, out):
    s.grad = o.data * out.grad
    o.grad = s.data * out.grad


def _mul_overwrites_other(s, o, out):
    s.grad += o.data * out.grad
    o.grad = s.data * out.grad


def _mul_swapped(s, o, out):
    s.grad += s.data * out.grad
    o.grad += o.data * out.grad


def _mul_ignores_out_grad(s, o, out):
    s.grad += o.data
    o.grad += s.data


ValueMulOverwrites = _mul("ValueMulOverwrites", _mul_overwrites)
ValueMulOverwritesOther = _mul("ValueMulOverwritesOther", _mul_overwrites_other)
ValueMulSwapped = _mul("ValueMulSwapped", _mul_swapped)
ValueMulIgnoresOutGrad = _mul("ValueMulIgnoresOutGrad", _mul_ignores_out_grad)
ValueExpOverwrites = _unary("ValueExpOverwrites", "exp", lambda s, out: out.data, assign=True)
ValueExpUsesInput = _unary("ValueExpUsesInput", "exp", lambda s, out: s.data)
ValueTanhOverwrites = _unary("ValueTanhOverwrites", "tanh", lambda s, out: 1 - out.data ** 2, assign=True)
ValueTanhNotSquared = _unary("ValueTanhNotSquared", "tanh", lambda s, out: 1 - out.data)
ValueTanhOfInput = _unary("ValueTanhOfInput", "tanh", lambda s, out: 1 - s.data ** 2)


class ValuePowOverwrites(Value):
    def __pow__(self, n):
        out = type(self)(self.data ** n, (self,), f"**{n}")

        def _backward():
            self.grad = n * self.data ** (n - 1) * out.grad

        out._backward = _backward
        return out


class ValuePowNoMinusOne(Value):
    """d x^n / dx written as n x^n."""

    def __pow__(self, n):
        out = type(self)(self.data ** n, (self,), f"**{n}")

        def _backward():
            self.grad += n * self.data ** n * out.grad

        out._backward = _backward
        return out


class ValuePlaceholder(Value):
    """What the student notebook ships: forward works, the backward closures raise."""

    def __mul__(self, other):
        out = super().__mul__(other)

        def _backward():
            raise NotImplementedError("complete the backward closure")

        out._backward = _backward
        return out


class ValueWrittenDifferently(Value):
    """Correct closures in other words: tanh' as 1/cosh², exp recomputed, local gradients named first."""

    def __mul__(self, other):
        other = self._lift(other)
        out = type(self)(self.data * other.data, (self, other), "*")

        def _backward():
            d_self, d_other = other.data, self.data
            self.grad = self.grad + d_self * out.grad
            other.grad = other.grad + d_other * out.grad

        out._backward = _backward
        return out

    def __pow__(self, n):
        out = type(self)(self.data ** n, (self,), f"**{n}")
        out._backward = lambda: setattr(self, "grad", self.grad + out.grad * n * self.data ** (n - 1))
        return out

    def exp(self):
        out = type(self)(math.exp(self.data), (self,), "exp")

        def _backward():
            self.grad += math.exp(self.data) * out.grad

        out._backward = _backward
        return out

    def tanh(self):
        out = type(self)(math.tanh(self.data), (self,), "tanh")

        def _backward():
            self.grad += out.grad / math.cosh(self.data) ** 2

        out._backward = _backward
        return out


class ValueTanhFromExp(Value):
    """tanh computed from exp, with its derivative from the output; pow's derivative via math.pow."""

    def tanh(self):
        e = math.exp(2 * self.data)
        t = (e - 1) / (e + 1)
        out = type(self)(t, (self,), "tanh")

        def _backward():
            self.grad += (1 - out.data * out.data) * out.grad

        out._backward = _backward
        return out

    def __pow__(self, n):
        out = type(self)(math.pow(self.data, n), (self,), f"**{n}")

        def _backward():
            local = n * math.pow(self.data, n - 1)
            self.grad += local * out.grad

        out._backward = _backward
        return out


# ----------------------------------------------------------------------------------------------
# 1.3 backward traversal
# ----------------------------------------------------------------------------------------------
def _run(order, root):
    """Reset non-leaf grads, seed the root, run the closures in `order`."""
    for v in order:
        if v._prev:
            v.grad = 0.0
    root.grad += 1.0
    for v in order:
        v._backward()


def _postorder(root, *, children=lambda v: v._prev, dedupe=True):
    order, seen = [], set()

    def visit(v):
        if dedupe and id(v) in seen:
            return
        seen.add(id(v))
        for c in children(v):
            visit(c)
        order.append(v)

    visit(root)
    return order


def backward_bfs(root):
    """Breadth-first from the output: a node can run before all its consumers have reported."""
    order, seen, i = [root], {id(root)}, 0
    while i < len(order):
        for c in order[i]._prev:
            if id(c) not in seen:
                seen.add(id(c))
                order.append(c)
        i += 1
    _run(order, root)


def backward_preorder(root):
    """Depth-first, each node listed *before* its inputs (pre-order), run in that order."""
    order, seen = [], set()

    def visit(v):
        if id(v) not in seen:
            seen.add(id(v))
            order.append(v)
            for c in v._prev:
                visit(c)

    visit(root)
    _run(order, root)


def backward_preorder_children_reversed(root):
    order, seen = [], set()

    def visit(v):
        if id(v) not in seen:
            seen.add(id(v))
            order.append(v)
            for c in reversed(v._prev):
                visit(c)

    visit(root)
    _run(order, root)


def backward_forward_order(root):
    """Runs the closures inputs-first (topological order, not reversed)."""
    _run(_postorder(root), root)


def backward_no_visited_set(root):
    """Post-order without remembering visited nodes: a shared node is listed, and run, more than once."""
    _run(list(reversed(_postorder(root, dedupe=False))), root)


def backward_no_seed(root):
    order = list(reversed(_postorder(root)))
    for v in order:
        if v._prev:
            v.grad = 0.0
    for v in order:
        v._backward()


def backward_zeroes_every_grad(root):
    """Resets the leaves too: an earlier backward's gradients are lost (no accumulation)."""
    order = list(reversed(_postorder(root)))
    for v in order:
        v.grad = 0.0
    root.grad = 1.0
    for v in order:
        v._backward()


def backward_zeroes_nothing(root):
    """micrograd's version: intermediate nodes keep the previous pass's grads and pass them on again."""
    order = list(reversed(_postorder(root)))
    root.grad = 1.0
    for v in order:
        v._backward()


def backward_kahn(root):
    """Kahn's algorithm: a node runs once every node that uses it has run."""
    nodes = _postorder(root)
    waiting = {id(v): 0 for v in nodes}
    for v in nodes:
        for c in v._prev:
            waiting[id(c)] += 1
    for v in nodes:
        if v._prev:
            v.grad = 0.0
    root.grad = root.grad + 1
    ready = [root]
    while ready:
        v = ready.pop()
        v._backward()
        for c in set(v._prev):
            waiting[id(c)] -= v._prev.count(c)
            if waiting[id(c)] == 0:
                ready.append(c)


def backward_iterative_dfs(root):
    """The same post-order with an explicit stack instead of recursion."""
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        v, expanded = stack.pop()
        if expanded:
            order.append(v)
            continue
        if id(v) in seen:
            continue
        seen.add(id(v))
        stack.append((v, True))
        stack.extend((c, False) for c in v._prev if id(c) not in seen)
    intermediates = [v for v in order if v._prev]
    for v in intermediates:
        v.grad = 0
    root.grad += 1
    for v in order[::-1]:
        v._backward()


def backward_children_reversed(root):
    """Post-order visiting each node's inputs in reverse: another valid topological order."""
    _run(list(reversed(_postorder(root, children=lambda v: tuple(reversed(v._prev))))), root)


# ----------------------------------------------------------------------------------------------
# 1.4 backprop by hand
# ----------------------------------------------------------------------------------------------
def _mlp_wrong(kind):
    def fn(X, y, W1, b1, W2, b2):
        B = X.shape[0]
        h_pre = X @ W1 + b1
        h = h_pre.clamp(min=0)
        logits = h @ W2 + b2
        dlogits = torch.softmax(logits, 0 if kind == "softmax_axis" else -1)
        dlogits[torch.arange(B), y] -= 1
        if kind != "no_mean":
            dlogits = dlogits / B
        dh = dlogits @ W2.T
        mask = (h_pre >= 0) if kind == "relu_ge" else (h_pre > 0)
        dh_pre = dh if kind == "no_relu_mask" else dh * mask
        dW1 = (dh_pre.T @ X).reshape(W1.shape) if kind == "transposed" else X.T @ dh_pre
        db1 = dh_pre.mean(0) if kind == "bias_mean" else dh_pre.sum(0)
        dW2 = (dlogits.T @ h).reshape(W2.shape) if kind == "transposed_W2" else h.T @ dlogits
        grads = {"W1": dW1, "b1": db1, "W2": dW2, "b2": dlogits.sum(0)}
        if kind != "params_only":
            grads.update(logits=dlogits, h=dh, h_pre=dh_pre)
        return grads

    fn.__name__ = f"mlp_backward_{kind}"
    return fn


def mlp_backward_with_autograd(X, y, W1, b1, W2, b2):
    ps = [p.clone().requires_grad_(True) for p in (W1, b1, W2, b2)]
    h_pre = X @ ps[0] + ps[1]
    h = h_pre.relu()
    logits = h @ ps[2] + ps[3]
    for t in (h_pre, h, logits):
        t.retain_grad()
    F.cross_entropy(logits, y).backward()
    return dict(W1=ps[0].grad, b1=ps[1].grad, W2=ps[2].grad, b2=ps[3].grad, logits=logits.grad, h=h.grad, h_pre=h_pre.grad)


def mlp_backward_einsum(X, y, W1, b1, W2, b2):
    h_pre = torch.einsum("bd,dh->bh", X, W1) + b1
    h = torch.where(h_pre > 0, h_pre, torch.zeros_like(h_pre))
    logits = torch.einsum("bh,hc->bc", h, W2) + b2
    probs = (logits - logits.max(1, keepdim=True).values).exp()
    probs = probs / probs.sum(1, keepdim=True)
    onehot = torch.zeros_like(probs).scatter_(1, y[:, None], 1.0)
    dlogits = (probs - onehot) / X.shape[0]
    dh = torch.einsum("bc,hc->bh", dlogits, W2)
    dh_pre = dh * (h_pre > 0).to(dh.dtype)
    return {"W1": torch.einsum("bd,bh->dh", X, dh_pre), "b1": dh_pre.sum(0), "W2": torch.einsum("bh,bc->hc", h, dlogits),
            "b2": dlogits.sum(0), "logits": dlogits, "h": dh, "h_pre": dh_pre}


def mlp_backward_through_logprobs(X, y, W1, b1, W2, b2):
    """The long way: through log-softmax, one example at a time for the weights."""
    B = X.shape[0]
    h_pre = X @ W1 + b1
    h = torch.relu(h_pre)
    logits = h @ W2 + b2
    logprobs = logits - logits.logsumexp(1, keepdim=True)
    dlogprobs = torch.zeros_like(logprobs)
    dlogprobs[torch.arange(B), y] = -1.0 / B
    dlogits = dlogprobs - logprobs.exp() * dlogprobs.sum(1, keepdim=True)
    dh = dlogits @ W2.T
    dh_pre = dh.masked_fill(h_pre <= 0, 0.0)
    dW1, dW2 = torch.zeros_like(W1), torch.zeros_like(W2)
    for i in range(B):
        dW1 = dW1 + torch.outer(X[i], dh_pre[i])
        dW2 = dW2 + torch.outer(h[i], dlogits[i])
    return {"W1": dW1, "b1": dh_pre.sum(0), "W2": dW2, "b2": dlogits.sum(0), "logits": dlogits, "h": dh, "h_pre": dh_pre}


# ----------------------------------------------------------------------------------------------
# 1.5 numerical gradient
# ----------------------------------------------------------------------------------------------
def numgrad_forward_difference(f, x, h=1e-5):
    grad, flat = torch.zeros_like(x), x.view(-1)
    f0 = float(f(x))
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + h
        grad.view(-1)[i] = (float(f(x)) - f0) / h
        flat[i] = old
    return grad


def numgrad_no_restore(f, x, h=1e-5):
    grad, flat = torch.zeros_like(x), x.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + h
        f_plus = float(f(x))
        flat[i] = old - h
        grad.view(-1)[i] = (f_plus - float(f(x))) / (2 * h)
    return grad


def numgrad_divides_by_h(f, x, h=1e-5):
    return numerical_grad(f, x.clone(), h) * 2


def numgrad_float32_result(f, x, h=1e-5):
    return numerical_grad(f, x.clone(), h).float() if x.dtype == torch.float64 else numerical_grad(f, x.clone(), h).double()


def numgrad_flat_result(f, x, h=1e-5):
    return numerical_grad(f, x.clone(), h).reshape(-1)


def numgrad_without_mutation(f, x, h=1e-5):
    """Never touches x: evaluates f at new tensors x ± h e_i."""
    grad = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e.view(-1)[i] = h
        grad.view(-1)[i] = (f(x + e) - f(x - e)) / (2 * h)
    return grad


def numgrad_by_index(f, x, h=1e-5):
    """Multi-dimensional indices instead of a flat view; the perturbed entry is restored each time."""
    grad = torch.empty_like(x)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in x.shape]).reshape(x.numel(), -1).tolist():
        idx = tuple(idx)
        old = x[idx].clone()
        x[idx] = old + h
        up = f(x).item()
        x[idx] = old - h
        down = f(x).item()
        x[idx] = old
        grad[idx] = (up - down) / (2 * h)
    return grad


# ----------------------------------------------------------------------------------------------
# 1.6 SGD with momentum
# ----------------------------------------------------------------------------------------------
def sgd_no_accumulation(p, g, v, *, lr, momentum=0.9, weight_decay=0.0):
    v = g + weight_decay * p
    return p - lr * v, v


def sgd_dampened(p, g, v, *, lr, momentum=0.9, weight_decay=0.0):
    v = momentum * v + (1 - momentum) * (g + weight_decay * p)
    return p - lr * v, v


def sgd_nesterov(p, g, v, *, lr, momentum=0.9, weight_decay=0.0):
    g = g + weight_decay * p
    v = momentum * v + g
    return p - lr * (g + momentum * v), v


def sgd_lr_inside_velocity(p, g, v, *, lr, momentum=0.9, weight_decay=0.0):
    v = momentum * v + lr * (g + weight_decay * p)
    return p - v, v


def sgd_ignores_weight_decay(p, g, v, *, lr, momentum=0.9, weight_decay=0.0):
    v = momentum * v + g
    return p - lr * v, v


def sgd_in_place(p, g, v, *, lr, momentum=0.9, weight_decay=0.0):
    """torch.optim's own style: right numbers, but the caller's param and velocity are overwritten."""
    v.mul_(momentum).add_(g + weight_decay * p)
    p.sub_(lr * v)
    return p, v


def sgd_velocity_in_place(p, g, v, *, lr, momentum=0.9, weight_decay=0.0):
    v *= momentum
    v += g + weight_decay * p
    return p - lr * v, v


def sgd_with_alpha(param, grad, velocity, *, lr, momentum=0.9, weight_decay=0.0):
    g = torch.add(grad, param, alpha=weight_decay)
    v = velocity.mul(momentum).add(g)
    return param.sub(v, alpha=lr), v


def sgd_on_private_copies(param, grad, velocity, *, lr, momentum=0.9, weight_decay=0.0):
    """In-place operations are fine on tensors the function created itself."""
    v = velocity.clone()
    v.mul_(momentum).add_(grad).add_(param, alpha=weight_decay)
    new = param.clone()
    new -= lr * v
    return new, v


# ----------------------------------------------------------------------------------------------
# 1.7 Adam
# ----------------------------------------------------------------------------------------------
def adam_no_bias_correction(p, g, m, v, t, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    g = g + weight_decay * p
    m = betas[0] * m + (1 - betas[0]) * g
    v = betas[1] * v + (1 - betas[1]) * g * g
    return p - lr * m / (v.sqrt() + eps), m, v


def adam_eps_inside_sqrt(p, g, m, v, t, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    g = g + weight_decay * p
    m = betas[0] * m + (1 - betas[0]) * g
    v = betas[1] * v + (1 - betas[1]) * g * g
    m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
    return p - lr * m_hat / (v_hat + eps).sqrt(), m, v


def adam_decoupled_weight_decay(p, g, m, v, t, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """AdamW's decay, where torch.optim.Adam adds L2 to the gradient."""
    p = p * (1 - lr * weight_decay)
    return adam_step(p, g, m, v, t, lr=lr, betas=betas, eps=eps, weight_decay=0.0)


def adam_step_counted_from_zero(p, g, m, v, t, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    return adam_step(p, g, m, v, t + 1, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def adam_moments_in_place(p, g, m, v, t, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    g = g + weight_decay * p
    m.mul_(betas[0]).add_((1 - betas[0]) * g)
    v.mul_(betas[1]).add_((1 - betas[1]) * g * g)
    m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
    return p - lr * m_hat / (v_hat.sqrt() + eps), m, v


def adam_torch_style(param, grad, m, v, t, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """torch's arrangement: bias corrections folded into the step size and the denominator."""
    b1, b2 = betas
    g = grad.add(param, alpha=weight_decay)
    m = m.lerp(g, 1 - b1)
    v = v.mul(b2).addcmul(g, g, value=1 - b2)
    step_size = lr / (1 - b1 ** t)
    denom = v.sqrt() / math.sqrt(1 - b2 ** t) + eps
    return param.addcdiv(m, denom, value=-step_size), m, v


def adam_written_out(param, grad, m, v, t, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    g = grad + param * weight_decay
    new_m = m + (1 - betas[0]) * (g - m)
    new_v = v + (1 - betas[1]) * (g ** 2 - v)
    update = (new_m / (1 - betas[0] ** t)) / ((new_v / (1 - betas[1] ** t)) ** 0.5 + eps)
    return param - lr * update, new_m, new_v


# ----------------------------------------------------------------------------------------------
# 1.8 batch normalisation
# ----------------------------------------------------------------------------------------------
class _BN(nn.Module):
    """A configurable batch norm, for writing wrong versions briefly."""

    axis, running_unbiased, norm_unbiased, eps_outside, keras_momentum = 0, True, False, False, False
    update_running, running_in_training, detach_stats = True, False, False

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        if self.training and not self.running_in_training:
            mean = x.mean(self.axis, keepdim=self.axis == 1)
            var = x.var(self.axis, unbiased=self.norm_unbiased, keepdim=self.axis == 1)
            if self.detach_stats:
                mean, var = mean.detach(), var.detach()
            if self.update_running:
                n = x.shape[0]
                batch_var = (x.var(0, unbiased=False) * n / (n - 1)) if self.running_unbiased else x.var(0, unbiased=False)
                k = 1 - self.momentum if self.keras_momentum else self.momentum
                with torch.no_grad():
                    self.running_mean = (1 - k) * self.running_mean + k * x.mean(0)
                    self.running_var = (1 - k) * self.running_var + k * batch_var
        else:
            mean, var = self.running_mean, self.running_var
        if self.eps_outside:
            return (x - mean) / (var.sqrt() + self.eps) * self.weight + self.bias
        return (x - mean) / (var + self.eps).sqrt() * self.weight + self.bias


def _bn_variant(name, **overrides):
    return type(name, (_BN,), overrides)


BNBiasedRunningVar = _bn_variant("BNBiasedRunningVar", running_unbiased=False)
BNWrongAxis = _bn_variant("BNWrongAxis", axis=1)
BNEpsOutsideSqrt = _bn_variant("BNEpsOutsideSqrt", eps_outside=True)
BNKerasMomentum = _bn_variant("BNKerasMomentum", keras_momentum=True)
BNUnbiasedNormalisation = _bn_variant("BNUnbiasedNormalisation", norm_unbiased=True)
BNNoRunningUpdate = _bn_variant("BNNoRunningUpdate", update_running=False)
BNRunningStatsInTraining = _bn_variant("BNRunningStatsInTraining", running_in_training=True)
BNDetachedStatistics = _bn_variant("BNDetachedStatistics", detach_stats=True)


class BNPlaceholder(nn.Module):
    """What the student notebook ships: the constructor works, forward is a placeholder."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        raise NotImplementedError("complete forward")


class BNWithRsqrtAndLerp(nn.Module):
    """Correct, written differently: rsqrt, and in-place lerp_ on the buffers."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        if self.training:
            mu = x.mean(0)
            centred = x - mu
            var = (centred ** 2).mean(0)
            with torch.no_grad():
                self.running_mean.lerp_(mu, self.momentum)
                self.running_var.lerp_(x.var(0), self.momentum)  # torch.var is unbiased by default
        else:
            centred, var = x - self.running_mean, self.running_var
        return centred * torch.rsqrt(var + self.eps) * self.weight + self.bias


class BNFromMoments(nn.Module):
    """Correct, written differently: statistics kept as (1, C) rows, sums divided by n, powers instead of sqrt."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        n = x.shape[0]
        if self.training:
            mean = x.sum(0, keepdim=True) / n  # (1, C)
            var = ((x - mean) ** 2).sum(0, keepdim=True) / n  # (1, C)
            m = self.momentum
            self.running_mean = self.running_mean * (1 - m) + mean.detach().squeeze(0) * m
            self.running_var = self.running_var * (1 - m) + var.detach().squeeze(0) * (n / (n - 1)) * m
        else:
            mean, var = self.running_mean[None], self.running_var[None]
        x_hat = (x - mean) / (var + self.eps) ** 0.5
        return self.weight * x_hat + self.bias


# ----------------------------------------------------------------------------------------------
# 1.9 dropout
# ----------------------------------------------------------------------------------------------
def dropout_no_scaling(x, p, training, generator=None):
    if not training:
        return x
    return x * (torch.rand(x.shape, generator=generator) >= p)


def dropout_scales_by_keep(x, p, training, generator=None):
    if not training:
        return x
    return x * (torch.rand(x.shape, generator=generator) >= p) * (1 - p)


def dropout_also_in_eval(x, p, training, generator=None):
    if p >= 1:
        return x * 0
    return x * (torch.rand(x.shape, generator=generator) >= p) / (1 - p)


def dropout_keeps_with_probability_p(x, p, training, generator=None):
    if not training or p == 0:
        return x
    if p >= 1:
        return x * 0
    return x * (torch.rand(x.shape, generator=generator) < p) / (1 - p)


def dropout_divides_by_zero(x, p, training, generator=None):
    if not training:
        return x
    return x * (torch.rand(x.shape, generator=generator) >= p) / (1 - p)


def dropout_detached(x, p, training, generator=None):
    """Right numbers, but built from x.detach(): no gradient reaches the layers before."""
    if not training or p == 0:
        return x
    if p >= 1:
        return torch.zeros_like(x)
    return x.detach() * (torch.rand(x.shape, generator=generator) >= p) / (1 - p)


def dropout_in_place(x, p, training, generator=None):
    """Right numbers, but x is overwritten: the tanh before it needs its output for backward."""
    if not training or p == 0:
        return x
    if p >= 1:
        return x.mul_(0)
    return x.mul_(torch.rand(x.shape, generator=generator) >= p).div_(1 - p)


def dropout_with_where(x, p, training, generator=None):
    if not training:
        return x
    u = torch.rand(x.shape, generator=generator)
    if p >= 1:
        return x * 0
    return torch.where(u >= p, x / (1 - p), x * 0)


def dropout_masked_fill(x, p, training, generator=None):
    if training and p > 0:
        drop = torch.rand(x.shape, generator=generator) < p
        scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
        return x.masked_fill(drop, 0.0) * scale
    return x


WRONG_IMPLEMENTATIONS = {
    "1.1": [ce_no_max_subtraction, ce_sum_not_mean, ce_wrong_axis, ce_log_of_softmax, ce_forgets_to_add_max_back,
            ce_in_float32, ce_calls_the_library, ce_uses_log_softmax],
    "1.2": [ValueMulOverwrites, ValueMulOverwritesOther, ValueMulSwapped, ValueMulIgnoresOutGrad, ValuePowOverwrites,
            ValuePowNoMinusOne, ValueExpOverwrites, ValueExpUsesInput, ValueTanhOverwrites, ValueTanhNotSquared,
            ValueTanhOfInput],
    "1.3": [backward_bfs, backward_preorder, backward_preorder_children_reversed, backward_forward_order,
            backward_no_visited_set, backward_no_seed, backward_zeroes_every_grad, backward_zeroes_nothing],
    "1.4": [_mlp_wrong(k) for k in ("no_mean", "no_relu_mask", "transposed", "transposed_W2", "bias_mean", "relu_ge",
                                    "softmax_axis", "params_only")] + [mlp_backward_with_autograd],
    "1.5": [numgrad_forward_difference, numgrad_no_restore, numgrad_divides_by_h, numgrad_float32_result,
            numgrad_flat_result],
    "1.6": [sgd_no_accumulation, sgd_dampened, sgd_nesterov, sgd_lr_inside_velocity, sgd_ignores_weight_decay,
            sgd_in_place, sgd_velocity_in_place],
    "1.7": [adam_no_bias_correction, adam_eps_inside_sqrt, adam_decoupled_weight_decay, adam_step_counted_from_zero,
            adam_moments_in_place],
    "1.8": [BNBiasedRunningVar, BNWrongAxis, BNEpsOutsideSqrt, BNKerasMomentum, BNUnbiasedNormalisation,
            BNNoRunningUpdate, BNRunningStatsInTraining, BNDetachedStatistics],
    "1.9": [dropout_no_scaling, dropout_scales_by_keep, dropout_also_in_eval, dropout_keeps_with_probability_p,
            dropout_divides_by_zero, dropout_detached, dropout_in_place],
}
CORRECT_ALTERNATIVES = {
    "1.1": [ce_gather_amax, ce_row_by_row, ce_sorted_max],
    "1.2": [ValueWrittenDifferently, ValueTanhFromExp],
    "1.3": [backward_kahn, backward_iterative_dfs, backward_children_reversed],
    "1.4": [mlp_backward_einsum, mlp_backward_through_logprobs],
    "1.5": [numgrad_without_mutation, numgrad_by_index],
    "1.6": [sgd_with_alpha, sgd_on_private_copies],
    "1.7": [adam_torch_style, adam_written_out],
    "1.8": [BNWithRsqrtAndLerp, BNFromMoments],
    "1.9": [dropout_with_where, dropout_masked_fill],
}
PLACEHOLDERS = {"1.2": ValuePlaceholder, "1.8": BNPlaceholder}


def test_week1_exercises_are_numbered_in_notebook_order():
    from course_utils import list_exercises
    from course_utils.exercises import get_exercise

    assert list_exercises(1) == [f"1.{i}" for i in range(1, 10)]
    assert get_exercise("1.8").title.startswith("Batch normalisation")
    assert get_exercise("1.9").title == "Inverted dropout"


# ----------------------------------------------------------------------------------------------
# Parity of the package's week-1 code with torch
# ----------------------------------------------------------------------------------------------
def test_value_engine_matches_torch_on_every_operation():
    a, b = Value(0.7), Value(-1.3)
    out = ((a * b).tanh() + (a / b) - b ** 2 + a.exp() + (a + 2).log() + (b - 1).relu() + (-a).relu() * 3
           + 2 / a - 1 * b + (3 - a) * (2 + b))
    out.backward()
    ta, tb = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.7, -1.3))
    tout = ((ta * tb).tanh() + ta / tb - tb ** 2 + ta.exp() + (ta + 2).log() + (tb - 1).relu() + (-ta).relu() * 3
            + 2 / ta - 1 * tb + (3 - ta) * (2 + tb))
    tout.backward()
    assert out.data == pytest.approx(tout.item(), abs=1e-12)
    assert a.grad == pytest.approx(ta.grad.item(), abs=1e-10)
    assert b.grad == pytest.approx(tb.grad.item(), abs=1e-10)


def test_value_mlp_gradients_match_torch():
    model = ValueMLP(3, [4, 4, 1], seed=1)
    x = [0.5, -1.0, 2.0]
    out = model(x)[0]
    out.backward()
    ws = []
    for layer in model.layers:  # rebuild the same network in torch from the Value weights
        W = torch.tensor([[w.data for w in n.w] for n in layer.neurons], dtype=torch.float64, requires_grad=True)
        bias = torch.tensor([n.b.data for n in layer.neurons], dtype=torch.float64, requires_grad=True)
        ws.append((W, bias))
    h = torch.tensor(x, dtype=torch.float64)
    for i, (W, bias) in enumerate(ws):
        h = W @ h + bias
        if i < len(ws) - 1:
            h = h.tanh()
    h.sum().backward()
    assert out.data == pytest.approx(h.item(), abs=1e-12)
    for layer, (W, bias) in zip(model.layers, ws):
        got = torch.tensor([[w.grad for w in n.w] for n in layer.neurons], dtype=torch.float64)
        assert torch.allclose(got, W.grad, atol=1e-10)
        assert torch.allclose(torch.tensor([n.b.grad for n in layer.neurons], dtype=torch.float64), bias.grad)
    assert len(model.parameters()) == (3 * 4 + 4) + (4 * 4 + 4) + (4 + 1)


@pytest.mark.parametrize("calls", [1, 2, 3])
def test_backward_accumulates_into_leaves_like_torch(calls):
    x, w = Value(0.3), Value(-0.8)
    y = (x.tanh() * w).exp() + x * w + x ** 2
    ta, tw = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.3, -0.8))
    ty = (ta.tanh() * tw).exp() + ta * tw + ta ** 2
    for _ in range(calls):
        backward(y)
        ty.backward(retain_graph=True)
    assert x.grad == pytest.approx(ta.grad.item(), abs=1e-12)
    assert w.grad == pytest.approx(tw.grad.item(), abs=1e-12)
    order = topological_order(y)
    position = {id(v): i for i, v in enumerate(order)}
    assert all(position[id(c)] < position[id(v)] for v in order for c in v._prev)


def test_zero_grad_resets_the_parameters():
    model = ValueMLP(2, [3, 1], seed=0)
    model([1.0, -1.0])[0].backward()
    assert any(p.grad != 0 for p in model.parameters())
    model.zero_grad()
    assert all(p.grad == 0 for p in model.parameters())


def test_draw_graph_draws_one_box_per_node():
    import matplotlib

    matplotlib.use("Agg")
    a, b = Value(2.0, label="a"), Value(-3.0, label="b")
    out = (a * b + a).tanh()
    out.backward()
    ax = draw_graph(out)
    texts = [t.get_text() for t in ax.texts]
    assert sum("data" in t for t in texts) == len(topological_order(out))
    assert any(t == "tanh" for t in texts)


@pytest.mark.parametrize("shape", [(5,), (3, 4), (1,)])
def test_numerical_grad_matches_autograd(shape):
    x = torch.randn(shape, dtype=torch.float64)
    f = lambda t: (t.sin() * t).sum()  # noqa: E731
    t = x.clone().requires_grad_(True)
    f(t).backward()
    before = x.clone()
    assert torch.allclose(numerical_grad(f, x), t.grad, atol=1e-8)
    assert torch.equal(x, before)


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_cross_entropy_matches_torch(scale):
    logits = torch.randn(6, 9) * scale
    y = torch.randint(0, 9, (6,))
    assert torch.allclose(cross_entropy(logits, y), F.cross_entropy(logits, y), atol=1e-5)


@pytest.mark.parametrize("B", [1, 7])
def test_mlp_backward_matches_autograd(B):
    X, y = torch.randn(B, 5, dtype=torch.float64), torch.randint(0, 4, (B,))
    params = [torch.randn(5, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64),
              torch.randn(6, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    grads = mlp_backward(X, y, *params)
    leaves = [p.clone().requires_grad_(True) for p in params]
    F.cross_entropy(torch.relu(X @ leaves[0] + leaves[1]) @ leaves[2] + leaves[3], y).backward()
    for key, leaf in zip(("W1", "b1", "W2", "b2"), leaves):
        assert torch.allclose(grads[key], leaf.grad, atol=1e-10)


def test_mlp_module_structure_and_shapes():
    model = MLP([8, 16, 16, 3], activation="tanh", dropout=0.2)
    assert [type(m).__name__ for m in model.net] == ["Linear", "Tanh", "Dropout", "Linear", "Tanh", "Dropout", "Linear"]
    assert model(torch.randn(4, 8)).shape == (4, 3)
    assert model(torch.randn(2, 5, 8)).shape == (2, 5, 3)
    assert len(model.linears) == 3
    assert [a.shape for a in hidden_activations(model, torch.randn(10, 8))] == [(10, 16), (10, 16)]
    normed = MLP([8, 16, 3], activation="tanh", norm=BatchNorm1d)
    assert [type(m).__name__ for m in normed.net] == ["Linear", "BatchNorm1d", "Tanh", "Linear"]
    assert [a.shape for a in hidden_activations(normed, torch.randn(10, 8))] == [(10, 16)]
    with pytest.raises(ValueError):
        MLP([4])
    with pytest.raises(ValueError):
        MLP([4, 2], activation="swish")


@pytest.mark.parametrize("B, C, momentum, eps, scale", [(2, 3, 0.1, 1e-5, 1.0), (16, 8, 0.5, 1e-3, 100.0),
                                                        (64, 1, 0.01, 1e-5, 1e-3)])
def test_batchnorm_matches_torch(B, C, momentum, eps, scale):
    torch.manual_seed(0)
    ours, theirs = BatchNorm1d(C, eps=eps, momentum=momentum), nn.BatchNorm1d(C, eps=eps, momentum=momentum)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 2.0, C))
            m.bias.copy_(torch.linspace(-1.0, 1.0, C))
    for _ in range(3):
        x = torch.randn(B, C) * scale + 3 * scale
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = ours(xa), theirs(xb)
        assert torch.allclose(ya, yb, atol=1e-4, rtol=1e-4)
        w = torch.randn(B, C)
        (ya * w).sum().backward()
        (yb * w).sum().backward()
        assert torch.allclose(xa.grad, xb.grad, atol=1e-4, rtol=1e-3)
    assert torch.allclose(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-9)
    ours.eval(), theirs.eval()
    x = torch.randn(5, C) * scale
    assert torch.allclose(ours(x), theirs(x), atol=1e-4, rtol=1e-4)
    assert set(ours.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    assert ours.double().running_var.dtype == torch.float64


def test_layer_statistics_of_a_deep_tanh_network():
    torch.manual_seed(0)
    X, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    plain, normed = MLP([10] + [32] * 4 + [3], activation="tanh"), MLP([10] + [32] * 4 + [3], activation="tanh",
                                                                      norm=BatchNorm1d)
    for model in (plain, normed):
        stats = layer_statistics(model, X, y)
        assert set(stats) == {"act_std", "saturated", "act_grad_std", "weight_grad_norm"}
        assert all(len(v) == 4 for v in stats.values())
        assert all(0 <= s <= 1 for s in stats["saturated"])
    assert layer_statistics(normed, X, y)["act_std"][-1] > layer_statistics(plain, X, y)["act_std"][-1]


def test_split_digits_and_minibatches():
    d = split_digits()
    assert [len(d[k]) for k in ("X", "X_val", "X_test")] == [1257, 269, 271]
    assert d["X"].dtype == torch.float32 and d["y"].dtype == torch.int64
    again = split_digits()
    assert torch.equal(d["X_val"], again["X_val"])
    batches = list(minibatches(d["X"], d["y"], 500, torch.Generator().manual_seed(0)))
    assert [len(b[0]) for b in batches] == [500, 500, 257]
    assert torch.equal(torch.cat([b[1] for b in batches]).sort().values, d["y"].sort().values)


def test_dropout_keeps_the_mean_stays_in_the_graph_and_is_identity_in_eval():
    x = torch.ones(200_000)
    out = dropout(x, 0.3, True, torch.Generator().manual_seed(0))
    assert abs(out.mean().item() - 1.0) < 0.01
    assert abs((out == 0).float().mean().item() - 0.3) < 0.01
    assert torch.equal(dropout(x, 0.3, False), x)
    leaf = torch.randn(5, requires_grad=True)
    dropout(leaf, 1.0, True).sum().backward()
    assert torch.equal(leaf.grad, torch.zeros(5))


def _train_both(ours, theirs, steps=5):
    torch.manual_seed(0)
    model_a = MLP([4, 8, 3])
    model_b = MLP([4, 8, 3])
    model_b.load_state_dict(model_a.state_dict())
    opt_a, opt_b = ours(list(model_a.parameters())), theirs(list(model_b.parameters()))
    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(steps):
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            opt.zero_grad()
            F.cross_entropy(model(X), y).backward()
            opt.step()
    return model_a, model_b


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_sgd_optimizer_matches_torch(wd):
    a, b = _train_both(lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=wd),
                       lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=wd))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adam_optimizer_matches_torch(wd):
    a, b = _train_both(lambda ps: Adam(ps, lr=0.01, weight_decay=wd),
                       lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=wd))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_step_functions_are_pure():
    p, g, v = torch.randn(3), torch.randn(3), torch.randn(3)
    p0, v0 = p.clone(), v.clone()
    sgd_momentum_step(p, g, v, lr=0.1, weight_decay=0.1)
    adam_step(p, g, v.abs(), v.abs(), 2, lr=0.1)
    assert torch.equal(p, p0) and torch.equal(v, v0)
