"""Running a learner's function on an exercise's cases, in a child process with a hard deadline.

The deadline is measured in CPU time (the child's own, so a busy machine or a grader running several
submissions at once does not turn a correct answer into a timeout), with a wall-clock limit
WALL_FACTOR times longer for code that waits instead of computing.

On Linux and macOS the cases run in a forked copy of the notebook's process: the learner's code sees
everything the notebook defined, but a loop that swallows every exception, or one that never ends,
is stopped by killing the child (and everything it started), and nothing the code patches during the
check leaks back into the notebook. The child only reports outputs, as plain data (see `verdicts`).
It also watches for library calls the exercise forbids (torch's function-mode hook sees them) and for
tensor arguments changed in place. Where `fork` does not exist (Windows) the cases run in-process
under a watchdog thread; the course supports Windows through WSL, where `fork` exists.
"""
from __future__ import annotations

import io
import json
import math
import os
import select
import signal
import struct
import sys
import threading
import time
import traceback
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .verdicts import MAX_RECORD_BYTES, WireError, encode, safe_text

MAX_PRINTED = 10_000  # characters of the learner's printed output shown after a check
WALL_FACTOR = 4.0  # wall-clock limit = WALL_FACTOR x the CPU-time limit (a sleeping loop is stopped too)


def _resolve(qualname: str) -> Any:
    """'torch.nn.functional.cross_entropy' -> the function object (None if this torch lacks it)."""
    import importlib

    parts = qualname.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


class _Watch(TorchFunctionMode):
    """Notes every forbidden torch function the learner's code calls, then lets the call through."""

    def __init__(self, forbid: tuple[str, ...]):
        super().__init__()
        self.forbidden = {}
        for name in forbid:
            fn = _resolve(name)
            if fn is not None:
                self.forbidden[fn] = name
        self.used: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = self.forbidden.get(func)
        if name is not None and name not in self.used:
            self.used.append(name)
        return func(*args, **(kwargs or {}))


def _snapshot(values: Any, label: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(label, the tensor passed to the learner, a private copy) for every tensor among the arguments."""
    found = []
    if isinstance(values, torch.Tensor):
        found.append((label, values, values.detach().clone()))
    elif isinstance(values, (list, tuple)):
        for i, v in enumerate(values):
            found.extend(_snapshot(v, f"{label}[{i}]"))
    elif isinstance(values, dict):
        for k, v in values.items():
            found.extend(_snapshot(v, f"{label}[{k!r}]"))
    return found


def _changed(passed: torch.Tensor, copy: torch.Tensor) -> bool:
    with torch._C.DisableTorchFunctionSubclass():
        p = torch.Tensor.detach(passed)
        if p.shape != copy.shape or p.dtype != copy.dtype:
            return True
        return not torch.equal(torch.nan_to_num(p.double(), nan=1.2345e300), torch.nan_to_num(copy.double(), nan=1.2345e300))


def learner_error(exc: BaseException) -> str:
    """The exception and the last frame of learner code, without our package's frames; never raises."""
    name = safe_text(type(exc).__name__, 100)
    where = ""
    try:
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if "course_utils" not in f.filename.replace("\\", "/")]
        if frames:
            f = frames[-1]
            where = f"\n   at line {f.lineno}: {f.line}" if f.line else f"\n   at line {f.lineno}"
    except BaseException:  # noqa: BLE001
        pass
    text = safe_text(exc)
    if "CUDA" in text and "fork" in text:
        text += " (checks run your code on CPU tensors: do not move them to the GPU inside the exercise)"
    return f"{name}: {text}{where}"


def _run_one(case, obj: Any, forbid: tuple[str, ...]) -> dict:
    """Call the learner's object on one case; return a plain-data result (never raises)."""
    args = kwargs = None
    try:
        if case.run is None:
            from .exercises import clone_inputs

            args, kwargs = clone_inputs(case.args), clone_inputs(case.kwargs)
            labels = _parameter_names(obj)
            watched = [t for i, a in enumerate(args) for t in _snapshot(a, labels[i] if i < len(labels) else f"argument {i + 1}")]
            watched += [t for k, v in kwargs.items() for t in _snapshot(v, f"`{k}`")]
        else:
            watched = []
        watch = _Watch(forbid)
        with watch:
            out = obj(*args, **kwargs) if case.run is None else case.run(obj)
        result: dict = {"status": "ok", "forbidden": watch.used}
        result["mutated"] = [label for label, passed, copy in watched if _changed(passed, copy)]
        result["output"] = encode(out)
        return result
    except NotImplementedError:
        return {"status": "not implemented"}
    except WireError as exc:
        return {"status": "error", "error": f"the output could not be read: {exc}"}
    except BaseException as exc:  # noqa: BLE001 - learner code may raise anything, even SystemExit
        return {"status": "error", "error": learner_error(exc)}


def _parameter_names(obj: Any) -> list[str]:
    """`x`, `h` ... for the learner's positional parameters, to name an argument changed in place."""
    import inspect

    try:
        target = obj.__init__ if isinstance(obj, type) else obj
        params = [p for p in inspect.signature(target).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"]
        return [f"`{p.name}`" for p in params]
    except (TypeError, ValueError):
        return []


class _Capped(io.StringIO):
    """A stdout stand-in that keeps only the first MAX_PRINTED characters."""

    def write(self, s):  # noqa: D401
        if self.tell() < MAX_PRINTED:
            super().write(str(s)[: MAX_PRINTED - self.tell()])
        return len(s) if isinstance(s, str) else 0


def _frame(payload: dict) -> bytes:
    data = json.dumps(payload).encode()
    if len(data) > MAX_RECORD_BYTES:
        data = json.dumps({"status": "error", "error": "the output is too large to check "
                                                       f"(over {MAX_RECORD_BYTES // 2**20} MB)"}).encode()
    return struct.pack(">Q", len(data)) + data


def _refuse_reference(*args, **kwargs):
    raise RuntimeError("this calls the course's own implementation of the exercise; write it yourself")


def _block(reference: Any) -> None:
    """In the child only: the exercise's reference function raises, however the learner's code reaches it."""
    code = getattr(reference, "__code__", None)
    if code is not None and not code.co_freevars:
        try:
            reference.__code__ = _refuse_reference.__code__
        except (TypeError, ValueError, AttributeError):
            pass


def _limit_cpu(seconds: float) -> None:
    """In the child: SIGXCPU after `seconds` of CPU time, SIGKILL one second later (a handler cannot save it)."""
    try:
        import resource

        soft = max(1, math.ceil(seconds))
        resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))
    except (ImportError, ValueError, OSError):
        pass  # the wall-clock limit still applies


def _child(write_fd: int, cases: list, obj: Any, forbid: tuple[str, ...], reference: Any, time_limit: float) -> None:
    """In the forked child: run every case, stream one frame per case, then exit without returning."""
    try:
        os.setpgid(0, 0)  # its own process group, so the parent can end everything it starts
        _limit_cpu(time_limit)  # a fork starts at zero CPU time: this is the check's own budget
        torch.set_num_threads(1)  # OpenMP's thread pool does not survive fork; one thread is always safe
        _block(reference)
        out = _Capped()
        sys.stdout = sys.stderr = out
        with os.fdopen(write_fd, "wb", closefd=True) as pipe:
            for case in cases:
                result = _run_one(case, obj, forbid)
                pipe.write(_frame(result))
                pipe.flush()
                if result["status"] != "ok":
                    break
            pipe.write(_frame({"printed": out.getvalue()}))
            pipe.flush()
    except BaseException:  # noqa: BLE001
        pass
    finally:
        os._exit(0)


def _read_frames(read_fd: int, deadline: float) -> tuple[list[dict], bool]:
    """Read frames until EOF or the deadline; return (frames, finished_in_time)."""
    buf = b""
    frames: list[dict] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return frames, False
        ready, _, _ = select.select([read_fd], [], [], remaining)
        if not ready:
            return frames, False
        chunk = os.read(read_fd, 1 << 20)
        if not chunk:
            return frames, True
        buf += chunk
        while len(buf) >= 8:
            (n,) = struct.unpack(">Q", buf[:8])
            if n > MAX_RECORD_BYTES + 2**20:
                return frames, True
            if len(buf) < 8 + n:
                break
            try:
                frames.append(json.loads(buf[8:8 + n]))
            except ValueError:
                frames.append({"status": "error", "error": "unreadable output"})
            buf = buf[8 + n:]


def _kill_group(pid: int) -> float:
    """End the child and everything it started; return the CPU seconds the child used."""
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
        except (ProcessLookupError, PermissionError, OSError):
            pass
    try:
        _, _, usage = os.wait4(pid, 0)
        return usage.ru_utime + usage.ru_stime
    except ChildProcessError:
        return 0.0


def run_cases(cases: list, obj: Any, *, time_limit: float, forbid: tuple[str, ...] = (), reference: Any = None) -> dict:
    """Run `obj` on every case; return the record the trusted side judges: {"status", "cases", ...}."""
    if not hasattr(os, "fork"):
        return _run_in_process(cases, obj, time_limit=time_limit, forbid=forbid)
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(write_fd, cases, obj, forbid, reference, time_limit)
    os.close(write_fd)
    try:
        try:
            os.setpgid(pid, pid)  # also set from this side, so killpg works even if the child is slow to start
        except OSError:
            pass
        frames, finished = _read_frames(read_fd, time.monotonic() + WALL_FACTOR * time_limit)
    finally:
        os.close(read_fd)
        cpu_seconds = _kill_group(pid)  # whatever the learner's code started is ended with it
    if finished and cpu_seconds >= math.ceil(time_limit) - 0.05 and not (frames and "printed" in frames[-1]):
        finished = False  # the CPU-time limit ended it (SIGXCPU or the SIGKILL after it)
    printed = ""
    if frames and "printed" in frames[-1]:
        printed = safe_text(frames.pop()["printed"], MAX_PRINTED)
    if printed:
        print(printed, end="" if printed.endswith("\n") else "\n")
    record: dict = {"status": "ran" if finished else "timeout", "cases": frames}
    if finished and len(frames) < len(cases) and (not frames or frames[-1].get("status") == "ok"):
        record["message"] = "Your code ended the check's process (os._exit, a crash or a signal)."
    return record


def _run_in_process(cases: list, obj: Any, *, time_limit: float, forbid: tuple[str, ...]) -> dict:
    """Without fork: a watchdog thread per case. A loop that never ends keeps running in the background."""
    deadline = time.monotonic() + time_limit
    frames = []
    for case in cases:
        box: dict = {}
        worker = threading.Thread(target=lambda c=case: box.update(r=_run_one(c, obj, forbid)), daemon=True)
        worker.start()
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            return {"status": "timeout", "cases": frames}
        frames.append(json.loads(json.dumps(box["r"])))
        if box["r"]["status"] != "ok":
            break
    return {"status": "ran", "cases": frames}
