"""Stand-in for the application's environment checks (``distill.validation.environment``):
a package where this project has no module, so that shadowing it would show."""

from __future__ import annotations

import sys


def check_python_version() -> list[str]:
    """Errors about the Python version (empty if it is acceptable)."""
    if sys.version_info < (3, 10):
        return ["Python 3.10+ required"]
    return []
