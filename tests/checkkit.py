"""Shared assertions for exercise-check tests: every check passes the reference, reports a placeholder
as not attempted, and fails on each plausible wrong implementation."""
from __future__ import annotations

from typing import Any, Callable

from course_utils.exercises import CheckResult, check, reference


def placeholder(*args: Any, **kwargs: Any) -> Any:
    """What the student notebook ships: the build's placeholder raises NotImplementedError."""
    raise NotImplementedError("complete this exercise")


def run_check(exercise_id: str, obj: Any) -> CheckResult:
    return check(exercise_id, obj, quiet=True)


def assert_check_contract(exercise_id: str, wrongs: list[Callable[[], Any]] | list[Any],
                          placeholder_obj: Any = placeholder) -> None:
    """The reference passes, the placeholder is 'not attempted', and every wrong version fails."""
    ok = run_check(exercise_id, reference(exercise_id))
    assert ok, f"reference does not pass its own check:\n{ok}"
    assert ok.total >= 3, f"{exercise_id} has only {ok.total} cases; use several randomized and edge cases"
    todo = run_check(exercise_id, placeholder_obj)
    assert todo.status == "not attempted", str(todo)
    assert len(wrongs) >= 2, f"{exercise_id}: need at least two plausible wrong implementations"
    for wrong in wrongs:
        res = run_check(exercise_id, wrong)
        assert not res, f"{exercise_id} passed a wrong implementation {getattr(wrong, '__name__', wrong)!r}"
        assert res.status in ("failed", "error", "timeout"), str(res)
