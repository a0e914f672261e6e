#!/usr/bin/env bash
# Set-up for a fresh machine: a virtual environment in $1 (default .venv) holding this package,
# its test and benchmark extras, and torch; $2, if given, is a constraints file of further
# pins (the Triton 3.6 environment: constraints-triton36.txt). torch is installed only when it
# is missing, and then pinned through constraints.txt (the CPU wheel these machines carry), so
# that set-up never pulls a CUDA build onto a CPU-only machine.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$here/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    # System site-packages stay visible so that an installed torch (e.g. a CUDA build) is reused.
    "$python" -m venv --system-site-packages "$venv"
fi
py="$venv/bin/python"

pin=()
if ! "$py" -c "import torch" >/dev/null 2>&1; then
    pin=(-c "$here/constraints.txt")
fi
if [ -n "${2:-}" ]; then
    pin+=(-c "$2")
fi
# Before 0.2 this package was installed under the application's name, "distill": such an
# install (told from the application's by its summary) would shadow the application, so it goes.
if "$py" -m pip show distill 2>/dev/null | grep -q "^Summary: Fused, exact training loss"; then
    "$py" -m pip uninstall -q -y distill
fi
"$py" -m pip install -q --disable-pip-version-check "${pin[@]}" -e "$here[test,bench]"
"$py" -c "import torch, distill_fused; print('distill_fused ready in $venv: torch', torch.__version__)"
