"""Every registered exercise is proven by tests: reference passes, placeholder and >= 2 wrong versions fail."""
import importlib
from pathlib import Path

import pytest
from checkkit import assert_check_contract, placeholder

from course_utils import check, list_exercises, reference

TESTS = Path(__file__).parent


def _week_modules():
    return [importlib.import_module(path.stem) for path in sorted(TESTS.glob("test_week*.py"))]


def wrong_tables() -> dict[str, list]:
    """WRONG_IMPLEMENTATIONS of every tests/test_weekN.py, merged: exercise id -> wrong versions."""
    tables: dict[str, list] = {}
    for module in _week_modules():
        for exercise_id, wrongs in getattr(module, "WRONG_IMPLEMENTATIONS", {}).items():
            tables.setdefault(exercise_id, []).extend(wrongs)
    return tables


def correct_alternatives() -> dict[str, list]:
    """CORRECT_ALTERNATIVES of the week modules: correct versions written differently from the reference."""
    tables: dict[str, list] = {}
    for module in _week_modules():
        for exercise_id, alts in getattr(module, "CORRECT_ALTERNATIVES", {}).items():
            tables.setdefault(exercise_id, []).extend(alts)
    return tables


def placeholders() -> dict:
    """PLACEHOLDERS of the week modules: class exercises need a placeholder class, not a function."""
    return {k: v for module in _week_modules() for k, v in getattr(module, "PLACEHOLDERS", {}).items()}


@pytest.mark.parametrize("exercise_id", list_exercises())
def test_check_contract(exercise_id):
    """The reference passes, the placeholder is 'not attempted', every wrong implementation fails."""
    assert_check_contract(exercise_id, wrong_tables().get(exercise_id, []),
                          placeholders().get(exercise_id, placeholder))


@pytest.mark.parametrize("exercise_id", list_exercises())
def test_correct_alternatives_pass(exercise_id):
    """A check must not reject a correct answer that is written differently from the reference."""
    alts = correct_alternatives().get(exercise_id, [])
    assert len(alts) >= 2, f"{exercise_id}: add at least two correct alternative formulations to CORRECT_ALTERNATIVES"
    for alt in alts:
        res = check(exercise_id, alt, quiet=True)
        assert res, f"{exercise_id} rejected the correct alternative {getattr(alt, '__name__', alt)!r}:\n{res}"


def test_every_exercise_has_wrong_implementations_under_test():
    tables = wrong_tables()
    missing = [i for i in list_exercises() if len(tables.get(i, [])) < 2]
    assert not missing, f"exercises without >= 2 wrong implementations in tests/test_week*.py: {missing}"


def test_every_exercise_has_an_importable_reference_and_a_title():
    from course_utils.exercises import get_exercise
    for exercise_id in list_exercises():
        assert reference(exercise_id) is not None
        assert get_exercise(exercise_id).title


def test_ids_are_week_dot_number_and_contiguous():
    by_week: dict[str, list[int]] = {}
    for exercise_id in list_exercises():
        week, n = exercise_id.split(".")
        by_week.setdefault(week, []).append(int(n))
    for week, numbers in by_week.items():
        assert numbers == list(range(1, len(numbers) + 1)), f"week {week} exercise ids {numbers} are not 1..n"


@pytest.mark.parametrize("exercise_id", list_exercises())
def test_expected_values_are_never_computed_in_the_learners_process(exercise_id):
    """Each case gives `expected` as a thunk (or an independent `reference`): the checker process computes it,
    so learner code cannot read it from the call stack; every case has a name for the verdict."""
    from course_utils.exercises import get_exercise
    for case in get_exercise(exercise_id).make_cases():
        assert case.reference is not None or callable(case.expected), f"{exercise_id}: {case.name} has an eager expected value"
        assert case.name
