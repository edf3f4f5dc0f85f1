"""`course grade` on sample submissions made from a real week-1 notebook: complete, partial, raising,
looping forever, and with cells deleted and duplicated. The submissions must never be modified."""
import csv
import hashlib
from pathlib import Path

import nbformat
import pytest

from course_utils.tools.build import INSTRUCTOR_TAG
from course_utils.tools.grade import grade

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "02_autograd_engine.ipynb"  # quick in the smoke profile, with two exercises


def _pair():
    sol = next((ROOT / "solutions").glob(f"week1_*/{NOTEBOOK}"))
    stu = ROOT / "weeks" / sol.parent.name / NOTEBOOK
    solution = nbformat.read(sol, as_version=4)
    solution.cells = [c for c in solution.cells if INSTRUCTOR_TAG not in c.metadata.get("tags", [])]
    student = nbformat.read(stu, as_version=4)
    assert len(solution.cells) == len(student.cells)
    return solution, student


def _code(src):
    cell = nbformat.v4.new_code_cell(src)
    cell.pop("id", None)
    return cell


def _check_cells(nb):
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "check(\"" in c.source]


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    solution, student = _pair()
    subs = tmp_path_factory.mktemp("submissions")

    def save(name, nb):
        (subs / name).mkdir()
        nbformat.write(nb, subs / name / NOTEBOOK)

    save("complete", solution)
    partial = nbformat.from_dict(student)
    last = max(i for i, c in enumerate(student.cells) if "NotImplementedError" in c.source)
    partial.cells[last] = solution.cells[last]  # only the last exercise done
    save("partial", partial)
    raising = nbformat.from_dict(student)
    raising.cells.insert(2, _code("raise RuntimeError('a bug in my own cell')"))
    save("raises", raising)
    looping = nbformat.from_dict(solution)
    checks = _check_cells(looping)
    looping.cells.insert(checks[1], _code("while True:\n    pass"))
    save("loops", looping)
    edited = nbformat.from_dict(solution)
    checks = _check_cells(edited)
    edited.cells.insert(checks[0] + 1, edited.cells[checks[0]])  # duplicated check cell
    del edited.cells[_check_cells(edited)[-1]]  # the last check cell deleted
    save("edited", edited)

    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in subs.rglob("*.ipynb")}
    out = tmp_path_factory.mktemp("grades")
    results = grade(subs, out, root=ROOT, profile="smoke", timeout=240, cell_timeout=20, progress=lambda *_: None)
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in subs.rglob("*.ipynb")}
    return {s.student: s for s in results}, out, before == after, len(checks)


def test_submissions_are_not_modified(graded):
    assert graded[2]


def test_complete_submission_passes_everything(graded):
    sub = graded[0]["complete"]
    assert sub.run_status == "ok"
    passed, total = sub.score
    assert total >= 2 and passed == total


def test_partial_submission(graded):
    sub = graded[0]["partial"]
    statuses = [sub.verdicts.get(i, {}).get("status") for i in sub.expected]
    assert statuses[-1] == "passed" and set(statuses[:-1]) == {"not attempted"}
    assert sub.run_status == "ok"  # a fresh student notebook runs top to bottom via reference fallbacks


def test_raising_submission_keeps_grading_later_cells(graded):
    sub = graded[0]["raises"]
    assert sub.run_status == "error" and "a bug in my own cell" in sub.run_error
    assert all(sub.verdicts.get(i, {}).get("status") == "not attempted" for i in sub.expected)


def test_infinite_loop_is_cut_off(graded):
    sub = graded[0]["loops"]
    assert sub.run_status == "timeout"
    assert sub.verdicts[sub.expected[0]]["status"] == "passed"
    assert sub.expected[-1] not in sub.verdicts  # never reached: reported as missing


def test_deleted_and_duplicated_cells(graded):
    sub = graded[0]["edited"]
    assert sub.run_status == "ok"
    assert sub.expected[-1] not in sub.verdicts  # deleted check: reported as missing, not as passed
    passed, total = sub.score
    assert passed == total - 1


def test_reports_are_written(graded):
    out = graded[1]
    rows = list(csv.DictReader(open(out / "grades.csv")))
    assert {r["student"] for r in rows} == {"complete", "partial", "raises", "loops", "edited"}
    complete = next(r for r in rows if r["student"] == "complete")
    assert complete["passed"] == complete["total"]
    summary = (out / "summary.md").read_text()
    assert "| complete |" in summary and "Execution problems" in summary and "timeout" in summary
    assert (out / "grades_long.csv").exists()
