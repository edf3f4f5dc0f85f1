"""Runtime switches: profile (size), device and precision, seeding, Colab detection, cache directory.

One switch for size (`COURSE_PROFILE` = smoke | cpu | gpu) and one helper for device, so notebooks
never carry scattered `if torch.cuda.is_available()` blocks.
"""
from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

PROFILES = ("smoke", "cpu", "gpu")
T = TypeVar("T")


def in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def get_profile() -> str:
    """The active size profile: `COURSE_PROFILE` if set, else `gpu` with CUDA, else `cpu`."""
    name = os.environ.get("COURSE_PROFILE", "").strip().lower()
    if not name:
        return "gpu" if torch.cuda.is_available() else "cpu"
    if name not in PROFILES:
        raise ValueError(f"COURSE_PROFILE={name!r} is not one of {', '.join(PROFILES)}.")
    return name


def by_profile(*, smoke: T, cpu: T, gpu: T) -> T:
    """Pick a value for the active profile: `cfg = by_profile(smoke=..., cpu=..., gpu=...)`."""
    return {"smoke": smoke, "cpu": cpu, "gpu": gpu}[get_profile()]


def get_device() -> torch.device:
    """The best available device: cuda -> mps -> cpu (override with `COURSE_DEVICE`)."""
    forced = os.environ.get("COURSE_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def get_precision(device: torch.device | None = None) -> str:
    """"bf16" on compute capability >= 8.0 (A100/L4/H100), "fp16" on older CUDA GPUs, else "fp32".

    A T4 reports `torch.cuda.is_bf16_supported() == True` but emulates bf16 slowly, so we look at the
    compute capability instead.
    """
    device = device or get_device()
    if device.type != "cuda":
        return "fp32"
    major, _ = torch.cuda.get_device_capability(device)
    return "bf16" if major >= 8 else "fp16"


def autocast(device: torch.device | None = None):
    """Mixed-precision context for the forward pass (a no-op in fp32)."""
    device = device or get_device()
    precision = get_precision(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device | None = None) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 and fp32 need no loss scaling)."""
    device = device or get_device()
    return torch.amp.GradScaler(device.type, enabled=get_precision(device) == "fp16")


@contextlib.contextmanager
def one_cpu_thread(device: torch.device | str | None = None):
    """Run a small model on one CPU thread (a no-op on GPU).

    Tiny recurrent steps are latency-bound: handing each small matmul between threads costs more than
    it saves, on a busy 2-core machine ten times more.
    """
    if torch.device(device or "cpu").type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pick_cpu_threads(work: Callable[[], object], *, repeats: int = 2, device: torch.device | str | None = None) -> int:
    """On a CPU, time `work()` with 1 thread and with every core; keep the faster for everything that follows.

    A model that is small for its machine (one sequence decoded token by token, a 135M model on a laptop)
    gains little from more threads, and on a busy machine (a shared laptop, CI) the threads wait for each
    other and can make it several times slower. Returns the thread count set. A no-op on GPU.
    """
    if torch.device(device or "cpu").type != "cpu":
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    timings = {}
    for n in sorted({1, cores}):
        torch.set_num_threads(n)
        work()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            work()
        timings[n] = time.perf_counter() - start
    best = min(timings, key=timings.get)
    torch.set_num_threads(best)
    return best


def alternating_seconds(work: dict[str, Callable[[], object]], *, rounds: int = 3,
                        device: torch.device | str | None = None) -> dict[str, list[float]]:
    """Time several pieces of work fairly: one call of each per round, the order reversed every other round.

    Timing A for a minute and then B for a minute on a shared machine compares two different machines:
    whatever else runs slows one more than the other. Alternating spreads the disturbance over both.
    Round 0 warms up and is not counted. Returns the seconds of every counted call, per name.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    sync = torch.cuda.synchronize if torch.device(device or "cpu").type == "cuda" else (lambda: None)
    seconds: dict[str, list[float]] = {name: [] for name in work}
    for r in range(rounds + 1):
        for name in (list(work) if r % 2 else list(work)[::-1]):
            sync()
            start = time.perf_counter()
            work[name]()
            sync()
            if r > 0:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a fresh `torch.Generator` seeded the same way."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def cache_dir(*parts: str) -> Path:
    """The one cache directory for data and models (`COURSE_CACHE`, default ~/.cache/llm-course)."""
    root = Path(os.environ.get("COURSE_CACHE", Path.home() / ".cache" / "llm-course")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def versions() -> dict[str, str]:
    """Versions of the libraries the course relies on (missing ones are reported as such)."""
    from importlib import metadata

    names = ["torch", "transformers", "datasets", "peft", "trl", "accelerate", "sentence-transformers",
             "scikit-learn", "matplotlib", "ipywidgets", "numpy"]
    out = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def describe() -> dict[str, Any]:
    """Everything `setup()` and `course doctor` print about the runtime."""
    device = get_device()
    info: dict[str, Any] = {"profile": get_profile(), "device": str(device), "precision": get_precision(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["colab"] = in_colab()
    info["strict"] = os.environ.get("COURSE_STRICT", "0") == "1"
    info["cache"] = str(cache_dir())
    return info


def setup(seed: int = 0, *, quiet: bool = False) -> torch.Generator:
    """Seed everything, configure plots, and print device, profile and library versions.

    Returns a seeded `torch.Generator` for lessons that depend on randomness.
    """
    generator = seed_everything(seed)
    torch.set_float32_matmul_precision("high")
    with contextlib.suppress(Exception):
        from . import plots

        plots.use_course_style()
    if not quiet:
        info = describe()
        v = versions()
        gpu = f" ({info['gpu']})" if "gpu" in info else ""
        print(f"profile={info['profile']}  device={info['device']}{gpu}  precision={info['precision']}  seed={seed}")
        print("  ".join(f"{k} {v[k]}" for k in ("python", "torch", "transformers", "numpy")))
    return generator
