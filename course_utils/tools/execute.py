"""Run one notebook in its own process with a time limit, never modifying the file.

Shared by `course grade` (student submissions) and `course bench` (solution notebooks). The parent
starts `python -m course_utils.tools.execute` in a new process group so that a kernel stuck in an infinite
loop is killed with everything it started; the child executes the notebook with nbclient and prints
one JSON line with what happened.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunOutcome:
    status: str  # "ok", "error" (a cell raised), "timeout", or "crashed"
    seconds: float
    error: str = ""  # first error: cell number and exception line
    peak_rss_mb: float = 0.0  # peak resident memory of the kernel process


def run_notebook(path: Path, *, env: dict[str, str] | None = None, timeout: float = 600,
                 cell_timeout: float = 300, allow_errors: bool = False, save_to: Path | None = None) -> RunOutcome:
    """Execute notebook `path` in a fresh process and kernel; the file itself is only read. With `save_to`,
    the executed copy (with its outputs, also after an error) is written there."""
    path = Path(path).resolve()
    cmd = [sys.executable, "-m", "course_utils.tools.execute", str(path), "--cell-timeout", str(cell_timeout)]
    if allow_errors:
        cmd.append("--allow-errors")
    if save_to is not None:
        cmd += ["--save", str(Path(save_to).resolve())]
    full_env = {**os.environ, **(env or {})}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="course-run-") as workdir:
        proc = subprocess.Popen(cmd, cwd=workdir, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return RunOutcome("timeout", time.perf_counter() - start, f"notebook exceeded {timeout:g} s")
    return parse_outcome(out, err, time.perf_counter() - start)


def parse_outcome(out: str, err: str, seconds: float) -> RunOutcome:
    """Read the one JSON line `main` prints; anything else means the run crashed."""
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            try:
                info = json.loads(line)
                return RunOutcome(str(info["status"])[:20], seconds, str(info.get("error", ""))[:500],
                                  float(info.get("peak_rss_mb", 0.0)))
            except (ValueError, KeyError, TypeError):
                break
    return RunOutcome("crashed", seconds, ((err or "").strip().splitlines() or ["no output"])[-1][:500])


def _execute(path: Path, cell_timeout: float, allow_errors: bool, save_to: Path | None = None) -> dict:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=cell_timeout, kernel_name="python3", allow_errors=allow_errors,
                            resources={"metadata": {"path": os.getcwd()}})
    info: dict = {"status": "ok"}
    try:
        client.execute()
    except CellTimeoutError as exc:
        info = {"status": "timeout", "error": f"a cell ran longer than {cell_timeout:g} s ({str(exc).splitlines()[0]})"}
    except CellExecutionError as exc:
        info = {"status": "error", "error": _first_error(nb) or str(exc).strip().splitlines()[-1]}
    except DeadKernelError as exc:
        info = {"status": "crashed", "error": f"the kernel died: {exc}"}
    if info["status"] == "ok" and allow_errors:
        first = _first_error(nb)
        if first:
            info = {"status": "error", "error": first}
    info["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, save_to)
    return info


def _first_error(nb) -> str:
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    for number, cell in enumerate(code_cells, start=1):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"code cell {number}: {output.get('ename')}: {output.get('evalue')}"
    return ""


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Execute one notebook (internal helper of course grade/bench).")
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--cell-timeout", type=float, default=300)
    parser.add_argument("--allow-errors", action="store_true")
    parser.add_argument("--save", type=Path, help="write the executed notebook, with its outputs, to this path")
    args = parser.parse_args(argv)
    print(json.dumps(_execute(args.notebook, args.cell_timeout, args.allow_errors, args.save)), flush=True)


if __name__ == "__main__":
    main()
