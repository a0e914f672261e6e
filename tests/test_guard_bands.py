"""The tests' guard bands (conftest.py) catch what they are there for: a kernel storing one
element past either end of its output fails the test that ran it, and one loading one element
past an input's end reads NaN. Shown with a small Triton kernel that copies with an offset."""

import pytest
import torch

from conftest import guarded, requires_triton

pytestmark = requires_triton

N = 37


def _copy(src, dst, count, shift):
    """``dst[i + shift] = src[i]`` for ``i < count``."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(src_ptr, dst_ptr, count, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        mask = i < count
        tl.store(dst_ptr + i + SHIFT, tl.load(src_ptr + i, mask=mask, other=0.0), mask=mask)

    copy_kernel[(1,)](src, dst, count, SHIFT=shift, BLOCK=64)


@pytest.mark.parametrize("shift, count, side",
                         [(0, N + 1, "after"), (-1, N, "before"), (1, N, "after")],
                         ids=["one-too-many", "one-before", "shifted"])
def test_a_store_past_the_buffer_fails_the_test(guarded_kernel_outputs, shift, count, side):
    src = torch.arange(N + 1, dtype=torch.float32)
    dst = guarded_kernel_outputs((N,), torch.float32, "cpu")
    _copy(src, dst, count, shift)
    with pytest.raises(AssertionError, match=f"wrote 1 element\\(s\\) {side} its output"):
        guarded_kernel_outputs.check()
    guarded_kernel_outputs.buffers.clear()  # this test's own failure, shown: not the teardown's


def test_a_store_within_the_buffer_passes(guarded_kernel_outputs):
    src = torch.arange(N, dtype=torch.float32)
    dst = guarded_kernel_outputs((N,), torch.float32, "cpu")
    assert torch.isnan(dst).all()  # poisoned until written
    _copy(src, dst, N, 0)
    guarded_kernel_outputs.check()
    assert torch.equal(dst, src)


def test_a_load_past_an_input_reads_nan():
    src = guarded(torch.arange(N, dtype=torch.float32))
    assert src.is_contiguous() and src.storage_offset() > 0
    dst = torch.zeros(N + 1)
    _copy(src, dst, N + 1, 0)
    assert torch.equal(dst[:N], torch.arange(N, dtype=torch.float32))
    assert torch.isnan(dst[N])
