"""Triton kernels of distill (installed as ``distill.kernels``).

Each module holds one fused operation: its Triton kernel(s), the launcher, and the
``torch.autograd.Function`` that ties them to autograd. Triton is imported lazily by the
``triton`` backend, never by ``import distill``; on CPU tensors the kernels run under
``TRITON_INTERPRET=1``.
"""
