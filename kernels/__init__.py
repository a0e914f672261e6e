"""Triton kernels of distill_fused (installed as ``distill_fused.kernels``).

Each module holds one stage: its math (and derivative) in the docstring, its ``@triton.jit``
kernels, their launchers (registered as ``torch.library`` ops by ``_common.kernel_op``) and,
where the stage is a loss of its own, the ``torch.autograd.Function`` that ties it to autograd:

- ``channels.py``: the ``[B, 2, H, W]`` inputs read in place and the gradients' stores;
- ``recon.py``: the reconstruction terms; ``kl.py``: the free-bits KL;
- ``stft_plan.py``: where the STFT's frames and spectra lie; ``stft_frames.py``: framing and
  its adjoint; ``stft_spectral.py``: the spectral sums and gradient; ``mrstft.py``: the STFT
  loss's stages in order;
- ``combined.py``: the whole combined loss, composed of the pieces above;
- ``_common.py``: what they share (registration, index math, scalars).

Only the ``triton`` backend imports this package (and so Triton); on CPU tensors the kernels
run under ``TRITON_INTERPRET=1``.
"""
