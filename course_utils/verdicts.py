"""Verdicts the learner's code cannot forge.

A check runs in two processes. The learner's process (the notebook kernel, or a graded submission
inside its sandbox) only *produces outputs*: it calls the learner's function on each case's inputs
and sends the outputs back as plain data (numbers, strings, and tensors as dtype + shape + bytes;
never pickles). A trusted process, started before any learner code could patch it (a fresh
interpreter here, the grader itself when grading), computes the expected values, owns the number of
cases, and compares. So a tensor subclass that "equals" everything, a patched `torch.allclose`, or
`F.softmax = my_softmax` in the notebook cannot change a verdict: none of them exists in that process.

This module holds both halves of the wire format (`encode` on the learner's side, `decode` on the
trusted side), the comparison, `judge()`, and the small server the notebook talks to.
"""
from __future__ import annotations

import base64
import json
import math
import os
import struct
import subprocess
import sys
import threading
from typing import Any, BinaryIO

import torch

MAX_RECORD_BYTES = 64 * 2**20  # a record larger than this is refused ("output too large")
MAX_TEXT = 2000  # characters kept of any learner-provided text (error messages, printed output)

_DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.bool)}


class WireError(ValueError):
    """An output that cannot be turned into plain data (learner's side) or a malformed record (trusted side)."""


# ----------------------------------------------------------------------------------------------
# Wire format: learner outputs -> JSON-able plain data
# ----------------------------------------------------------------------------------------------
def safe_text(value: Any, limit: int = MAX_TEXT) -> str:
    """str(value) that never raises (a learner's exception may have a broken __str__) and is bounded."""
    try:
        text = str(value)
    except BaseException:  # noqa: BLE001 - learner objects may raise anything from __str__
        try:
            text = object.__repr__(value)
        except BaseException:  # noqa: BLE001
            text = "<unprintable>"
    if not isinstance(text, str):
        text = "<unprintable>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain_tensor(t: torch.Tensor) -> dict:
    """Reduce any tensor (subclass, non-contiguous, on a GPU) to dtype + shape + raw bytes."""
    with torch._C.DisableTorchFunctionSubclass():
        if torch.Tensor.is_meta.__get__(t):
            raise WireError("it is a meta tensor, which holds no values")
        dtype = torch.Tensor.dtype.__get__(t)
        name = str(dtype).replace("torch.", "")
        if name not in _DTYPES:
            raise WireError(f"tensors of dtype {dtype} are not supported here")
        plain = torch.Tensor.contiguous(torch.Tensor.cpu(torch.Tensor.detach(t)))
        shape = list(torch.Tensor.size(plain))
        raw = torch.Tensor.numpy(torch.Tensor.view(plain, torch.uint8) if plain.dim() else
                                 torch.Tensor.view(plain.reshape(1), torch.uint8)).tobytes()
    return {"$tensor": name, "shape": shape, "data": base64.b64encode(raw).decode("ascii")}


def encode(value: Any, depth: int = 0) -> Any:
    """Turn a learner's output into JSON-able data. Unknown objects become a typed description."""
    if depth > 20:
        raise WireError("the output is nested more than 20 levels deep")
    if isinstance(value, torch.Tensor):
        return _plain_tensor(value)
    if type(value) in (bool, int, str) or value is None:
        return value
    if type(value) is float:
        return {"$float": repr(value)} if not math.isfinite(value) else value
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            out = _plain_tensor(torch.from_numpy(np.ascontiguousarray(value)))
            out["numpy"] = True
            return out
        if isinstance(value, np.generic):
            return encode(value.item(), depth + 1)
    except (ImportError, TypeError):
        pass
    if isinstance(value, (list, tuple)):
        return {"$list": [encode(v, depth + 1) for v in list(value)[:100_000]], "tuple": isinstance(value, tuple)}
    if isinstance(value, dict):
        return {"$dict": [[safe_text(k, 200), encode(v, depth + 1)] for k, v in list(value.items())[:10_000]]}
    if isinstance(value, (int, float)):  # subclasses of int/float (e.g. a bool-like): reduce to plain
        return encode(float(value) if isinstance(value, float) else int(value), depth + 1)
    return {"$object": safe_text(type(value).__name__, 200), "repr": safe_text(value, 200)}


def decode(data: Any, depth: int = 0) -> Any:
    """Trusted side: rebuild plain Python values and plain tensors from `encode`'s output."""
    if depth > 22:
        raise WireError("record nested too deeply")
    if data is None or type(data) in (bool, int, float, str):
        return data
    if isinstance(data, list):  # never produced by encode, but harmless
        return [decode(v, depth + 1) for v in data]
    if not isinstance(data, dict):
        raise WireError("malformed record")
    if "$tensor" in data:
        dtype = _DTYPES.get(data["$tensor"])
        shape = data.get("shape")
        if dtype is None or not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise WireError("malformed tensor in record")
        raw = base64.b64decode(data.get("data", ""), validate=True)
        numel = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(raw) != numel * itemsize:
            raise WireError("tensor bytes do not match its shape")
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype) if raw else torch.empty(0, dtype=dtype)
        tensor = flat.reshape(shape).clone()
        return NumpyOutput(tensor) if data.get("numpy") else tensor
    if "$float" in data:
        return float(data["$float"])
    if "$list" in data:
        items = [decode(v, depth + 1) for v in data["$list"]]
        return tuple(items) if data.get("tuple") else items
    if "$dict" in data:
        return {str(k): decode(v, depth + 1) for k, v in data["$dict"]}
    if "$object" in data:
        return ForeignObject(str(data["$object"])[:200], str(data.get("repr", ""))[:200])
    raise WireError("malformed record")


class NumpyOutput:
    """A numpy array the learner returned where a tensor may be expected (told apart in verdicts)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class ForeignObject:
    """An output that was not data (a function, a module, a custom object): only its type and repr travel."""

    def __init__(self, type_name: str, text: str):
        self.type_name, self.text = type_name, text

    def __repr__(self) -> str:
        return f"<{self.type_name}: {self.text}>"


# ----------------------------------------------------------------------------------------------
# Comparing outputs (trusted side; `got` is always decoded plain data)
# ----------------------------------------------------------------------------------------------
def describe(value: Any) -> str:
    """A short description of a value for verdicts: type, shape, dtype and a few numbers."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().flatten()[:6].tolist()
        more = ", ..." if value.numel() > 6 else ""
        nums = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in flat)
        return f"tensor shape {tuple(value.shape)} {str(value.dtype).replace('torch.', '')} [{nums}{more}]"
    if isinstance(value, NumpyOutput):
        return f"numpy array shape {tuple(value.tensor.shape)}"
    if isinstance(value, ForeignObject):
        return f"a {value.type_name} ({value.text})"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = safe_text(value, 200)
    return text if len(text) < 80 else text[:77] + "..."


def output_name(path: tuple, names: tuple[str, ...] | str | None) -> str:
    """'the gradient of b' instead of output[1]: the case's `names` label the outputs."""
    if isinstance(names, str) and not path:
        return names
    if isinstance(names, (tuple, list)) and path and isinstance(path[0], int) and path[0] < len(names):
        rest = "".join(f"[{p!r}]" for p in path[1:])
        return names[path[0]] + rest
    return "output" + "".join(f"[{p!r}]" for p in path)


def compare(got: Any, expected: Any, *, atol: float = 1e-5, rtol: float = 1e-4, check_dtype: bool = True,
            names: tuple[str, ...] | str | None = None, path: tuple = ()) -> str | None:
    """None when `got` matches `expected`, else a one-paragraph explanation naming the wrong output."""
    where = output_name(path, names)
    kw = dict(atol=atol, rtol=rtol, check_dtype=check_dtype, names=names)
    if isinstance(expected, torch.Tensor):
        if isinstance(got, NumpyOutput):
            return f"{where}: expected a torch.Tensor, got a numpy array (use torch operations)."
        if not isinstance(got, torch.Tensor):
            return f"{where}: expected a torch.Tensor, got {describe(got)}."
        if tuple(got.shape) != tuple(expected.shape):
            return f"{where}: wrong shape. expected {tuple(expected.shape)}, got {tuple(got.shape)}."
        if check_dtype and got.dtype != expected.dtype:
            return f"{where}: wrong dtype. expected {expected.dtype}, got {got.dtype}."
        g, e = got.detach().cpu(), expected.detach().cpu()
        if not e.is_floating_point():
            if not torch.equal(g.to(e.dtype), e):
                bad = (g.to(e.dtype) != e).nonzero()[0].tolist()
                return (f"{where}: values differ at index {tuple(bad)}.\n"
                        f"expected {describe(e)}\ngot      {describe(g)}")
            return None
        g, e = g.double(), e.double()
        if torch.isnan(g).any() and not torch.isnan(e).any():
            return f"{where}: contains NaN where the expected values are finite.\ngot {describe(got)}"
        if torch.isinf(g).any() and not torch.isinf(e).any():
            return f"{where}: contains inf where the expected values are finite (overflow?).\ngot {describe(got)}"
        if not torch.allclose(g, e, atol=atol, rtol=rtol, equal_nan=True):
            diff = (g - e).abs().nan_to_num(0.0)
            flat = int(diff.flatten().argmax()) if diff.numel() else 0
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), e.shape)) if e.dim() else ()
            return (f"{where}: values differ. max abs diff {diff.max().item():.3g} at index {idx} "
                    f"(tolerance atol={atol:g}, rtol={rtol:g}).\n"
                    f"expected {describe(expected)}\ngot      {describe(got)}")
        return None
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)):
            return f"{where}: expected a {type(expected).__name__} of {len(expected)} items, got {describe(got)}."
        if len(got) != len(expected):
            return f"{where}: expected {len(expected)} items, got {len(got)}."
        for i, (g, e) in enumerate(zip(got, expected)):
            msg = compare(g, e, path=(*path, i), **kw)
            if msg:
                return msg
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return f"{where}: expected a dict with keys {sorted(expected)}, got {describe(got)}."
        missing = [k for k in expected if str(k) not in got]
        if missing:
            return f"{where}: missing keys {missing}."
        for k, e in expected.items():
            msg = compare(got[str(k)], e, path=(*path, k), **kw)
            if msg:
                return msg
        return None
    if isinstance(expected, bool) or expected is None or isinstance(expected, str):
        ok = type(got) is type(expected) and got == expected
        return None if ok else f"{where}: expected {expected!r}, got {describe(got)}."
    if isinstance(expected, (int, float)):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            return f"{where}: expected a number, got {describe(got)}."
        if math.isnan(got) and not math.isnan(expected):
            return f"{where}: got NaN, expected {expected:.6g}."
        if not math.isclose(got, expected, rel_tol=rtol, abs_tol=atol):
            return f"{where}: expected {expected:.6g}, got {got:.6g} (abs diff {abs(got - expected):.3g})."
        return None
    return f"{where}: the check cannot compare a {type(expected).__name__}: tell the course maintainers."


# ----------------------------------------------------------------------------------------------
# Judging a record against the trusted expected values
# ----------------------------------------------------------------------------------------------
_EXPECTED: dict[tuple[str, str], list] = {}


def expected_cases(exercise_id: str) -> list:
    """The exercise's cases with `expected` evaluated here, in the trusted process (cached per salt)."""
    from .exercises import get_exercise

    key = (exercise_id, os.environ.get("COURSE_CHECK_SALT", "0"))
    if key not in _EXPECTED:
        ex = get_exercise(exercise_id)
        cases = []
        for case in ex.make_cases():  # evaluate each thunk before the generator moves on (late binding)
            if case.reference is not None:
                value = case.call(case.reference)
            elif callable(case.expected):
                value = case.expected()
            else:
                value = case.expected
            cases.append((case, decode(encode(value))))  # exactly what a learner's output goes through
        _EXPECTED[key] = cases
    return _EXPECTED[key]


def judge(exercise_id: str, record: dict) -> dict:
    """Compare a learner's record with the trusted expected values; return the verdict as a dict.

    `record` comes from `learner_run.run_cases` (or from a submission's output file): it is untrusted
    data, so everything in it is validated and bounded here, and the number of cases is ours.
    """
    from .exercises import get_exercise

    ex = get_exercise(exercise_id)
    cases = expected_cases(ex.id)
    total = len(cases)

    def verdict(status: str, passed: int, message: str = "", case=None) -> dict:
        hint = "" if status == "passed" else ((case.hint if case is not None and case.hint else "") or ex.hint)
        return {"exercise": ex.id, "title": ex.title, "status": status, "passed": passed, "total": total,
                "message": message, "case": case.name if case is not None else "", "hint": hint}

    if not isinstance(record, dict):
        return verdict("error", 0, "The check's record is malformed.")
    if record.get("status") == "not attempted":
        return verdict("not attempted", 0, safe_text(record.get("message", "")))
    if record.get("status") == "refused":
        return verdict("failed", 0, safe_text(record.get("message", "")))
    results = record.get("cases")
    if not isinstance(results, list):
        return verdict("error", 0, "The check's record is malformed.")
    for i, (case, expected) in enumerate(cases):
        r = results[i] if i < len(results) and isinstance(results[i], dict) else None
        if r is None:
            if record.get("status") == "timeout":
                return verdict("timeout", i, f"Stopped after {ex.time_limit:g} s of computing: is there an infinite loop, "
                                             "or a Python loop over every element?", case)
            return verdict("error", i, safe_text(record.get("message") or "Your code stopped before this case ran."), case)
        status = r.get("status")
        if status == "not implemented":
            if i == 0:
                return verdict("not attempted", 0)
            return verdict("error", i, "NotImplementedError: part of the exercise is still a placeholder.", case)
        if status == "error":
            return verdict("error", i, safe_text(r.get("error", "your code raised an exception")), case)
        forbidden = [safe_text(f, 100) for f in r.get("forbidden", []) or []]
        if forbidden:
            return verdict("failed", i, f"you used {', '.join(forbidden)}, which this exercise asks you to "
                                        "write yourself.", case)
        mutated = [safe_text(m, 100) for m in r.get("mutated", []) or []]
        if mutated and not case.allow_mutation:
            return verdict("failed", i, f"your code changed its input {', '.join(mutated)} in place; "
                                        "compute a new tensor instead.", case)
        if status != "ok":
            return verdict("error", i, "The check's record is malformed.", case)
        try:
            got = decode(r.get("output"))
        except (WireError, ValueError, TypeError, KeyError) as exc:
            return verdict("error", i, f"could not read the output: {exc}", case)
        try:
            if case.compare is not None:
                problem = case.compare(got, expected)
            else:
                problem = compare(got, expected, atol=case.atol, rtol=case.rtol, check_dtype=case.check_dtype,
                                  names=case.names)
        except Exception as exc:  # noqa: BLE001 - a custom comparison meeting an output shape it did not expect
            problem = f"{output_name((), case.names)}: could not compare ({type(exc).__name__}: {exc}); got {describe(got)}"
        if problem:
            return verdict("failed", i, problem, case)
    return verdict("passed", total)


# ----------------------------------------------------------------------------------------------
# The trusted checker process a notebook talks to
# ----------------------------------------------------------------------------------------------
def _write_frame(stream: BinaryIO, payload: bytes) -> None:
    stream.write(struct.pack(">Q", len(payload)) + payload)
    stream.flush()


def _read_frame(stream: BinaryIO, limit: int = MAX_RECORD_BYTES + 2**20) -> bytes | None:
    head = stream.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack(">Q", head)
    if n > limit:
        raise WireError("frame too large")
    data = stream.read(n)
    return data if len(data) == n else None


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Answer judge requests, one JSON frame in, one JSON frame out, until stdin closes."""
    while True:
        frame = _read_frame(stdin)
        if frame is None:
            return
        try:
            request = json.loads(frame)
            answer = judge(str(request["exercise"]), request["record"])
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the checker
            answer = {"status": "error", "message": f"the checker failed: {type(exc).__name__}: {safe_text(exc)}"}
        _write_frame(stdout, json.dumps(answer).encode())


class JudgeClient:
    """Starts the trusted checker (`python -m course_utils.verdicts`) once, then asks it for verdicts."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONSTARTUP")}
        env["OMP_NUM_THREADS"] = "1"  # the checker's work is small; leave the cores to the learner's kernel
        return subprocess.Popen([sys.executable, "-m", "course_utils.verdicts"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, close_fds=True)

    def judge(self, exercise_id: str, record: dict) -> dict:
        payload = json.dumps({"exercise": exercise_id, "record": record}).encode()
        with self._lock:
            for attempt in range(2):
                if self._proc is None or self._proc.poll() is not None:
                    self._proc = self._start()
                try:
                    _write_frame(self._proc.stdin, payload)
                    answer = _read_frame(self._proc.stdout)
                    if answer is not None:
                        return json.loads(answer)
                except (OSError, ValueError):
                    pass
                self.close()
        return {"status": "error", "message": "the course's checker process could not be started or crashed; "
                                              "restart the kernel and run the check again."}

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._proc.kill()
                self._proc.wait(timeout=5)
            except Exception:  # noqa: BLE001
                pass
            self._proc = None


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
