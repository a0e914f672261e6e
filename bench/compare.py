"""Does a change cost the default path anything? Time one provider's step (``harness``) with the
package of two source trees, in alternating processes on this machine, and print the medians
and peak extra memory of each run::

    git worktree add /tmp/base <commit>
    python bench/compare.py --base /tmp/base --rounds 3 --case smoke user long

A run imports the tree's ``src`` (before the installed package) and this tree's
``bench/harness``: the same steps and measurements for both. ``src`` holds no Triton kernels
(the installed package maps them in), so the providers are the ``torch`` and ``reference``
ones. Differences smaller than the spread between a tree's own runs are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPS = {"smoke": 300, "user": 20, "long": 7, "user-padded-none": 7, "dac-mel": 5}


def measure(provider: str, cases) -> dict:
    """In this process: ``{case: [median ms, peak extra MB]}``."""
    import torch

    import harness
    dev = harness.device()
    out = {}
    for name in cases:
        step = harness.make_step(provider, harness.CASES[name], dev)
        for _ in range(2):
            step()
        times = []
        for _ in range(REPS[name]):
            start = time.perf_counter()
            step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out[name] = [round(statistics.median(times) * 1e3, 2),
                     round(harness.peak_memory_mb(step, dev), 2)]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the other source tree (a worktree)")
    parser.add_argument("--provider", default="torch")
    parser.add_argument("--case", nargs="+", default=["smoke", "user", "long"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", help="also write the runs here (JSON lines, the device "
                                        "first)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # a child run: this tree
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.provider, args.case)))
        return
    here = Path(__file__).resolve().parents[1]
    import harness
    lines = [json.dumps({"device": harness.device_name(harness.device()),
                         "provider": args.provider, "base": str(args.base),
                         "fields": "case: [median ms, peak extra MB]"})]
    print(lines[0], flush=True)
    for _ in range(args.rounds):
        for tree in (Path(args.base).resolve(), here):
            env = dict(os.environ, PYTHONPATH=str(tree / "src"))
            run = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--base", "-",
                                  "--measure", "1", "--provider", args.provider,
                                  "--case", *args.case], env=env, capture_output=True,
                                 text=True, check=True)
            lines.append(json.dumps({"tree": str(tree),
                                     **json.loads(run.stdout.splitlines()[-1])}))
            print(lines[-1], flush=True)
    if args.write:
        Path(args.write).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
