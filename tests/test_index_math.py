"""The kernels' index math: 32-bit, with divisions by a multiply and a shift (``magic``,
``divide``), below ``kernels._common.INDEX_LIMIT`` elements; 64-bit with divisions past it.
The 64-bit path is taken here by lowering the limit, so both paths of every kernel run against
the oracle (values and gradients, float64), on strided inputs and odd sizes too."""

import random

import pytest
import torch

from conftest import (
    assert_matches_oracle,
    make_batch,
    requires_triton,
    with_and_without_target_grad,
)
from distill_fused import LossConfig, MultiResolutionSTFTLoss, STFTLossConfig

triton = pytest.importorskip("triton", reason="Triton is not installed")
tl = triton.language
from distill_fused.kernels._common import INDEX_LIMIT, divide, magic  # noqa: E402

pytestmark = [requires_triton, pytest.mark.kernels]


def _divisors_and_numerators(seed):
    """Every divisor up to 3000 and random ones up to the limit, each with the numerators at
    the edges of its quotients (multiples, one off them, the largest allowed) and random ones."""
    rng = random.Random(seed)
    divisors = list(range(1, 3000)) + [rng.randrange(1, INDEX_LIMIT + 1) for _ in range(3000)]
    divisors += [INDEX_LIMIT, 2**29, 2**29 + 1, 2**15 + 1]
    for d in divisors:
        top = INDEX_LIMIT // d * d
        numerators = [0, 1, d - 1, d, d + 1, top - 1, top, INDEX_LIMIT]
        numerators += [rng.randrange(0, INDEX_LIMIT + 1) for _ in range(8)]
        yield d, [n for n in numerators if 0 <= n <= INDEX_LIMIT]


def test_magic_numbers_divide_exactly_below_the_limit(seed):
    for d, numerators in _divisors_and_numerators(seed):
        m, s = magic(d)
        assert 0 < m < 2**31, d  # an int32 meta table holds it
        for n in numerators:
            assert (n * m) >> s == n // d, (n, d)


def test_magic_numbers_fail_past_the_limit():
    """The bound is tight enough to matter: past 2^30 some quotient comes out wrong, so the
    kernels must switch to 64-bit division there (the test can fail)."""
    wrong = 0
    for d in (3, 7, 641, 6700417, 2**30 - 3):
        m, s = magic(d)
        wrong += sum((n * m) >> s != n // d for n in range(2**33 - 50, 2**33))
    assert wrong > 0


@triton.jit
def quotient_kernel(n_ptr, out_ptr, count, divisor, m, s, WIDE: tl.constexpr,
                    BLOCK: tl.constexpr):
    index = tl.arange(0, BLOCK)
    mask = index < count
    n = tl.load(n_ptr + index, mask=mask, other=0)
    tl.store(out_ptr + index, divide(n, divisor, m, s, WIDE), mask=mask)


@pytest.mark.parametrize("wide", [False, True], ids=["int32", "int64"])
def test_divide_in_a_kernel(wide, seed):
    """``divide`` as the kernels run it, both paths, against ``//``."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.int64 if wide else torch.int32
    for d in (1, 2, 3, 7, 94, 257, 12032, 1000003, INDEX_LIMIT):
        n = torch.randint(0, INDEX_LIMIT + 1, (60,), generator=gen).to(dtype)
        n[:4] = torch.tensor([0, d - 1, d, INDEX_LIMIT // d * d])
        out = torch.full_like(n, -1)
        quotient_kernel[(1,)](n, out, n.numel(), d, *magic(d), WIDE=wide, BLOCK=64)
        assert torch.equal(out, n // d), d


def test_the_limit_selects_the_width(monkeypatch):
    from distill_fused.kernels import _common
    small = torch.empty(3, 5)
    assert not _common.is_wide(1024, small)
    monkeypatch.setattr(_common, "INDEX_LIMIT", 1024 + 15)
    assert not _common.is_wide(1024, small)  # 15 elements and a tile up to the limit...
    monkeypatch.setattr(_common, "INDEX_LIMIT", 1024 + 14)
    assert _common.is_wide(1024, small)  # ...one past it
    strided = torch.empty(4, 100)[:, ::50]  # 8 elements reaching 351
    assert _common.is_wide(1024, strided)
    monkeypatch.setattr(_common, "INDEX_LIMIT", 1024 + 351)
    assert not _common.is_wide(1024, strided)


@pytest.fixture
def wide_index(monkeypatch):
    """Every kernel with 64-bit index math (the limit set to 0)."""
    from distill_fused.kernels import _common
    monkeypatch.setattr(_common, "INDEX_LIMIT", 0)


@with_and_without_target_grad
def test_64_bit_index_math_matches_oracle(wide_index, grad_target, seed):
    config = LossConfig(stft=STFTLossConfig(fft_sizes=(64, 90), hop_sizes=(16, 33),
                                            win_lengths=(64, 61)))
    batch = make_batch("realistic", torch.float64, seed, batch=3, height=13, width=81,
                       latent_dim=5)
    assert_matches_oracle(batch, "triton", torch.float64, grad_target=grad_target,
                          loss_config=config, kl_weight=0.1)


def test_64_bit_index_math_module_on_strided_signals_equals_the_reference(wide_index, seed):
    """``create_stft_loss``'s module on a strided [B, C, T] view: the framing kernel's
    divisions by channels and width, 64-bit."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(2, 3, 2 * 301, dtype=torch.float64, generator=gen)
    y = torch.randn(2, 3, 301, dtype=torch.float64, generator=gen)
    settings = dict(fft_sizes=[64, 128], hop_sizes=[16, 50], win_lengths=[64, 100])
    results = []
    for backend in ("reference", "triton"):
        x = base[..., ::2].detach().requires_grad_()
        loss = MultiResolutionSTFTLoss(**settings, backend=backend)(x, y)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (ref, ref_grad), (got, grad) = results
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)
