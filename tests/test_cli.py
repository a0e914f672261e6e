"""``python -m distill_fused`` / ``distill-fused``: the help, a clean failure for what this
machine cannot serve, a verdict that can fail, and the JSON output."""

import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from conftest import requires_cuda, requires_triton
from distill_fused import cli, selfcheck

# Not the interpreter's own small batch: under TRITON_INTERPRET=1 a run has two groups.
SMALL = ["--batch", "2", "--height", "16", "--width", "80", "--latent", "8", "--reps", "1"]
TRITON = importlib.util.find_spec("triton") is not None
OPTIONS = ["--backend", "--dtype", "--device", "--batch", "--height", "--width", "--latent",
           "--reps", "--json", "--quiet", "--verbose"]


def _run(*args, interpret=True):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "distill_fused", *args], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.mark.triton_free
def test_help_explains_every_option_and_column():
    run = _run("--help")
    assert run.returncode == 0 and not run.stderr
    help_text = run.stdout
    for option in OPTIONS:
        line = next(line for line in help_text.splitlines() if line.strip().startswith(option))
        assert len(line.split(maxsplit=2)) == 3, f"{option} has no explanation: {line!r}"
    for column in ("loss error", "grad error", "tolerance", "check", "median", "speed-up"):
        assert f"\n  {column}" in help_text, column
    assert "exit status" in help_text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: cuda is served")
@pytest.mark.triton_free
def test_an_unavailable_device_is_one_line_and_status_2():
    run = _run("--device", "cuda")
    assert run.returncode == 2
    assert run.stderr.startswith("distill-fused: error: --device cuda: ")
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert run.stdout == ""


@pytest.mark.parametrize("args, says", [
    (["--device", "tpu"], "--device tpu: not a device"),
    (["--backend", "triton", "--device", "cpu"], "--backend triton: loss backend 'triton' is "
                                                 "not available for cpu tensors"),
    (["--width", "2"], "--height 128 --width 2: the STFT loss needs H*W >= 1025"),
    (["--json", "/nonexistent/out.json"], "--json /nonexistent/out.json: No such file"),
    (["--batch", "x"], "argument --batch: must be a positive integer, got 'x'"),
])
@pytest.mark.triton_free
def test_what_cannot_run_here_is_one_line_and_status_2(args, says):
    run = _run(*args, "--quiet", interpret=False)
    assert run.returncode == 2, run.stderr
    error = run.stderr.splitlines()[-1]  # argparse's own errors follow its usage lines
    assert error.startswith("distill-fused: error: ") and says in error, run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""
    if not args[0] == "--batch":
        assert run.stderr.count("\n") == 1


def test_a_run_checks_every_backend_and_dtype_against_the_oracle(tmp_path):
    out = tmp_path / "result.json"
    run = _run(*SMALL, "--device", "cpu", "--json", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(out.read_text())
    assert doc["passed"] is True and doc["device"] == "cpu"
    seen = {(r["backend"], r["problem"]["width"], r["dtype"]) for r in doc["results"]}
    groups = [("reference", 80), ("torch", 80)] + (
        [("reference", 67), ("triton", 67)] if TRITON else [])  # the interpreter's own batch
    assert seen == {(b, w, d) for b, w in groups for d in ("float32", "float64")}
    for r in doc["results"]:
        assert set(r["loss_errors"]) == {"total_loss", "stft_loss", "mag_recon_loss",
                                         "if_recon_loss", "kl_loss", "recon_loss"}
        assert set(r["grad_errors"]) == {"recon", "mu", "logvar"}
        assert max(r["loss_errors"].values()) <= r["loss_tolerance"]
        assert all(e <= r["grad_tolerances"][k] for k, e in r["grad_errors"].items())
        assert r["median_ms"] > 0
    # float32 gradients: max(1e-3, twice the float32 reference's own error), per gradient
    for r in doc["results"]:
        reference_f32 = next(o for o in doc["results"] if o["backend"] == "reference"
                             and o["dtype"] == "float32" and o["problem"] == r["problem"])
        expected = ({k: max(1e-3, 2 * e) for k, e in reference_f32["grad_errors"].items()}
                    if r["dtype"] == "float32" else {k: 1e-8 for k in r["grad_errors"]})
        assert r["grad_tolerances"] == expected
        assert r["loss_tolerance"] == (1e-5 if r["dtype"] == "float32" else 1e-10)
    torch_f32 = next(r for r in doc["results"] if r["backend"] == "torch"
                     and r["dtype"] == "float32")
    assert torch_f32["speedup_vs_reference"] > 0
    assert 0 < max(torch_f32["grad_errors"].values()) < 1e-2  # a float32 run, measured
    table = run.stdout
    checks = len(seen) - len(groups) // 2  # the oracle rows (reference, float64) are no check
    assert f"{checks} of {checks} checks PASS" in table and "FAIL" not in table
    assert f"the {len(groups) // 2} rows marked oracle are the oracle itself" in table
    assert table.count(" ms ") == len(seen) and "speed-up" in table
    assert [r["oracle"] for r in doc["results"]].count(True) == len(groups) // 2
    # progress on stderr, as it goes
    assert "comparing with the float64 oracle" in run.stderr


@pytest.mark.triton_free
def test_json_to_stdout_is_the_whole_output():
    run = _run(*SMALL, "--backend", "torch", "--dtype", "float64", "--quiet", "--json", "-",
               interpret=False)
    assert run.returncode == 0 and run.stderr == ""
    doc = json.loads(run.stdout)
    assert [(r["backend"], r["dtype"]) for r in doc["results"]] == [
        ("reference", "float64"), ("torch", "float64")]


@pytest.mark.triton_free
def test_every_computation_starts_from_fresh_leaves():
    # Leaves that alias the batch would pile gradients up call after call (and an error
    # measured between two views of one accumulating tensor reads 0).
    checker = selfcheck.Checker(selfcheck.Problem(2, 16, 80, 8), torch.device("cpu"))
    first = checker._outcome("torch", torch.float64, checker.device)
    kept = {k: g.clone() for k, g in first.grads.items()}
    second = checker._outcome("torch", torch.float64, checker.device)
    oracle = checker.oracle(torch.float64)
    for k, g in kept.items():
        assert torch.equal(first.grads[k], g) and torch.equal(second.grads[k], g)
        assert selfcheck._relative(g, oracle.grads[k]) < 1e-12
    assert not any(t.requires_grad or t.grad is not None for t in checker.batch)


# A tolerance no computation in that dtype meets (the float64 oracle itself, error 0, still
# meets it): the verdict must say FAIL, for a loss or for a gradient alone, and the status 1.
@pytest.mark.parametrize("dtype, tighten, verdict", [
    ("float32", lambda m: m.setitem(selfcheck.LOSS_TOLERANCE, torch.float32, 1e-30),
     "0 of 2 checks PASS; FAIL: reference float32, torch float32"),
    ("float64", lambda m: m.setattr(selfcheck, "GRAD_TOLERANCE_FLOAT64", 1e-30),
     "0 of 1 checks PASS; FAIL: torch float64 (the row marked oracle is the oracle itself"),
], ids=["a loss", "a gradient"])
@pytest.mark.triton_free
def test_an_error_outside_its_tolerance_fails_with_status_1(monkeypatch, capsys, dtype, tighten,
                                                             verdict):
    tighten(monkeypatch)
    status = cli.main([*SMALL, "--backend", "torch", "--dtype", dtype, "--device", "cpu",
                       "--quiet"])
    assert status == 1
    assert verdict in capsys.readouterr().out


@pytest.mark.triton_free
def test_the_console_script_is_installed(capsys):
    (script,) = entry_points(group="console_scripts", name="distill-fused")
    assert script.value == "distill_fused.cli:main"
    with pytest.raises(SystemExit) as exit_:
        script.load()(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"distill-fused {cli.__version__}"
    installed = Path(sys.executable).parent / "distill-fused"
    if installed.exists():  # a venv install (a --target install puts it elsewhere)
        run = subprocess.run([str(installed), "--version"], capture_output=True, text=True)
        assert run.returncode == 0 and run.stdout.startswith("distill-fused ")


@requires_cuda
def test_a_run_on_the_gpu_passes_every_check(tmp_path):
    out = tmp_path / "result.json"
    run = _run(*SMALL, "--device", "cuda", "--json", str(out), interpret=False)
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(out.read_text())
    assert {r["backend"] for r in doc["results"]} == {"reference", "torch", "triton"}
    assert doc["passed"] is True and doc["device_name"]


@pytest.mark.triton_free
def test_the_former_demo_module_runs_the_same_command():
    run = subprocess.run([sys.executable, "-m", "distill_fused.demo", "--version"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("distill-fused ")


@pytest.mark.triton_free
def test_the_table_says_what_auto_picks_here_and_why(capsys):
    assert cli.main([*SMALL, "--backend", "torch", "--dtype", "float64", "--device", "cpu",
                     "--quiet"]) == 0
    out = capsys.readouterr().out
    assert ("auto (compute_combined_loss's default) picks torch for cpu tensors here: cpu "
            "tensors: the triton backend runs CUDA tensors") in out


@requires_triton
def test_where_auto_picks_triton_the_report_has_its_check():
    """On a GPU auto's pick is the verified triton backend: the report runs its first call on
    the batch and gives the verdict (here CPU tensors under CUDA's device policy, in Triton's
    interpreter, on a small batch)."""
    from distill_fused import verification
    from distill_fused.core.devices import emulated
    verification.forget()
    with emulated("cpu", like="cuda"):
        report = cli.auto_report(selfcheck.Problem(2, 16, 67, 8), torch.device("cpu"))
    verification.forget()
    assert report["backend"] == "triton" and "verified against the torch backend" in (
        report["why"] + report["verified"]["reason"])
    assert report["verified"]["backend"] == "triton"
    closest = report["verified"]["closest"]
    assert 0 <= closest["error"] <= closest["tolerance"]
    lines = cli.auto_lines(report, torch.device("cpu"))
    assert "passed: auto computes it with triton" in lines[1]


@pytest.mark.triton_free
def test_backend_triton_without_triton_says_it_is_not_installed_and_how_to_install_it(
        monkeypatch, capsys):
    from distill_fused import dispatch
    monkeypatch.setattr(dispatch, "_triton", None)
    monkeypatch.setattr(dispatch, "_triton_import_error", "No module named 'triton'")
    assert cli.main([*SMALL, "--backend", "triton", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Triton is not installed: No module named 'triton'" in err
    assert "pip install 'distill-fused[triton]'" in err and "TRITON_INTERPRET" not in err
