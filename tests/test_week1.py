"""Week 1: the checks catch plausible wrong answers, and the package's MLP, autograd engine and
optimisers agree with torch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from course_utils.autograd import MLP as ValueMLP
from course_utils.autograd import Value, backward, draw_graph, numerical_grad, topological_order
from course_utils.mlp import MLP, cross_entropy, dropout, hidden_activations, mlp_backward
from course_utils.optim import SGD, Adam, adam_step, sgd_momentum_step


# ----------------------------------------------------------------------------------------------
# Wrong implementations, one plausible mistake each
# ----------------------------------------------------------------------------------------------
def ce_no_max_subtraction(logits, y):
    logprobs = logits - logits.exp().sum(-1, keepdim=True).log()
    return -logprobs[torch.arange(len(y)), y].mean()


def ce_sum_not_mean(logits, y):
    return F.cross_entropy(logits, y, reduction="sum")


def ce_wrong_axis(logits, y):
    logprobs = logits - logits.logsumexp(dim=0, keepdim=True)
    return -logprobs[torch.arange(len(y)), y].mean()


def ce_log_of_softmax(logits, y):
    return -torch.softmax(logits, -1)[torch.arange(len(y)), y].log().mean()


class ValueMulOverwrites(Value):
    """`=` instead of `+=`: a node used twice keeps only the last contribution."""

    def __mul__(self, other):
        other = self._lift(other)
        out = type(self)(self.data * other.data, (self, other), "*")

        def _backward():
            self.grad = other.data * out.grad
            other.grad = self.data * out.grad

        out._backward = _backward
        return out


class ValueMulSwapped(Value):
    """Each input receives its own value instead of the other's."""

    def __mul__(self, other):
        other = self._lift(other)
        out = type(self)(self.data * other.data, (self, other), "*")

        def _backward():
            self.grad += self.data * out.grad
            other.grad += other.data * out.grad

        out._backward = _backward
        return out


class ValueTanhWrong(Value):
    """d tanh / dx written as 1 - tanh(x) instead of 1 - tanh(x)^2."""

    def tanh(self):
        t = math.tanh(self.data)
        out = type(self)(t, (self,), "tanh")

        def _backward():
            self.grad += (1 - t) * out.grad

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


class ValueExpUsesInput(Value):
    """d e^x / dx written as x."""

    def exp(self):
        out = type(self)(math.exp(self.data), (self,), "exp")

        def _backward():
            self.grad += self.data * out.grad

        out._backward = _backward
        return out


class ValuePlaceholder(Value):
    """What the student notebook ships: forward works, backward closures raise."""

    def __mul__(self, other):
        out = super().__mul__(other)

        def _backward():
            raise NotImplementedError("complete the backward closure")

        out._backward = _backward
        return out


def backward_bfs(root):
    """Breadth-first from the output: a node can run before all its consumers have reported."""
    for v in topological_order(root):
        v.grad = 0.0
    root.grad = 1.0
    queue, seen = [root], {id(root)}
    while queue:
        v = queue.pop(0)
        v._backward()
        for c in v._prev:
            if id(c) not in seen:
                seen.add(id(c))
                queue.append(c)


def backward_no_seed(root):
    order = topological_order(root)
    for v in order:
        v.grad = 0.0
    for v in reversed(order):
        v._backward()


def backward_no_zeroing(root):
    order = topological_order(root)
    root.grad = 1.0
    for v in reversed(order):
        v._backward()


def backward_forward_order(root):
    """Runs the closures inputs-first (topological, not reversed)."""
    order = topological_order(root)
    for v in order:
        v.grad = 0.0
    root.grad = 1.0
    for v in order:
        v._backward()


def _mlp_wrong(kind):
    def fn(X, y, W1, b1, W2, b2):
        B = X.shape[0]
        h_pre = X @ W1 + b1
        h = h_pre.clamp(min=0)
        dlogits = torch.softmax(h @ W2 + b2, -1)
        dlogits[torch.arange(B), y] -= 1
        if kind != "no_mean":
            dlogits = dlogits / B
        dh = dlogits @ W2.T
        dh_pre = dh if kind == "no_relu_mask" else dh * (h_pre > 0)
        dW1 = dh_pre.T @ X if kind == "transposed" else X.T @ dh_pre
        dW1 = dW1.reshape(W1.shape) if kind == "transposed" else dW1
        db1 = dh_pre.mean(0) if kind == "bias_mean" else dh_pre.sum(0)
        return {"W1": dW1, "b1": db1, "W2": h.T @ dlogits, "b2": dlogits.sum(0)}

    fn.__name__ = f"mlp_backward_{kind}"
    return fn


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
    return numerical_grad(f, x, h) * 2


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
        return torch.zeros_like(x)
    return x * (torch.rand(x.shape, generator=generator) >= p) / (1 - p)


def dropout_keeps_with_probability_p(x, p, training, generator=None):
    if not training or p == 0:
        return x
    if p >= 1:
        return torch.zeros_like(x)
    return x * (torch.rand(x.shape, generator=generator) < p) / (1 - p)


def dropout_divides_by_zero(x, p, training, generator=None):
    if not training:
        return x
    return x * (torch.rand(x.shape, generator=generator) >= p) / (1 - p)


WRONG_IMPLEMENTATIONS = {
    "1.1": [ce_no_max_subtraction, ce_sum_not_mean, ce_wrong_axis, ce_log_of_softmax],
    "1.2": [ValueMulOverwrites, ValueMulSwapped, ValueTanhWrong, ValuePowNoMinusOne, ValueExpUsesInput],
    "1.3": [backward_bfs, backward_no_seed, backward_no_zeroing, backward_forward_order],
    "1.4": [_mlp_wrong("no_mean"), _mlp_wrong("no_relu_mask"), _mlp_wrong("transposed"), _mlp_wrong("bias_mean")],
    "1.5": [numgrad_forward_difference, numgrad_no_restore, numgrad_divides_by_h],
    "1.6": [sgd_no_accumulation, sgd_dampened, sgd_nesterov, sgd_lr_inside_velocity, sgd_ignores_weight_decay],
    "1.7": [adam_no_bias_correction, adam_eps_inside_sqrt, adam_decoupled_weight_decay],
    "1.8": [dropout_no_scaling, dropout_scales_by_keep, dropout_also_in_eval, dropout_keeps_with_probability_p,
            dropout_divides_by_zero],
}
PLACEHOLDERS = {"1.2": ValuePlaceholder}



def test_week1_has_eight_exercises_in_order():
    from course_utils import list_exercises

    assert list_exercises(1) == [f"1.{i}" for i in range(1, 9)]


# ----------------------------------------------------------------------------------------------
# Parity of the package's week-1 code with torch
# ----------------------------------------------------------------------------------------------
def test_value_engine_matches_torch_on_every_operation():
    a, b = Value(0.7), Value(-1.3)
    out = ((a * b).tanh() + (a / b) - b ** 2 + a.exp() + (a + 2).log() + (b - 1).relu() + (-a).relu() * 3)
    out.backward()
    ta, tb = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.7, -1.3))
    tout = ((ta * tb).tanh() + ta / tb - tb ** 2 + ta.exp() + (ta + 2).log() + (tb - 1).relu() + (-ta).relu() * 3)
    tout.backward()
    assert out.data == pytest.approx(tout.item(), abs=1e-12)
    assert a.grad == pytest.approx(ta.grad.item(), abs=1e-10)
    assert b.grad == pytest.approx(tb.grad.item(), abs=1e-10)


def test_value_mlp_gradients_match_torch():
    model = ValueMLP(3, [4, 4, 1], seed=1)
    x = [0.5, -1.0, 2.0]
    out = model(x)[0]
    out.backward()
    # rebuild the same network in torch from the Value weights
    ws = []
    for layer in model.layers:
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


def test_backward_twice_is_idempotent_and_topological_order_is_valid():
    x = Value(0.3)
    y = (x.tanh() * 2).exp() + x ** 2
    order = topological_order(y)
    position = {id(v): i for i, v in enumerate(order)}
    assert all(position[id(c)] < position[id(v)] for v in order for c in v._prev)
    backward(y)
    first = x.grad
    backward(y)
    assert x.grad == first


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


def test_mlp_backward_matches_autograd():
    X, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 4, (7,))
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
    with pytest.raises(ValueError):
        MLP([4])
    with pytest.raises(ValueError):
        MLP([4, 2], activation="swish")


def test_dropout_keeps_the_mean_and_is_identity_in_eval():
    x = torch.ones(200_000)
    out = dropout(x, 0.3, True, torch.Generator().manual_seed(0))
    assert abs(out.mean().item() - 1.0) < 0.01
    assert abs((out == 0).float().mean().item() - 0.3) < 0.01
    assert torch.equal(dropout(x, 0.3, False), x)


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
    p, g, v = torch.randn(3), torch.randn(3), torch.zeros(3)
    p0 = p.clone()
    sgd_momentum_step(p, g, v, lr=0.1)
    adam_step(p, g, torch.zeros(3), torch.zeros(3), 1, lr=0.1)
    assert torch.equal(p, p0)
