"""Week 1 checks: softmax cross-entropy, a scalar autograd engine, backprop by hand, gradient checking,
optimisers, batch normalisation and dropout.

Expected values come from torch (autograd, F.cross_entropy, torch.optim, nn.BatchNorm1d) or closed
forms, never from the package's own reference implementations. Harnesses (`run=`) call the learner's
code in the learner's process and return plain data; every `expected` is a thunk the trusted checker
evaluates.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from ..exercises import Case, case_rng, exercise

_ACCUMULATE = ("a node that feeds several others receives a contribution from each: add into .grad (+=), "
               "never assign (=)")


# ----------------------------------------------------------------------------------------------
# 1.1 softmax cross-entropy (notebook 01)
# ----------------------------------------------------------------------------------------------
@exercise("1.1", "Softmax cross-entropy from logits", reference="course_utils.mlp:cross_entropy",
          hint="loss = mean over the batch of (log-sum-exp of the row) - (the target's logit); make every exp() "
               "argument <= 0 by subtracting each row's max first",
          forbid=("torch.nn.functional.cross_entropy", "torch.nn.functional.log_softmax", "torch.nn.functional.nll_loss",
                  "torch.log_softmax", "torch.Tensor.log_softmax", "torch.logsumexp", "torch.Tensor.logsumexp",
                  "torch.special.logsumexp", "torch.special.log_softmax"))
def _():
    g = case_rng(11)
    for B, C, scale in [(4, 10, 1.0), (1, 3, 1.0), (16, 2, 5.0), (7, 5, 1000.0)]:
        logits = torch.randn(B, C, generator=g) * scale
        y = torch.randint(0, C, (B,), generator=g)
        name = f"logits ({B}, {C})" + (f", values ~{scale:g}" if scale > 1 else "") + (", batch of one" if B == 1 else "")
        hint = "exp(1000) overflows: subtract each row's max first" if scale >= 1000 else None
        yield Case(name, args=(logits, y), expected=lambda logits=logits, y=y: F.cross_entropy(logits, y),
                   names="the mean loss", hint=hint)
    # one row far more confident than the others: the target's probability is about e^-100
    logits = torch.tensor([[0.0, 50.0, -50.0], [1.0, 2.0, 3.0]])
    y = torch.tensor([2, 0])
    yield Case("logits (2, 3), target has probability ~e^-100", args=(logits, y),
               expected=lambda: F.cross_entropy(logits, y), names="the mean loss",
               hint="take the log of the softmax analytically (z - logsumexp(z)), not log(softmax): softmax "
                    "underflows to 0 and log(0) = -inf")
    x64 = torch.randn(3, 6, generator=g, dtype=torch.float64) * 3
    y64 = torch.randint(0, 6, (3,), generator=g)
    yield Case("float64 logits (3, 6): the loss is float64 too", args=(x64, y64),
               expected=lambda: F.cross_entropy(x64, y64), names="the mean loss",
               hint="compute in the logits' dtype: do not convert to float32 (or to a Python float)")
    masked = torch.randn(4, 5, generator=g)
    ym = torch.tensor([0, 1, 2, 3])
    masked[:, 4] = float("-inf")  # a class ruled out: probability exactly 0
    yield Case("logits (4, 5) with a masked class (-inf) that is never the target", args=(masked, ym),
               expected=lambda: F.cross_entropy(masked, ym), names="the mean loss",
               hint="a logit of -inf has probability 0: exp(-inf - max) = 0 is fine, but -inf - (-inf) is NaN")
    one = torch.randn(5, 1, generator=g)
    yield Case("a single class (C = 1): the loss is exactly 0", args=(one, torch.zeros(5, dtype=torch.long)),
               expected=lambda: F.cross_entropy(one, torch.zeros(5, dtype=torch.long)), names="the mean loss")


# ----------------------------------------------------------------------------------------------
# 1.2 Value operations and their backward closures (notebook 02)
# ----------------------------------------------------------------------------------------------
# Each expression is written once and evaluated twice: with the learner's Value class and with torch
# float64 tensors. Every operation the learner writes (*, **, exp, tanh) appears in a case where its
# input also feeds a node whose closure runs *earlier*, so a closure that assigns (=) instead of
# adding (+=) wipes out that contribution and fails; * is tested with the shared input on each side,
# and constants on each side (a * 2, 2 * a, 2 - a, 2 / a) go through the reflected operators.
def _ab(a, b, c):
    ab = a * b
    return ab.exp() + ab


_EXPRESSIONS = [
    # (description, function of leaves a, b, c, positive inputs only, hint)
    ("a * b + a: a feeds * and +", lambda a, b, c: a * b + a, False, _ACCUMULATE),
    ("b * a + a: a is the right-hand operand of *", lambda a, b, c: b * a + a, False, _ACCUMULATE),
    ("a * a + b * c: the same node on both sides of *", lambda a, b, c: a * a + b * c, False,
     "in a * a, self and other are the same node: both lines must add their share"),
    ("2 * a + a * 3 - a: constants on each side of * (__rmul__, __mul__, __neg__)",
     lambda a, b, c: 2 * a + a * 3 - a, False, _ACCUMULATE),
    ("a ** 3 * a + b ** -2 + b: a power whose input also feeds another node",
     lambda a, b, c: a ** 3 * a + b ** -2 + b, False, _ACCUMULATE),
    ("a ** 0.5 * a: a fractional exponent", lambda a, b, c: a ** 0.5 * a + c, True, None),
    ("a / b + b / a + b: division is a * b ** -1", lambda a, b, c: a / b + b / a + b, False, None),
    ("2 / a - 1 / b + a * b: a constant divided by a Value (__rtruediv__)",
     lambda a, b, c: 2 / a - 1 / b + a * b, False, None),
    ("exp(a) * a + exp(b): exp's input also feeds *", lambda a, b, c: a.exp() * a + b.exp(), False, _ACCUMULATE),
    ("exp(a * b) + a * b: one product node feeds exp and +", _ab, False, _ACCUMULATE),
    ("tanh(a) * a + (1 - tanh(b)): tanh's input also feeds *; 1 - x is __rsub__",
     lambda a, b, c: a.tanh() * a + (1 - b.tanh()), False, _ACCUMULATE),
    ("3 + exp(c) - tanh(c) * b: __radd__, and c feeds exp and tanh",
     lambda a, b, c: 3 + c.exp() - c.tanh() * b, False, _ACCUMULATE),
    ("a neuron: tanh(a * b + c) * c", lambda a, b, c: (a * b + c).tanh() * c, False, None),
    ("tanh(a * tanh(a)) + relu(b) + log(c * c + 1)",
     lambda a, b, c: (a * a.tanh()).tanh() + b.relu() + (c * c + 1).log(), False, None),
    ("a long expression: ((tanh(a b) + exp(c / 2) / (a² + 1)) b - c³)",
     lambda a, b, c: ((a * b).tanh() + (c * 0.5).exp() / (a ** 2 + 1)) * b - c ** 3, False, None),
]


def _leaf_values(g: torch.Generator, positive: bool) -> tuple[float, float, float]:
    """Three inputs in [0.4, 1.4] in size, with random signs (positive only for fractional powers)."""
    size = torch.rand(3, generator=g) + 0.4
    sign = torch.ones(3) if positive else torch.where(torch.rand(3, generator=g) < 0.5, -1.0, 1.0)
    return tuple(round(float(v), 4) for v in size * sign)


def _torch_leaf_grads(fn, values):
    """The output and d(output)/d(leaf) of `fn` from torch autograd in float64."""
    leaves = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
    out = fn(*leaves)
    out.backward()
    return (float(out.detach()), *(0.0 if t.grad is None else float(t.grad) for t in leaves))


def _run_value_expression(fn, values):
    def run(cls):
        from ..autograd import backward  # the package's traversal: only the learner's closures are tested

        leaves = [cls(v) for v in values]
        out = fn(*leaves)
        backward(out)
        return (float(out.data), *(float(leaf.grad) for leaf in leaves))

    return run


@exercise("1.2", "Backward closures of Value operations", reference="course_utils.autograd:Value",
          hint="each _backward adds (local derivative) * out.grad into the .grad of each input, with +=")
def _():
    g = case_rng(12)
    for name, fn, positive, hint in _EXPRESSIONS:
        values = _leaf_values(g, positive)
        yield Case(f"{name}, at (a, b, c) = {values}", run=_run_value_expression(fn, values),
                   expected=lambda fn=fn, values=values: _torch_leaf_grads(fn, values), atol=1e-6,
                   names=("the output", "the gradient of a", "the gradient of b", "the gradient of c"), hint=hint)


# ----------------------------------------------------------------------------------------------
# 1.3 backward: reverse topological order, accumulating into leaves (notebook 02)
# ----------------------------------------------------------------------------------------------
# Every graph with a shared node is built in several operand orders, so a traversal that happens to
# work for one order (breadth-first, pre-order, insertion order) fails on another; only an order in
# which every node runs after all of its consumers passes them all.
def _diamond(order):
    def fn(a):
        b = a.tanh()
        c = b.exp()
        return {"cc+b": lambda: c * c + b, "b+cc": lambda: b + c * c,
                "b*(c+1)": lambda: b * (c + 1), "(c+1)*b": lambda: (c + 1) * b}[order]()

    return fn


def _long_and_short(short_first):
    def fn(x, w):
        y = x * w
        z = ((y * 2).tanh() * y).exp()  # the long path from y
        return y + z if short_first else z + y

    return fn


def _residual(skip_first, depth=6):
    def fn(x, w):
        h = x
        for _ in range(depth):
            h = h + (h * w).tanh() if skip_first else (h * w).tanh() + h
        return h

    return fn


def _three_consumers(order):
    def fn(a, b):
        s = a * b
        terms = [s.tanh(), s.exp() * s, s ** 2]
        return terms[order[0]] + terms[order[1]] + terms[order[2]]

    return fn


def _chain(x, n=60):
    for _ in range(n):
        x = (x * 1.1).tanh()
    return x


def _two_losses(x, w):
    h = (x * w).tanh()  # a shared intermediate, e.g. a hidden layer
    return (h * h + w, (h * 3).exp())


def _as_roots(out):
    return out if isinstance(out, tuple) else (out,)


def _graph_case(name, fn, values, *, prior=None, calls=(0,), hint=None):
    """Build `fn`'s graph from leaves holding `prior` grads, call backward on roots `calls` in turn,
    return every leaf's grad. Expected: torch autograd on the same expression (retain_graph=True)."""
    prior = tuple(prior or (0.0,) * len(values))
    names = tuple(f"the gradient of {n}" for n in list(inspect.signature(fn).parameters)[:len(values)])

    def run(backward_fn):
        from ..autograd import Value  # the package's Value: only the learner's traversal is tested

        leaves = [Value(v) for v in values]
        for leaf, g0 in zip(leaves, prior):
            leaf.grad = g0
        roots = _as_roots(fn(*leaves))
        for i in calls:
            backward_fn(roots[i])
        return tuple(float(leaf.grad) for leaf in leaves)

    def expected():
        leaves = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
        for leaf, g0 in zip(leaves, prior):
            if g0:
                leaf.grad = torch.tensor(g0, dtype=torch.float64)
        roots = _as_roots(fn(*leaves))
        for i in calls:
            roots[i].backward(retain_graph=True)
        return tuple(0.0 if t.grad is None else float(t.grad) for t in leaves)

    return Case(name, run=run, expected=expected, atol=1e-6, names=names, hint=hint)


_ORDER_HINT = ("run each node's _backward only after every node that uses it has run: reverse topological "
               "order (a depth-first post-order over _prev, reversed). Breadth-first or pre-order traversals "
               "work for some graphs and fail when the same graph is built in another order")
_LEAF_HINT = ("leaves (nodes with no _prev) keep their gradient between calls and add to it, as in PyTorch; "
              "every other node's grad starts each pass at 0")


@exercise("1.3", "Backward pass: reverse topological order, accumulating into leaves",
          reference="course_utils.autograd:backward",
          hint="order the nodes so each comes after all of its inputs (DFS post-order over _prev); reset every "
               "non-leaf grad to 0; add 1 to root.grad; call _backward() on the nodes in reverse order")
def _():
    g = case_rng(13)

    def val(lo=0.3, hi=1.2):
        return round(float(torch.empty(()).uniform_(lo, hi, generator=g)) * (1 if torch.rand((), generator=g) < 0.5
                                                                                 else -1), 4)

    yield _graph_case("a single multiplication a * b", lambda a, b: a * b, (val(), val()))
    for order in ("cc+b", "b+cc", "b*(c+1)", "(c+1)*b"):
        yield _graph_case(f"diamond: b = tanh(a), c = exp(b), out = {order} (b feeds a long and a short path)",
                          _diamond(order), (val(),), hint=_ORDER_HINT)
    for short_first in (True, False):
        yield _graph_case(f"y = x w feeds the output directly and through four more nodes, "
                          f"out = {'y + z' if short_first else 'z + y'}", _long_and_short(short_first),
                          (val(), val()), hint=_ORDER_HINT)
    for skip_first in (True, False):
        yield _graph_case(f"six residual layers h = {'h + tanh(h w)' if skip_first else 'tanh(h w) + h'} "
                          "(w shared by all six)", _residual(skip_first), (val(0.2, 0.6), val(0.2, 0.8)),
                          hint=_ORDER_HINT)
    for order in ((0, 1, 2), (2, 1, 0), (1, 2, 0)):
        names = ["tanh(s)", "exp(s) * s", "s ** 2"]
        yield _graph_case(f"s = a b feeds three terms: {' + '.join(names[i] for i in order)}",
                          _three_consumers(order), (val(), val()), hint=_ORDER_HINT)
    yield _graph_case("a deep chain: 60 layers of tanh(1.1 x)", _chain, (val(0.5, 1.0),))
    yield _graph_case("leaves that already hold gradients (0.25, -1.5) from an earlier backward: add to them",
                      _diamond("b+cc"), (val(),), prior=(0.25,), hint=_LEAF_HINT)
    yield _graph_case("leaves already holding gradients, a * b + exp(b)", lambda a, b: a * b + b.exp(),
                      (val(), val()), prior=(0.25, -1.5), hint=_LEAF_HINT)
    yield _graph_case("backward twice on the same graph: every leaf gradient doubles (PyTorch, retain_graph=True)",
                      _diamond("cc+b"), (val(),), calls=(0, 0),
                      hint="the second pass must see the intermediate nodes' grads at 0 again, or the first pass's "
                           "values are passed on a second time; only leaves accumulate")
    yield _graph_case("two losses share a hidden node h = tanh(x w): backward on each, leaves get the sum",
                      _two_losses, (val(), val()), calls=(0, 1),
                      hint="gradient accumulation: leaves add up both passes, but h must start the second pass "
                           "at 0, or the first loss's gradient reaches x and w twice")


# ----------------------------------------------------------------------------------------------
# 1.4 manual backward of a 2-layer MLP (notebook 03)
# ----------------------------------------------------------------------------------------------
_GRAD_KEYS = ("W1", "b1", "W2", "b2", "logits", "h", "h_pre")


def _mlp_params(g, D, H, C, dtype=torch.float64):
    return (torch.randn(D, H, generator=g, dtype=dtype) / math.sqrt(D), torch.randn(H, generator=g, dtype=dtype) * 0.1,
            torch.randn(H, C, generator=g, dtype=dtype) / math.sqrt(H), torch.randn(C, generator=g, dtype=dtype) * 0.1)


def _mlp_autograd(X, y, W1, b1, W2, b2):
    """torch.autograd's gradients of the mean loss, for the parameters and the three intermediates."""
    params = [p.clone().requires_grad_(True) for p in (W1, b1, W2, b2)]
    h_pre = X @ params[0] + params[1]
    h = torch.relu(h_pre)
    logits = h @ params[2] + params[3]
    for t in (h_pre, h, logits):
        t.retain_grad()
    F.cross_entropy(logits, y).backward()
    return dict(zip(_GRAD_KEYS, [p.grad for p in params] + [logits.grad, h.grad, h_pre.grad]))


@exercise("1.4", "Backward pass of a 2-layer MLP by hand", reference="course_utils.mlp:mlp_backward",
          hint="dlogits = (softmax - onehot) / B; dW2 = h.T @ dlogits; dh = dlogits @ W2.T; "
               "dh_pre = dh where h_pre > 0, else 0; dW1 = X.T @ dh_pre; a bias sums its gradient over the batch",
          forbid=("torch.Tensor.backward", "torch.autograd.grad", "torch.autograd.backward"))
def _():
    g = case_rng(14)
    for B, D, H, C in [(8, 5, 6, 3), (1, 4, 7, 2), (32, 64, 32, 10), (5, 6, 6, 6)]:
        X = torch.randn(B, D, generator=g, dtype=torch.float64)
        y = torch.randint(0, C, (B,), generator=g)
        params = _mlp_params(g, D, H, C)
        name = f"B={B}, D={D}, H={H}, C={C}" + (" (batch of one)" if B == 1 else "") + (
            " (H = C: a transposed weight gradient still has the right shape)" if H == C else "")
        yield Case(name, args=(X, y, *params), expected=lambda X=X, y=y, params=params: _mlp_autograd(X, y, *params),
                   atol=1e-8, rtol=1e-6)
    # ReLU at exactly 0: torch's slope there is 0
    X = torch.randn(4, 3, generator=g, dtype=torch.float64)
    X[1] = 0.0
    W1, _, W2, b2 = _mlp_params(g, 3, 5, 4)
    b1 = torch.zeros(5, dtype=torch.float64)
    y = torch.randint(0, 4, (4,), generator=g)
    yield Case("a row of zeros with b1 = 0: h_pre is exactly 0 there", args=(X, y, W1, b1, W2, b2),
               expected=lambda: _mlp_autograd(X, y, W1, b1, W2, b2), atol=1e-8, rtol=1e-6,
               hint="torch treats ReLU's slope at exactly 0 as 0: pass the gradient only where h_pre > 0")
    # digits-like batch, float32 as in the notebook
    X = torch.rand(20, 64, generator=g)
    y = torch.randint(0, 10, (20,), generator=g)
    params32 = tuple(p.float() for p in _mlp_params(g, 64, 16, 10))
    yield Case("float32 batch (20, 64) -> 16 -> 10: the gradients are float32 too", args=(X, y, *params32),
               expected=lambda: _mlp_autograd(X, y, *params32), atol=1e-5,
               hint="keep the inputs' dtype: F.one_hot gives int64, convert it with .to(logits.dtype)")


# ----------------------------------------------------------------------------------------------
# 1.5 numerical gradient by central differences (notebook 03)
# ----------------------------------------------------------------------------------------------
def _autograd_grad(f, x):
    x = x.clone().requires_grad_(True)
    f(x).backward()
    return x.grad


def _numgrad_case(name, f, x, h, *, rtol=1e-3, atol=1e-6, hint=None):
    def run(fn):
        xc = x.clone()
        grad = fn(f, xc, h)
        return grad, xc  # x must come back unchanged

    return Case(name, run=run, expected=lambda: (_autograd_grad(f, x), x.clone()), atol=atol, rtol=rtol,
                names=("the gradient estimate", "x after the call (restore every entry you perturb)"),
                allow_mutation=True, hint=hint)


@exercise("1.5", "Numerical gradient by central differences", reference="course_utils.autograd:numerical_grad",
          hint="for each entry i: (f(x + h e_i) - f(x - h e_i)) / (2h), then put x_i back to its old value; the "
               "result has x's shape and dtype")
def _():
    g = case_rng(15)
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
    x = torch.randn(2, 3, generator=g)
    yield _numgrad_case("float32 x (2, 3), f = sum(sin(x)), h=1e-2: the estimate is float32 too",
                        lambda t: t.sin().sum(), x, 1e-2, rtol=1e-2, atol=1e-3,
                        hint="create the gradient with x's dtype, e.g. torch.zeros_like(x)")


# ----------------------------------------------------------------------------------------------
# 1.6 SGD with momentum and 1.7 Adam (notebook 04): pure functions, no in-place updates
# ----------------------------------------------------------------------------------------------
_PURE_HINT = ("return new tensors (e.g. param - lr * velocity) and leave param, grad and the state you were "
              "given untouched: no -=, +=, .add_() or .copy_() on them")


def _torch_optimizer_run(make_opt, p0, grads, *, state=None, lrs=None, keys=()):
    """Run torch.optim on one parameter; return the final parameter and the named optimiser state."""
    p = p0.clone().requires_grad_(True)
    opt = make_opt([p])
    if state is not None:
        opt.state[p] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    for i, grad in enumerate(grads):
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[i]
        p.grad = grad.clone()
        opt.step()
    return (p.detach(), *(opt.state[p][k] for k in keys))


def _pure_steps(step_fn, p0, grads, state0, call):
    """Apply `call(step_fn, p, grad, state, i)` for every gradient; also report whether any input changed."""
    p, state, unchanged = p0.clone(), tuple(s.clone() for s in state0), True
    for i, grad in enumerate(grads):
        inputs = (p, grad.clone(), *state)
        before = [t.clone() for t in inputs]
        out = call(step_fn, *inputs, i)
        unchanged = unchanged and all(torch.equal(a, b) for a, b in zip(inputs, before))
        if not (isinstance(out, (tuple, list)) and len(out) == 1 + len(state0)):
            return out  # let the comparison explain what came back
        p, *state = out
        state = tuple(state)
    return (p, *state, bool(unchanged))


def _sgd_case(name, p0, grads, *, lr, momentum, weight_decay=0.0, v0=None, lrs=None, hint=None):
    v0 = torch.zeros_like(p0) if v0 is None else v0

    def call(step_fn, p, grad, v, i):
        return step_fn(p, grad, v, lr=lrs[i] if lrs else lr, momentum=momentum, weight_decay=weight_decay)

    def expected():
        make = lambda ps: torch.optim.SGD(ps, lr=lr if lr else lrs[0], momentum=momentum,  # noqa: E731
                                          weight_decay=weight_decay, foreach=False)
        out = _torch_optimizer_run(make, p0, grads, state={"momentum_buffer": v0}, lrs=lrs, keys=("momentum_buffer",))
        return (*out, True)

    return Case(name, run=lambda fn: _pure_steps(fn, p0, grads, (v0,), call), expected=expected, atol=1e-5,
                names=("param after the steps", "velocity after the steps",
                       "inputs left unchanged (no in-place update)"), hint=hint)


@exercise("1.6", "SGD with momentum, one step", reference="course_utils.optim:sgd_momentum_step",
          hint="torch.optim.SGD: g = grad + wd * param; v = momentum * v + g; param - lr * v (no (1 - momentum), "
               "lr outside v); return new tensors, change nothing in place")
def _():
    g = case_rng(16)
    # one step with the arguments passed directly: the default check rejects changes to them in place
    p, grad, v = torch.randn(5, generator=g), torch.randn(5, generator=g), torch.randn(5, generator=g) * 0.5
    yield Case("one step from a non-zero velocity, param (5,), lr=0.1, momentum=0.9, weight_decay=0.01",
               args=(p, grad, v), kwargs=dict(lr=0.1, momentum=0.9, weight_decay=0.01),
               expected=lambda: _torch_optimizer_run(
                   lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, foreach=False), p, [grad],
                   state={"momentum_buffer": v}, keys=("momentum_buffer",)),
               names=("the new param", "the new velocity"), atol=1e-6, hint=_PURE_HINT)
    for shape, steps, lr, mom, wd in [((3, 4), 6, 0.05, 0.9, 0.0), ((10,), 8, 0.01, 0.5, 0.1), ((1,), 5, 0.2, 0.99, 0.0)]:
        p0 = torch.randn(shape, generator=g)
        grads = [torch.randn(shape, generator=g) for _ in range(steps)]
        yield _sgd_case(f"param {shape}, {steps} steps, lr={lr}, momentum={mom}, weight_decay={wd}",
                        p0, grads, lr=lr, momentum=mom, weight_decay=wd)
    p0 = torch.randn(4, generator=g)
    grads = [torch.randn(4, generator=g) for _ in range(6)]
    lrs = [0.1, 0.1, 0.05, 0.05, 0.01, 0.01]
    yield _sgd_case(f"param (4,), 6 steps with a decaying lr {lrs}, momentum=0.9", p0, grads, lr=None, momentum=0.9,
                    lrs=lrs, hint="torch keeps lr out of the velocity: v = m v + g, p -= lr v. Folding lr into v only "
                                  "agrees while lr is constant")
    p0 = torch.randn(3, generator=g, dtype=torch.float64)
    grads = [torch.randn(3, generator=g, dtype=torch.float64) for _ in range(3)]
    yield _sgd_case("float64 param (3,), 3 steps: the results stay float64", p0, grads, lr=0.1, momentum=0.9,
                    weight_decay=0.01)


def _adam_case(name, p0, grads, *, m0=None, v0=None, t0=0, hint=None, **hyper):
    full = dict(lr=hyper["lr"], betas=hyper.get("betas", (0.9, 0.999)), eps=hyper.get("eps", 1e-8),
                weight_decay=hyper.get("weight_decay", 0.0))
    m0 = torch.zeros_like(p0) if m0 is None else m0
    v0 = torch.zeros_like(p0) if v0 is None else v0

    def call(step_fn, p, grad, m, v, i):
        return step_fn(p, grad, m, v, t0 + i + 1, **full)

    def expected():
        out = _torch_optimizer_run(lambda ps: torch.optim.Adam(ps, **full, foreach=False), p0, grads,
                                   state={"step": torch.tensor(float(t0)), "exp_avg": m0, "exp_avg_sq": v0},
                                   keys=("exp_avg", "exp_avg_sq"))
        return (*out, True)

    return Case(name, run=lambda fn: _pure_steps(fn, p0, grads, (m0, v0), call), expected=expected, atol=1e-6,
                rtol=1e-4, names=("param after the steps", "m after the steps", "v after the steps",
                                  "inputs left unchanged (no in-place update)"), hint=hint)


@exercise("1.7", "Adam, one step", reference="course_utils.optim:adam_step",
          hint="g = grad + weight_decay * param; m and v are running means of g and g²; divide each by (1 - beta^t) "
               "before the step lr * m_hat / (sqrt(v_hat) + eps); return new tensors, change nothing in place")
def _():
    g = case_rng(17)
    p, grad = torch.randn(5, generator=g), torch.randn(5, generator=g)
    m, v = torch.randn(5, generator=g) * 0.1, torch.rand(5, generator=g) * 0.01
    yield Case("one step at t=4 from non-zero m and v, param (5,), lr=0.01", args=(p, grad, m, v, 4),
               kwargs=dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
               expected=lambda: _torch_optimizer_run(lambda ps: torch.optim.Adam(ps, lr=0.01, foreach=False), p, [grad],
                                                     state={"step": torch.tensor(3.0), "exp_avg": m, "exp_avg_sq": v},
                                                     keys=("exp_avg", "exp_avg_sq")),
               names=("the new param", "the new m", "the new v"), atol=1e-6, hint=_PURE_HINT)
    settings = [((5,), 1, dict(lr=0.01), 1.0), ((3, 4), 10, dict(lr=1e-3), 1.0),
                ((6,), 5, dict(lr=0.05, betas=(0.8, 0.99), weight_decay=0.1), 1.0),
                ((8,), 4, dict(lr=1e-2), 1e-4), ((1,), 3, dict(lr=0.1, eps=1e-3), 1.0)]
    for shape, steps, kw, scale in settings:
        p0 = torch.randn(shape, generator=g)
        grads = [torch.randn(shape, generator=g) * scale for _ in range(steps)]
        desc = ", ".join(f"{k}={v}" for k, v in kw.items())
        hint = ("eps goes outside the square root: sqrt(v_hat) + eps; with tiny gradients v is ~1e-8 and the "
                "difference shows" if scale < 1 else None)
        yield _adam_case(f"param {shape}, {steps} steps, {desc}" + (f", gradients ~{scale:g}" if scale < 1 else ""),
                         p0, grads, hint=hint, **kw)
    p0 = torch.randn(3, generator=g, dtype=torch.float64)
    grads = [torch.randn(3, generator=g, dtype=torch.float64) for _ in range(3)]
    yield _adam_case("float64 param (3,), 3 steps: the results stay float64", p0, grads, lr=0.01)


# ----------------------------------------------------------------------------------------------
# 1.8 batch normalisation (notebook 04)
# ----------------------------------------------------------------------------------------------
_BN_NAMES = ("the output in training mode (first batch)", "the gradient with respect to x",
             "the gradient with respect to weight", "the gradient with respect to bias",
             "running_mean after the training batches", "running_var after the training batches",
             "the output in evaluation mode", "x left unchanged")


def _bn_case(name, batches, x_eval, *, kwargs=None, float64=False, hint=None):
    """Train-mode batches (backward through the first), then one eval-mode batch. Runs the learner's class,
    and for the expected values `torch.nn.BatchNorm1d`, through the same harness."""
    kwargs = kwargs or {}
    C = batches[0].shape[1]
    g = case_rng(180 + C + len(batches))
    weight, bias = torch.randn(C, generator=g) * 0.5 + 1, torch.randn(C, generator=g) * 0.5
    upstream = torch.randn(batches[0].shape, generator=g)  # d loss / d output of the first batch

    def run(cls):
        bn = cls(C, **kwargs)
        if float64:
            bn = bn.double()
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        bn.train()
        unchanged, first = True, None
        for xb in batches:
            xb = xb.double() if float64 else xb
            x = xb.clone().requires_grad_(True)
            y = bn(x)
            if first is None:
                (y * upstream.to(y.dtype)).sum().backward()
                first = (y.detach(), x.grad, bn.weight.grad, bn.bias.grad)
            unchanged = unchanged and torch.equal(x.detach(), xb)
        running = (bn.running_mean.detach().clone(), bn.running_var.detach().clone())
        bn.eval()
        with torch.no_grad():
            y_eval = bn(x_eval.double() if float64 else x_eval.clone())
        return (*first, *running, y_eval, bool(unchanged))

    return Case(name, run=run, reference=torch.nn.BatchNorm1d, names=_BN_NAMES, atol=1e-5, rtol=1e-4, hint=hint)


@exercise("1.8", "Batch normalisation (training and evaluation mode)", reference="course_utils.mlp:BatchNorm1d",
          hint="training: normalise each column (feature) with the batch mean and biased variance, "
               "(x - mean) / sqrt(var + eps) * weight + bias, and move the running statistics: "
               "running = (1 - momentum) * running + momentum * batch value, with the unbiased variance for "
               "running_var; evaluation: use the running statistics instead",
          forbid=("torch.nn.functional.batch_norm", "torch.batch_norm", "torch.nn.functional.layer_norm",
                  "torch.nn.functional.instance_norm"))
def _():
    g = case_rng(18)
    yield _bn_case("x (8, 4), one training batch", [torch.randn(8, 4, generator=g)], torch.randn(3, 4, generator=g))
    yield _bn_case("the smallest batch, x (2, 3): biased variance to normalise, unbiased (n - 1) for running_var",
                   [torch.randn(2, 3, generator=g)], torch.randn(2, 3, generator=g),
                   hint="normalise with the batch's biased variance (divide by n); running_var stores the unbiased "
                        "one (divide by n - 1), as torch does")
    yield _bn_case("three batches (32, 16) with mean 5 and std 3, then evaluation of a single example",
                   [torch.randn(32, 16, generator=g) * 3 + 5 for _ in range(3)], torch.randn(1, 16, generator=g) * 3 + 5,
                   hint="each column is a feature: take mean and variance over the batch (dim 0), one per feature")
    tiny = torch.randn(10, 5, generator=g)
    tiny[:, 2] *= 1e-3  # variance ~1e-6, below eps
    yield _bn_case("a feature with variance ~1e-6, below eps = 1e-5", [tiny], torch.randn(4, 5, generator=g),
                   hint="eps goes inside the square root: sqrt(var + eps)")
    yield _bn_case("momentum=0.5, eps=1e-3, two batches (10, 6)", [torch.randn(10, 6, generator=g) * 2 - 1 for _ in range(2)],
                   torch.randn(4, 6, generator=g), kwargs=dict(eps=1e-3, momentum=0.5),
                   hint="torch's momentum weighs the new batch: running = (1 - momentum) * running + momentum * batch")
    yield _bn_case("float64 module (.double()) and input (5, 3)", [torch.randn(5, 3, generator=g)],
                   torch.randn(2, 3, generator=g), float64=True)


# ----------------------------------------------------------------------------------------------
# 1.9 inverted dropout (notebook 05)
# ----------------------------------------------------------------------------------------------
def _dropout_case(name, x0, p, training, seed, hint=None):
    """Dropout applied to h = tanh(x), a hidden activation inside a graph; then backward to x."""
    g = case_rng(190 + seed)
    upstream = torch.randn(x0.shape, generator=g, dtype=x0.dtype)  # d loss / d output

    def run(fn):
        x = x0.clone().requires_grad_(True)
        h = torch.tanh(x)  # a non-leaf tensor whose value tanh's backward needs
        h_before = h.detach().clone()
        out = fn(h, p, training, case_rng(seed))
        if not isinstance(out, torch.Tensor):
            return out
        if not out.requires_grad:
            return (out, "no gradient reaches x: the output is detached from the graph", True)
        unchanged = bool(torch.equal(h.detach(), h_before))
        (out * upstream).sum().backward()
        return (out.detach(), x.grad, unchanged)

    def expected():
        x = x0.clone().requires_grad_(True)
        h = torch.tanh(x)
        if not training or p == 0:
            out = h
        elif p >= 1:
            out = h * 0
        else:  # closed form with the same random numbers the function must draw
            u = torch.rand(h.shape, generator=case_rng(seed))
            out = torch.where(u >= p, h / (1 - p), torch.zeros_like(h))
        (out * upstream).sum().backward()
        return (out.detach(), x.grad, True)

    return Case(name, run=run, expected=expected, atol=1e-6,
                names=("the output", "the gradient with respect to the input", "the input left unchanged"),
                hint=hint)


@exercise("1.9", "Inverted dropout", reference="course_utils.mlp:dropout",
          hint="training: u = torch.rand(x.shape, generator=generator); keep where u >= p; multiply kept "
               "entries by 1/(1-p), as a new tensor connected to x. Evaluation: return x unchanged",
          forbid=("torch.nn.functional.dropout", "torch.dropout", "torch.nn.functional.dropout1d"))
def _():
    g = case_rng(19)
    inplace = "build a new tensor (x * mask / (1 - p)); changing x in place breaks the backward pass of the layer before"
    yield _dropout_case("x (4, 8), p=0.5, training", torch.randn(4, 8, generator=g), 0.5, True, 1, hint=inplace)
    yield _dropout_case("x (2, 3, 5), p=0.1, training", torch.randn(2, 3, 5, generator=g), 0.1, True, 2)
    yield _dropout_case("x (4, 8), p=0.5, evaluation (training=False)", torch.randn(4, 8, generator=g), 0.5, False, 3,
                        hint="at evaluation time dropout does nothing: the 1/(1-p) scaling during training "
                             "already kept the expected activation equal to x")
    yield _dropout_case("x (1, 1), p=0.3, training", torch.randn(1, 1, generator=g), 0.3, True, 4)
    yield _dropout_case("x (100,), p=0.8, training", torch.randn(100, generator=g), 0.8, True, 5)
    yield _dropout_case("x (3, 3), p=0 (keep everything)", torch.randn(3, 3, generator=g), 0.0, True, 6)
    yield _dropout_case("x (3, 3), p=1 (drop everything; the gradient is 0, as with F.dropout)",
                        torch.randn(3, 3, generator=g), 1.0, True, 7,
                        hint="with p=1 every entry is dropped: return x * 0 (zeros that stay connected to x; "
                             "1/(1-p) would divide by zero)")
    yield _dropout_case("float64 x (6, 4), p=0.25, training: the output is float64 too",
                        torch.randn(6, 4, generator=g, dtype=torch.float64), 0.25, True, 8)
