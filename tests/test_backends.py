"""Backend selection: auto, the environment variable, explicit names, errors."""

import pytest
import torch

from distill_fused.backends import ENV_VAR, available_backends, select_backend


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert select_backend("cpu").name == "torch"


@pytest.mark.parametrize("name", ["reference", "torch"])
def test_env_var_overrides_auto(monkeypatch, name):
    monkeypatch.setenv(ENV_VAR, name)
    assert select_backend("cpu").name == name


def test_explicit_name_beats_env_var(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    assert select_backend("cpu", "torch").name == "torch"


def test_unknown_name_lists_available(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match="available.*reference, torch"):
        select_backend("cpu")


def test_unavailable_backend_is_a_value_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "triton" not in available_backends("cpu")
    with pytest.raises(ValueError, match="'triton' is not available.*torch"):
        select_backend("cpu", "triton")


def test_env_var_reaches_compute_combined_loss(monkeypatch):
    from distill_fused import compute_combined_loss
    monkeypatch.setenv(ENV_VAR, "nope")
    x = torch.randn(1, 2, 16, 80)
    with pytest.raises(ValueError, match="DISTILL_LOSS_BACKEND"):
        compute_combined_loss(x, x, torch.zeros(1, 2), torch.zeros(1, 2))


def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    pytest.importorskip("triton", reason="Triton is not installed")
    monkeypatch.delenv(ENV_VAR, raising=False)
    # Selection only imports the backend; no GPU is needed to choose it.
    assert select_backend("cuda").name == "triton"


def test_mps_gets_torch(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert select_backend("mps").name == "torch"
    assert "triton" not in available_backends("mps")
