"""Triton kernels of distill_fused (installed as ``distill_fused.kernels``).

Each module holds one fused operation: its Triton kernel(s), the launcher, and the
``torch.autograd.Function`` that ties them to autograd. Triton is imported lazily by the
``triton`` backend, never by ``import distill_fused``; on CPU tensors the kernels run under
``TRITON_INTERPRET=1``.
"""
