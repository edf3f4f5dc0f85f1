"""The check framework itself: verdicts for every kind of bad learner input, strict mode, fallback, records."""
import json

import pytest
import torch
import torch.nn.functional as F

from course_utils import exercises as ex
from course_utils.exercises import Case, check, compare, use


def softmax_reference(x):
    return torch.softmax(x, dim=-1)


@pytest.fixture(autouse=True)
def toy_exercise(monkeypatch):
    """Register a throwaway exercise '0.1' (softmax) for these tests only."""
    registry = dict(ex._REGISTRY)
    monkeypatch.setattr(ex, "_REGISTRY", registry)
    monkeypatch.setattr(ex, "_LAST", {})
    monkeypatch.delenv("COURSE_STRICT", raising=False)

    @ex.exercise("0.1", "Softmax", reference=f"{__name__}:softmax_reference", hint="subtract the row max", time_limit=1.5)
    def _():
        g = torch.Generator().manual_seed(0)
        for shape in [(1, 3), (4, 5)]:
            x = torch.randn(*shape, generator=g)
            yield Case(f"x {shape}", args=(x,), expected=F.softmax(x, dim=-1))
        big = torch.tensor([[1000.0, 0.0, -1000.0]])
        yield Case("x with values of +-1000", args=(big,), expected=F.softmax(big, dim=-1))


def naive(x):
    return x.exp() / x.exp().sum(-1, keepdim=True)


@pytest.mark.parametrize("impl, status, fragment", [
    (softmax_reference, "passed", ""),
    (naive, "failed", "NaN"),
    (lambda x: torch.softmax(x, dim=0), "failed", "max abs diff"),
    (lambda x: torch.softmax(x, dim=-1)[0], "failed", "wrong shape"),
    (lambda x: torch.softmax(x.double(), dim=-1), "failed", "wrong dtype"),
    (lambda x: torch.softmax(x, -1).numpy(), "failed", "numpy array"),
    (lambda x: x.nonexistent(), "error", "AttributeError"),
    (lambda x: [][1], "error", "IndexError"),
    (lambda x: exit(), "error", "SystemExit"),
    (None, "not attempted", ""),
])
def test_verdicts(impl, status, fragment):
    res = check("0.1", impl, quiet=True)
    assert res.status == status, str(res)
    assert bool(res) == (status == "passed")
    assert fragment in str(res)
    assert "Traceback" not in str(res)


def test_placeholder_is_not_attempted():
    def softmax(x):
        raise NotImplementedError("compute the softmax")
    assert check("0.1", softmax, quiet=True).status == "not attempted"


def test_infinite_loop_becomes_timeout():
    def loops(x):
        while True:
            pass
    res = check("0.1", loops, quiet=True)
    assert res.status == "timeout" and "infinite loop" in str(res)


def test_except_exception_cannot_swallow_the_time_limit():
    def sneaky(x):
        while True:
            try:
                while True:
                    pass
            except Exception:
                pass
    assert check("0.1", sneaky, quiet=True).status == "timeout"


def test_learner_mutating_inputs_does_not_change_later_cases():
    def mutating(x):
        out = torch.softmax(x, -1)
        x.zero_()
        return out
    assert check("0.1", mutating, quiet=True)


def test_strict_mode_raises(monkeypatch):
    monkeypatch.setenv("COURSE_STRICT", "1")
    with pytest.raises(ex.ExerciseCheckFailed, match="0.1 Softmax"):
        check("0.1", naive, quiet=True)
    assert check("0.1", softmax_reference, quiet=True)


def test_use_falls_back_to_reference(capsys):
    assert use("0.1", naive) is softmax_reference
    assert "continuing with the reference" in capsys.readouterr().out
    mine = lambda x: torch.softmax(x, -1)  # noqa: E731
    check("0.1", mine, quiet=True)
    assert use("0.1", mine) is mine


def test_results_are_recorded_as_json_lines(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    monkeypatch.setenv("COURSE_RESULTS_FILE", str(path))
    check("0.1", naive, quiet=True)
    check("0.1", softmax_reference, quiet=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["failed", "passed"]
    assert rows[1]["passed"] == rows[1]["total"] == 3


def test_html_and_text_rendering():
    res = check("0.1", naive, quiet=True)
    assert "<div" in res._repr_html_() and "❌" in res._repr_html_()
    assert str(res).startswith("❌ 0.1 Softmax")
    assert repr(res) == "<CheckResult 0.1: failed 2/3>"


def test_compare_nested_and_numbers():
    assert compare((torch.ones(2), 3.0), (torch.ones(2), 3.0)) is None
    assert "expected 2 items" in compare((1.0,), (1.0, 2.0))
    assert "missing keys" in compare({"a": 1.0}, {"a": 1.0, "b": 2.0})
    assert compare(torch.tensor(2.0), 2.0) is None
    assert "got NaN" in compare(float("nan"), 1.0)
    assert "expected a number" in compare("1.0", 1.0)
    assert "values differ" in compare(torch.tensor([1, 2]), torch.tensor([1, 3]))


def test_unknown_exercise_lists_known_ones():
    with pytest.raises(KeyError, match="Known:"):
        check("99.9", naive)
