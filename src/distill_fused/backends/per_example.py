"""Per-example losses, padded batches and per-resolution terms, on the ``torch`` and ``triton``
backends: every loss formed from sums over each example's valid region.

Example b of B holds C signals (the combined loss: its magnitude channel, C = 1; the STFT
module: its C channels), each a ``[H, W]`` block read row-major as one signal of ``H*W``
samples (the module's ``[B, C, T]``: H = 1, W = T). With ``lengths``, only the first ``L_b``
columns of example b are valid: its signal is the crop ``[H, :L_b]`` flattened, ``n_b = H L_b``
samples, and the STFT runs over that signal (its own reflect padding and frame count), not over
a masked version of the full one. Per resolution ``r`` (n, hop, pad = n//2), with the frames
``f < F_b = 1 + (n_b + 2 pad - n) // hop`` of every channel and ``n//2 + 1`` bins,
``K_rb = C F_b (n//2 + 1)`` values (notation of ``core/settings.py``)::

    s_rb = (sum D^2, sum My^2, sum |ln Mx/My|, sum |D|, sum (arg X - arg Y)^2)
                                                                      (spectral sums)

With auraloss's other options (``core/settings.py``) ``Mx``, ``My`` are the magnitudes the
terms are formed from (mel: ``W_r Mx`` per frame, over ``K_rb = C F_b n_bins_r`` values; ``My``
scaled by its signal's alpha with ``scale_invariance``), ``|.|`` becomes ``(.)^2`` with
``mag_distance="L2"``, and the phase sum (0 unless ``w_phs``) runs over the STFT's own
``C F_b (n//2 + 1)`` bins: ``phs_rb = s_rb4 / (C F_b (n//2 + 1))``.

over example b's ``N_b = H L_b`` valid elements::

    q_b = (sum |rm - tm|, sum |ri - ti| tm, sum tm)                  (reconstruction sums)

and ``kl_b = sum_d max(k, free_bits)``. A reduction turns sums into losses::

    "none": each term of example b from its own sums: sc_rb = sqrt(s_rb0 / s_rb1),
            log_rb = s_rb2 / K_rb, lin_rb = s_rb3 / K_rb, mag_b = q_b0 / N_b,
            if_b = (q_b1 / N_b) / (q_b2 / N_b + 1e-8): what the oracle gives the example
            alone, as a batch of one, cropped to its length
    "sum":  the sum over b of "none"
    "mean": each term from the batch's sums (s_r = sum_b s_rb, K_r = sum_b K_rb, q, N
            likewise; kl = mean_b kl_b): with every L_b = W the seed's batch-level loss (and
            the oracle's), with lengths the same loss over the valid elements only

and then, for each entry, ``MRSTFT = (1/R) sum_r rw_r (w_sc sc_r + w_log log_r + w_lin lin_r
+ w_phs phs_r)``,
``stft = max(MRSTFT, 0)`` and the total with its non-finite guard, entry by entry.

Gradients: the STFT term's and the KL's in closed form (``_STFTTerm``, ``_ExampleFreeBitsKL``:
an entry that no gradient reaches gets exactly 0 from them, as the non-finite guard needs),
the sums' by the backend (``TorchSums`` below, ``kernels/example_sums.py``), the formulas on
``[B]``-sized sums by autograd. No padded sample is read, so the gradient on padding is exactly
0. ``lengths`` stay on the device: nothing here reads a value back.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..core.devices import accumulation_dtype
from ..core.gradients import first_order_only
from ..core.options import Options
from ..core.outputs import LOSS_KEYS, compute_dtype
from ..core.settings import MRSTFTSettings
from .torch_backend import cached, half_spectrum_weights, overlap_add, reflect_pad_adjoint

IF_EPS = 1e-8


# --------------------------------------------------------------------------------------------
# The spectra of the (cropped) signals, and the adjoint: torch framing, one rfft per resolution
# --------------------------------------------------------------------------------------------

def _source_index(lengths: torch.Tensor, height: int, width: int, pad: int,
                  padded_length: int) -> torch.Tensor:
    """``[B, padded_length]``: for each position ``p`` of example b's reflect-padded cropped
    signal, the flat index ``h W + w`` of the sample it reads in the ``[H, W]`` block::

        j = reflect(p - pad) within [0, n_b),  h = j // L_b,  w = j - h L_b

    (positions past the last valid frame are clamped into range: their frames are masked)."""
    n = (lengths * height)[:, None]
    j = torch.arange(padded_length, device=lengths.device)[None, :] - pad
    j = torch.where(j < 0, -j, j)
    j = torch.where(j >= n, 2 * (n - 1) - j, j)
    j = torch.minimum(j.clamp_min(0), n - 1)
    row = j // lengths[:, None]
    return row * width + (j - row * lengths[:, None])


def spectra(both: torch.Tensor, settings: MRSTFTSettings, index: int,
            lengths: Optional[torch.Tensor], height: int, width: int):
    """``(spec, frames, source)`` of resolution ``index`` for ``both`` ``[2B, C, H*W]`` (x's
    examples, then y's): ``spec`` ``[2B, C, F, n//2+1]``, ``frames`` ``[B]`` each example's
    count of valid frames ``F_b`` (``F``: the full signal's), and ``source`` the gather's
    index (``None`` without ``lengths``: the padding is a plain reflection)."""
    batch, channels, length = both.shape[0] // 2, both.shape[1], both.shape[2]
    res = settings.resolutions[index]
    pad = res.n_fft // 2
    if lengths is None:
        source = None
        padded = F.pad(both, (pad, pad), mode="reflect")
        n = torch.full((batch,), length, device=both.device, dtype=torch.int64)
    else:
        source = _source_index(lengths, height, width, pad, length + 2 * pad).repeat(2, 1)
        padded = torch.gather(both, 2, source[:, None, :].expand(-1, channels, -1))
        n = lengths * height
    frames = padded.unfold(-1, res.n_fft, res.hop) * cached(
        settings, ("window", index, both.device, both.dtype), settings.padded_window, index,
        both.device, both.dtype)
    return torch.fft.rfft(frames, dim=-1), 1 + (n + 2 * pad - res.n_fft) // res.hop, source


def signal_gradient(grad_spec: torch.Tensor, settings: MRSTFTSettings, index: int,
                    source: Optional[torch.Tensor], length: int) -> torch.Tensor:
    """The adjoint of ``spectra``: ``[2B, C, H*W]`` from the spectra's gradient ``G``
    (``dL/dRe + i dL/dIm``): ``irfft(h G)`` (``h``: ``half_spectrum_weights``), the window,
    overlap-add, then the reflection folded back (or, with ``lengths``, the gather's
    ``scatter_add``: padding receives nothing)."""
    rows, channels, n_frames, _ = grad_spec.shape
    res = settings.resolutions[index]
    pad = res.n_fft // 2
    device, dtype = grad_spec.device, grad_spec.real.dtype
    half = cached(settings, ("half", index, device, dtype), half_spectrum_weights, res.n_fft,
                  device, dtype)
    window = cached(settings, ("window", index, device, dtype), settings.padded_window, index,
                    device, dtype)
    frames = torch.fft.irfft(grad_spec * half, n=res.n_fft, dim=-1, norm="forward") * window
    padded = overlap_add(frames.reshape(rows * channels, n_frames, res.n_fft), res.hop,
                         length + 2 * pad)
    if source is None:
        return reflect_pad_adjoint(padded, pad).view(rows, channels, length)
    out = padded.new_zeros(rows, channels, length)
    return out.scatter_add_(2, source[:, None, :].expand(-1, channels, -1),
                            padded.view(rows, channels, -1))


# --------------------------------------------------------------------------------------------
# The sums and their gradients, in torch (the triton backend's: kernels/example_sums.py)
# --------------------------------------------------------------------------------------------

class TorchSums:
    """The ``torch`` backend's sums: plain torch."""

    name = "torch"

    @staticmethod
    def spectral(spec: torch.Tensor, frames: torch.Tensor, settings: MRSTFTSettings,
                 index: int, cropped: bool = True) -> torch.Tensor:
        """``[B, 4]`` spectral sums ``s_rb`` (without the phase's) of ``spec``
        ``[2B, C, F, bins]`` (resolution ``index``) over each example's first ``frames[b]``
        frames (every frame unless ``cropped``). Each sum is one fused reduction (a vector
        norm)."""
        sx, sy, _, _, _ = _features(spec, frames, settings, index, cropped)
        valid = _valid_frames(spec, frames) if cropped else None
        diff = sx - sy
        order = 2 if settings.mag_distance == "L2" else 1
        return torch.stack([_power_sum(diff, 2, valid), _power_sum(sy, 2, valid),
                            _power_sum(torch.log(sx / sy), order, valid),
                            _power_sum(diff, order, valid)], 1)

    @staticmethod
    def spectral_grad(spec: torch.Tensor, frames: torch.Tensor, settings: MRSTFTSettings,
                      index: int, grad_sums: torch.Tensor, cropped: bool = True
                      ) -> torch.Tensor:
        """``dL/dX`` (complex, ``spec``'s shape) for the sums' gradients ``grad_sums``
        ``[B, 4]`` (``kernels/per_example.py`` and ``kernels/stft_options.py`` have the
        formulas; scale invariance: ``sy = alpha sy0``, ``dL/dalpha = <dL/dsy, sy0>``, then
        ``dL/dsx += dL/dalpha sy0 / |sy0|^2`` and ``dL/dsy0 = alpha dL/dsy + dL/dalpha
        (sx - 2 sy) / |sy0|^2`` per signal)."""
        valid = _valid_frames(spec, frames) if cropped else None
        sx, sy, scaling, power, mag = _features(spec, frames, settings, index, cropped)
        g_d2, g_sy, g_log, g_d = (g[:, None, None, None] for g in grad_sums.unbind(1))
        diff = sx - sy
        if settings.mag_distance == "L2":
            slope_log, slope_d = 2 * torch.log(sx / sy), 2 * diff
        else:
            slope_log, slope_d = torch.sign(torch.log(sx / sy)), torch.sign(diff)
        d_sx = _masked(2 * g_d2 * diff + g_log * slope_log / sx + g_d * slope_d, valid)
        d_sy = _masked(-2 * g_d2 * diff + 2 * g_sy * sy - g_log * slope_log / sy
                       - g_d * slope_d, valid)
        if scaling is not None:  # sy = alpha sy0, alpha = <sx, sy0> / <sy0, sy0> per signal
            alpha, sy0 = scaling
            norm2 = _masked(sy0.square(), valid).sum((2, 3), keepdim=True)
            d_alpha = (d_sy * sy0).sum((2, 3), keepdim=True)
            d_sx = d_sx + _masked(d_alpha * sy0 / norm2, valid)
            d_sy = alpha * d_sy + _masked(d_alpha * (sx - 2 * sy) / norm2, valid)
        bank = settings.filterbank(index, spec.device, spec.real.dtype)
        d_feat = torch.cat([d_sx, d_sy])
        d_mag = d_feat if bank is None else d_feat @ bank
        return _times_spectrum(torch.where(power >= settings.eps, d_mag / mag, 0.0), spec)

    @staticmethod
    def recon(recon: torch.Tensor, target: torch.Tensor,
              lengths: Optional[torch.Tensor]) -> torch.Tensor:
        """``[B, 3]`` reconstruction sums ``q_b`` (float64 where the device has it, not MPS)
        over each example's first ``lengths[b]`` columns."""
        wide = accumulation_dtype(recon.device, recon.dtype)
        recon, target = recon.to(wide), target.to(wide)
        if lengths is not None:
            # The padding is zeroed before any term is formed: whatever it holds (NaN, inf),
            # it sends exactly 0 back (a mask applied after would send 0 * nan).
            valid = torch.arange(recon.shape[3], device=recon.device)[None, :] < lengths[:, None]
            valid = valid[:, None, None, :]
            recon, target = torch.where(valid, recon, 0.0), torch.where(valid, target, 0.0)
        rm, ri, tm, ti = recon[:, 0], recon[:, 1], target[:, 0], target[:, 1]
        terms = torch.stack([(rm - tm).abs(), (ri - ti).abs() * tm, tm])
        return terms.sum((2, 3)).T


def _valid_frames(spec: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """``[B, 1, F, 1]``: whether frame f is one of example b's."""
    valid = torch.arange(spec.shape[2], device=spec.device)[None, :] < frames[:, None]
    return valid[:, None, :, None]


def _masked(t: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """``t`` where ``valid``, else 0 (``valid = None``: every element)."""
    return t if valid is None else torch.where(valid, t, 0.0)


def _power_sum(t: torch.Tensor, order: int, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B]``: ``sum |t|^order`` over each example's valid elements (``order`` 1 or 2), as
    one fused reduction."""
    norm = torch.linalg.vector_norm(_masked(t, valid), ord=order, dim=(1, 2, 3))
    return norm.square() if order == 2 else norm


def _power(spec: torch.Tensor) -> torch.Tensor:
    """``|X|^2 = Re^2 + Im^2``, read from the spectrum's real pairs (faster than its strided
    ``.real`` and ``.imag`` views)."""
    pairs = torch.view_as_real(spec)
    re, im = pairs[..., 0], pairs[..., 1]
    return re * re + im * im


def _times_spectrum(coef: torch.Tensor, spec: torch.Tensor) -> torch.Tensor:
    """``coef X`` for a real ``coef``: a real product on the pairs (no complex promotion)."""
    return torch.view_as_complex(torch.view_as_real(spec) * coef[..., None])


def _features(spec: torch.Tensor, frames: torch.Tensor, settings: MRSTFTSettings, index: int,
              cropped: bool):
    """``(Sx, Sy, scaling, power, magnitudes)``: the magnitudes the terms are formed from
    (``[B, C, F, K]`` each: clamped STFT magnitudes, through the mel filterbank with
    ``scale``; with ``scale_invariance``, ``Sy = alpha Sy0`` and ``scaling = (alpha, Sy0)``,
    alpha ``[B, C, 1, 1]`` over each signal's valid frames, else ``scaling = None``), and the
    spectrum's power and clamped magnitudes."""
    batch = frames.shape[0]
    power = _power(spec)
    mag = power.clamp(min=settings.eps).sqrt()
    bank = settings.filterbank(index, spec.device, spec.real.dtype)
    feat = mag if bank is None else mag @ bank.T
    sx, sy = feat[:batch], feat[batch:]
    if not settings.scale_invariance:
        return sx, sy, None, power, mag
    valid = _valid_frames(spec, frames) if cropped else None
    alpha = (_masked(sx * sy, valid).sum((2, 3), keepdim=True)
             / _masked(sy.square(), valid).sum((2, 3), keepdim=True))
    return sx, alpha * sy, (alpha, sy), power, mag


def _phase(spec: torch.Tensor) -> torch.Tensor:
    """``arg X`` by ``atan2`` (``torch.angle``'s value; MPS has no complex ``angle``), with
    ``arg 0 = 0``."""
    zero = (spec.real == 0) & (spec.imag == 0)
    return torch.atan2(spec.imag, torch.where(zero, 1.0, spec.real))


def phase_sums(spec: torch.Tensor, frames: torch.Tensor, cropped: bool = True) -> torch.Tensor:
    """``[B]``: ``sum (arg X - arg Y)^2`` over each example's first ``frames[b]`` frames (the
    phase term's sum, in torch on every backend: see ``kernels/stft_options.py``)."""
    batch = frames.shape[0]
    diff = _phase(spec[:batch]) - _phase(spec[batch:])
    return _power_sum(diff, 2, _valid_frames(spec, frames) if cropped else None)


def phase_grad(spec: torch.Tensor, frames: torch.Tensor, grad_sum: torch.Tensor,
               cropped: bool = True) -> torch.Tensor:
    """``dL/dX`` of ``phase_sums`` for its gradient ``grad_sum`` ``[B]``: ``d arg X =
    i X / |X|^2`` (0 at X = 0, as ``torch.angle``'s backward), so ``dL/dX = 2 g (arg X -
    arg Y) i X / |X|^2`` and ``dL/dY = -2 g (arg X - arg Y) i Y / |Y|^2``."""
    batch = frames.shape[0]
    diff = _phase(spec[:batch]) - _phase(spec[batch:])
    d_phase = _masked(2 * grad_sum[:, None, None, None] * diff,
                      _valid_frames(spec, frames) if cropped else None)
    power = _power(spec)
    coef = torch.where(power > 0, torch.cat([d_phase, -d_phase]) / power, 0.0)
    return _times_spectrum(coef, 1j * spec)


# --------------------------------------------------------------------------------------------
# The STFT term from sums, and its gradient
# --------------------------------------------------------------------------------------------

def _norm_of_sum(total: torch.Tensor) -> torch.Tensor:
    """``sqrt(total)``, 0 at 0 (the spectral-convergence numerator ``||D||``)."""
    return torch.where(total == 0, 0.0, total.sqrt())


def _batch_sums(sums: torch.Tensor, reduction: str) -> torch.Tensor:
    """The sums a term is formed from: the batch's (``mean``) or each example's."""
    return sums.sum(0) if reduction == "mean" else sums


def _entry(per_example: torch.Tensor, reduction: str) -> torch.Tensor:
    """A term formed per example, as the reduction returns it (``sum``: summed)."""
    return per_example.sum(0) if reduction == "sum" else per_example


def _term_names(settings: MRSTFTSettings, r: int) -> List[Tuple[int, str, float]]:
    """``(column of the sums, name, weight)`` of resolution r's terms auraloss computes."""
    return [(column, f"stft_{name}_loss_{r}", weight) for column, name, weight in (
        (0, "sc", settings.w_sc), (2, "log_mag", settings.w_log_mag),
        (3, "lin_mag", settings.w_lin_mag), (4, "phs", settings.w_phs)) if weight]


def _count_of(count: torch.Tensor, column: int) -> torch.Tensor:
    """The count a mean term divides by: the magnitudes' (``K``, mel bins with ``scale``), or
    the STFT bins' for the phase term (column 4)."""
    return count[..., 1 if column == 4 else 0]


def stft_terms(spectral: List[torch.Tensor], counts: List[torch.Tensor],
               settings: MRSTFTSettings, reduction: str
               ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``(MRSTFT, per-resolution terms)`` from each resolution's ``[B, 5]`` sums and ``[B, 2]``
    counts (``_count_of``), per example or for the batch (``mean``: ``_batch_sums``). Terms
    whose weight is 0 are left out, as auraloss leaves them."""
    n_res = len(settings.resolutions)
    weights = settings.resolution_weights or (1.0,) * n_res
    mrstft = None
    terms: Dict[str, torch.Tensor] = {}
    for r, (sums, count) in enumerate(zip(spectral, counts)):
        sums = _batch_sums(sums, reduction)
        count = _batch_sums(count, reduction).to(sums.dtype)
        loss_r = torch.zeros_like(sums[..., 0])
        for column, name, weight in _term_names(settings, r):
            if column == 0:
                term = _norm_of_sum(sums[..., 0]) / sums[..., 1].sqrt()
            else:
                term = sums[..., column] / _count_of(count, column)
            terms[name] = term
            loss_r = loss_r + weight * term
        loss_r = weights[r] * loss_r
        mrstft = loss_r if mrstft is None else mrstft + loss_r
    return mrstft / n_res, terms


def _sums_gradient(sums, count, settings: MRSTFTSettings, r: int, reduction: str,
                   g_mrstft, g_terms: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, 5]``: the gradient of the incoming ``g_mrstft`` (of MRSTFT) and ``g_terms`` (of
    resolution r's terms) with respect to its sums ``s_rb``::

        c = g_mrstft rw_r w / R + g_term            (each term's incoming coefficient)
        d sc/ds0 = 1 / (2 sqrt(s0) sqrt(s1)) (0 at s0 = 0, torch.norm's)
        d sc/ds1 = -sqrt(s0) / (2 s1 sqrt(s1)),   d log/ds2 = d lin/ds3 = 1 / K,
        d phs/ds4 = 1 / K_bins

    (``mean``: of the batch's sums, the same for every example)."""
    n_res = len(settings.resolutions)
    weight_r = (settings.resolution_weights or (1.0,) * n_res)[r]
    sums = _batch_sums(sums, reduction)
    count = _batch_sums(count, reduction).to(sums.dtype)
    grad = torch.zeros_like(sums)
    for column, name, weight in _term_names(settings, r):
        c = torch.zeros_like(sums[..., 0])
        if g_mrstft is not None:
            c = c + g_mrstft * (weight_r * weight / n_res)
        if g_terms.get(name) is not None:
            c = c + g_terms[name]
        if column == 0:
            num, den = _norm_of_sum(sums[..., 0]), sums[..., 1].sqrt()
            grad[..., 0] = torch.where(num == 0, 0.0, c / (2 * num * den))
            grad[..., 1] = -c * num / (2 * sums[..., 1] * den)
        else:
            grad[..., column] = c / _count_of(count, column)
    return grad


def _spectral_sums(spec, frames, settings: MRSTFTSettings, index: int, sums,
                   cropped: bool) -> torch.Tensor:
    """``[B, 5]``: the backend's four sums (torch's with ``scale_invariance``: its alpha
    couples every element of a signal, no fast path), and the phase's (0 without ``w_phs``);
    ``cropped``: whether some frames are past an example's signal (``lengths``)."""
    magnitude = (TorchSums if settings.scale_invariance else sums).spectral(
        spec, frames, settings, index, cropped)
    phase = (phase_sums(spec, frames, cropped) if settings.w_phs
             else torch.zeros_like(magnitude[:, 0]))
    return torch.cat([magnitude, phase[:, None]], 1)


def _spectral_grad(spec, frames, settings: MRSTFTSettings, index: int, sums,
                   grad_sums: torch.Tensor, cropped: bool) -> torch.Tensor:
    """``dL/dX`` for the ``[B, 5]`` gradients of ``_spectral_sums``."""
    grad = (TorchSums if settings.scale_invariance else sums).spectral_grad(
        spec, frames, settings, index, grad_sums[:, :4].contiguous(), cropped)
    if settings.w_phs:
        grad = grad + phase_grad(spec, frames, grad_sums[:, 4], cropped)
    return grad


class _STFTTerm(torch.autograd.Function):
    """The STFT term of ``[B, C, H, W]`` signals (MRSTFT per example, or of the batch for
    ``mean``) and its per-resolution terms; sums by ``sums``. Backward, from the saved
    spectra: the sums' gradient (``_sums_gradient``), the spectra's (``sums.spectral_grad``),
    then the adjoint of the framing (``signal_gradient``). An example (the batch, for
    ``mean``) that no incoming gradient reaches gets exactly 0, even where its own gradient
    is NaN or inf: the non-finite guard relies on it (``core/gradients.py``)."""

    @staticmethod
    def forward(ctx, x, y, settings, reduction, lengths, sums):
        batch, channels, height, width = x.shape
        both = torch.cat([x, y]).reshape(2 * batch, channels, height * width)
        spectral, counts, saved = [], [], []
        for index, res in enumerate(settings.resolutions):
            spec, frames, source = spectra(both, settings, index, lengths, height, width)
            spectral.append(_spectral_sums(spec, frames, settings, index, sums,
                                           lengths is not None))
            bins = res.n_fft // 2 + 1
            features = (settings.n_bins[index] if settings.scale else None) or bins
            counts.append(torch.stack([frames * (channels * features),
                                       frames * (channels * bins)], 1))
            saved += [spec, frames, source, spectral[-1], counts[-1]]
        mrstft, terms = stft_terms(spectral, counts, settings, reduction)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, y, *saved)
        ctx.meta = (settings, reduction, sums, list(terms))
        return (mrstft, *terms.values())

    @staticmethod
    def backward(ctx, g_mrstft, *g_terms):
        x, y, *saved = ctx.saved_tensors
        settings, reduction, sums, names = ctx.meta
        incoming = [g for g in (g_mrstft, *g_terms) if g is not None]
        if not incoming:
            return None, None, None, None, None, None
        reached = torch.stack([g != 0 for g in incoming]).any(0)
        g_terms = dict(zip(names, g_terms))
        batch, channels, height, width = x.shape
        grad = None
        for index in range(len(settings.resolutions)):
            spec, frames, source, spectral, count = saved[5 * index:5 * index + 5]
            grad_sums = _sums_gradient(spectral, count, settings, index, reduction, g_mrstft,
                                       g_terms).expand(batch, 5)
            grad_spec = _spectral_grad(spec, frames, settings, index, sums, grad_sums,
                                       source is not None)
            grad_r = signal_gradient(grad_spec, settings, index, source, height * width)
            grad = grad_r if grad is None else grad + grad_r
        rows = reached.repeat(2) if reached.dim() else reached
        grad = torch.where(rows.reshape(-1, 1, 1), grad, 0.0)
        gx, gy = (g.reshape(x.shape) for g in grad.chunk(2))
        grads = first_order_only(sums.name, (gx if ctx.needs_input_grad[0] else None,
                                                 gy if ctx.needs_input_grad[1] else None),
                                 (x, y))
        return (*grads, None, None, None, None)


def a_weighted(x: torch.Tensor, y: torch.Tensor, settings: MRSTFTSettings,
               lengths: Optional[torch.Tensor]):
    """``(x, y, lengths)`` as the STFT term reads them. With ``perceptual_weighting``, each
    signal (example b's ``[H, :L_b]`` crop read row-major, ``n_b = H L_b`` samples; the whole
    block without ``lengths``) filtered by auraloss's A-weighting FIR as auraloss filters it,
    ``conv1d`` with zero padding (``core/settings.py``): returned as ``[B, C, 1, H W]``
    signals whose first ``n_b`` samples are valid (``lengths`` becomes ``n_b``). Autograd
    differentiates the filter (its adjoint is the same correlation, reversed); padding is
    never read, and gets no gradient. Otherwise the arguments as they are."""
    taps = settings.prefilter(x.device, x.dtype)
    if taps is None:
        return x, y, lengths
    batch, channels, height, width = x.shape
    n = height * width
    signals = torch.cat([x, y]).reshape(2 * batch, channels, n)
    if lengths is not None:
        # Position j of example b's crop reads column j % L_b of row j // L_b.
        j = torch.arange(n, device=x.device)[None, :]
        crop = lengths.repeat(2)[:, None]
        row = j // crop
        valid = j < height * crop
        source = torch.where(valid, row * width + (j - row * crop), 0)
        signals = torch.where(valid[:, None, :], torch.gather(
            signals, 2, source[:, None, :].expand(-1, channels, -1)), 0.0)
    filtered = _fir(signals.reshape(-1, n), taps)
    x, y = filtered.reshape(2 * batch, channels, 1, n).chunk(2)
    return x, y, None if lengths is None else lengths * height


# MPS on macOS 14 and 15.0 refuses a convolution with an output dimension past 65536
# (pytorch/pytorch#142515, torch 2.13): longer signals are filtered in blocks of this length.
FIR_BLOCK = 65536


def _fir(signals: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """``[N, n]`` signals correlated with ``taps`` (``[1, 1, k]``, k odd) with zero padding of
    ``k // 2`` on each side (``conv1d(padding=k // 2)``), in blocks of at most ``FIR_BLOCK``
    output samples: each block reads its ``k - 1`` neighbours, so the result is the same."""
    n, half = signals.shape[-1], taps.shape[-1] // 2
    if n <= FIR_BLOCK:
        return F.conv1d(signals[:, None], taps, padding=half)[:, 0]
    blocks = -(-n // FIR_BLOCK)
    padded = F.pad(signals, (half, blocks * FIR_BLOCK - n + half))
    windows = padded.unfold(-1, FIR_BLOCK + 2 * half, FIR_BLOCK)
    out = F.conv1d(windows.reshape(-1, 1, FIR_BLOCK + 2 * half), taps)
    return out.reshape(signals.shape[0], blocks * FIR_BLOCK)[:, :n]


def _stft_term(x, y, settings, reduction, lengths, sums):
    """``(MRSTFT, terms)`` of ``[B, C, H, W]`` signals: ``[B]`` each (``none``, ``sum``) or
    0-dim (``mean``)."""
    x, y, lengths = a_weighted(x, y, settings, lengths)
    mrstft, *terms = _STFTTerm.apply(x, y, settings, reduction, lengths, sums)
    names = [name for r in range(len(settings.resolutions))
             for _, name, _ in _term_names(settings, r)]
    return mrstft, dict(zip(names, terms))


# --------------------------------------------------------------------------------------------
# The free-bits KL per example
# --------------------------------------------------------------------------------------------

class _ExampleFreeBitsKL(torch.autograd.Function):
    """``kl_b = sum_d max(k, free_bits)``, ``k = -0.5 (1 + logvar - mu^2 - exp(logvar))``;
    ``dkl_b/dmu = mu [k >= free_bits]``, ``dkl_b/dlogvar = 0.5 (exp(logvar) - 1)
    [k >= free_bits]``, computed in forward; an example no gradient reaches gets exactly 0
    (an infinite KL cut off by the non-finite guard sends no ``0 * inf``)."""

    @staticmethod
    def forward(mu, logvar, free_bits, backend):
        var = torch.exp(logvar)
        k = -0.5 * (1 + logvar - mu * mu - var)
        active = (k >= free_bits).to(mu.dtype)
        return k.clamp_min(free_bits).sum(1), mu * active, 0.5 * (var - 1) * active

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, g_mu, g_logvar = output
        ctx.mark_non_differentiable(g_mu, g_logvar)
        ctx.save_for_backward(g_mu, g_logvar, *inputs[:2])
        ctx.backend = inputs[3]

    @staticmethod
    def backward(ctx, grad_kl, _g_mu, _g_logvar):
        g_mu, g_logvar, mu, logvar = ctx.saved_tensors
        scale = grad_kl[:, None]
        grads = [torch.where(scale != 0, scale * g, 0.0) if needed else None
                 for g, needed in zip((g_mu, g_logvar), ctx.needs_input_grad)]
        return (*first_order_only(ctx.backend, grads, (mu, logvar)), None, None)


# --------------------------------------------------------------------------------------------
# The losses
# --------------------------------------------------------------------------------------------

def mrstft_loss(x: torch.Tensor, y: torch.Tensor, settings: MRSTFTSettings, options: Options,
                sums) -> torch.Tensor:
    """MRSTFT of ``[B, C, T]`` signals under ``options`` (``lengths``: valid samples of each
    example's signals) with ``sums`` (``TorchSums`` or the kernels'); with
    ``options.per_resolution_terms``, ``(MRSTFT, per-resolution terms)``."""
    dtype = compute_dtype(x, y)
    x, y = (t.to(dtype)[:, :, None, :] for t in (x, y))
    mrstft, terms = _stft_term(x, y, settings, options.reduction, options.lengths, sums)
    if options.per_resolution_terms:
        return _entry(mrstft, options.reduction), {
            name: _entry(term, options.reduction) for name, term in terms.items()}
    return _entry(mrstft, options.reduction)


def combined_loss(recon, target, mu, logvar, config, kl_weight, stft: MRSTFTSettings,
                  options: Options, sums) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """The losses of ``compute_combined_loss`` under ``options`` (see the module docstring),
    each entry 0-dim (``mean``, ``sum``) or ``[B]`` (``none``), and the guard's decision for
    the non-finite report (0-dim: whether every entry's total was finite)."""
    dtype = compute_dtype(recon, target, mu, logvar)
    recon, target, mu, logvar = (t.to(dtype) for t in (recon, target, mu, logvar))
    reduction, lengths = options.reduction, options.lengths
    height = recon.shape[2]

    q = _batch_sums(sums.recon(recon, target, lengths), reduction)
    wide = q.dtype
    if lengths is None:
        n = torch.full((recon.shape[0],), height * recon.shape[3], device=recon.device)
    else:
        n = lengths * height
    n = _batch_sums(n, reduction).to(wide)
    mag = q[..., 0] / n
    if_loss = (q[..., 1] / n) / (q[..., 2] / n + IF_EPS)
    rc = config.reconstruction
    recon_wide = rc.weight * (rc.magnitude_weight * mag + rc.if_weight * if_loss)

    mrstft, terms = _stft_term(recon[:, :1], target[:, :1], stft, reduction, lengths, sums)
    stft_loss = mrstft.clamp_min(0.0)

    kl, _, _ = _ExampleFreeBitsKL.apply(mu, logvar, float(config.kl.free_bits), sums.name)
    kl = kl.mean() if reduction == "mean" else kl

    total = config.stft.weight * stft_loss.to(wide) + recon_wide
    if isinstance(kl_weight, torch.Tensor):
        total = total + torch.where(kl_weight.reshape(()) > 0,
                                    kl_weight.reshape(()) * kl.to(wide), 0.0)
    elif kl_weight > 0:
        total = total + kl_weight * kl.to(wide)
    total, recon_loss = total.to(dtype), recon_wide.to(dtype)
    finite = torch.isfinite(total)
    total = torch.where(finite, total, recon_loss)
    losses = dict(zip(LOSS_KEYS, (total, stft_loss, mag.to(dtype), if_loss.to(dtype), kl,
                                  recon_loss)))
    if options.per_resolution_terms:
        losses.update(terms)
    out = {key: _entry(value, reduction) for key, value in losses.items()}
    return out, finite.all()
