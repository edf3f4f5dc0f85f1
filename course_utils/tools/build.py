"""Notebook build: `solutions/` is the one source; `weeks/` (the student version) is generated from it.

For every `solutions/weekN_<slug>/NN_<slug>.ipynb` the build
1. normalises the solution in place: outputs stripped, the Colab badge and the setup cell stamped
   from one template (so the repository URL and the setup code live only in this package);
2. writes `weeks/weekN_<slug>/NN_<slug>.ipynb`: cells tagged `instructor` removed, every
   `# BEGIN SOLUTION: <task>` ... `# END SOLUTION` block replaced by a placeholder that raises
   `NotImplementedError(<task>)`, and markdown between `<!-- BEGIN SOLUTION -->` and
   `<!-- END SOLUTION -->` replaced by an answer prompt.
`build(check=True)` changes nothing and lists what is stale.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

SETUP_TAG = "setup"
INSTRUCTOR_TAG = "instructor"
BADGE_PREFIX = "[![Open In Colab]"
_CODE_BLOCK = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION(?::[ \t]*(?P<task>[^\n]*))?$\n(?P<body>.*?)^[ \t]*# END SOLUTION[ \t]*$\n?",
                         re.MULTILINE | re.DOTALL)
_MD_BLOCK = re.compile(r"<!-- BEGIN SOLUTION -->.*?<!-- END SOLUTION -->", re.DOTALL)


def repo_root() -> Path:
    """The repository holding `solutions/` (the working directory or a parent of it)."""
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "solutions").is_dir() and (candidate / "pyproject.toml").exists():
            return candidate
    package_parent = Path(__file__).resolve().parent.parent
    if (package_parent / "solutions").is_dir():
        return package_parent
    raise FileNotFoundError("Could not find the course repository (a folder with solutions/ and pyproject.toml). "
                            "Run `course build` from inside the repository.")


def setup_source() -> str:
    """The first code cell of every notebook: install the package in Colab, then `setup()`."""
    from .. import REPO_URL

    return (
        "# Setup: run this cell first. In Colab it installs the course package (about a minute).\n"
        "import importlib.util, subprocess, sys\n"
        "if importlib.util.find_spec(\"course_utils\") is None:\n"
        f"    subprocess.run([sys.executable, \"-m\", \"pip\", \"install\", \"-q\", \"git+{REPO_URL}\"], check=True)\n"
        "import course_utils\n"
        "from course_utils import by_profile, check, record, use\n"
        "generator = course_utils.setup(seed=0)"
    )


def badge(relpath: str) -> str:
    """Markdown for an 'Open in Colab' badge pointing at `relpath` in the repository."""
    from .. import REPO_URL

    slug = REPO_URL.removeprefix("https://github.com/")
    url = f"https://colab.research.google.com/github/{slug}/blob/main/{relpath}"
    return f"{BADGE_PREFIX}(https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _strip(nb) -> None:
    """Remove outputs, execution counts and editor metadata; keep cell tags."""
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    for cell in nb.cells:
        tags = _tags(cell)
        cell.metadata = {"tags": tags} if tags else {}
        cell.pop("id", None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.nbformat, nb.nbformat_minor = 4, 4


def normalise_solution(nb, relpath: str):
    """The solution notebook as it should be on disk: stripped, badge and setup cell stamped."""
    nb = copy.deepcopy(nb)
    _strip(nb)
    if not nb.cells or nb.cells[0].cell_type != "markdown" or not nb.cells[0].source.lstrip().startswith("# "):
        raise ValueError(f"{relpath}: the first cell must be a markdown cell starting with '# <title>'.")
    lines = [ln for ln in nb.cells[0].source.splitlines() if not ln.startswith(BADGE_PREFIX)]
    lines.insert(1, "")
    lines.insert(2, badge(relpath))
    nb.cells[0].source = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip()
    setup_cells = [c for c in nb.cells if SETUP_TAG in _tags(c)]
    for c in setup_cells:
        nb.cells.remove(c)
    setup = nbformat.v4.new_code_cell(setup_source(), metadata={"tags": [SETUP_TAG]})
    setup.pop("id", None)
    nb.cells.insert(1, setup)
    return nb


def _placeholder(match: re.Match) -> str:
    indent = match.group("indent")
    task = (match.group("task") or "complete this exercise").strip()
    return f"{indent}# TODO: {task}\n{indent}raise NotImplementedError({task!r})\n"


def student_version(solution_nb, student_relpath: str):
    """The student notebook generated from a (normalised) solution notebook."""
    nb = copy.deepcopy(solution_nb)
    nb.cells = [c for c in nb.cells if INSTRUCTOR_TAG not in _tags(c)]
    for cell in nb.cells:
        if cell.cell_type == "code":
            if "BEGIN SOLUTION" in cell.source and not _CODE_BLOCK.search(cell.source):
                raise ValueError(f"{student_relpath}: unmatched '# BEGIN SOLUTION' in:\n{cell.source[:200]}")
            cell.source = _CODE_BLOCK.sub(_placeholder, cell.source + ("\n" if not cell.source.endswith("\n") else "")).rstrip("\n")
        else:
            cell.source = _MD_BLOCK.sub("*Your answer here.*", cell.source)
            lines = [badge(student_relpath) if ln.startswith(BADGE_PREFIX) else ln for ln in cell.source.splitlines()]
            cell.source = "\n".join(lines)
    return nb


def _dumps(nb) -> str:
    return nbformat.writes(nb, version=4) + "\n"


def content_hash(nb) -> str:
    """A hash of what a person changes in a notebook: every cell's type, source and outputs."""
    cells = [[c.cell_type, c.source, c.get("outputs", [])] for c in nb.cells]
    return hashlib.sha256(json.dumps(cells, sort_keys=True).encode()).hexdigest()[:16]


def stamp_generated(nb):
    """Record in the notebook's metadata the hash of what the build generated, to recognise later edits."""
    nb.metadata.setdefault("course", {})["generated"] = content_hash(nb)
    return nb


def edited_by_hand(path: Path) -> bool:
    """True when a generated notebook was changed after the build wrote it (run and saved, or edited)."""
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception:  # noqa: BLE001 - unreadable: treat as someone's work, do not overwrite
        return True
    stamp = nb.metadata.get("course", {}).get("generated")
    if stamp is None:  # written before stamps existed: someone's work only if it was run
        return any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    return stamp != content_hash(nb)


def backup(path: Path) -> Path:
    """Move a notebook aside as `<name>.backup-<time>.ipynb` next to it and return the new path."""
    target = path.with_name(f"{path.stem}.backup-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
    path.rename(target)
    return target


def _title(nb) -> str:
    return nb.cells[0].source.splitlines()[0].lstrip("# ").strip()


def notebook_table(root: Path) -> str:
    """The README's list of notebooks, each with Colab links to the student and solution versions."""
    from .. import REPO_URL

    slug = REPO_URL.removeprefix("https://github.com/")
    lines = ["| week | notebook | open in Colab |", "|---|---|---|"]
    for src in sorted((root / "solutions").glob("week*/*.ipynb")):
        rel = src.relative_to(root).as_posix()
        student_rel = "weeks/" + rel.split("/", 1)[1]
        week = src.parent.name.split("_")[0].removeprefix("week")
        colab = "https://colab.research.google.com/github/{}/blob/main/{}"
        title = _title(nbformat.read(src, as_version=4))
        lines.append(f"| {week} | [{title}]({student_rel}) | [student]({colab.format(slug, student_rel)}) · "
                     f"[solution]({colab.format(slug, rel)}) |")
    return "\n".join(lines)


def time_table(root: Path) -> str:
    """The README's run-time table, from the results files that `course bench` wrote."""
    from .bench import table

    results = sorted((root / "benchmarks").glob("*.json")) if (root / "benchmarks").is_dir() else []
    if not results:
        return "No benchmark results yet: run `course bench --profile cpu`."
    return (table(results) + "\n\nWall-clock seconds to execute each solution notebook top to bottom "
            "(`course bench`), including kernel start; numbers quoted inside notebooks come from the same runs.")


def update_readme(root: Path) -> str:
    """README.md with its generated blocks (notebook list, time table) brought up to date."""
    text = (root / "README.md").read_text(encoding="utf-8")
    for name, make in (("notebooks", notebook_table), ("times", time_table)):
        start, end = f"<!-- BEGIN {name} (generated by course build) -->", f"<!-- END {name} -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            text = head + start + "\n" + make(root) + "\n" + end + rest.split(end, 1)[1]
    return text


@dataclass
class BuildReport:
    written: list[str]  # files (re)written, or stale ones in check mode
    removed: list[str]  # generated files with no source any more
    kept: list[str] = field(default_factory=list)  # generated files edited by hand: left alone (no --force)
    backups: list[str] = field(default_factory=list)  # with --force: where the edited versions were moved

    @property
    def stale(self) -> bool:
        return bool(self.written or self.removed or self.kept)


def build(root: Path | None = None, *, check: bool = False, force: bool = False) -> BuildReport:
    """Normalise every solution notebook and regenerate `weeks/`; in check mode only report what differs.

    A notebook in `weeks/` that was changed since the build wrote it (a learner ran or edited it there)
    is never overwritten silently: it is reported as kept, or with `force` moved to a backup first.
    """
    root = root or repo_root()
    written: list[str] = []
    kept: list[str] = []
    backups: list[str] = []

    def protect(path: Path) -> bool:
        """True when `path` may be replaced; otherwise it is recorded as kept (or backed up with force)."""
        if not path.exists() or not path.is_relative_to(root / "weeks") or not edited_by_hand(path):
            return True
        if force and not check:
            backups.append(backup(path).relative_to(root).as_posix())
            return True
        kept.append(path.relative_to(root).as_posix())
        return False

    expected_students: set[Path] = set()
    for src in sorted((root / "solutions").glob("week*/*.ipynb")):
        rel = src.relative_to(root).as_posix()
        student_rel = "weeks/" + rel.split("/", 1)[1]
        raw = src.read_text(encoding="utf-8")
        solution = normalise_solution(nbformat.reads(raw, as_version=4), rel)
        student = stamp_generated(student_version(solution, student_rel))
        targets = [(src, _dumps(solution)), (root / student_rel, _dumps(student))]
        expected_students.add(root / student_rel)
        for path, text in targets:
            current = path.read_text(encoding="utf-8") if path.exists() else None
            if current != text:
                if not protect(path):
                    continue
                written.append(path.relative_to(root).as_posix())
                if not check:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(text, encoding="utf-8")
    readme = root / "README.md"
    if readme.exists():
        text = update_readme(root)
        if text != readme.read_text(encoding="utf-8"):
            written.append("README.md")
            if not check:
                readme.write_text(text, encoding="utf-8")
    removed = []
    for stale in sorted((root / "weeks").glob("week*/*.ipynb")) if (root / "weeks").is_dir() else []:
        if stale not in expected_students and ".backup-" not in stale.name:
            if not protect(stale):
                continue
            removed.append(stale.relative_to(root).as_posix())
            if not check:
                stale.unlink()
    return BuildReport(written, removed, kept, backups)


def work_copies(root: Path, refresh: list[str] | None = None) -> list[str]:
    """Give the learner a personal copy of every student notebook in `work/` (ignored by git, never touched
    by the build or the tests). Existing copies are kept; `refresh` names notebooks to replace with a fresh
    copy, the old one moved to a backup next to it. Returns what was copied or backed up, as messages."""
    messages = []
    refresh = [r.removeprefix("weeks/").removeprefix("work/") for r in (refresh or [])]
    sources = sorted((root / "weeks").glob("week*/*.ipynb"))
    known = {src.relative_to(root / "weeks").as_posix() for src in sources}
    for name in refresh:
        if name not in known:
            raise FileNotFoundError(f"no notebook weeks/{name}; known: {', '.join(sorted(known))}")
    for src in sources:
        rel = src.relative_to(root / "weeks").as_posix()
        dest = root / "work" / rel
        if dest.exists() and rel in refresh:
            messages.append(f"backed up work/{rel} -> {backup(dest).relative_to(root).as_posix()}")
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            messages.append(f"copied  weeks/{rel} -> work/{rel}")
    return messages
