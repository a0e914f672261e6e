"""The ``torch`` backend: pure PyTorch, the same code on CPU, CUDA and MPS.

Less work than the reference: one ``torch.stft`` per resolution for input and target together,
no phase (so no ``torch.angle``, which MPS lacks), the log term from one ``log`` of a ratio,
and closed-form gradients computed in the forward pass, so that autograd keeps one
signal-sized tensor per input instead of a graph of spectrogram-sized intermediates. Nothing
here reads a value back to the host.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..core.devices import accumulation_dtype
from ..core.gradients import first_order_only, gated_grad
from ..core.outputs import Combined, compute_dtype
from ..core.settings import MRSTFTSettings
from ..core.tracing import tracing
from .assemble import assemble_combined_loss

# --------------------------------------------------------------------------------------------
# Multi-resolution STFT loss
# --------------------------------------------------------------------------------------------

def half_spectrum_weights(n_fft: int, device, dtype) -> torch.Tensor:
    """``h[k]`` such that ``irfft(h * G, norm="forward")`` is the adjoint of the onesided rfft.

    The onesided rfft of a real frame ``f`` is ``X_k = sum_n f_n exp(-2i pi k n / N)`` for
    ``k = 0 .. N//2``; for a real loss with ``G_k = dL/dRe X_k + i dL/dIm X_k`` the chain rule
    gives ``dL/df_n = sum_k Re(G_k exp(2i pi k n / N))``. ``irfft`` counts every bin but DC and
    (for even N) Nyquist twice, so those interior bins are halved first.
    """
    h = torch.full((n_fft // 2 + 1,), 0.5, device=device, dtype=dtype)
    h[0] = 1.0
    if n_fft % 2 == 0:
        h[-1] = 1.0
    return h


def overlap_add(frames: torch.Tensor, hop: int, length: int) -> torch.Tensor:
    """Adjoint of cutting ``[S, length]`` into frames ``[S, n_frames, n_fft]`` every ``hop``.

    When ``hop`` divides ``n_fft`` the frames are ``n_fft / hop`` blocks of ``hop`` samples and
    the sum is that many shifted adds; otherwise (or for many blocks) ``fold`` does it.
    """
    signals, n_frames, n_fft = frames.shape
    blocks = n_fft // hop
    if n_fft % hop or blocks > 16:
        out = F.fold(frames.transpose(1, 2), output_size=(1, length), kernel_size=(1, n_fft),
                     stride=(1, hop))
        return out.view(signals, length)
    out = frames.new_zeros(signals, max(length, (n_frames + blocks - 1) * hop))
    out_blocks = out[:, :(n_frames + blocks - 1) * hop].view(signals, -1, hop)
    frame_blocks = frames.view(signals, n_frames, blocks, hop)
    for j in range(blocks):
        out_blocks[:, j:j + n_frames] += frame_blocks[:, :, j]
    return out[:, :length]


def reflect_pad_adjoint(padded: torch.Tensor, pad: int) -> torch.Tensor:
    """Adjoint of reflect-padding ``[..., T]`` by ``pad`` samples on each side (``pad < T``):
    ``[..., T + 2 pad]`` back to ``[..., T]``. Sample ``t`` of the signal appears at ``pad + t``,
    and, reflected, at ``pad - t`` (for ``1 <= t <= pad``) and at ``pad + 2 (T - 1) - t`` (for
    ``T - 1 - pad <= t <= T - 2``), so its gradient is the sum of those three places.

    Slices and flips, not ``aten.reflection_pad1d_backward``: that kernel returns wrong
    gradients on MPS for padded lengths past 65536 (pytorch/pytorch#196949, torch 2.13) and
    adds with atomics on CUDA (rounding that varies run to run); this sums in one fixed order
    on every device."""
    length = padded.shape[-1] - 2 * pad
    grad = padded[..., pad:pad + length].clone()
    grad[..., 1:pad + 1] += padded[..., :pad].flip(-1)
    grad[..., length - 1 - pad:length - 1] += padded[..., pad + length:].flip(-1)
    return grad


def _stft_adjoint(grad_spec: torch.Tensor, window: torch.Tensor, hop: int,
                  like: torch.Tensor) -> torch.Tensor:
    """Adjoint of ``torch.stft(center=True, pad_mode="reflect", onesided=True)``.

    ``grad_spec`` is ``[S, frames, F]`` with the half-spectrum weights already applied; the
    result has the shape of ``like`` (``[S, T]``): inverse rfft per frame, times the window,
    overlap-added, then the reflect padding folded back onto the signal.
    """
    n_fft = window.shape[0]
    pad = n_fft // 2
    frames = torch.fft.irfft(grad_spec, n=n_fft, dim=-1, norm="forward")
    frames.mul_(window)
    return reflect_pad_adjoint(overlap_add(frames, hop, like.shape[-1] + 2 * pad), pad)


def cached(settings: MRSTFTSettings, key, make, *args):
    """``settings.cache[key]``, made on first use as ``make(*args)``; a traced step makes its
    own and keeps none (a tensor made inside a compiled graph must not outlive it)."""
    value = settings.cache.get(key)
    if value is None:
        value = make(*args)
        if not tracing():
            settings.cache[key] = value
    return value


def _mrstft_value_and_grads(x: torch.Tensor, y: torch.Tensor, settings: MRSTFTSettings,
                            grad_x: bool, grad_y: bool):
    """MRSTFT of ``x, y`` (``[S, T]``, same dtype) and, when asked, its gradients: ``[S, T]``
    for one of them, ``[2S, T]`` (x's rows, then y's) for both, else ``None``.

    Per resolution, with ``P = max(|X|^2, eps)``, ``Mx = sqrt(Px)``, ``D = Mx - My``,
    ``K = numel(Mx)``, ``num = ||D||``, ``den = ||My||``, ``s = sign(ln Mx - ln My)`` and R
    resolutions::

        dL/dMx = ( w_sc * D / (num den) + w_log * s / (K Mx) + w_lin * sign(D) / K ) / R
        dL/dMy = (-w_sc * D / (num den) - w_sc * num My / den^3
                  - w_log * s / (K My) - w_lin * sign(D) / K ) / R
        dL/dX  = dL/dMx * X / Mx   where |X|^2 >= eps, else 0 (the clamp holds)

    ``dL/dX`` goes back to the signal through the adjoint of the STFT (``_stft_adjoint``).
    """
    signals = x.shape[0]
    device, dtype = x.device, x.dtype
    both = torch.cat([x, y])
    grad_rows = slice(0 if grad_x else signals, 2 * signals if grad_y else signals)
    n_res = len(settings.resolutions)
    weights = (settings.w_sc, settings.w_log_mag, settings.w_lin_mag)
    w_sc, w_log, w_lin = (w / n_res for w in weights)

    loss = torch.zeros((), device=device, dtype=dtype)
    grad = None
    for index, res in enumerate(settings.resolutions):
        window = cached(settings, ("window", index, device, dtype), settings.padded_window,
                         index, device, dtype)
        # [2S, frames, F]: torch.stft's own memory order, so every pass below is contiguous.
        spec = torch.stft(both, res.n_fft, res.hop, window=window, center=True,
                          pad_mode="reflect", normalized=False, onesided=True,
                          return_complex=True).transpose(1, 2)
        power = torch.addcmul(spec.real.square(), spec.imag, spec.imag)
        clamped = power < settings.eps
        mag = power.clamp_min_(settings.eps).sqrt_()
        mx, my = mag[:signals], mag[signals:]
        count = mx.numel()
        diff = mx - my
        # Plain sums: torch's cascade summation keeps float32 accurate over ~1e6 terms, where
        # linalg.vector_norm's running sum loses digits (4e-6 relative at the user case).
        if w_sc:
            num = diff.square().sum().sqrt()
            den = my.square().sum().sqrt()
            loss = loss + w_sc * (num / den)
        if w_log:
            log_ratio = torch.log(mx / my)
            loss = loss + (w_log / count) * log_ratio.abs().sum()
        if w_lin:
            loss = loss + (w_lin / count) * diff.abs().sum()
        if not (grad_x or grad_y):
            continue

        # coef = dL/dM / M on the rows that need a gradient (sign-flipped terms for y).
        coefs = []
        for is_x, m in ((True, mx), (False, my)):
            if not (grad_x if is_x else grad_y):
                continue
            sign = 1.0 if is_x else -1.0
            coef = torch.zeros_like(m)
            if w_log:
                coef.add_(torch.sign(log_ratio).div_(m), alpha=sign * w_log / count)
            if w_lin:
                coef.add_(torch.sign(diff), alpha=sign * w_lin / count)
            if w_sc:
                # d||D||/dD = D / ||D||, and 0 at D = 0 (as torch.norm's backward has it; a
                # NaN norm gives NaN).
                sc_scale = torch.where(num == 0, 0.0, w_sc / (num * den))
                coef.addcmul_(diff, sign * sc_scale)
                if not is_x:
                    coef.addcmul_(m, -w_sc * num / den.pow(3))
            coefs.append(coef.div_(m))
        coef = torch.cat(coefs) if len(coefs) == 2 else coefs[0]
        half = cached(settings, ("half", index, device, dtype), half_spectrum_weights,
                       res.n_fft, device, dtype)
        coef.masked_fill_(clamped[grad_rows], 0.0).mul_(half)
        res_grad = _stft_adjoint(spec[grad_rows] * coef, window, res.hop, both[grad_rows])
        grad = res_grad if grad is None else grad + res_grad

    return loss, grad


class _MRSTFTLoss(torch.autograd.Function):
    """MRSTFT with its gradients computed in the forward pass (see ``_mrstft_value_and_grads``);
    backward only scales them by ``grad_output``.

    With ``clamped``, the output is ``max(MRSTFT, 0)`` (the combined loss's STFT term) and the
    gradient passes as through ``torch.clamp``: 0 where MRSTFT < 0 or is NaN, multiplied in
    (``0 * nan`` is NaN, as in the oracle) wherever a gradient reaches the term at all."""

    @staticmethod
    def forward(x, y, settings, grad_x, grad_y, clamped):
        loss, grad = _mrstft_value_and_grads(x, y, settings, grad_x, grad_y)
        # The unclamped value is what the clamp's gradient needs (and only it).
        return (loss.clamp_min(0.0), loss, grad) if clamped else (loss, None, grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, loss, grad = output
        ctx.mark_non_differentiable(*(t for t in (loss, grad) if t is not None))
        ctx.save_for_backward(loss, grad, *inputs[:2])

    @staticmethod
    def backward(ctx, grad_output, _grad_loss, _grad_grad):
        loss, grad, x, y = ctx.saved_tensors
        grad = gated_grad(grad, grad_output, loss)
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:
            gx, gy = grad.chunk(2)
        else:
            gx, gy = (grad, None) if ctx.needs_input_grad[0] else (None, grad)
        return (*first_order_only("torch", (gx, gy), (x, y)), None, None, None, None)


def mrstft_loss(x: torch.Tensor, y: torch.Tensor, settings: MRSTFTSettings, *,
                fft_grouping: str = "per_resolution", clamped: bool = False) -> torch.Tensor:
    """MRSTFT of ``[B, C, T]`` signals (half precision computed in float32), or
    ``max(MRSTFT, 0)`` with ``clamped``; no gradient is computed under ``torch.no_grad()``.
    ``torch.stft`` runs one FFT per resolution: ``fft_grouping`` does not apply."""
    dtype = compute_dtype(x, y)
    length = x.shape[-1]
    grad_x, grad_y = (torch.is_grad_enabled() and t.requires_grad for t in (x, y))
    loss, _, _ = _MRSTFTLoss.apply(x.reshape(-1, length).to(dtype),
                                   y.reshape(-1, length).to(dtype), settings, grad_x, grad_y,
                                   clamped)
    return loss


# --------------------------------------------------------------------------------------------
# Reconstruction terms and free-bits KL
# --------------------------------------------------------------------------------------------

def recon_terms(recon: torch.Tensor, target: torch.Tensor,
                dtype: Optional[torch.dtype] = None):
    """``mean|rm - tm|`` and ``mean(|ri - ti| * tm) / (mean(tm) + 1e-8)`` of the inputs in
    ``dtype`` (default: ``compute_dtype`` of the two), through autograd (a handful of passes over
    ``[B, H, W]``; the gradient for ``target`` comes for free, and so does autograd's treatment
    of NaN and inf).

    The elementwise terms and their sums are computed, and the two terms returned unrounded,
    in float64 wherever the device has it (not MPS: there in ``dtype``), exactly for float32
    inputs: the IF sums run over a signed ``tm`` and may cancel (mean(tm) near 0 makes the
    term ill-conditioned), and so may the weighted sum of the two terms, which the caller
    forms before rounding."""
    dtype = dtype or compute_dtype(recon, target)
    acc = accumulation_dtype(recon.device, dtype)
    recon, target = recon.to(dtype).to(acc), target.to(dtype).to(acc)
    rm, ri, tm, ti = recon[:, 0], recon[:, 1], target[:, 0], target[:, 1]
    count = tm.numel()
    mag = (rm - tm).abs().sum() / count
    weighted = ((ri - ti).abs() * tm).sum() / count
    return mag, weighted / (tm.sum() / count + 1e-8)


class _FreeBitsKL(torch.autograd.Function):
    """``kl = mean_b sum_d max(k, free_bits)``, ``k = -0.5 (1 + logvar - mu^2 - exp(logvar))``.

    ``dkl/dmu = mu [k >= free_bits] / B`` and ``dkl/dlogvar = 0.5 (exp(logvar) - 1)
    [k >= free_bits] / B`` (``torch.clamp`` passes the gradient at the boundary; the mask is
    multiplied in, so a NaN ``k`` with a NaN or infinite factor gives NaN, as autograd gives).
    Computed in forward."""

    @staticmethod
    def forward(mu, logvar, free_bits, grad_mu, grad_logvar):
        var = torch.exp(logvar)
        k = -0.5 * (1 + logvar - mu * mu - var)
        batch = mu.shape[0]
        kl = k.clamp_min(free_bits).sum() / batch
        active = (k >= free_bits).to(mu.dtype) / batch if grad_mu or grad_logvar else None
        g_mu = mu * active if grad_mu else None
        g_logvar = 0.5 * (var - 1) * active if grad_logvar else None
        return kl, g_mu, g_logvar

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, g_mu, g_logvar = output
        ctx.mark_non_differentiable(*(g for g in (g_mu, g_logvar) if g is not None))
        ctx.save_for_backward(g_mu, g_logvar, *inputs[:2])

    @staticmethod
    def backward(ctx, grad_output, _grad_g_mu, _grad_g_logvar):
        g_mu, g_logvar, mu, logvar = ctx.saved_tensors
        grads = (gated_grad(g_mu, grad_output), gated_grad(g_logvar, grad_output))
        return (*first_order_only("torch", grads, (mu, logvar)), None, None, None)


def free_bits_kl(mu: torch.Tensor, logvar: torch.Tensor, free_bits: float,
                 dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Free-bits KL in ``dtype`` (default: ``compute_dtype`` of the two)."""
    dtype = dtype or compute_dtype(mu, logvar)
    grad_mu, grad_logvar = (torch.is_grad_enabled() and t.requires_grad for t in (mu, logvar))
    kl, _, _ = _FreeBitsKL.apply(mu.to(dtype), logvar.to(dtype), float(free_bits), grad_mu,
                                 grad_logvar)
    return kl


def combined_loss(recon, target, mu, logvar, config, kl_weight, stft, *,
                  fft_grouping: str = "per_resolution") -> Combined:
    return assemble_combined_loss(recon, target, mu, logvar, config, kl_weight, stft,
                                  recon_terms=recon_terms, free_bits_kl=free_bits_kl,
                                  mrstft_loss=mrstft_loss, fft_grouping=fft_grouping)

