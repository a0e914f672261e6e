"""Backend selection: auto, the environment variable, explicit names, errors."""

import pytest
import torch

from distill_fused.api.environment import BACKEND_VAR, backend_choice
from distill_fused.dispatch import available_backends, select_backend


def chosen(device, argument=None) -> str:
    """The backend a call with ``backend=argument`` gets for tensors on ``device``."""
    return select_backend(device, *backend_choice(argument)).name


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv(BACKEND_VAR, raising=False)
    assert chosen("cpu") == "torch"


@pytest.mark.parametrize("name", ["reference", "torch"])
def test_env_var_overrides_auto(monkeypatch, name):
    monkeypatch.setenv(BACKEND_VAR, name)
    assert chosen("cpu") == name


def test_explicit_name_beats_env_var(monkeypatch):
    monkeypatch.setenv(BACKEND_VAR, "reference")
    assert chosen("cpu", "torch") == "torch"


def test_unknown_name_lists_available_and_names_its_source(monkeypatch):
    monkeypatch.setenv(BACKEND_VAR, "cudnn")
    with pytest.raises(ValueError, match="available.*reference, torch"):
        chosen("cpu")
    with pytest.raises(ValueError, match=f"from {BACKEND_VAR}"):
        chosen("cpu")
    with pytest.raises(ValueError, match="from the backend argument"):
        chosen("cpu", "cudnn")


def test_unavailable_backend_is_a_value_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "triton" not in available_backends("cpu")
    with pytest.raises(ValueError, match="'triton' is not available.*torch"):
        chosen("cpu", "triton")


def test_env_var_reaches_compute_combined_loss(monkeypatch):
    from distill_fused import compute_combined_loss
    monkeypatch.setenv(BACKEND_VAR, "nope")
    x = torch.randn(1, 2, 16, 80)
    with pytest.raises(ValueError, match="DISTILL_LOSS_BACKEND"):
        compute_combined_loss(x, x, torch.zeros(1, 2), torch.zeros(1, 2))


def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    pytest.importorskip("triton", reason="Triton is not installed")
    monkeypatch.delenv(BACKEND_VAR, raising=False)
    # Selection only imports the backend; no GPU is needed to choose it.
    assert chosen("cuda") == "triton"


def test_auto_on_mps_is_torch_and_triton_is_unavailable(monkeypatch):
    monkeypatch.delenv(BACKEND_VAR, raising=False)
    assert chosen("mps") == "torch"
    assert "triton" not in available_backends("mps")
