"""Exercise checks: run a learner's function or class against an independent reference.

An exercise is registered with `@exercise(id, title, reference=..., hint=...)` on a generator of
`Case`s. `check(id, obj)` runs every case under a time limit and returns a `CheckResult` that is
truthy only when all cases pass; `use(id, obj)` returns the learner's object when it passed, else
the package's reference, so a notebook keeps running before its exercises are done.

Learner code never produces a traceback from inside this module: exceptions, wrong types, shapes,
dtypes, NaNs and infinite loops all become verdicts.
"""
from __future__ import annotations

import html
import importlib
import json
import os
import pkgutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

DEFAULT_TIME_LIMIT = 20.0  # seconds for all cases of one exercise together


# ----------------------------------------------------------------------------------------------
# Cases and exercises
# ----------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One test input for an exercise, with the expected output from an independent reference."""

    name: str  # what the input is, shown when the case fails, e.g. "logits (4, 10), one large value"
    args: tuple = ()  # positional arguments; tensors are cloned before every call
    kwargs: dict = field(default_factory=dict)
    # What the output should be, as a zero-argument function (a "thunk") that the trusted checker calls;
    # the learner's process never computes it, so learner code cannot read it. Or give `reference`.
    expected: Callable[[], Any] | None = None
    reference: Callable[..., Any] | None = None  # an independent implementation run through the same `call`
    run: Callable[[Any], Any] | None = None  # custom call: run(obj) -> output (default obj(*args))
    names: tuple[str, ...] | str | None = None  # what each output is, for verdicts ("h", "c") instead of output[0]
    allow_mutation: bool = False  # by default a call that changes a tensor argument in place fails
    atol: float = 1e-5
    rtol: float = 1e-4
    check_dtype: bool = True  # tensors must match the expected dtype
    hint: str | None = None  # shown when this case fails (overrides the exercise hint)
    compare: Callable[[Any, Any], str | None] | None = None  # custom comparison: message or None

    def call(self, obj: Any) -> Any:
        if self.run is not None:
            return self.run(obj)
        return obj(*clone_inputs(self.args), **clone_inputs(self.kwargs))


@dataclass
class Exercise:
    """A registered exercise: its id, one-line task, case generator and reference implementation."""

    id: str  # "<week>.<n>", e.g. "1.3"
    title: str  # one line, e.g. "Softmax cross-entropy from logits"
    make_cases: Callable[[], Iterable[Case]]
    reference: str  # "module:attribute" of the reference implementation, imported lazily
    hint: str = ""
    time_limit: float = DEFAULT_TIME_LIMIT
    forbid: tuple[str, ...] = ()  # qualified names the learner must not call, e.g. "torch.nn.functional.cross_entropy"

    def load_reference(self) -> Any:
        module, _, attr = self.reference.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj


_REGISTRY: dict[str, Exercise] = {}


def exercise(id: str, title: str, *, reference: str, hint: str = "", time_limit: float = DEFAULT_TIME_LIMIT,
             forbid: Iterable[str] = ()):
    """Decorator registering a case generator as exercise `id`."""

    def register(make_cases: Callable[[], Iterable[Case]]):
        if id in _REGISTRY:
            raise ValueError(f"exercise {id} is registered twice")
        _REGISTRY[id] = Exercise(id, title, make_cases, reference, hint, time_limit, tuple(forbid))
        return make_cases

    return register


def _sort_key(exercise_id: str) -> tuple[int, ...]:
    return tuple(int(p) for p in exercise_id.split("."))


def _load_checks(week: str | None = None) -> None:
    """Import the check modules (all, or one week's: `weekN.py` and `weekN_*.py`); importing registers them."""
    from . import checks

    for module in sorted(m.name for m in pkgutil.iter_modules(checks.__path__)):
        if week is None or module == f"week{week}" or module.startswith(f"week{week}_"):
            importlib.import_module(f"{checks.__name__}.{module}")
    # Exercises of the framework's own tests live outside the package (tests/toy_checks.py).
    for module in filter(None, os.environ.get("COURSE_EXTRA_CHECKS", "").split(",")):
        importlib.import_module(module)


def list_exercises(week: int | None = None) -> list[str]:
    """Every registered exercise id, in order (optionally only one week's)."""
    _load_checks()
    ids = sorted(_REGISTRY, key=_sort_key)
    return [i for i in ids if week is None or i.split(".")[0] == str(week)]


def get_exercise(exercise_id: str) -> Exercise:
    if str(exercise_id) not in _REGISTRY:
        _load_checks(str(exercise_id).split(".")[0])
    try:
        return _REGISTRY[str(exercise_id)]
    except KeyError:
        raise KeyError(f"No exercise {exercise_id!r}. Known: {', '.join(list_exercises())}") from None


def reference(exercise_id: str) -> Any:
    """The package's reference implementation of an exercise."""
    return get_exercise(exercise_id).load_reference()


def case_rng(seed: int) -> torch.Generator:
    """The generator for one exercise's random case inputs: `seed` mixed with `COURSE_CHECK_SALT`.

    The grader draws a fresh salt per grading run, so the graded inputs differ from the ones a learner
    saw in class and hard-coded answers fail; the learner's process and the checker use the same salt.
    """
    return torch.Generator().manual_seed(seed + int(os.environ.get("COURSE_CHECK_SALT", "0") or 0))


def randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """Reproducible random inputs for cases: standard normal times `scale`, drawn from generator `g`."""
    return torch.randn(*shape, generator=g) * scale


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------
STATUSES = ("passed", "failed", "error", "timeout", "not attempted")


@dataclass
class CheckResult:
    """The verdict of one `check`; truthy only when every case passed."""

    exercise_id: str
    title: str
    status: str  # one of STATUSES
    passed: int  # cases passed
    total: int  # cases run or planned
    message: str = ""  # what went wrong (empty on a pass)
    case: str = ""  # the failing case's description
    hint: str = ""
    seconds: float = 0.0
    _shown: bool = field(default=False, repr=False)

    def __bool__(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        return {"exercise": self.exercise_id, "title": self.title, "status": self.status,
                "passed": self.passed, "total": self.total, "message": self.message,
                "case": self.case, "seconds": round(self.seconds, 3)}

    def headline(self) -> str:
        if self.status == "passed":
            return f"✅ {self.exercise_id} {self.title}: passed all {self.total} cases"
        if self.status == "not attempted":
            return f"⬜ {self.exercise_id} {self.title}: not attempted yet"
        word = {"failed": "failed", "error": "raised an error", "timeout": "ran out of time"}[self.status]
        return f"❌ {self.exercise_id} {self.title}: {word} on case {self.passed + 1} of {self.total}"

    def __str__(self) -> str:
        lines = [self.headline()]
        if self.status in ("failed", "error", "timeout"):
            lines.append(f"   case: {self.case}")
            lines.extend("   " + line for line in self.message.splitlines())
        if self.hint and self.status != "passed":
            lines.append(f"   hint: {self.hint}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<CheckResult {self.exercise_id}: {self.status} {self.passed}/{self.total}>"

    def _repr_html_(self) -> str:
        colour = {"passed": "#1a7f37", "not attempted": "#6e7781"}.get(self.status, "#cf222e")
        body = ""
        if self.status != "passed":
            detail = str(self).split("\n", 1)[1] if "\n" in str(self) else ""
            if detail:
                body = f"<pre style='margin:4px 0 0 0;font-size:12px;white-space:pre-wrap'>{html.escape(detail)}</pre>"
        return (f"<div style='border-left:4px solid {colour};padding:4px 10px;margin:4px 0'>"
                f"<b style='color:{colour}'>{html.escape(self.headline())}</b>{body}</div>")

    def _ipython_display_(self) -> None:
        # `check()` already displayed this verdict; do not show it twice when it is a cell's value.
        if not self._shown:
            _display(self)


class ExerciseCheckFailed(AssertionError):
    """Raised by `check` in strict mode (`COURSE_STRICT=1`) when an exercise does not pass."""


def _display(result: CheckResult) -> None:
    result._shown = True
    try:
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is not None:
            # Both forms: HTML in Jupyter/Colab, the same verdict as text in consoles and nbconvert.
            display({"text/plain": str(result), "text/html": result._repr_html_()}, raw=True)
            return
    except ImportError:
        pass
    print(result)


# ----------------------------------------------------------------------------------------------
# Running a check: outputs from the learner's process, verdicts from a trusted one
# ----------------------------------------------------------------------------------------------
def clone_inputs(value: Any) -> Any:
    """A fresh copy of a case's inputs for every call, so one call cannot change the next one's inputs."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, (list, tuple)):
        return type(value)(clone_inputs(v) for v in value)
    if isinstance(value, dict):
        return {k: clone_inputs(v) for k, v in value.items()}
    return value


def _strict() -> bool:
    return os.environ.get("COURSE_STRICT", "0") == "1"


def _is_package_object(obj: Any) -> bool:
    """True for the course's own implementations (e.g. what `use()` or `reference()` returned)."""
    module = getattr(obj, "__module__", None) or ""
    return isinstance(module, str) and (module == "course_utils" or module.startswith("course_utils."))


def _fingerprint(obj: Any) -> Any:
    """What must stay the same for a cached verdict to still hold: the code, not only the object's id."""
    if isinstance(obj, type):
        return (obj, tuple((k, _fingerprint(v)) for k, v in vars(obj).items() if callable(v) or isinstance(v, (staticmethod, classmethod))))
    code = getattr(obj, "__code__", None)
    if code is not None:
        cells = tuple(id(c.cell_contents) if c is not None else 0 for c in (getattr(obj, "__closure__", None) or ())
                      if _has_contents(c))
        return (obj, code, getattr(obj, "__defaults__", None), cells)
    if isinstance(obj, staticmethod | classmethod):
        return _fingerprint(obj.__func__)
    return (obj,)


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False


_JUDGE = None


def _judge_client():
    global _JUDGE
    if _JUDGE is None:
        from .verdicts import JudgeClient

        _JUDGE = JudgeClient()
    return _JUDGE


def _grading_record(ex: Exercise, record: dict) -> None:
    """Under `course grade`: append the outputs (data, never a verdict) for the grader to judge itself."""
    folder = os.environ.get("COURSE_OUTPUTS_DIR")
    if folder:
        with open(os.path.join(folder, "records.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"exercise": ex.id, "record": record}) + "\n")


def _evaluate(ex: Exercise, obj: Any, *, graded: bool = False) -> CheckResult:
    """Run the cases in a child process, judge the outputs in the checker; under `course grade`, a check
    cell's outputs (not `use()`'s) also go to the grader, so a deleted check cell shows as missing."""
    from .learner_run import run_cases

    start = time.monotonic()
    if obj is None:
        record = {"status": "not attempted", "message": "Pass your function or class to check()."}
    elif _is_package_object(obj):
        record = {"status": "refused", "message": "this is the course's own implementation, not yours: "
                                                  "pass the function or class you wrote in this notebook."}
    else:
        cases = list(ex.make_cases())  # inputs only: expected values are never computed in this process
        record = run_cases(cases, obj, time_limit=ex.time_limit, forbid=ex.forbid, reference=ex.load_reference())
    if graded:
        _grading_record(ex, record)
    v = _judge_client().judge(ex.id, record)
    return CheckResult(ex.id, ex.title, v.get("status", "error"), int(v.get("passed", 0)), int(v.get("total", 0)),
                       str(v.get("message", "")), str(v.get("case", "")), str(v.get("hint", "")),
                       time.monotonic() - start)


_LAST: dict[str, tuple[CheckResult, Any]] = {}


def check(exercise_id: str, obj: Any = None, *, quiet: bool = False) -> CheckResult:
    """Run exercise `exercise_id`'s cases against `obj` and show a short verdict.

    Returns a `CheckResult` that is truthy only when every case passed. With `COURSE_STRICT=1` a
    result that is not a pass raises `ExerciseCheckFailed`.
    """
    ex = get_exercise(exercise_id)
    res = _evaluate(ex, obj, graded=True)
    _LAST[ex.id] = (res, _fingerprint(obj))
    if not quiet:
        _display(res)
    if _strict() and not res:
        raise ExerciseCheckFailed(str(res))
    return res


def use(exercise_id: str, obj: Any = None) -> Any:
    """Return `obj` if it passes exercise `exercise_id`, else the package's reference implementation.

    Reuses the verdict of the last `check` of the very same object and code, so nothing runs twice; a
    function redefined or changed since its check is checked again.
    """
    ex = get_exercise(exercise_id)
    cached = _LAST.get(ex.id)
    if cached is not None and obj is not None and cached[1] == _fingerprint(obj):
        res = cached[0]
    else:
        res = _evaluate(ex, obj)
        _LAST[ex.id] = (res, _fingerprint(obj))
        if _strict() and not res:
            raise ExerciseCheckFailed(str(res))
    if res:
        return obj
    print(f"↪ {ex.id} {ex.title}: {res.status}; continuing with the reference `{ex.reference.replace(':', '.')}`.")
    return ex.load_reference()
