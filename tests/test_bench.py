"""`course bench`: metrics recorded by a notebook land in the results file; `executed` keeps the outputs."""
import json

import nbformat

from course_utils.tools.bench import bench


def test_bench_records_metrics_and_keeps_executed_copy(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from course_utils import record\nprint('hello from the run')\n"
                                          "record('toy.value', 0.25)")]
    path = tmp_path / "solutions" / "week9_toy" / "01_toy.ipynb"
    path.parent.mkdir(parents=True)
    nbformat.write(nb, path)
    original = path.read_text()
    out = bench(tmp_path, "smoke", [path], out=tmp_path / "results.json", timeout=120, progress=lambda _: None,
                executed=tmp_path / "executed")
    entry = json.loads(out.read_text())["notebooks"]["solutions/week9_toy/01_toy.ipynb"]
    assert entry["status"] == "ok" and entry["metrics"]["toy.value"]["value"] == 0.25
    ran = nbformat.read(tmp_path / "executed" / "solutions/week9_toy/01_toy.ipynb", as_version=4)
    assert "hello from the run" in "".join(o.get("text", "") for o in ran.cells[0].outputs)
    assert path.read_text() == original  # the solution notebook itself is never modified
