"""Grading: execute a folder of submitted student notebooks, each in a sandbox, and judge every exercise.

Layout of DIR: either `DIR/<student>/<notebook>.ipynb` (one folder per student) or
`DIR/<student>__<notebook>.ipynb` / `DIR/<anything>.ipynb` (one file per submission).

Submissions are untrusted code. Each one runs on its own throwaway copy inside the sandbox
(`tools/sandbox.py`), where `check()` only writes the learner's *outputs* (as data) to the sandbox's
output folder. After the sandbox has ended, this process, which never runs learner code, computes the
expected values itself (with a salt drawn for this grading run, so the inputs differ from those seen in
class), counts the cases and compares. Nothing a submission prints, writes or reports is taken as a
verdict. Submissions are only read, never modified, and a hash proves it.
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import json
import os
import queue
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from ..exercises import STATUSES, list_exercises
from ..verdicts import MAX_RECORD_BYTES, judge
from . import sandbox
from .execute import parse_outcome, run_notebook

_CHECK_CALL = re.compile(r"""\bcheck\(\s*["'](\d+\.\d+)["']""")
MISSING = "missing"  # the exercise's check never ran (cell deleted, or execution stopped before it)

# Code a learner's notebook has no reason to contain; its presence is reported for the instructor to read.
SUSPICIOUS = {
    r"course_utils\.(exercises|verdicts|learner_run|checks|tools)\b|_REGISTRY|_JUDGE|_LAST\b": "touches the check machinery",
    r"\breference\s*\(|load_reference": "calls the course's reference implementations",
    r"COURSE_[A-Z_]+": "reads or sets the course's environment variables",
    r"records\.jsonl|/sandbox/": "touches the grader's files",
    r"TorchFunctionMode|__torch_function__|__torch_dispatch__": "overrides torch's dispatch",
    r"\bos\.fork\b|\bsubprocess\b|\bos\.system\b|\bctypes\b|\bos\.kill": "starts or signals processes",
    r"sys\._getframe|inspect\.stack|\.f_back|\.f_locals|gc\.get_objects": "inspects the call stack or the heap",
    r"__code__\s*=": "swaps a function's code",
}


@dataclass
class Submission:
    student: str
    notebook: str  # file name, e.g. 02_autograd_engine.ipynb
    path: Path
    run_status: str = ""
    run_error: str = ""
    seconds: float = 0.0
    expected: list[str] = field(default_factory=list)  # exercise ids this notebook should check
    verdicts: dict[str, dict] = field(default_factory=dict)  # id -> the grader's verdict
    flags: list[str] = field(default_factory=list)  # suspicious code found in the submission, for a human
    sha256: str = ""

    @property
    def score(self) -> tuple[int, int]:
        passed = sum(1 for i in self.expected if self.verdicts.get(i, {}).get("status") == "passed")
        return passed, len(self.expected)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_submissions(folder: Path) -> list[Submission]:
    """Every notebook under `folder`, with the student name taken from its folder or file name."""
    subs = []
    for path in sorted(folder.rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts or path.is_symlink():
            continue
        rel = path.relative_to(folder)
        if rel.parts[0] == "grades":
            continue
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
    return [i for i in list_exercises() if i in ids]


def scan(path: Path) -> list[str]:
    """Suspicious code in a submission's code cells (a reason for a human to look, not a verdict)."""
    from .build import setup_source

    try:
        nb = nbformat.read(path, as_version=4)
        setup = setup_source().strip()  # the course's own first cell (it pip-installs the package in Colab)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code" and c.source.strip() != setup)
    except Exception:  # noqa: BLE001
        return ["the notebook could not be read"]
    return [why for pattern, why in SUSPICIOUS.items() if re.search(pattern, code)]


def read_records(path: Path) -> dict[str, dict]:
    """The last record per exercise from a sandbox's output file (untrusted data: bounded and validated)."""
    records: dict[str, dict] = {}
    if not path.is_file() or path.is_symlink():
        return records
    with open(path, "rb") as f:
        data = f.read(MAX_RECORD_BYTES * 4 + 1)
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("exercise"), str) and isinstance(row.get("record"), dict):
            records[row["exercise"]] = row["record"]  # duplicated check cells: the last one counts
    return records


def _judge_all(sub: Submission, records: dict[str, dict]) -> None:
    known = set(list_exercises())
    for exercise_id in sorted(set(sub.expected) | (set(records) & known)):
        if exercise_id not in records:
            continue
        try:
            sub.verdicts[exercise_id] = judge(exercise_id, records[exercise_id])
        except Exception as exc:  # noqa: BLE001 - a malformed record is that submission's problem only
            sub.verdicts[exercise_id] = {"status": "error", "message": f"unreadable record ({type(exc).__name__})"}
        if exercise_id not in sub.expected:
            sub.expected.append(exercise_id)


def grade_one(sub: Submission, *, root: Path | None, profile: str, timeout: float, cell_timeout: float,
              salt: int, limits: sandbox.Limits, slot: int = 0, bwrap: str | None = None, threads: int = 1) -> Submission:
    sub.expected = expected_exercises(sub, root)
    sub.sha256 = _sha256(sub.path)
    sub.flags = scan(sub.path)
    with tempfile.TemporaryDirectory(prefix="course-grade-") as tmp:
        tmp_path = Path(tmp)
        work, out = tmp_path / "work", tmp_path / "out"
        work.mkdir()
        out.mkdir()
        copy = work / "submission.ipynb"
        shutil.copyfile(sub.path, copy)  # its own throwaway copy; the original is never opened for writing
        env = {"COURSE_PROFILE": profile, "COURSE_STRICT": "0", "COURSE_CHECK_SALT": str(salt),
               "OMP_NUM_THREADS": str(threads)}
        if bwrap is not None:
            env["COURSE_OUTPUTS_DIR"] = sandbox.INSIDE_OUT
            cmd = ["python", "-m", "course_utils.tools.execute", f"{sandbox.INSIDE_WORK}/submission.ipynb",
                   "--cell-timeout", str(cell_timeout), "--allow-errors"]
            result = sandbox.run(cmd, work=work, out=out, env=sandbox.base_env(env), slot=slot, exe=bwrap,
                                 limits=sandbox.Limits(**{**limits.__dict__, "seconds": timeout}))
            outcome = parse_outcome(result.stdout, result.stderr, result.seconds)
            if result.timed_out:
                outcome.status, outcome.error = "timeout", f"notebook exceeded {timeout:g} s"
        else:  # --no-sandbox: the instructor accepted running submissions unisolated
            env["COURSE_OUTPUTS_DIR"] = str(out)
            outcome = run_notebook(copy, env=env, timeout=timeout, cell_timeout=cell_timeout, allow_errors=True)
        _judge_all(sub, read_records(out / "records.jsonl"))
    sub.run_status, sub.run_error, sub.seconds = outcome.status, outcome.error, outcome.seconds
    if _sha256(sub.path) != sub.sha256:
        sub.flags.append("the submission file changed during grading")
    return sub


def grade(folder: Path, out: Path, *, root: Path | None = None, profile: str = "smoke", timeout: float = 600,
          cell_timeout: float = 120, jobs: int = 1, allow_no_sandbox: bool = False,
          limits: sandbox.Limits | None = None, progress: bool = True) -> list[Submission]:
    """Grade every submission in `folder` in parallel sandboxes; write `grades.csv`, `grades_long.csv` and
    `summary.md` to `out` (which must not be inside any submission's reach: it never is mounted)."""
    folder, out = Path(folder).resolve(), Path(out).resolve()
    subs = find_submissions(folder)
    if not subs:
        raise FileNotFoundError(f"No .ipynb files under {folder}.")
    bwrap = sandbox.bwrap_path()
    if bwrap is None and not allow_no_sandbox:
        raise RuntimeError(f"refusing to run untrusted notebooks without a sandbox: {sandbox.unavailable_reason()}. "
                           "Pass --no-sandbox only for submissions you trust.")
    salt = secrets.randbelow(2**31)
    previous = os.environ.get("COURSE_CHECK_SALT")
    os.environ["COURSE_CHECK_SALT"] = str(salt)  # this process computes the expected values with the same salt
    try:
        return _grade_all(subs, out, root=root, profile=profile, timeout=timeout, cell_timeout=cell_timeout,
                          jobs=jobs, limits=limits or sandbox.Limits(), salt=salt, bwrap=bwrap, progress=progress)
    finally:
        if previous is None:
            os.environ.pop("COURSE_CHECK_SALT", None)
        else:
            os.environ["COURSE_CHECK_SALT"] = previous


def _grade_all(subs: list[Submission], out: Path, *, root, profile, timeout, cell_timeout, jobs, limits, salt, bwrap,
               progress) -> list[Submission]:
    out.mkdir(parents=True, exist_ok=True)
    jobs = max(1, jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    slots: queue.Queue[int] = queue.Queue()
    for k in range(jobs):
        slots.put(k)

    def work(sub: Submission) -> Submission:
        slot = slots.get()
        try:
            return grade_one(sub, root=root, profile=profile, timeout=timeout, cell_timeout=cell_timeout, salt=salt,
                             limits=limits, slot=slot, bwrap=bwrap, threads=threads)
        finally:
            slots.put(slot)

    from tqdm.auto import tqdm

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(work, s) for s in subs]
        bar = tqdm(cf.as_completed(futures), total=len(futures), desc="grading", unit="notebook", disable=not progress)
        for future in bar:
            sub = future.result()
            passed, total = sub.score
            bar.set_postfix_str(f"{sub.student}: {passed}/{total}")
    elapsed = time.perf_counter() - start
    write_reports(subs, out, elapsed=elapsed, jobs=jobs, sandboxed=bwrap is not None)
    return subs


def status_of(sub: Submission, exercise_id: str) -> str:
    return sub.verdicts.get(exercise_id, {}).get("status", MISSING)


def estimate(elapsed: float, n: int, jobs: int, target: int = 300) -> str:
    per = elapsed / max(n, 1)
    return (f"{n} notebooks in {elapsed:.0f} s with -j {jobs} ({per:.1f} s each on average): "
            f"{target} submissions would take about {per * target / 60:.0f} minutes at the same setting.")


def write_reports(subs: list[Submission], out: Path, *, elapsed: float = 0.0, jobs: int = 1,
                  sandboxed: bool = True) -> None:
    ids = [i for i in list_exercises() if any(i in s.expected for s in subs)]
    with open(out / "grades.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "notebook", "run", "passed", "total", *ids, "flags"])
        for s in subs:
            passed, total = s.score
            writer.writerow([s.student, s.notebook, s.run_status, passed, total,
                             *[status_of(s, i) if i in s.expected else "" for i in ids], "; ".join(s.flags)])
    with open(out / "grades_long.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "notebook", "exercise", "status", "cases_passed", "cases_total", "message"])
        for s in subs:
            for i in s.expected:
                v = s.verdicts.get(i, {})
                writer.writerow([s.student, s.notebook, i, status_of(s, i), v.get("passed", ""), v.get("total", ""),
                                 str(v.get("message", "")).splitlines()[0][:300] if v.get("message") else ""])
    symbol = {"passed": "✅", "failed": "❌", "error": "💥", "timeout": "⏱", "not attempted": "⬜", MISSING: "—"}
    lines = ["# Grades", "",
             ("Every notebook ran in a sandbox; verdicts were computed by the grader from the outputs, "
              "with inputs drawn for this run." if sandboxed else
              "**Ran WITHOUT a sandbox (--no-sandbox): only for submissions you trust.**"),
             "", estimate(elapsed, len(subs), jobs), "",
             "Legend: " + ", ".join(f"{symbol[k]} {k}" for k in (*STATUSES, MISSING)), "",
             "| student | notebook | run | score | " + " | ".join(ids) + " |",
             "|---|---|---|---|" + "---|" * len(ids)]
    for s in subs:
        passed, total = s.score
        cells = [symbol.get(status_of(s, i), "?") if i in s.expected else "" for i in ids]
        lines.append(f"| {s.student} | {s.notebook} | {s.run_status} | {passed}/{total} | " + " | ".join(cells) + " |")
    problems = [s for s in subs if s.run_error]
    if problems:
        lines += ["", "## Execution problems", ""]
        lines += [f"- **{s.student} / {s.notebook}** ({s.run_status}): {s.run_error}" for s in problems]
    flagged = [s for s in subs if s.flags]
    if flagged:
        lines += ["", "## Worth a look (code a course notebook has no reason to contain)", ""]
        lines += [f"- **{s.student} / {s.notebook}**: {'; '.join(s.flags)}" for s in flagged]
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
