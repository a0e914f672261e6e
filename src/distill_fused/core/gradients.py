"""The rules every hand-written backward of this package follows (``torch`` and ``triton``
backends alike).

The fast backends compute their gradients in the forward pass, in closed form (see
``backends/torch_backend.py`` and ``kernels/``); their backward only scales what was saved.
Two consequences are made explicit here:

- A term that no gradient reaches sends nothing: ``gated_grad`` gives exactly 0 where the
  incoming gradient is 0, even where the saved gradient is NaN or inf, as autograd (which
  never visits such a term) does. The non-finite guard relies on it: with the total not finite
  the STFT and KL terms get 0 and must not turn it into ``0 * nan``. Its ``unclamped`` adds the
  STFT term's clamp at 0. (The fused kernels decide "reached" by which outputs have
  an incoming gradient at all: ``kernels/combined.py``.)
- First-order only: the saved gradient is a constant to autograd, so a gradient of the gradient
  (``create_graph=True`` then a Hessian-vector product, nested ``torch.func.grad``) would miss
  every second-order term and come out silently wrong. ``first_order_only`` makes it an error
  at the double backward, naming the ``reference`` backend, which computes it with autograd.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

SECOND_ORDER_ERROR = (
    "distill_fused: the {backend!r} backend computes first-order gradients only; a gradient "
    "of its gradient (create_graph=True then backward, a Hessian-vector product, nested "
    "torch.func.grad) is not available from it. Use backend='reference', which computes "
    "higher-order gradients with autograd."
)


def gated_grad(grad: Optional[torch.Tensor], grad_output: torch.Tensor,
               unclamped: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``grad * grad_output`` for a saved gradient ``grad``, and exactly 0 where
    ``grad_output == 0`` (the term is not reached). With ``unclamped`` (``L``, for a term
    returned as ``max(L, 0)``), a reached term's gradient passes as through ``torch.clamp``: 0
    where ``L < 0`` or is NaN, and multiplied in there too (``0 * nan`` is NaN, as in the
    reference's autograd). (The kernels' ``gated_grad`` is the same rule.)"""
    if grad is None:
        return None
    gate = grad_output if unclamped is None else torch.where(unclamped >= 0, grad_output, 0.0)
    return torch.where(grad_output != 0, grad * gate.to(grad.dtype), 0.0)


class _SecondOrderError(torch.autograd.Function):
    """Identity on a backward's gradients, with the forward's inputs as further (unused)
    inputs: autograd then finds a path from the gradients back to those inputs, and meets this
    node's backward, the double backward: an error."""

    @staticmethod
    def forward(backend, n_grads, *tensors):
        return tuple(g.view_as(g) for g in tensors[:n_grads])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.backend = inputs[0]

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(SECOND_ORDER_ERROR.format(backend=ctx.backend))


def first_order_only(backend: str, grads: Sequence[Optional[torch.Tensor]],
                     inputs: Sequence[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """``grads``, a backward's results for ``inputs`` (its forward's tensor inputs), as they
    are, unless the backward runs with grad mode on (``create_graph=True``, or inside
    ``torch.func.grad``): then they pass through ``_SecondOrderError``, which ties them to
    ``inputs`` (the second-order terms they lack would flow along that tie) so that a gradient
    of them is an error instead of silently missing those terms."""
    if not torch.is_grad_enabled():
        return tuple(grads)
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return tuple(grads)
    tied = _SecondOrderError.apply(backend, len(present), *(grads[i] for i in present), *inputs)
    out = list(grads)
    for i, g in zip(present, tied):
        out[i] = g
    return tuple(out)
