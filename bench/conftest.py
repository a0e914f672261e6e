"""``pytest bench/``: every case x provider, results written once the session ends."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import harness  # noqa: E402

_ROWS = []
_KERNEL_ROWS = []


@pytest.fixture(scope="session")
def results():
    return _ROWS


@pytest.fixture(scope="session")
def kernel_results():
    return _KERNEL_ROWS


def pytest_configure(config):
    # The test suite's pytest.ini disables pytest-benchmark; here it must run.
    if hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = False


def pytest_sessionfinish(session, exitstatus):
    if _ROWS or _KERNEL_ROWS:
        path = harness.results_path(harness.device())
        existed = path.exists()
        harness.write_results(_ROWS, harness.device(), _KERNEL_ROWS)
        replaced = "replacing this device's previous run" if existed else "new"
        print(f"\nbenchmark results written to {os.path.relpath(path)} ({replaced})")
