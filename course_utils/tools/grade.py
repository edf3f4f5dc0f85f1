"""Grading: execute a folder of submitted student notebooks and tabulate every exercise's verdict.

Layout of DIR: either `DIR/<student>/<notebook>.ipynb` (one folder per student) or
`DIR/<student>__<notebook>.ipynb` / `DIR/<anything>.ipynb` (one file per submission). Each notebook
runs in its own process and kernel with a time limit; check() verdicts are collected through
`COURSE_RESULTS_FILE`. Submissions are only read, never modified.
"""
from __future__ import annotations

import csv
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from ..exercises import STATUSES, list_exercises
from .execute import run_notebook

_CHECK_CALL = re.compile(r"""\bcheck\(\s*["'](\d+\.\d+)["']""")
MISSING = "missing"  # the exercise's check never ran (cell deleted, or execution stopped before it)


@dataclass
class Submission:
    student: str
    notebook: str  # file name, e.g. 02_autograd_engine.ipynb
    path: Path
    run_status: str = ""
    run_error: str = ""
    seconds: float = 0.0
    expected: list[str] = field(default_factory=list)  # exercise ids this notebook should check
    verdicts: dict[str, dict] = field(default_factory=dict)  # id -> last check result

    @property
    def score(self) -> tuple[int, int]:
        passed = sum(1 for i in self.expected if self.verdicts.get(i, {}).get("status") == "passed")
        return passed, len(self.expected)


def find_submissions(folder: Path) -> list[Submission]:
    """Every notebook under `folder`, with the student name taken from its folder or file name."""
    subs = []
    for path in sorted(folder.rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        rel = path.relative_to(folder)
        if len(rel.parts) > 1:
            student, notebook = rel.parts[0], path.name
        elif "__" in path.stem:
            student, _, rest = path.stem.partition("__")
            notebook = rest + ".ipynb"
        else:
            student, notebook = path.stem, path.name
        subs.append(Submission(student, notebook, path))
    return subs


def _solution_for(notebook: str, root: Path | None) -> Path | None:
    if root is None or not (root / "solutions").is_dir():
        return None
    for sol in (root / "solutions").glob("week*/*.ipynb"):
        if notebook == sol.name or notebook.endswith("_" + sol.name) or notebook.endswith("-" + sol.name):
            return sol
    return None


def expected_exercises(sub: Submission, root: Path | None) -> list[str]:
    """Exercises checked by the matching solution notebook (else by the submission's own source)."""
    source = _solution_for(sub.notebook, root) or sub.path
    try:
        nb = nbformat.read(source, as_version=4)
        ids = {m for c in nb.cells if c.cell_type == "code" for m in _CHECK_CALL.findall(c.source)}
    except Exception:  # noqa: BLE001 - an unreadable submission is reported by the run itself
        ids = set()
    known = set(list_exercises())
    return [i for i in list_exercises() if i in ids & known]


def grade_one(sub: Submission, *, root: Path | None, profile: str, timeout: float, cell_timeout: float) -> Submission:
    sub.expected = expected_exercises(sub, root)
    with tempfile.TemporaryDirectory(prefix="course-grade-") as tmp:
        results = Path(tmp) / "results.jsonl"
        results.touch()
        env = {"COURSE_PROFILE": profile, "COURSE_RESULTS_FILE": str(results), "COURSE_STRICT": "0"}
        outcome = run_notebook(sub.path, env=env, timeout=timeout, cell_timeout=cell_timeout, allow_errors=True)
        for line in results.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            sub.verdicts[record["exercise"]] = record  # duplicated cells: the last verdict counts
    sub.run_status, sub.run_error, sub.seconds = outcome.status, outcome.error, outcome.seconds
    for extra in sorted(set(sub.verdicts) - set(sub.expected)):
        sub.expected.append(extra)
    return sub


def grade(folder: Path, out: Path, *, root: Path | None = None, profile: str = "smoke", timeout: float = 600,
          cell_timeout: float = 120, progress=print) -> list[Submission]:
    """Grade every submission in `folder`; write `grades.csv`, `grades_long.csv` and `summary.md` to `out`."""
    folder, out = Path(folder), Path(out)
    subs = find_submissions(folder)
    if not subs:
        raise FileNotFoundError(f"No .ipynb files under {folder}.")
    out.mkdir(parents=True, exist_ok=True)
    for n, sub in enumerate(subs, start=1):
        progress(f"[{n}/{len(subs)}] {sub.student} / {sub.notebook} ...")
        grade_one(sub, root=root, profile=profile, timeout=timeout, cell_timeout=cell_timeout)
        passed, total = sub.score
        progress(f"    {sub.run_status}: {passed}/{total} exercises passed ({sub.seconds:.0f} s)"
                 + (f" — {sub.run_error}" if sub.run_error else ""))
    write_reports(subs, out)
    return subs


def status_of(sub: Submission, exercise_id: str) -> str:
    return sub.verdicts.get(exercise_id, {}).get("status", MISSING)


def write_reports(subs: list[Submission], out: Path) -> None:
    ids = [i for i in list_exercises() if any(i in s.expected for s in subs)]
    with open(out / "grades.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "notebook", "run", "passed", "total", *ids])
        for s in subs:
            passed, total = s.score
            writer.writerow([s.student, s.notebook, s.run_status, passed, total,
                             *[status_of(s, i) if i in s.expected else "" for i in ids]])
    with open(out / "grades_long.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "notebook", "exercise", "status", "cases_passed", "cases_total", "message"])
        for s in subs:
            for i in s.expected:
                v = s.verdicts.get(i, {})
                writer.writerow([s.student, s.notebook, i, status_of(s, i), v.get("passed", ""), v.get("total", ""),
                                 v.get("message", "").splitlines()[0] if v.get("message") else ""])
    symbol = {"passed": "✅", "failed": "❌", "error": "💥", "timeout": "⏱", "not attempted": "⬜", MISSING: "—"}
    lines = ["# Grades", "", "Legend: " + ", ".join(f"{symbol[k]} {k}" for k in (*STATUSES, MISSING)), "",
             "| student | notebook | run | score | " + " | ".join(ids) + " |",
             "|---|---|---|---|" + "---|" * len(ids)]
    for s in subs:
        passed, total = s.score
        cells = [symbol[status_of(s, i)] if i in s.expected else "" for i in ids]
        lines.append(f"| {s.student} | {s.notebook} | {s.run_status} | {passed}/{total} | " + " | ".join(cells) + " |")
    problems = [s for s in subs if s.run_error]
    if problems:
        lines += ["", "## Execution problems", ""]
        lines += [f"- **{s.student} / {s.notebook}** ({s.run_status}): {s.run_error}" for s in problems]
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
