"""Benchmark: run every solution notebook under one profile and write times, memory and measured numbers.

The README's time table and every number quoted in the notebooks come from these results files
(`benchmarks/<profile>-<hardware>.json`), never from timed tests.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
from pathlib import Path

from .execute import run_notebook
from ..runtime import versions


def hardware() -> str:
    """A short name for this machine: the GPU if there is one, else the CPU model and core count."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-").replace("--", "-")[:60]


def bench(root: Path, profile: str, notebooks: list[Path] | None = None, *, out: Path | None = None,
          timeout: float = 3600, progress=print, executed: Path | None = None) -> Path:
    """Run the notebooks under `profile`; merge their results into the results file and return its path.
    With `executed`, each executed notebook (outputs included) is also written under that folder, so the
    prose can be checked against what the run printed."""
    notebooks = notebooks or [root / "solutions"]
    # a folder stands for every notebook below it (`course bench solutions/week4_transformer`)
    notebooks = [n for p in notebooks for n in (sorted(Path(p).rglob("week*/*.ipynb")) or sorted(Path(p).glob("*.ipynb"))
                                                  if Path(p).is_dir() else [Path(p)])]
    hw = hardware()
    out = out or root / "benchmarks" / f"{profile}-{slug(hw)}.json"
    data = json.loads(out.read_text()) if out.exists() else {"notebooks": {}}
    data.update({"profile": profile, "hardware": hw, "versions": versions()})
    for nb in notebooks:
        rel = nb.resolve().relative_to(root.resolve()).as_posix()
        progress(f"{rel} ({profile}) ...")
        with tempfile.TemporaryDirectory() as tmp:
            metrics_file = Path(tmp) / "metrics.jsonl"
            metrics_file.touch()
            env = {"COURSE_PROFILE": profile, "COURSE_METRICS_FILE": str(metrics_file), "COURSE_STRICT": "1"}
            outcome = run_notebook(nb, env=env, timeout=timeout, cell_timeout=timeout,
                                   save_to=Path(executed) / rel if executed else None)
            metrics = {}
            for line in metrics_file.read_text().splitlines():
                m = json.loads(line)
                metrics[m["name"]] = {"value": m["value"], "unit": m["unit"]}
        data["notebooks"][rel] = {"status": outcome.status, "seconds": round(outcome.seconds, 1),
                                  "peak_rss_mb": round(outcome.peak_rss_mb), "error": outcome.error,
                                  "metrics": metrics, "date": datetime.date.today().isoformat()}
        progress(f"    {outcome.status} in {outcome.seconds:.0f} s, peak {outcome.peak_rss_mb:.0f} MB"
                 + (f" — {outcome.error}" if outcome.error else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    data["notebooks"] = dict(sorted(data["notebooks"].items()))
    out.write_text(json.dumps(data, indent=1) + "\n")
    return out


def table(results: list[Path]) -> str:
    """A markdown table of seconds per notebook, one column per results file (profile, hardware)."""
    runs = [json.loads(p.read_text()) for p in results]
    names = sorted({nb for r in runs for nb in r["notebooks"]})
    header = "| notebook | " + " | ".join(f"{r['profile']} ({r['hardware']})" for r in runs) + " |"
    lines = [header, "|---|" + "---|" * len(runs)]
    for name in names:
        cells = []
        for r in runs:
            nb = r["notebooks"].get(name)
            cells.append("—" if nb is None else f"{nb['seconds']:.0f} s" if nb["status"] == "ok" else nb["status"])
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
