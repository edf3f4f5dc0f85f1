"""A real sandbox for untrusted code: bubblewrap (`bwrap`), with limits on time, memory and processes.

What runs inside sees a read-only system (/usr, /etc, the Python installation, the virtual
environment, the course package and the data cache), an empty /tmp and home, its own working folder
and its own output folder, and nothing else: not the other submissions, not the grader's output, not
the instructor's files (the repository's solutions/ included). It has no network (its own network
namespace holds only a loopback device), its own PID namespace (when the sandbox ends, every process
it started ends with it), a scrubbed environment, and resource limits (address space, number of
processes, file size). Run as root, it also drops to an unprivileged user id of its own, so the process
limit is its own and it cannot touch files owned by anyone else.

What it does not protect against: a kernel exploit; using all the CPU time it is given; and it cannot
tell whether a correct output was computed by the learner's own code (see the README).
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

INSIDE_WORK = "/sandbox/work"
INSIDE_OUT = "/sandbox/out"
BASE_UID = 61000  # run as root: sandbox slot k runs as uid/gid BASE_UID + k


@dataclass
class Limits:
    seconds: float = 600.0  # wall clock for the whole run
    memory_mb: int = 8192  # address space per process
    processes: int = 256  # processes and threads of the sandbox's user
    file_mb: int = 256  # largest file it may write
    output_mb: int = 16  # stdout/stderr kept


@dataclass
class SandboxRun:
    returncode: int | None
    seconds: float
    timed_out: bool
    stdout: str  # the last `output_mb` of standard output
    stderr: str


def bwrap_path() -> str | None:
    """The `bwrap` executable if it exists and can create namespaces here, else None."""
    exe = shutil.which("bwrap")
    if exe is None:
        return None
    probe = [exe, *_unshare(), "--die-with-parent", "--ro-bind", "/", "/", *_drop_privileges(0), "true"]
    try:
        ok = subprocess.run(probe, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return exe if ok else None


def unavailable_reason() -> str:
    if shutil.which("bwrap") is None:
        return ("bubblewrap is not installed (Debian/Ubuntu: `sudo apt-get install bubblewrap`; "
                "Fedora: `sudo dnf install bubblewrap`)")
    return ("bubblewrap cannot create namespaces here (user namespaces disabled? try "
            "`sudo sysctl kernel.unprivileged_userns_clone=1`)")


def _unshare() -> list[str]:
    """Every namespace. As root, no user namespace: bwrap is privileged, and the command drops to a plain uid."""
    if os.geteuid() == 0:
        return ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    return ["--unshare-all"]


def _drop_privileges(slot: int) -> list[str]:
    """Run as root: the command inside becomes uid/gid BASE_UID + slot with no capabilities."""
    if os.geteuid() != 0:
        return []
    uid = str(BASE_UID + slot)
    return ["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups", "--inh-caps=-all", "--no-new-privs", "--"]


def readonly_paths() -> list[Path]:
    """What the sandbox may read: the system, Python, the virtual environment, the package, the data cache."""
    import course_utils
    from course_utils.runtime import cache_dir

    paths = [Path(p) for p in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt")]
    paths += [Path(sys.base_prefix), Path(sys.prefix), Path(sys.executable).parent,
              Path(course_utils.__file__).resolve().parent, cache_dir()]
    seen, out = set(), []
    for p in paths:
        if p.exists() and str(p) not in seen:
            seen.add(str(p))
            out.append(p)
    return out


def _binds(paths: list[Path]) -> list[str]:
    # Folders on the way to a bound path are made world-traversable (bwrap would make them root-only).
    parents = sorted({str(q) for p in paths for q in p.parents if str(q) != "/"} - {str(p) for p in paths},
                     key=lambda q: len(Path(q).parts))
    args: list[str] = [a for q in parents for a in ("--perms", "0755", "--dir", q)]
    for p in sorted(paths, key=lambda q: len(q.parts)):
        if p.is_symlink() and len(p.parts) == 2:  # /lib -> usr/lib on merged-/usr systems
            args += ["--symlink", os.readlink(p), str(p)]
        else:
            args += ["--ro-bind", str(p), str(p)]
    return args


def command(exe: str, cmd: list[str], *, work: Path, out: Path, env: dict[str, str], slot: int = 0) -> list[str]:
    """The full bwrap command line that runs `cmd` inside the sandbox."""
    # /tmp first: a read-only path below /tmp (a repository cloned there) is then bound on top of it.
    args = [exe, *_unshare(), "--die-with-parent", "--new-session", "--hostname", "sandbox",
            "--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp",
            *_binds(readonly_paths()),
            "--perms", "0755", "--dir", "/sandbox", "--bind", str(work), INSIDE_WORK, "--bind", str(out), INSIDE_OUT, "--chdir", INSIDE_WORK,
            "--clearenv"]
    for key, value in env.items():
        args += ["--setenv", key, value]
    return args + ["--", *_drop_privileges(slot), *cmd]


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A scrubbed environment: nothing of the grader's own environment comes along."""
    from course_utils.runtime import cache_dir

    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp/home",
           "LANG": "C.UTF-8", "TMPDIR": "/tmp", "MPLBACKEND": "Agg", "MPLCONFIGDIR": "/tmp/mpl",
           "IPYTHONDIR": "/tmp/ipython", "JUPYTER_RUNTIME_DIR": "/tmp/jupyter", "JUPYTER_DATA_DIR": "/tmp/jupyter",
           "PYTHONDONTWRITEBYTECODE": "1", "COURSE_CACHE": str(cache_dir()), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COURSE_OFFLINE": "1"}
    env.update(extra or {})
    return env


def _limit(limits: Limits):
    def apply() -> None:
        mem = limits.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        size = limits.file_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)

    return apply


def _tail(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - limit))
        return f.read().decode("utf-8", "replace")


def run(cmd: list[str], *, work: Path, out: Path, env: dict[str, str], limits: Limits, slot: int = 0,
        exe: str | None = None) -> SandboxRun:
    """Run `cmd` in the sandbox; kill everything it started when it ends or runs out of time."""
    exe = exe or bwrap_path()
    if exe is None:
        raise RuntimeError(f"no sandbox: {unavailable_reason()}")
    if os.geteuid() == 0:
        for folder in (work, out, work.parent):
            os.chown(folder, BASE_UID + slot, BASE_UID + slot)
        for f in work.rglob("*"):
            os.chown(f, BASE_UID + slot, BASE_UID + slot)
    logs = out.parent
    start = time.perf_counter()
    with open(logs / "stdout.log", "wb") as so, open(logs / "stderr.log", "wb") as se:
        proc = subprocess.Popen(command(exe, cmd, work=work, out=out, env=env, slot=slot), stdin=subprocess.DEVNULL,
                                stdout=so, stderr=se, start_new_session=True, preexec_fn=_limit(limits),
                                close_fds=True)
        timed_out = False
        try:
            proc.wait(timeout=limits.seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            try:  # bwrap dies, its PID namespace goes with it: nothing the submission started survives
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
    keep = limits.output_mb * 2**20
    return SandboxRun(None if timed_out else proc.returncode, time.perf_counter() - start, timed_out,
                      _tail(logs / "stdout.log", keep), _tail(logs / "stderr.log", 64 * 1024))
