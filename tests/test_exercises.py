"""The check framework itself: verdicts for every kind of bad learner input, and verdicts that learner
code cannot forge (tensor subclasses, monkeypatching, reading expected values, swallowing the time
limit). Uses the toy exercises in tests/toy_checks.py through the real checker process."""
import json
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from course_utils import exercises as ex
from course_utils.exercises import check, use
from course_utils.verdicts import compare, decode, encode

TESTS = Path(__file__).parent


@pytest.fixture(scope="module", autouse=True)
def toy_checker():
    """The toy exercises, visible here and in one fresh checker process for this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COURSE_EXTRA_CHECKS", "toy_checks")
        mp.setenv("PYTHONPATH", str(TESTS))
        mp.setattr(ex, "_REGISTRY", dict(ex._REGISTRY))
        sys.modules.pop("toy_checks", None)
        old_judge = ex._JUDGE
        ex._JUDGE = None
        yield
        if ex._JUDGE is not None:
            ex._JUDGE.close()
        ex._JUDGE = old_judge
        sys.modules.pop("toy_checks", None)


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch, toy_checker):
    monkeypatch.delenv("COURSE_STRICT", raising=False)
    monkeypatch.setattr(ex, "_LAST", {})


class BrokenStr(Exception):
    def __str__(self):
        raise RuntimeError("no message for you")


class BadRepr:
    def __repr__(self):
        raise RuntimeError("no repr")


def raises_broken(x):
    raise BrokenStr()


def mine(x):
    shifted = x - x.max(-1, keepdim=True).values
    return shifted.exp() / shifted.exp().sum(-1, keepdim=True)


def naive(x):
    return x.exp() / x.exp().sum(-1, keepdim=True)


@pytest.mark.parametrize("impl, status, fragment", [
    (mine, "passed", ""),
    (lambda x: (x - x.amax(-1, keepdim=True)).exp().div((x - x.amax(-1, keepdim=True)).exp().sum(-1, keepdim=True)),
     "passed", ""),
    (naive, "failed", "NaN"),
    (lambda x: mine(x.T).T, "failed", "max abs diff"),
    (lambda x: mine(x)[0], "failed", "wrong shape"),
    (lambda x: mine(x.double()), "failed", "wrong dtype"),
    (lambda x: mine(x).numpy(), "failed", "numpy array"),
    (lambda x: "a string", "failed", "expected a torch.Tensor"),
    (lambda x: mine, "failed", "function"),
    (lambda x: torch.softmax(x, -1), "failed", "you used torch.softmax"),
    (lambda x: x.softmax(-1), "failed", "you used torch.Tensor.softmax"),
    (lambda x: x.sub_(x.max(-1, keepdim=True).values).exp() / x.exp().sum(-1, keepdim=True), "failed", "in place"),
    (lambda x: x.nonexistent(), "error", "AttributeError"),
    (lambda x: [][1], "error", "IndexError"),
    (lambda x: exit(), "error", "SystemExit"),
    (lambda x: torch.empty(x.shape, device="meta"), "error", "meta tensor"),
    (raises_broken, "error", "BrokenStr"),
    (lambda x: BadRepr(), "failed", "BadRepr"),
    (lambda x: [BadRepr()], "failed", "expected a torch.Tensor"),
    (None, "not attempted", ""),
])
def test_verdicts(impl, status, fragment):
    res = check("0.1", impl, quiet=True)
    assert res.status == status, str(res)
    assert bool(res) == (status == "passed")
    assert fragment in str(res)
    assert "Traceback" not in str(res)


def test_verdict_names_the_wrong_output():
    def also_right(x, w, b):
        return x @ w + b * 2 - b  # same value and the same gradients, written differently

    def wrong_b(x, w, b):
        return x @ w + b.detach()
    res = check("0.2", wrong_b, quiet=True)
    assert not res and "the gradient of b" in res.message, str(res)
    assert check("0.2", also_right, quiet=True)
    assert check("0.2", lambda x, w, b: torch.addmm(b, x, w), quiet=True)


def test_placeholder_is_not_attempted():
    def softmax(x):
        raise NotImplementedError("compute the softmax")
    assert check("0.1", softmax, quiet=True).status == "not attempted"


@pytest.mark.parametrize("body", ["while True:\n        pass",
                                  "while True:\n        try:\n            time.sleep(0.01)\n        except:\n            pass",
                                  "import signal\n    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n    while True:\n        pass"])
def test_time_limit_cannot_be_swallowed(body):
    namespace = {"time": time}
    exec(f"def loops(x):\n    {body}\n", namespace)
    start = time.monotonic()
    res = check("0.1", namespace["loops"], quiet=True)
    assert res.status == "timeout" and "infinite loop" in str(res)
    assert time.monotonic() - start < 10


def test_learner_loop_does_not_outlive_the_check(tmp_path):
    marker = tmp_path / "alive"

    def spawns(x):
        import subprocess
        subprocess.Popen([sys.executable, "-c", f"import time\nfor _ in range(100):\n    open({str(marker)!r}, 'a').write('x')\n    time.sleep(0.1)"])
        while True:
            pass

    check("0.1", spawns, quiet=True)
    time.sleep(0.5)
    size = marker.stat().st_size if marker.exists() else 0
    time.sleep(1.0)
    assert (marker.stat().st_size if marker.exists() else 0) == size, "a process started by learner code outlived the check"


def test_tensor_subclass_that_equals_everything_does_not_pass():
    class Liar(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func in (torch.allclose, torch.equal, torch.Tensor.__eq__, torch.isclose):
                return True
            return super().__torch_function__(func, types, args, kwargs or {})
    res = check("0.1", lambda x: torch.zeros_like(x).as_subclass(Liar), quiet=True)
    assert res.status == "failed" and "values differ" in res.message


def test_monkeypatching_torch_or_the_package_changes_no_verdict(monkeypatch):
    assert check("0.1", mine, quiet=True)  # start the checker first, as a notebook would
    import course_utils.verdicts as verdicts
    monkeypatch.setattr(torch, "allclose", lambda *a, **k: True)
    monkeypatch.setattr(verdicts, "compare", lambda *a, **k: None)
    monkeypatch.setattr(F, "softmax", lambda x, dim=-1, **k: naive(x))
    res = check("0.1", naive, quiet=True)
    assert res.status == "failed" and "NaN" in res.message
    assert check("0.1", mine, quiet=True)


def test_patching_inside_the_learner_function_does_not_leak(monkeypatch):
    def patches(x):
        torch.allclose = lambda *a, **k: True
        return naive(x)
    original = torch.allclose
    assert not check("0.1", patches, quiet=True)
    assert torch.allclose is original


def test_reading_expected_values_from_the_stack_finds_none():
    def snoop(x):
        import inspect
        for frame_info in inspect.stack():
            for value in frame_info.frame.f_locals.values():
                for case in (value if isinstance(value, list) else [value]):
                    got = getattr(case, "expected", None)
                    if isinstance(got, torch.Tensor) and got.shape == x.shape:
                        return got
        return torch.zeros_like(x)
    assert not check("0.1", snoop, quiet=True)


def test_the_course_reference_is_refused():
    from course_utils.attention import attention_weights  # a package function that computes a softmax
    res = check("0.1", attention_weights, quiet=True)
    assert res.status == "failed" and "course's own implementation" in res.message


def test_a_wrapper_around_the_course_reference_does_not_pass():
    from course_utils import reference
    res = check("0.1", lambda x: reference("0.1")(x), quiet=True)
    assert res.status == "error" and "course's own implementation" in res.message, str(res)
    assert reference("0.1")(torch.zeros(1, 2)).shape == (1, 2)  # blocked only inside the check


def test_use_rechecks_a_redefined_function(capsys):
    def impl(x):
        return mine(x)
    assert check("0.1", impl, quiet=True)
    assert use("0.1", impl) is impl
    impl.__code__ = naive.__code__  # same object, different code: the cached verdict must not be reused
    assert use("0.1", impl) is not impl
    assert "continuing with the reference" in capsys.readouterr().out


def test_strict_mode_raises(monkeypatch):
    monkeypatch.setenv("COURSE_STRICT", "1")
    with pytest.raises(ex.ExerciseCheckFailed, match="0.1 Softmax"):
        check("0.1", naive, quiet=True)
    assert check("0.1", mine, quiet=True)


def test_use_falls_back_to_reference(capsys):
    ref = use("0.1", naive)
    assert ref.__name__ == "softmax_reference"
    assert "continuing with the reference" in capsys.readouterr().out
    check("0.1", mine, quiet=True)
    assert use("0.1", mine) is mine


def test_outputs_not_verdicts_are_recorded_for_the_grader(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_OUTPUTS_DIR", str(tmp_path))
    check("0.1", naive, quiet=True)
    check("0.1", mine, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [r["exercise"] for r in rows] == ["0.1", "0.1"]
    assert all("status" not in c or c["status"] == "ok" for c in rows[1]["record"]["cases"])
    assert "passed" not in json.dumps(rows)  # outputs only: the grader judges them itself


def test_html_and_text_rendering():
    res = check("0.1", naive, quiet=True)
    assert "<div" in res._repr_html_() and "❌" in res._repr_html_()
    assert str(res).startswith("❌ 0.1 Softmax")
    assert repr(res) == "<CheckResult 0.1: failed 2/3>"


def test_wire_format_round_trip_and_compare():
    value = (torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), 3.0, float("nan"), {"a": [1, True, None]}, "s")
    back = decode(json.loads(json.dumps(encode(value))))
    assert torch.equal(back[0], value[0]) and back[0].dtype == torch.bfloat16
    assert back[1] == 3.0 and back[2] != back[2] and back[3] == {"a": [1, True, None]} and back[4] == "s"
    assert compare((torch.ones(2), 3.0), (torch.ones(2), 3.0)) is None
    assert "expected 2 items" in compare((1.0,), (1.0, 2.0))
    assert "missing keys" in compare({"a": 1.0}, {"a": 1.0, "b": 2.0})
    assert compare(torch.tensor(2.0), 2.0) is None
    assert "got NaN" in compare(float("nan"), 1.0)
    assert "expected a number" in compare("1.0", 1.0)
    assert "values differ" in compare(torch.tensor([1, 2]), torch.tensor([1, 3]))
    assert "the gradient of b" in compare((1.0, 2.0), (1.0, 3.0), names=("y", "the gradient of b"))


def test_unknown_exercise_lists_known_ones():
    with pytest.raises(KeyError, match="Known:"):
        check("99.9", naive)


def test_time_limit_is_cpu_time_so_a_busy_machine_does_not_time_out_a_right_answer():
    """Four busy processes on the check's CPU: a right answer still passes (the limit counts its own CPU time)."""
    import multiprocessing as mp

    hogs = [mp.get_context("fork").Process(target=_spin, daemon=True) for _ in range(4)]
    for h in hogs:
        h.start()
    try:
        def softmax(x):
            e = (x - x.max(dim=-1, keepdim=True).values).exp()
            return e / e.sum(dim=-1, keepdim=True)
        assert check("0.1", softmax, quiet=True)
    finally:
        for h in hogs:
            h.kill()


def test_a_waiting_loop_is_stopped_by_the_wall_clock():
    def sleeps(x):
        while True:
            time.sleep(0.05)
    start = time.monotonic()
    res = check("0.1", sleeps, quiet=True)
    assert res.status == "timeout"
    assert time.monotonic() - start < 15


def _spin():
    while True:
        pass
