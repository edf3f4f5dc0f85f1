"""Throwaway exercises ("0.x") for the check framework's own tests; loaded only where
COURSE_EXTRA_CHECKS=toy_checks (the tests set it, and the checker process inherits it)."""
import torch
import torch.nn.functional as F

from course_utils.exercises import Case, case_rng, exercise


def softmax_reference(x):
    return torch.softmax(x, dim=-1)


@exercise("0.1", "Softmax", reference="toy_checks:softmax_reference", hint="subtract the row max", time_limit=1.5,
          forbid=("torch.softmax", "torch.nn.functional.softmax", "torch.Tensor.softmax"))
def _():
    g = case_rng(0)
    for shape in [(1, 3), (4, 5)]:
        x = torch.randn(*shape, generator=g)
        yield Case(f"x {shape}", args=(x,), expected=lambda: F.softmax(x, dim=-1), names="probabilities")
    big = torch.tensor([[1000.0, 0.0, -1000.0]])
    yield Case("x with values of +-1000", args=(big,), expected=lambda: F.softmax(big, dim=-1), names="probabilities")


def linear_reference(x, w, b):
    return x @ w + b


def _linear_with_grads(x, w, b):
    def run(fn):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        out = fn(xs, ws, bs)
        out.pow(2).sum().backward()
        return out, xs.grad, ws.grad, bs.grad
    return run


@exercise("0.2", "Affine layer with gradients", reference="toy_checks:linear_reference")
def _():
    g = case_rng(1)
    for n in (1, 3):
        x, w, b = torch.randn(n, 4, generator=g), torch.randn(4, 2, generator=g), torch.randn(2, generator=g)
        run = _linear_with_grads(x, w, b)
        yield Case(f"x ({n}, 4)", run=run, reference=linear_reference,
                   names=("y", "the gradient of x", "the gradient of w", "the gradient of b"))
        yield Case(f"x ({n}, 4), outputs only", args=(x, w, b), reference=linear_reference, names="y")
