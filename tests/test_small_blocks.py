"""The kernels with tiny blocks, so that every multi-tile path runs on small inputs: many
programs per resolution, epilogue loops over several chunks of partials, KL tiles."""

import pytest
import torch

from conftest import assert_matches_oracle, make_batch, requires_triton
from distill_fused import MultiResolutionSTFTLoss

pytestmark = [requires_triton, pytest.mark.kernels]


@pytest.fixture
def tiny_blocks(monkeypatch):
    import distill_fused.kernels.combined as combined
    import distill_fused.kernels.kl as kl
    import distill_fused.kernels.recon as recon
    import distill_fused.kernels.stft_plan as stft_plan
    import distill_fused.kernels.stft_spectral as stft_spectral

    # Sizes below make tiles > block (several epilogue chunks) for every reduction, several
    # tiles for each program of the sums, framing tiles of a few columns, adjoint tiles that
    # the reflect padding spans several of.
    for module, name, block in ((stft_plan, "GRAD_TILE", 32), (stft_spectral, "EPILOGUE_BLOCK", 32),
                                (combined, "BLOCK", 32), (kl, "BLOCK", 32),
                                (recon, "BLOCK", 16), (recon, "FINAL_BLOCK", 8),
                                (stft_plan, "PARTIAL_PROGRAMS", 5), (stft_plan, "PARTIAL_TILE", 32),
                                (recon, "SUM_PROGRAMS", 3), (stft_plan, "FRAME_TILE", 64),
                                (stft_plan, "FRAME_COLS", 16), (stft_plan, "ADJOINT_BLOCK", 16)):
        monkeypatch.setattr(module, name, block)


@pytest.mark.parametrize("grouping", ["per_resolution", "shared"])
def test_tiny_blocks_match_oracle(tiny_blocks, seed, grouping):
    # A module of its own (fresh settings): plans are sized by the block in force when built.
    stft_fn = MultiResolutionSTFTLoss(fft_sizes=(64, 128, 32), hop_sizes=(16, 32, 8),
                                      win_lengths=(64, 100, 32))
    batch = make_batch("realistic", torch.float64, seed, batch=2, height=8, width=45,
                       latent_dim=37)
    assert_matches_oracle(batch, "triton", torch.float64, grad_target=True,
                          _stft_loss_fn=stft_fn, kl_weight=0.2, fft_grouping=grouping)
