"""Shared assertions for exercise-check tests: every check passes the reference, reports a placeholder
as not attempted, and fails on each plausible wrong implementation."""
from __future__ import annotations

import types
from typing import Any, Callable

from course_utils.exercises import CheckResult, check, reference


def placeholder(*args: Any, **kwargs: Any) -> Any:
    """What the student notebook ships: the build's placeholder raises NotImplementedError."""
    raise NotImplementedError("complete this exercise")


def as_learner_copy(obj: Any) -> Any:
    """The reference as if a learner had typed it: a new function (or subclass) outside the package, since
    `check` refuses the package's own objects and blocks the exercise's reference while it runs."""
    if isinstance(obj, type):
        return type(obj.__name__, (obj,), {"__module__": __name__})
    copy = types.FunctionType(obj.__code__, obj.__globals__, obj.__name__, obj.__defaults__, obj.__closure__)
    copy.__kwdefaults__ = obj.__kwdefaults__
    copy.__module__ = __name__
    return copy


def run_check(exercise_id: str, obj: Any) -> CheckResult:
    return check(exercise_id, obj, quiet=True)


def assert_check_contract(exercise_id: str, wrongs: list[Callable[[], Any]] | list[Any],
                          placeholder_obj: Any = placeholder) -> None:
    """The reference passes, the placeholder is 'not attempted', and every wrong version fails."""
    ok = run_check(exercise_id, as_learner_copy(reference(exercise_id)))
    assert ok, f"reference does not pass its own check:\n{ok}"
    assert ok.total >= 3, f"{exercise_id} has only {ok.total} cases; use several randomized and edge cases"
    todo = run_check(exercise_id, placeholder_obj)
    assert todo.status == "not attempted", str(todo)
    assert len(wrongs) >= 2, f"{exercise_id}: need at least two plausible wrong implementations"
    for wrong in wrongs:
        res = run_check(exercise_id, wrong)
        assert not res, f"{exercise_id} passed a wrong implementation {getattr(wrong, '__name__', wrong)!r}"
        assert res.status in ("failed", "error", "timeout"), str(res)
