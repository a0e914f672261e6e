"""The application adopts distill_fused, side by side with its own loss.

A stand-in for the application (``tests/host_app``: a package ``distill`` holding the seed's
``models/losses.py`` verbatim, its ``training/config.py`` verbatim, its epoch functions, and a
``validation/`` package) is copied into a temporary directory and put on ``PYTHONPATH``, beside
the installed ``distill_fused``. Its own training epoch (three AdamW steps with gradient
clipping, one NaN batch skipped) and validation epoch (under ``torch.no_grad()``) run:

- as it is: the reference;
- after ``distill_fused.patch_distill()``, then after ``unpatch_distill()`` (route b);
- with the diff from the README applied to its ``losses.py`` (route a).

Every step's six losses, the epoch averages, the validation results and the parameter update
must equal the application's own: float64 within 1e-10; float32 against the application's
float64 run within the spec's bounds (1e-5 for losses, 1e-3 for the update, or twice the
application's own float32 error where that is larger). Nothing of the application is
shadowed, its warnings are the same, and the patch undoes.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST_BACKENDS

HOST_APP = Path(__file__).parent / "host_app"
README = Path(__file__).parents[1] / "README.md"
SCALARS = ("train_loss", "recon_loss", "kl_loss", "stft_loss", "mag_recon_loss",
           "if_recon_loss")


def readme_diff() -> str:
    """The migration diff of route (a), as the README shows it."""
    section = README.read_text().split("## Adopting it in the application", 1)[1]
    match = re.search(r"```diff\n(.*?)```", section, re.S)
    assert match, "README: no diff in 'Adopting it in the application'"
    return match.group(1)


def apply_diff(root: Path, diff: str) -> None:
    """Apply a unified diff against the application's repository (``a/src/distill/...``) to the
    stand-in's tree (``distill/...``), checking every context and removed line."""
    for file_diff in re.split(r"(?m)^--- ", diff)[1:]:
        header, _, hunks = file_diff.partition("\n+++ ")
        path = root / Path(header.split()[0]).relative_to("a/src")
        lines = path.read_text().splitlines(keepends=True)
        out, pos = [], 0
        for match in re.finditer(r"(?m)^@@ -(\d+)(?:,\d+)? \+\S+ @@.*\n((?:[ +-].*(?:\n|$))*)",
                                 hunks):
            start = int(match.group(1)) - 1
            out += lines[pos:start]
            pos = start
            for line in match.group(2).splitlines():
                tag, text = line[:1], line[1:]
                if tag in " -":
                    assert lines[pos].rstrip("\n") == text, f"{path}:{pos + 1}: {text!r}"
                    if tag == " ":
                        out.append(lines[pos])
                    pos += 1
                else:
                    out.append(text + "\n")
        path.write_text("".join(out + lines[pos:]))


def build_host(root: Path, diff: str | None = None) -> Path:
    shutil.copytree(HOST_APP, root, ignore=shutil.ignore_patterns("__pycache__"))
    if diff is not None:
        apply_diff(root, diff)
    return root


def run_host(root: Path, runs, backend: str, **env_vars):
    """The stand-in's epochs in a fresh process, one result per ``ROUTE:DTYPE`` in ``runs``."""
    env = dict(os.environ, DISTILL_LOSS_BACKEND=backend, **env_vars)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    out = root / "results.pt"
    proc = subprocess.run([sys.executable, str(root / "run_steps.py"), str(out), *runs],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {r["run"]: r for r in torch.load(out, weights_only=False)}


@pytest.fixture(scope="module", params=FAST_BACKENDS)
def host_runs(request, tmp_path_factory):
    """Both routes with one backend: ``{route tree: {run: result}}``."""
    backend = request.param
    tmp = tmp_path_factory.mktemp(f"host-{backend}")
    seed_tree = build_host(tmp / "seed")
    patched = run_host(seed_tree, ["host:float64", "host:float32", "patch:float64",
                                   "patch:float32", "unpatch:float64"], backend)
    import_tree = build_host(tmp / "imported", diff=readme_diff())
    # DISTILL_NONFINITE=warn keeps the seed's warning on this route (README).
    imported = run_host(import_tree, ["host:float64", "host:float32"], backend,
                        DISTILL_NONFINITE="warn")
    return {"seed_tree": seed_tree, "import_tree": import_tree, "patched": patched,
            "imported": imported}


def _values(result):
    """Every number the application saw, in a fixed order (NaN where the loop skipped)."""
    values = [step[key] for step in result["steps"] for key in SCALARS]
    values += [result["train"][key] for key in sorted(result["train"])]
    values += [result["val"][key] for key in sorted(result["val"])]
    return values


def _rel(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    return abs(a - b) / abs(b) if b else abs(a)


def _update_rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def assert_same_run(got, host64, host32=None):
    """``got`` equals the application's float64 run: to 1e-10 when ``got`` is float64, else
    within the spec's float32 bounds, where ``host32`` gives the application's own error."""
    assert [s["step"] for s in got["steps"]] == [s["step"] for s in host64["steps"]]
    assert got["warnings"] == host64["warnings"]
    ref = _values(host64)
    if host32 is None:
        for i, (a, b) in enumerate(zip(_values(got), ref)):
            assert _rel(a, b) <= 1e-10, f"value {i}: {a!r} vs {b!r}"
        assert _update_rel(got["update"], host64["update"]) <= 1e-10
        return
    own = _values(host32)
    for i, (a, b, c) in enumerate(zip(_values(got), ref, own)):
        bound = max(1e-5, 2 * _rel(c, b))
        assert _rel(a, b) <= bound, f"value {i}: {a!r} vs {b!r} (bound {bound:.3g})"
    own_update = _update_rel(host32["update"], host64["update"])
    # The bound means something only if the application's float32 run tracks its float64 one.
    assert own_update < 0.05, f"test set-up: float32 update {own_update:.3g} off float64"
    bound = max(1e-3, 2 * own_update)
    err = _update_rel(got["update"], host64["update"])
    assert err <= bound, f"parameter update: {err:.3g} > {bound:.3g}"


def test_host_run_is_meaningful(host_runs):
    """The reference run took three optimizer steps and skipped the NaN batch, warning as the
    seed does, so the comparisons below cover all of that."""
    host = host_runs["patched"]["host:float64"]
    assert [s["step"] for s in host["steps"]] == [0, 1, 2, 3]
    assert math.isnan(host["steps"][2]["train_loss"])
    assert sum(not math.isnan(s["train_loss"]) for s in host["steps"]) == 3
    assert host["update"].abs().max() > 0
    assert host["warnings"] == [
        "compute_combined_loss: total_loss is NaN/Inf, falling back to recon_loss only",
        "NaN loss at epoch 1 step 2 -- skipping gradient update",
    ]
    assert host["provenance"]["distill_fused"] is None  # the seed run never imports us


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_patch_route_equals_host(host_runs, dtype):
    runs = host_runs["patched"]
    host32 = runs["host:float32"] if dtype == "float32" else None
    assert_same_run(runs[f"patch:{dtype}"], runs["host:float64"], host32)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_import_route_equals_host(host_runs, dtype):
    """Route (a) against the unmodified application's own runs."""
    reference = host_runs["patched"]
    host32 = reference["host:float32"] if dtype == "float32" else None
    assert_same_run(host_runs["imported"][f"host:{dtype}"], reference["host:float64"], host32)


def test_unpatch_restores_the_host(host_runs):
    runs = host_runs["patched"]
    restored, host = runs["unpatch:float64"], runs["host:float64"]
    assert _values(restored) == pytest.approx(_values(host), rel=0, abs=0, nan_ok=True)
    assert torch.equal(restored["update"], host["update"])
    assert restored["provenance"]["losses"] == host["provenance"]["losses"]
    assert restored["provenance"]["models"] == host["provenance"]["models"]


def test_nothing_of_the_host_is_shadowed(host_runs):
    """The application's modules come from its own tree on every route; the loss functions are
    ours exactly where a route puts them."""
    ours = {"distill_fused.api.losses"}
    for tree, runs in (("seed_tree", host_runs["patched"]),
                       ("import_tree", host_runs["imported"])):
        root = host_runs[tree]
        for name, result in runs.items():
            prov = result["provenance"]
            assert Path(prov["distill"]).is_relative_to(root), name
            assert Path(prov["distill.validation"]).is_relative_to(root), name
            assert prov["has_get_adaptive_config"], name
            if prov["distill_fused"] is not None:
                assert not Path(prov["distill_fused"]).is_relative_to(root), name
            loss_modules = set(prov["losses"].values()) | set(prov["models"].values())
            adopted = name.startswith("patch") or tree == "import_tree"
            assert loss_modules == (ours if adopted else {"distill.models.losses"}), name


def test_the_diff_is_checked_against_the_seed(tmp_path):
    """The README's diff applies to the seed's losses.py only where its context lines match."""
    diff = readme_diff()
    assert diff.count("\n+") >= 2 and "distill_fused" in diff
    wrong = diff.replace('         "recon_loss": recon_term,', '         "recon_loss": recon,')
    with pytest.raises(AssertionError, match="recon_loss"):
        build_host(tmp_path / "wrong", diff=wrong)
