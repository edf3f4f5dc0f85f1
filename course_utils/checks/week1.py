"""Week 1 checks: softmax cross-entropy, a scalar autograd engine, backprop by hand, gradient
checking, optimisers and dropout. Expected values come from torch (autograd, F.cross_entropy,
torch.optim) or closed forms, never from the package's own reference implementations."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..exercises import Case, exercise


# ----------------------------------------------------------------------------------------------
# 1.1 softmax cross-entropy (notebook 01)
# ----------------------------------------------------------------------------------------------
@exercise("1.1", "Softmax cross-entropy from logits", reference="course_utils.mlp:cross_entropy",
          hint="loss = mean over the batch of logsumexp(z) - z[target]; subtract the row max before exp()")
def _():
    g = torch.Generator().manual_seed(11)
    for B, C, scale in [(4, 10, 1.0), (1, 3, 1.0), (16, 2, 5.0), (7, 5, 1000.0)]:
        logits = torch.randn(B, C, generator=g) * scale
        y = torch.randint(0, C, (B,), generator=g)
        name = f"logits ({B}, {C})" + (f", values ~{scale:g}" if scale > 1 else "")
        hint = "exp(1000) overflows: subtract each row's max first" if scale >= 1000 else None
        yield Case(name, args=(logits, y), expected=F.cross_entropy(logits, y), hint=hint)
    # one row far more confident than the others: the loss is dominated by a tiny probability
    logits = torch.tensor([[0.0, 50.0, -50.0], [1.0, 2.0, 3.0]])
    y = torch.tensor([2, 0])
    yield Case("logits (2, 3), target has probability ~e^-100", args=(logits, y),
               expected=F.cross_entropy(logits, y), hint="take the log of the softmax analytically (log-sum-exp), "
                                                         "not log(softmax): softmax underflows to 0")


# ----------------------------------------------------------------------------------------------
# 1.2 Value operations and their backward closures (notebook 02)
# ----------------------------------------------------------------------------------------------
# Each expression is written once and evaluated twice: with the learner's Value class and with torch
# float64 tensors; the check compares the output and every leaf gradient.
_EXPRESSIONS = {
    "a * b + a (a used twice)": (lambda a, b, c: a * b + a, (-1.5, 2.0, 0.0)),
    "a * a (the same node on both sides of *)": (lambda a, b, c: a * a + b * c, (3.0, -2.0, 0.5)),
    "tanh(a * b + c)": (lambda a, b, c: (a * b + c).tanh(), (0.7, -1.2, 0.3)),
    "exp(a) * b ** 3": (lambda a, b, c: a.exp() * b ** 3 + c, (0.5, -1.3, 2.0)),
    "a / b - c ** 2 (pow with exponent -1 inside /)": (lambda a, b, c: a / b - c ** 2, (2.0, -0.8, 1.5)),
    "neuron: tanh(w1 x1 + w2 x2 + b), x2 = x1 used twice": (
        lambda a, b, c: (a * b + c * b + 0.5).tanh() * (b ** 2).exp(), (-0.3, 0.9, 1.1)),
}


def _torch_leaf_grads(fn, values):
    leaves = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
    out = fn(*leaves)
    out.backward()
    return (float(out.detach()), *(0.0 if t.grad is None else float(t.grad) for t in leaves))


def _run_value_expression(fn, values):
    def run(cls):
        from ..autograd import backward  # the package's graph traversal, so only the learner's closures are tested

        leaves = [cls(v) for v in values]
        out = fn(*leaves)
        backward(out)
        return (out.data, *(leaf.grad for leaf in leaves))

    return run


@exercise("1.2", "Backward closures of Value operations", reference="course_utils.autograd:Value",
          hint="each _backward adds local derivative * out.grad into its inputs with +=")
def _():
    for name, (fn, values) in _EXPRESSIONS.items():
        hint = "a node used twice must accumulate (+=), not overwrite (=) its grad" if "twice" in name else None
        yield Case(name + f" at {values}", run=_run_value_expression(fn, values),
                   expected=_torch_leaf_grads(fn, values), atol=1e-6, hint=hint)
    rng = torch.Generator().manual_seed(3)
    for i in range(2):
        values = tuple(float(v) for v in torch.empty(3).uniform_(-1.5, 1.5, generator=rng))
        fn = lambda a, b, c: ((a * b).tanh() + (c * 0.5).exp() / (a ** 2 + 1)) * b - c ** 3  # noqa: E731
        yield Case(f"random expression #{i + 1} at {tuple(round(v, 3) for v in values)}",
                   run=_run_value_expression(fn, values), expected=_torch_leaf_grads(fn, values), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 1.3 topological backward (notebook 02)
# ----------------------------------------------------------------------------------------------
def _graph_case(name, fn, values, *, twice=False, hint=None):
    def run(backward_fn):
        from ..autograd import Value  # the package's Value: only the learner's traversal is tested

        leaves = [Value(v) for v in values]
        out = fn(*leaves)
        backward_fn(out)
        if twice:
            backward_fn(out)
        return tuple(leaf.grad for leaf in leaves)

    return Case(name, run=run, expected=_torch_leaf_grads(fn, values)[1:], atol=1e-6, hint=hint)


@exercise("1.3", "Backward pass in reverse topological order", reference="course_utils.autograd:backward",
          hint="zero every grad, set root.grad = 1, then call _backward() on nodes from the output back to "
               "the inputs, each node only after every node that uses it")
def _():
    yield _graph_case("a single multiplication a * b", lambda a, b: a * b, (2.0, -3.0))
    yield _graph_case("a leaf that is also the output's direct input: (a * b).tanh() + a",
                      lambda a, b: (a * b).tanh() + a, (0.4, 1.3))
    yield _graph_case("diamond: b = tanh(a), c = exp(b), d = c * c, out = d + b (b feeds a long and a short path)",
                      lambda a: (lambda b: (lambda c: c * c + b)(b.exp()))(a.tanh()), (0.6,),
                      hint="visiting nodes in breadth-first or insertion order runs b's _backward before "
                           "the long path has delivered its share; sort topologically")
    yield _graph_case("chain with a skip: x -> tanh -> *2 -> exp, plus x ** 2 at the end",
                      lambda x: ((x.tanh() * 2).exp() + x ** 2).tanh(), (-0.35,))
    yield _graph_case("backward called twice on the same graph gives the same grads",
                      lambda a, b: a * b + b.exp(), (1.5, -0.5), twice=True,
                      hint="reset every node's grad to 0 before seeding root.grad = 1")
    yield _graph_case("a deep chain (60 tanh layers)",
                      lambda x: _chain(x, 60), (0.8,))


def _chain(x, n):
    for _ in range(n):
        x = (x * 1.1).tanh()
    return x


# ----------------------------------------------------------------------------------------------
# 1.4 manual backward of a 2-layer MLP (notebook 03)
# ----------------------------------------------------------------------------------------------
def _mlp_params(g, D, H, C, dtype=torch.float64):
    return (torch.randn(D, H, generator=g, dtype=dtype) / math.sqrt(D), torch.randn(H, generator=g, dtype=dtype) * 0.1,
            torch.randn(H, C, generator=g, dtype=dtype) / math.sqrt(H), torch.randn(C, generator=g, dtype=dtype) * 0.1)


def _mlp_autograd(X, y, W1, b1, W2, b2):
    params = [p.clone().requires_grad_(True) for p in (W1, b1, W2, b2)]
    loss = F.cross_entropy(torch.relu(X @ params[0] + params[1]) @ params[2] + params[3], y)
    loss.backward()
    return {k: p.grad for k, p in zip(("W1", "b1", "W2", "b2"), params)}


@exercise("1.4", "Backward pass of a 2-layer MLP by hand", reference="course_utils.mlp:mlp_backward",
          hint="dlogits = (softmax - onehot) / B; dW2 = h.T @ dlogits; dh = dlogits @ W2.T; "
               "dh_pre = dh * (h_pre > 0); dW1 = X.T @ dh_pre; biases sum over the batch")
def _():
    g = torch.Generator().manual_seed(14)
    for B, D, H, C in [(8, 5, 6, 3), (1, 4, 7, 2), (32, 64, 32, 10), (5, 6, 6, 6)]:
        X = torch.randn(B, D, generator=g, dtype=torch.float64)
        y = torch.randint(0, C, (B,), generator=g)
        params = _mlp_params(g, D, H, C)
        yield Case(f"B={B}, D={D}, H={H}, C={C}", args=(X, y, *params), expected=_mlp_autograd(X, y, *params),
                   atol=1e-8, rtol=1e-6)
    # digits-like batch, float32 as in the notebook
    X = torch.rand(20, 64, generator=g)
    y = torch.randint(0, 10, (20,), generator=g)
    params = tuple(p.float() for p in _mlp_params(g, 64, 16, 10))
    yield Case("float32 batch (20, 64) -> 16 -> 10", args=(X, y, *params), expected=_mlp_autograd(X, y, *params),
               atol=1e-5)


# ----------------------------------------------------------------------------------------------
# 1.5 numerical gradient by central differences (notebook 03)
# ----------------------------------------------------------------------------------------------
def _autograd_grad(f, x):
    x = x.clone().requires_grad_(True)
    f(x).backward()
    return x.grad


def _numgrad_case(name, f, x, h, *, rtol=1e-3, atol=1e-6, hint=None):
    # returns (grad, x after the call): x must come back unchanged
    return Case(name, run=lambda fn, x=x: (lambda xc: (fn(f, xc, h), xc))(x.clone()),
                expected=(_autograd_grad(f, x), x.clone()), atol=atol, rtol=rtol, hint=hint)


@exercise("1.5", "Numerical gradient by central differences", reference="course_utils.autograd:numerical_grad",
          hint="for each entry i: (f(x + h e_i) - f(x - h e_i)) / (2h), then put x_i back to its old value")
def _():
    g = torch.Generator().manual_seed(15)
    x = torch.randn(5, generator=g, dtype=torch.float64)
    yield _numgrad_case("f(x) = sum(x ** 3), x (5,), h=1e-4", lambda t: (t ** 3).sum(), x, 1e-4)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    yield _numgrad_case("f(X) = logsumexp of a (3, 4) matrix (x has two dimensions), h=1e-4",
                        lambda t: t.logsumexp(dim=(0, 1)), x, 1e-4, hint="loop over every entry of x, "
                        "e.g. through x.view(-1), and return a gradient with x's shape")
    x = torch.randn(4, generator=g, dtype=torch.float64) * 0.5
    yield _numgrad_case("strongly curved f(x) = sum(exp(3x)), h=1e-2", lambda t: (3 * t).exp().sum(), x, 1e-2,
                        hint="a one-sided difference (f(x+h) - f(x)) / h has an O(h) error; central "
                             "differences cancel it and leave O(h^2)")
    x = torch.randn(6, generator=g, dtype=torch.float64)
    yield _numgrad_case("coupled f(x) = (sum x)^2 + x0 * x5, h=1e-3", lambda t: t.sum() ** 2 + t[0] * t[5], x, 1e-3,
                        hint="restore x_i after perturbing it; otherwise later entries are measured at a shifted point")
    x = torch.tensor([0.3], dtype=torch.float64)
    yield _numgrad_case("one entry, f(x) = tanh(x) * x, h=1e-5", lambda t: (t.tanh() * t).sum(), x, 1e-5)


# ----------------------------------------------------------------------------------------------
# 1.6 SGD with momentum (notebook 03)
# ----------------------------------------------------------------------------------------------
def _grad_sequence(g, shape, steps, scale=1.0):
    return [torch.randn(shape, generator=g) * scale for _ in range(steps)]


def _torch_optimizer_run(make_opt, p0, grads, lrs=None):
    p = p0.clone().requires_grad_(True)
    opt = make_opt([p])
    for i, grad in enumerate(grads):
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[i]
        p.grad = grad.clone()
        opt.step()
    return p.detach()


def _sgd_run(p0, grads, *, lr, momentum, weight_decay=0.0, lrs=None):
    def run(step_fn):
        p, v = p0.clone(), torch.zeros_like(p0)
        for i, grad in enumerate(grads):
            p, v = step_fn(p, grad.clone(), v, lr=lrs[i] if lrs else lr, momentum=momentum, weight_decay=weight_decay)
        return p

    return run


@exercise("1.6", "SGD with momentum, one step", reference="course_utils.optim:sgd_momentum_step",
          hint="torch.optim.SGD: g = grad + wd * p; v = momentum * v + g; p = p - lr * v (no (1 - momentum), "
               "lr outside v)")
def _():
    g = torch.Generator().manual_seed(16)
    for shape, steps, lr, mom, wd in [((5,), 1, 0.1, 0.9, 0.0), ((3, 4), 6, 0.05, 0.9, 0.0),
                                      ((10,), 8, 0.01, 0.5, 0.1), ((1,), 5, 0.2, 0.99, 0.0)]:
        p0 = torch.randn(shape, generator=g)
        grads = _grad_sequence(g, shape, steps)
        expected = _torch_optimizer_run(lambda ps: torch.optim.SGD(ps, lr=lr, momentum=mom, weight_decay=wd), p0, grads)
        yield Case(f"param {shape}, {steps} steps, lr={lr}, momentum={mom}, weight_decay={wd}",
                   run=_sgd_run(p0, grads, lr=lr, momentum=mom, weight_decay=wd), expected=expected, atol=1e-5)
    p0 = torch.randn(4, generator=g)
    grads = _grad_sequence(g, (4,), 6)
    lrs = [0.1, 0.1, 0.05, 0.05, 0.01, 0.01]
    expected = _torch_optimizer_run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), p0, grads, lrs)
    yield Case(f"param (4,), 6 steps with a decaying lr {lrs}, momentum=0.9",
               run=_sgd_run(p0, grads, lr=None, momentum=0.9, lrs=lrs), expected=expected, atol=1e-5,
               hint="torch keeps lr out of the velocity: v = m v + g, p -= lr v. Folding lr into v only agrees "
                    "while lr is constant")


# ----------------------------------------------------------------------------------------------
# 1.7 Adam (notebook 03)
# ----------------------------------------------------------------------------------------------
def _adam_run(p0, grads, **kwargs):
    def run(step_fn):
        p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
        for t, grad in enumerate(grads, start=1):
            p, m, v = step_fn(p, grad.clone(), m, v, t, **kwargs)
        return p

    return run


@exercise("1.7", "Adam, one step", reference="course_utils.optim:adam_step",
          hint="m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps), "
               "with g = grad + weight_decay * p")
def _():
    g = torch.Generator().manual_seed(17)
    settings = [((5,), 1, dict(lr=0.01)), ((3, 4), 10, dict(lr=1e-3)),
                ((6,), 5, dict(lr=0.05, betas=(0.8, 0.99), weight_decay=0.1)),
                ((8,), 4, dict(lr=1e-2, grad_scale=1e-4)), ((1,), 3, dict(lr=0.1, eps=1e-3))]
    for shape, steps, kw in settings:
        kw = dict(kw)
        scale = kw.pop("grad_scale", 1.0)
        full = dict(lr=kw["lr"], betas=kw.get("betas", (0.9, 0.999)), eps=kw.get("eps", 1e-8),
                    weight_decay=kw.get("weight_decay", 0.0))
        p0 = torch.randn(shape, generator=g)
        grads = _grad_sequence(g, shape, steps, scale)
        expected = _torch_optimizer_run(lambda ps: torch.optim.Adam(ps, **full), p0, grads)
        desc = ", ".join(f"{k}={v}" for k, v in full.items())
        hint = ("eps goes outside the square root: sqrt(v_hat) + eps; with tiny gradients v is ~1e-8 and the "
                "difference shows" if scale < 1 else None)
        yield Case(f"param {shape}, {steps} steps, {desc}" + (f", gradients ~{scale:g}" if scale < 1 else ""),
                   run=_adam_run(p0, grads, **full), expected=expected, atol=1e-6, rtol=1e-4, hint=hint)


# ----------------------------------------------------------------------------------------------
# 1.8 inverted dropout (notebook 03)
# ----------------------------------------------------------------------------------------------
def _dropout_case(name, x, p, training, seed, hint=None):
    if not training or p == 0:
        expected = x.clone()
    elif p >= 1:
        expected = torch.zeros_like(x)
    else:  # closed form with the same random numbers the function must draw
        u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))
        expected = torch.where(u >= p, x / (1 - p), torch.zeros_like(x))
    return Case(name, run=lambda fn: fn(x.clone(), p, training, torch.Generator().manual_seed(seed)),
                expected=expected, atol=1e-6, hint=hint)


@exercise("1.8", "Inverted dropout", reference="course_utils.mlp:dropout",
          hint="training: u = torch.rand(x.shape, generator=generator); keep where u >= p; multiply kept "
               "entries by 1/(1-p). Evaluation: return x unchanged")
def _():
    g = torch.Generator().manual_seed(18)
    yield _dropout_case("x (4, 8), p=0.5, training", torch.randn(4, 8, generator=g), 0.5, True, 1)
    yield _dropout_case("x (2, 3, 5), p=0.1, training", torch.randn(2, 3, 5, generator=g), 0.1, True, 2)
    yield _dropout_case("x (4, 8), p=0.5, evaluation (training=False)", torch.randn(4, 8, generator=g), 0.5, False, 3,
                        hint="at evaluation time dropout does nothing: the 1/(1-p) scaling during training "
                             "already kept the expected activation equal to x")
    yield _dropout_case("x (1, 1), p=0.3, training", torch.randn(1, 1, generator=g), 0.3, True, 4)
    yield _dropout_case("x (100,), p=0.8, training", torch.randn(100, generator=g), 0.8, True, 5)
    yield _dropout_case("x (3, 3), p=0 (keep everything)", torch.randn(3, 3, generator=g), 0.0, True, 6)
    yield _dropout_case("x (3, 3), p=1 (drop everything)", torch.randn(3, 3, generator=g), 1.0, True, 7,
                        hint="with p=1 every entry is dropped: return zeros (1/(1-p) would divide by zero)")
