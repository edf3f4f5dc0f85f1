"""The `course` command (also `python -m course_utils`): build, grade, fetch, doctor, bench, exercises."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_build(args) -> int:
    from .build import build, repo_root

    report = build(repo_root(), check=args.check, force=args.force)
    for f in report.kept:
        print(f"kept    {f}: it was changed after the build wrote it (run or edited in Jupyter?), so it is not "
              "overwritten. Your work is safe: copy it into work/ (`course work` makes personal copies), then "
              "`course build --force` moves it to a backup and regenerates it.")
    for f in report.backups:
        print(f"backup  {f} (your edited version, moved aside by --force)")
    if args.check:
        if report.written or report.removed:
            print("Out of date (a maintainer runs `course build` after changing solutions/):")
            for f in report.written:
                print(f"  would rewrite {f}")
            for f in report.removed:
                print(f"  would remove  {f}")
        if report.stale:
            return 1
        print("weeks/ and solutions/ are up to date.")
        return 0
    for f in report.written:
        print(f"wrote   {f}")
    for f in report.removed:
        print(f"removed {f}")
    if not report.stale:
        print("Nothing to do: weeks/ and solutions/ are up to date.")
    return 1 if report.kept else 0


def cmd_work(args) -> int:
    from .build import repo_root, work_copies

    root = repo_root()
    for message in work_copies(root, args.refresh):
        print(message)
    print(f"Your notebooks are in {root / 'work'} (git, the build and the tests never touch them).")
    return 0


def cmd_grade(args) -> int:
    from .build import repo_root
    from .grade import grade

    try:
        root = repo_root()
    except FileNotFoundError:
        root = None
    from .sandbox import Limits

    out = Path(args.out or Path(args.folder) / "grades")
    grade(Path(args.folder), out, root=root, profile=args.profile, timeout=args.timeout, cell_timeout=args.cell_timeout,
          jobs=args.jobs, allow_no_sandbox=args.no_sandbox, limits=Limits(memory_mb=args.memory_mb))
    print(f"\nWrote {out / 'grades.csv'}, {out / 'grades_long.csv'} and {out / 'summary.md'}\n")
    print((out / "summary.md").read_text(encoding="utf-8"))
    return 0


def cmd_fetch(args) -> int:
    from .. import data

    statuses = data.fetch(args.names or None)  # prints one line per item as it goes
    failed = [name for name, status in statuses.items() if status.startswith("failed")]
    print(f"{len(statuses) - len(failed)} of {len(statuses)} ready in {data.cache_dir()}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed and args.names else 0


def cmd_doctor(args) -> int:
    from .. import data
    from ..runtime import describe, versions

    print("Runtime")
    for key, value in describe().items():
        print(f"  {key:10s} {value}")
    print("Libraries")
    problems = []
    for name, version in versions().items():
        print(f"  {name:22s} {version}")
        if version == "not installed":
            problems.append(f"{name} is missing: run `pip install -e .` in the repository (or `make lab`).")
    print(f"Cache ({data.cache_dir()})")
    for name, cached in data.cache_status().items():
        print(f"  {name:12s} {'cached' if cached else 'not cached'}")
        if not cached and name != "mnist":
            problems.append(f"{name} is not cached: run `course fetch {name}`.")
    print(f"Hub reachable: {data.hub_reachable()}")
    if problems:
        print("\nTo fix:")
        for p in problems:
            print(f"  - {p}")
        return 1
    print("\nEverything the course needs is here.")
    return 0


def cmd_bench(args) -> int:
    from .bench import bench, table
    from .build import repo_root

    root = repo_root()
    if args.table:
        print(table([Path(p) for p in args.table]))
        return 0
    notebooks = [Path(p) for p in args.notebooks] or None
    out = bench(root, args.profile, notebooks, out=Path(args.out) if args.out else None,
                executed=Path(args.executed) if args.executed else None)
    print(f"\nWrote {out}")
    print(table([out]))
    return 0


def cmd_exercises(args) -> int:
    from ..exercises import get_exercise, list_exercises

    for i in list_exercises(args.week):
        ex = get_exercise(i)
        print(f"{i:5s} {ex.title}  (reference: {ex.reference.replace(':', '.')})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="course", description="Tools for the LLM course.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="generate weeks/ from solutions/")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything is stale")
    p.add_argument("--force", action="store_true",
                   help="also regenerate notebooks in weeks/ that were edited by hand (each moved to a backup first)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("work", help="make your personal copies of the student notebooks in work/")
    p.add_argument("--refresh", nargs="+", metavar="WEEK/NOTEBOOK",
                   help="replace these copies with fresh ones (the old copy is kept as a backup)")
    p.set_defaults(func=cmd_work)

    p = sub.add_parser("grade", help="execute a folder of student notebooks and tabulate exercise verdicts")
    p.add_argument("folder")
    p.add_argument("--out", help="where to write grades.csv and summary.md (default FOLDER/grades)")
    p.add_argument("--profile", default="smoke", choices=["smoke", "cpu", "gpu"])
    p.add_argument("--timeout", type=float, default=600, help="seconds per notebook")
    p.add_argument("--cell-timeout", type=float, default=120, help="seconds per cell")
    p.add_argument("-j", "--jobs", type=int, default=1, help="notebooks graded at once (default 1)")
    p.add_argument("--memory-mb", type=int, default=8192, help="address-space limit per process in the sandbox")
    p.add_argument("--no-sandbox", action="store_true",
                   help="run without bubblewrap (only for submissions you trust: they could forge or harm others)")
    p.set_defaults(func=cmd_grade)

    p = sub.add_parser("fetch", help="fill the cache with the course's data and models")
    p.add_argument("names", nargs="*", help="digits mnist1d mnist shakespeare smollm2 minilm (default: all)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("doctor", help="print device, precision, profile, versions and cache state")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("bench", help="run solution notebooks under a profile and write a results file")
    p.add_argument("notebooks", nargs="*")
    p.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "gpu"])
    p.add_argument("--out")
    p.add_argument("--table", nargs="+", metavar="RESULTS", help="print a markdown table of results files")
    p.add_argument("--executed", metavar="DIR", help="also write each executed notebook, outputs included, under DIR")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("exercises", help="list the registered exercises")
    p.add_argument("--week", type=int)
    p.set_defaults(func=cmd_exercises)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as exc:
        # Expected problems (no repository here, a missing dataset offline, a bad name) get one clear line.
        print(f"course {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
