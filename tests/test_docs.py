"""Every Python block of the README and of ``docs/`` runs as written, each on its own in a fresh
interpreter, so the documentation cannot rot. A block preceded by the line
``<!-- snippet: with the application -->`` needs the application (``distill``): it runs with
the stand-in of ``tests/host_app`` importable. The pages link only to files that exist."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton_free  # the blocks run without TRITON_INTERPRET

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HOST_APP = Path(__file__).parent / "host_app"
WITH_APPLICATION = "<!-- snippet: with the application -->"


# A block followed (after a line of prose or none) by this line and a ```text block must print
# what that block shows.
OUTPUT = "<!-- output -->"


def _blocks():
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"```python\n(.*?)^```", text, re.M | re.S):
            line = text.count("\n", 0, match.start()) + 1
            preceding = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            yield pytest.param(match.group(1), preceding.strip() == WITH_APPLICATION,
                               _shown_output(text[match.end():]),
                               id=f"{page.relative_to(ROOT)}:{line}")


def _shown_output(after: str):
    """The ```text block after ``OUTPUT``, where that line comes before the next fence."""
    head, marker, rest = after.partition(OUTPUT + "\n```text\n")
    if not marker or "```" in head:
        return None
    return rest.split("```", 1)[0]


BLOCKS = list(_blocks())


def test_the_pages_have_python_blocks():
    pages = {b.id.split(":")[0] for b in BLOCKS}
    assert {"README.md", "docs/usage.md"} <= pages, pages


@pytest.mark.parametrize("code, with_application, output", BLOCKS)
def test_python_block_runs_as_written(code, with_application, output, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    env.pop("TRITON_INTERPRET", None)  # as a user's shell has it
    if with_application:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HOST_APP),
                                                          env.get("PYTHONPATH")]))
    script = tmp_path / "snippet.py"
    script.write_text(code)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 0, f"the block fails:\n{code}\n{run.stderr}"
    if output is not None:
        assert run.stdout == output, f"the block prints:\n{run.stdout}\nits page shows:\n{output}"


def test_the_quick_start_shows_what_it_prints():
    assert [b for b in BLOCKS if b.id.startswith("README.md") and b.values[2] is not None]


def test_relative_links_point_to_files_that_exist():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_no_page_points_outside_the_repository():
    for page in PAGES:
        assert "../shared" not in page.read_text(), page
