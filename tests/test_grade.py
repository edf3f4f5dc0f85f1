"""`course grade` on sample submissions made from a real week-1 notebook: honest ones (complete, partial,
raising, looping forever, cells deleted and duplicated) are graded as they deserve, and hostile ones
(forging results, monkeypatching, using the reference, touching other submissions or the package,
background processes, a fork bomb, a memory hog, 10 MB of output, a swallowed time limit) earn nothing.
No submission file changes and no process survives."""
import csv
import hashlib
import re
import subprocess
import time
from pathlib import Path

import nbformat
import pytest

from course_utils.tools.build import INSTRUCTOR_TAG
from course_utils.tools import sandbox
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


ATTACKS = {
    # each is inserted right after the setup cell of a student notebook whose exercises are NOT done
    "forges_records": "import json, os\n"
        "for i in {ids!r}:\n"
        "    for path in (os.environ.get('COURSE_OUTPUTS_DIR', '.') + '/records.jsonl', 'records.jsonl'):\n"
        "        open(path, 'a').write(json.dumps({{'exercise': i, 'status': 'passed', 'passed': 9, 'total': 9,\n"
        "            'record': {{'status': 'passed', 'cases': [{{'status': 'ok', 'output': 0}}] * 50}}}}) + '\\n')",
    "patches_checks": "import course_utils, course_utils.exercises as E, course_utils.verdicts as V, torch\n"
        "V.judge = lambda *a, **k: {{'status': 'passed', 'passed': 1, 'total': 1}}\n"
        "V.compare = lambda *a, **k: None\n"
        "torch.allclose = lambda *a, **k: True\n"
        "E._JUDGE = type('J', (), {{'judge': lambda self, i, r: {{'status': 'passed', 'passed': 1, 'total': 1}}}})()\n"
        "for i in {ids!r}:\n"
        "    course_utils.check(i, lambda *a, **k: None)",
    "uses_the_reference": "from course_utils import check, reference, use\n"
        "for i in {ids!r}:\n"
        "    ref = reference(i)\n"
        "    check(i, ref); check(i, use(i, None))\n"
        "    check(i, (lambda r: (lambda *a, **k: r(*a, **k)))(ref))",
    "touches_others": "import glob, os, shutil\n"
        "found = glob.glob('/sandbox/**', recursive=True) + glob.glob('/tmp/**', recursive=True)\n"
        "found += glob.glob({others!r} + '/**/*', recursive=True)\n"
        "print(found)\n"
        "for victim in glob.glob({others!r} + '/**/*.ipynb', recursive=True):\n"
        "    os.remove(victim)\n"
        "shutil.rmtree({others!r}, ignore_errors=True)",
    "edits_the_package": "import course_utils, pathlib\n"
        "for f in pathlib.Path(course_utils.__file__).parent.rglob('*.py'):\n"
        "    try:\n"
        "        f.write_text('raise SystemExit')\n"
        "    except OSError as e:\n"
        "        print('refused', e)",
    "background_forger": "import subprocess, os\n"
        "subprocess.Popen(['sh', '-c', 'while true; do for f in /sandbox/out/records.jsonl /tmp/*/out/records.jsonl; do "
        "echo x >> $f; done; sleep 0.2; done'], start_new_session=True)\n"
        "if os.fork() == 0:\n"
        "    os.setsid(); import time; time.sleep(600); os._exit(0)",
    "fork_bomb": "import os, time\n"
        "for _ in range(100000):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(600); os._exit(0)\n"
        "    except OSError:\n"
        "        break",
    "memory_hog": "import torch\nblocks = []\n"
        "try:\n"
        "    while True:\n"
        "        blocks.append(torch.empty(2**28))  # 1 GiB each, never touched: the limit is hit at once\n"
        "except (MemoryError, RuntimeError):\n"
        "    print('memory limit reached at', len(blocks), 'GiB')\n"
        "del blocks\n"
        "try:\n"
        "    big = bytearray(100 * 2**30)\n"
        "except MemoryError:\n"
        "    print('100 GiB refused')",
    "floods_output": "import os\nprint('x' * 10_000_000)\nos.write(1, b'y' * 10_000_000)",
    "swallows_the_time_limit": "import time\nfrom course_utils import check\n"
        "def sneaky(*args, **kwargs):\n"
        "    while True:\n"
        "        try:\n"
        "            time.sleep(0.01)\n"
        "        except:\n"
        "            pass\n"
        "for i in {ids!r}:\n"
        "    print(check(i, sneaky))",
}


def _running_sandbox_processes() -> list[str]:
    from course_utils.tools.sandbox import BASE_UID
    out = subprocess.run(["ps", "-eo", "uid=,pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split() and BASE_UID <= int(line.split()[0]) < BASE_UID + 64]


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    solution, student = _pair()
    subs = tmp_path_factory.mktemp("submissions")
    ids = sorted({m for c in solution.cells if c.cell_type == "code" for m in re.findall(r'check\("([0-9.]+)"', c.source)})

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
    for name, attack in ATTACKS.items():
        nb = nbformat.from_dict(student)
        nb.cells.insert(2, _code(attack.format(ids=ids, others=str(subs / "complete"))))
        save(name, nb)

    package = {p: p.read_bytes() for p in (ROOT / "course_utils").rglob("*.py")}
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in subs.rglob("*.ipynb")}
    out = tmp_path_factory.mktemp("grades")
    results = grade(subs, out, root=ROOT, profile="smoke", timeout=150, cell_timeout=20, jobs=2, progress=False)
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in subs.rglob("*.ipynb")}
    time.sleep(1)
    return {"subs": {s.student: s for s in results}, "out": out, "unchanged": before == after,
            "package_unchanged": not any(p.read_bytes() == b"raise SystemExit" for p in package),
            "survivors": _running_sandbox_processes()}


pytestmark = pytest.mark.skipif(sandbox.bwrap_path() is None, reason="bubblewrap is not available here")


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_no_attack_earns_a_pass(graded, attack):
    sub = graded["subs"][attack]
    passed, total = sub.score
    assert total >= 2 and passed == 0, (attack, sub.verdicts)


def test_no_process_survives_grading(graded):
    assert graded["survivors"] == []


def test_package_files_are_unchanged(graded):
    assert graded["package_unchanged"]


def test_suspicious_code_is_flagged(graded):
    subs = graded["subs"]
    assert any("machinery" in f for f in subs["patches_checks"].flags)
    assert any("reference" in f for f in subs["uses_the_reference"].flags)
    assert not subs["complete"].flags


def test_refuses_without_a_sandbox(tmp_path, monkeypatch):
    nbformat.write(nbformat.v4.new_notebook(), tmp_path / "a.ipynb")
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: None)
    with pytest.raises(RuntimeError, match="without a sandbox"):
        grade(tmp_path, tmp_path / "grades", progress=False)


def test_submissions_are_not_modified(graded):
    assert graded["unchanged"]


def test_complete_submission_passes_everything(graded):
    sub = graded["subs"]["complete"]
    assert sub.run_status == "ok"
    passed, total = sub.score
    assert total >= 2 and passed == total


def test_partial_submission(graded):
    sub = graded["subs"]["partial"]
    statuses = [sub.verdicts.get(i, {}).get("status") for i in sub.expected]
    assert statuses[-1] == "passed" and set(statuses[:-1]) == {"not attempted"}
    assert sub.run_status == "ok"  # a fresh student notebook runs top to bottom via reference fallbacks


def test_raising_submission_keeps_grading_later_cells(graded):
    sub = graded["subs"]["raises"]
    assert sub.run_status == "error" and "a bug in my own cell" in sub.run_error
    assert all(sub.verdicts.get(i, {}).get("status") == "not attempted" for i in sub.expected)


def test_infinite_loop_is_cut_off(graded):
    sub = graded["subs"]["loops"]
    assert sub.run_status == "timeout"
    assert sub.verdicts[sub.expected[0]]["status"] == "passed"
    assert sub.expected[-1] not in sub.verdicts  # never reached: reported as missing


def test_deleted_and_duplicated_cells(graded):
    sub = graded["subs"]["edited"]
    assert sub.run_status == "ok"
    assert sub.expected[-1] not in sub.verdicts  # deleted check: reported as missing, not as passed
    passed, total = sub.score
    assert passed == total - 1


def test_reports_are_written(graded):
    out = graded["out"]
    rows = list(csv.DictReader(open(out / "grades.csv")))
    assert {r["student"] for r in rows} == {"complete", "partial", "raises", "loops", "edited", *ATTACKS}
    complete = next(r for r in rows if r["student"] == "complete")
    assert complete["passed"] == complete["total"]
    summary = (out / "summary.md").read_text()
    assert "| complete |" in summary and "Execution problems" in summary and "timeout" in summary
    assert (out / "grades_long.csv").exists()
