"""Every registered exercise is proven by tests: reference passes, placeholder and >= 2 wrong versions fail."""
import importlib
from pathlib import Path

from course_utils import list_exercises, reference

TESTS = Path(__file__).parent


def wrong_tables() -> dict[str, list]:
    tables: dict[str, list] = {}
    for path in sorted(TESTS.glob("test_week*.py")):
        module = importlib.import_module(path.stem)
        for exercise_id, wrongs in getattr(module, "WRONG_IMPLEMENTATIONS", {}).items():
            tables.setdefault(exercise_id, []).extend(wrongs)
    return tables


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
