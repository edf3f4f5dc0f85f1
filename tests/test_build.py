"""The notebook build: placeholders, instructor cells, stripping, badge/setup stamping, --check."""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from course_utils import REPO_URL
from course_utils.tools.build import build

ROOT = Path(__file__).resolve().parent.parent


def make_repo(tmp_path: Path) -> Path:
    (tmp_path / "pyproject.toml").write_text("")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Toy notebook\n\nGoals."),
        nbformat.v4.new_code_cell("def f(x):\n    # BEGIN SOLUTION: return twice x\n    y = 2 * x\n    return y\n    # END SOLUTION"),
        nbformat.v4.new_code_cell("print('for the instructor')", metadata={"tags": ["instructor"]}),
        nbformat.v4.new_markdown_cell("Why? <!-- BEGIN SOLUTION -->Because.<!-- END SOLUTION -->"),
        nbformat.v4.new_code_cell("f(2)", execution_count=3,
                                  outputs=[nbformat.v4.new_output("execute_result", data={"text/plain": "4"})]),
    ]
    path = tmp_path / "solutions" / "week1_toy" / "01_toy.ipynb"
    path.parent.mkdir(parents=True)
    nbformat.write(nb, path)
    return tmp_path


def test_build_generates_student_version(tmp_path):
    root = make_repo(tmp_path)
    report = build(root)
    assert report.written == ["solutions/week1_toy/01_toy.ipynb", "weeks/week1_toy/01_toy.ipynb"]
    sol = nbformat.read(root / "solutions/week1_toy/01_toy.ipynb", as_version=4)
    stu = nbformat.read(root / "weeks/week1_toy/01_toy.ipynb", as_version=4)
    # Solution: stripped, badge pointing at itself, setup cell second.
    assert "solutions/week1_toy/01_toy.ipynb" in sol.cells[0].source and REPO_URL.split("github.com/")[1] in sol.cells[0].source
    assert sol.cells[1].metadata["tags"] == ["setup"] and "course_utils.setup" in sol.cells[1].source
    assert all(c.get("outputs", []) == [] and c.get("execution_count") is None for c in sol.cells if c.cell_type == "code")
    # Student: placeholder, instructor cell gone, written answer blanked, badge pointing at weeks/.
    assert "weeks/week1_toy/01_toy.ipynb" in stu.cells[0].source
    code = stu.cells[2].source
    assert "raise NotImplementedError('return twice x')" in code and "2 * x" not in code and "# TODO: return twice x" in code
    assert not any("instructor" in c.source for c in stu.cells)
    assert "Because" not in stu.cells[3].source and "*Your answer here.*" in stu.cells[3].source


def test_placeholder_runs_and_raises(tmp_path):
    root = make_repo(tmp_path)
    build(root)
    stu = nbformat.read(root / "weeks/week1_toy/01_toy.ipynb", as_version=4)
    namespace = {}
    exec(stu.cells[2].source, namespace)
    with pytest.raises(NotImplementedError, match="return twice x"):
        namespace["f"](1)


def test_build_is_idempotent_and_check_detects_staleness(tmp_path):
    root = make_repo(tmp_path)
    build(root)
    assert not build(root, check=True).stale
    path = root / "solutions/week1_toy/01_toy.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells[4].source = "Why not? <!-- BEGIN SOLUTION -->Because.<!-- END SOLUTION -->"
    nbformat.write(nb, path)
    assert build(root, check=True).written == ["weeks/week1_toy/01_toy.ipynb"]  # the student copy is now stale
    build(root)
    student = root / "weeks/week1_toy/01_toy.ipynb"
    student.write_text(student.read_text().replace("Why not?", "Edited by hand"))
    hand = build(root, check=True)  # stale, but kept: a hand edit is someone's work
    assert hand.stale and hand.kept == ["weeks/week1_toy/01_toy.ipynb"] and hand.written == []
    build(root, force=True)
    orphan = nbformat.v4.new_notebook()
    nbformat.write(orphan, root / "weeks/week1_toy/99_orphan.ipynb")
    build(root)
    assert not (root / "weeks/week1_toy/99_orphan.ipynb").exists()  # a generated file without a source goes



def test_unmatched_marker_is_an_error(tmp_path):
    root = make_repo(tmp_path)
    path = root / "solutions/week1_toy/01_toy.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].source = "# BEGIN SOLUTION: oops\nx = 1"
    nbformat.write(nb, path)
    with pytest.raises(ValueError, match="unmatched"):
        build(root)


def test_repository_is_built():
    """weeks/ and the solutions are exactly what `course build` produces (what `course build --check` says)."""
    result = subprocess.run([sys.executable, "-m", "course_utils", "build", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_notebook_has_title_goals_and_checks_that_exist():
    from course_utils import list_exercises
    known = set(list_exercises())
    for path in sorted((ROOT / "solutions").glob("week*/*.ipynb")):
        nb = json.loads(path.read_text())
        first = "".join(nb["cells"][0]["source"])
        assert first.startswith("# "), path
        assert "goal" in first.lower() or "you will" in first.lower(), f"{path}: no learning goals in the first cell"
        source = "\n".join("".join(c["source"]) for c in nb["cells"])
        import re
        for exercise_id in re.findall(r"""check\(\s*["'](\d+\.\d+)""", source):
            assert exercise_id in known, f"{path} checks unknown exercise {exercise_id}"


def _run_in_jupyter(path: Path) -> None:
    """What a learner's autosave does: the same notebook, now with outputs."""
    nb = nbformat.read(path, as_version=4)
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", text="my work\n")]
    code.execution_count = 1
    nbformat.write(nb, path)


def test_build_never_overwrites_a_notebook_a_learner_ran_in_weeks(tmp_path):
    root = make_repo(tmp_path)
    build(root)
    student = root / "weeks/week1_toy/01_toy.ipynb"
    _run_in_jupyter(student)
    mine = student.read_bytes()
    src = root / "solutions/week1_toy/01_toy.ipynb"
    nb = nbformat.read(src, as_version=4)
    nb.cells[2].source = "print('changed by the maintainer')"
    nbformat.write(nb, src)
    check = build(root, check=True)
    assert check.stale and check.kept == ["weeks/week1_toy/01_toy.ipynb"]
    report = build(root)
    assert report.kept == ["weeks/week1_toy/01_toy.ipynb"] and student.read_bytes() == mine
    forced = build(root, force=True)
    assert len(forced.backups) == 1 and (root / forced.backups[0]).read_bytes() == mine
    assert "changed by the maintainer" in student.read_text() and not build(root, check=True).stale


def test_work_copies_are_personal_and_refreshable(tmp_path):
    from course_utils.tools.build import work_copies

    root = make_repo(tmp_path)
    build(root)
    assert work_copies(root) == ["copied  weeks/week1_toy/01_toy.ipynb -> work/week1_toy/01_toy.ipynb"]
    mine = root / "work/week1_toy/01_toy.ipynb"
    _run_in_jupyter(mine)
    saved = mine.read_bytes()
    assert work_copies(root) == [] and mine.read_bytes() == saved  # never overwritten
    assert not build(root, check=True).stale  # the build and its check ignore work/
    messages = work_copies(root, ["week1_toy/01_toy.ipynb"])
    backup = next(root.glob("work/week1_toy/01_toy.backup-*.ipynb"))
    assert backup.read_bytes() == saved and len(messages) == 2 and mine.read_bytes() != saved
    with pytest.raises(FileNotFoundError, match="known"):
        work_copies(root, ["week9/nope.ipynb"])


def test_work_folder_is_ignored_by_git():
    out = subprocess.run(["git", "check-ignore", "work/week1/x.ipynb"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
