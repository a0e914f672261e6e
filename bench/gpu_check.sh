#!/usr/bin/env bash
# The GPU evidence run, on the lent machine (device tool), from the repository root:
#   make gpu-wheels              here first: .whl/ holds this package's wheel and auraloss's
#   bash bench/gpu_check.sh      there, carrying .whl
# Installs both wheels into the image's python (torch 2.11, triton 3.6 there; nothing is built
# there), runs the whole test suite on the GPU (CUDA tests included) and the benchmarks, and
# leaves logs and results in $OUT.
set -uo pipefail
out="${OUT:-$(mktemp -d)}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

if ! ls .whl/auraloss-*.whl .whl/distill_fused-*.whl >/dev/null 2>&1; then
    echo "bench/gpu_check.sh: .whl/ must hold the auraloss and distill_fused wheels:" \
         "run 'make gpu-wheels' before the GPU run, and carry .whl" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site

{ nvidia-smi; echo "wheels built from: $(cat .whl/BUILT_FROM 2>/dev/null)"
  python3 -c "import torch, triton, auraloss, distill_fused
print('torch', torch.__version__, 'triton', triton.__version__, 'distill_fused', distill_fused.__file__)
print(torch.cuda.get_device_name())"; } > "$out/env.txt" 2>&1
cat "$out/env.txt"

# The suite imports distill_fused from /tmp/site (its kernels/ maps to distill_fused.kernels there).
python3 -m pytest -q tests -p no:cacheprovider -rs 2>&1 | tee "$out/tests.log" | tail -25
python3 -m pytest -q bench -p no:cacheprovider 2>&1 | tee "$out/bench.log" | tail -30
python3 bench/render.py
python3 -m distill_fused --device cuda --json "$out/selfcheck.json" 2>&1 | tee "$out/selfcheck.log"
cp bench/results/*.json bench/RESULTS.md bench/speedup.png "$out/" 2>/dev/null
ls -la "$out"
