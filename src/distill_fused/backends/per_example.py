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

    s_rb = (sum D^2, sum My^2, sum |ln Mx/My|, sum |D|)               (spectral sums)

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

and then, for each entry, ``MRSTFT = (1/R) sum_r rw_r (w_sc sc_r + w_log log_r + w_lin lin_r)``,
``stft = max(MRSTFT, 0)`` and the total with its non-finite guard, entry by entry.

The sums' gradients are the backends' (``TorchSums`` below, ``kernels/per_example.py``); the
rest is autograd through the formulas above, so the gradient on padding is exactly 0 (no
padded sample is read). ``lengths`` stay on the device: nothing here reads a value back.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..core.options import Options
from ..core.outputs import LOSS_KEYS, compute_dtype
from ..core.settings import MRSTFTSettings
from ..core.tracing import tracing

IF_EPS = 1e-8


# --------------------------------------------------------------------------------------------
# The spectra of the (cropped) signals: torch framing, one rfft per resolution
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


def spectra(x: torch.Tensor, y: torch.Tensor, settings: MRSTFTSettings, index: int,
            lengths: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(spec, frames)`` of resolution ``index``: ``spec`` ``[2B, C, F, n//2+1]`` (x's examples,
    then y's) of ``[B, C, H, W]`` signals in one dtype, and ``frames`` ``[B]``, each example's
    count of valid frames ``F_b`` (``F`` is the full signal's count)."""
    batch, channels, height, width = x.shape
    res = settings.resolutions[index]
    pad = res.n_fft // 2
    length = height * width
    both = torch.cat([x, y]).reshape(2 * batch, channels, length)
    if lengths is None:
        padded = F.pad(both, (pad, pad), mode="reflect")
        n = torch.full((batch,), length, device=x.device, dtype=torch.int64)
    else:
        source = _source_index(lengths, height, width, pad, length + 2 * pad).repeat(2, 1)
        padded = torch.gather(both, 2, source[:, None, :].expand(-1, channels, -1))
        n = lengths * height
    window = _window(settings, index, x.device, x.dtype)
    frames = padded.unfold(-1, res.n_fft, res.hop) * window
    spec = torch.fft.rfft(frames, dim=-1)
    return spec, 1 + (n + 2 * pad - res.n_fft) // res.hop


def _window(settings: MRSTFTSettings, index: int, device, dtype) -> torch.Tensor:
    key = ("window", index, torch.device(device), dtype)
    window = settings.cache.get(key)
    if window is None:
        window = settings.padded_window(index, device, dtype)
        if not tracing():
            settings.cache[key] = window
    return window


# --------------------------------------------------------------------------------------------
# The sums, in torch (the triton backend's: kernels/per_example.py)
# --------------------------------------------------------------------------------------------

class TorchSums:
    """The ``torch`` backend's sums: plain torch, gradients by autograd."""

    @staticmethod
    def spectral(spec: torch.Tensor, frames: torch.Tensor, eps: float) -> torch.Tensor:
        """``[B, 4]`` spectral sums ``s_rb`` of ``spec`` ``[2B, C, F, bins]`` over each
        example's first ``frames[b]`` frames."""
        batch = frames.shape[0]
        power = spec.real.square() + spec.imag.square()
        mag = power.clamp(min=eps).sqrt()
        mx, my = mag[:batch], mag[batch:]
        diff = mx - my
        terms = torch.stack([diff.square(), my.square(), torch.log(mx / my).abs(), diff.abs()])
        valid = torch.arange(spec.shape[2], device=spec.device)[None, :] < frames[:, None]
        terms = torch.where(valid[None, :, None, :, None], terms, 0.0)
        return terms.sum((2, 3, 4)).T

    @staticmethod
    def recon(recon: torch.Tensor, target: torch.Tensor,
              lengths: Optional[torch.Tensor]) -> torch.Tensor:
        """``[B, 3]`` reconstruction sums ``q_b`` (float64 where the device has it, not MPS)
        over each example's first ``lengths[b]`` columns."""
        wide = recon.dtype if recon.device.type == "mps" else torch.float64
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


# --------------------------------------------------------------------------------------------
# Losses from sums
# --------------------------------------------------------------------------------------------

def _norm_of_sum(total: torch.Tensor) -> torch.Tensor:
    """``sqrt(total)`` whose gradient at 0 is 0 (``torch.norm``'s at a zero vector, which the
    oracle's spectral convergence takes), not ``0 * inf``; NaN stays NaN."""
    zero = total == 0
    return torch.where(zero, 0.0, torch.where(zero, 1.0, total).sqrt())


def _reduced(sums: torch.Tensor, reduction: str) -> torch.Tensor:
    """The sums a term is formed from: the batch's (``mean``) or each example's."""
    return sums.sum(0) if reduction == "mean" else sums


def _entry(per_example: torch.Tensor, reduction: str) -> torch.Tensor:
    """A term formed per example, as the reduction returns it (``sum``: summed)."""
    return per_example.sum(0) if reduction == "sum" else per_example


def stft_terms(spectral: List[torch.Tensor], counts: List[torch.Tensor],
               settings: MRSTFTSettings, reduction: str
               ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``(MRSTFT, per-resolution terms)`` from each resolution's ``[B, 4]`` sums and ``[B]``
    counts, per example or for the batch (``_reduced``), before the ``sum`` reduction. Terms
    whose weight is 0 are left out, as auraloss leaves them."""
    n_res = len(settings.resolutions)
    weights = settings.resolution_weights or (1.0,) * n_res
    mrstft = None
    terms: Dict[str, torch.Tensor] = {}
    for r, (sums, count) in enumerate(zip(spectral, counts)):
        sums = _reduced(sums, reduction)
        count = _reduced(count, reduction).to(sums.dtype)
        loss_r = torch.zeros_like(sums[..., 0])
        if settings.w_sc:
            terms[f"stft_sc_loss_{r}"] = sc = _norm_of_sum(sums[..., 0]) / sums[..., 1].sqrt()
            loss_r = loss_r + settings.w_sc * sc
        if settings.w_log_mag:
            terms[f"stft_log_mag_loss_{r}"] = log_mag = sums[..., 2] / count
            loss_r = loss_r + settings.w_log_mag * log_mag
        if settings.w_lin_mag:
            terms[f"stft_lin_mag_loss_{r}"] = lin_mag = sums[..., 3] / count
            loss_r = loss_r + settings.w_lin_mag * lin_mag
        loss_r = weights[r] * loss_r
        mrstft = loss_r if mrstft is None else mrstft + loss_r
    return mrstft / n_res, terms


def _spectral_sums(x, y, settings: MRSTFTSettings, lengths, sums) -> Tuple[list, list]:
    """Each resolution's ``[B, 4]`` sums and ``[B]`` counts ``K_rb`` for ``[B, C, H, W]``
    signals."""
    spectral, counts = [], []
    for index, res in enumerate(settings.resolutions):
        spec, frames = spectra(x, y, settings, index, lengths)
        spectral.append(sums.spectral(spec, frames, settings.eps))
        counts.append(frames * (x.shape[1] * (res.n_fft // 2 + 1)))
    return spectral, counts


def mrstft_loss(x: torch.Tensor, y: torch.Tensor, settings: MRSTFTSettings, options: Options,
                sums) -> torch.Tensor:
    """MRSTFT of ``[B, C, T]`` signals under ``options`` (``lengths``: valid samples of each
    example's signals) with ``sums`` (``TorchSums`` or the kernels')."""
    dtype = compute_dtype(x, y)
    x, y = (t.to(dtype)[:, :, None, :] for t in (x, y))
    spectral, counts = _spectral_sums(x, y, settings, options.lengths, sums)
    mrstft, _ = stft_terms(spectral, counts, settings, options.reduction)
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

    q = _reduced(sums.recon(recon, target, lengths), reduction)
    wide = q.dtype
    if lengths is None:
        n = torch.full((recon.shape[0],), height * recon.shape[3], device=recon.device)
    else:
        n = lengths * height
    n = _reduced(n, reduction).to(wide)
    mag = q[..., 0] / n
    if_loss = (q[..., 1] / n) / (q[..., 2] / n + IF_EPS)
    rc = config.reconstruction
    recon_wide = rc.weight * (rc.magnitude_weight * mag + rc.if_weight * if_loss)

    spectral, counts = _spectral_sums(recon[:, :1], target[:, :1], stft, lengths, sums)
    mrstft, terms = stft_terms(spectral, counts, stft, reduction)
    stft_loss = mrstft.clamp_min(0.0)

    k = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    kl = k.clamp(min=config.kl.free_bits).sum(dim=1)
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
