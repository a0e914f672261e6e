"""``make bench``'s rendering: it reads every benchmark run in ``bench/results/`` (and nothing
else there, such as the cost model's JSON), and the committed ``bench/RESULTS.md`` and README
tables are what it renders from them."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton_free

ROOT = Path(__file__).resolve().parents[1]


def _render():
    spec = importlib.util.spec_from_file_location("bench_render", ROOT / "bench" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_benchmark_runs_are_rendered():
    render = _render()
    files = {doc["file"] for doc in render.load()}
    assert files, "no benchmark run in bench/results/"
    assert all(name.endswith(".json") and "costmodel" not in name for name in files)
    assert (ROOT / "bench" / "results" / "costmodel-h100-before.json").exists()


def test_committed_results_and_readme_tables_are_current():
    render = _render()
    markdown = render.render_markdown(render.load())
    assert (ROOT / "bench" / "RESULTS.md").read_text() == markdown
    readme = (ROOT / "README.md").read_text()
    for part in markdown.split("\n## ")[1:]:
        assert "### " + part in readme
