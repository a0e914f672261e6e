"""The report of the non-finite fallback: silent by default, a device-side count without a host
sync, or the seed's warning; chosen globally, by environment or per call."""

import logging

import pytest
import torch

from conftest import FAST_BACKENDS, SYNC_OPS, OpRecorder, make_batch
from distill_fused import (
    LossConfig,
    compute_combined_loss,
    nonfinite_count,
    reset_nonfinite_count,
    set_nonfinite_mode,
)
from distill_fused.api.environment import NONFINITE_VAR as ENV_VAR

SEED_WARNING = "compute_combined_loss: total_loss is NaN/Inf, falling back to recon_loss only"
BACKENDS = ["reference"] + FAST_BACKENDS


@pytest.fixture(autouse=True)
def fresh_mode(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    set_nonfinite_mode(None)
    reset_nonfinite_count()
    yield
    set_nonfinite_mode(None)
    reset_nonfinite_count()


def _batch(seed, finite: bool):
    recon, target, mu, logvar = make_batch("realistic", torch.float32, seed)
    if not finite:
        logvar[0, 0] = 1e5  # exp overflows: the KL and the total are inf, the recon term is not
    return [t.requires_grad_() for t in (recon, target, mu, logvar)]


def _loss(batch, backend, **kwargs):
    out = compute_combined_loss(*batch, LossConfig(), 1.0, backend=backend, **kwargs)
    out["total_loss"].backward()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_count_mode_counts_fallbacks_on_the_device(backend, seed, caplog):
    set_nonfinite_mode("count")
    for finite in (True, False, True, False, False):
        out = _loss(_batch(seed, finite), backend)
        assert torch.isfinite(out["total_loss"])
    count = nonfinite_count("cpu")
    assert count.dtype == torch.int64 and count.shape == ()
    assert int(count) == 3
    assert not caplog.records
    reset_nonfinite_count("cpu")
    assert int(nonfinite_count("cpu")) == 0


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_count_mode_makes_no_host_sync(backend, seed):
    batch = _batch(seed, finite=False)
    with OpRecorder() as rec:
        _loss(batch, backend, nonfinite="count")
        count = nonfinite_count("cpu")
    assert rec.ops and not [op for op in rec.ops if op in SYNC_OPS]
    assert int(count) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_fallbacks_are_silent_by_default(backend, seed, caplog):
    _loss(_batch(seed, finite=False), backend)
    assert int(nonfinite_count("cpu")) == 0
    assert not caplog.records


@pytest.mark.parametrize("backend", BACKENDS)
def test_warn_mode_logs_the_seed_warning(backend, seed, caplog, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "warn")
    with caplog.at_level(logging.WARNING, logger="distill_fused"):
        _loss(_batch(seed, finite=True), backend)
        assert not caplog.records
        _loss(_batch(seed, finite=False), backend)
    assert [r.getMessage() for r in caplog.records] == [SEED_WARNING]
    assert caplog.records[0].name == "distill_fused"
    assert int(nonfinite_count("cpu")) == 1


def test_call_argument_beats_the_setter_which_beats_the_environment(seed, monkeypatch, caplog):
    """The call's argument, then set_nonfinite_mode, then the environment."""
    batch = _batch(seed, finite=False)
    monkeypatch.setenv(ENV_VAR, "warn")
    set_nonfinite_mode("count")
    _loss(batch, "torch")
    assert not caplog.records and int(nonfinite_count("cpu")) == 1
    for t in batch:
        t.grad = None
    _loss(batch, "torch", nonfinite="silent")
    assert int(nonfinite_count("cpu")) == 1


@pytest.mark.parametrize("where", ["call", "setter", "env"])
def test_bad_mode_is_rejected_naming_its_source(where, seed, monkeypatch):
    batch = _batch(seed, finite=True)
    with pytest.raises(ValueError, match={"call": "nonfinite", "setter": "non-finite mode",
                                          "env": ENV_VAR}[where]):
        if where == "call":
            compute_combined_loss(*batch, nonfinite="loud")
        elif where == "setter":
            set_nonfinite_mode("loud")
        else:
            monkeypatch.setenv(ENV_VAR, "loud")
            compute_combined_loss(*batch)
