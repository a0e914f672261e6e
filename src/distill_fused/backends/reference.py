"""The ``reference`` backend: auraloss 0.4.0 plus plain torch, exactly the seed computation.

It is the correctness oracle of the tests and the baseline of every benchmark. It reads the
finiteness of the total back to the host (one sync per step), as the seed code did.
"""

from __future__ import annotations

import copy

import auraloss
import torch

from ..core.outputs import LOSS_KEYS, Combined, compute_dtype
from ..core.settings import MRSTFTSettings


def auraloss_module(settings: MRSTFTSettings) -> auraloss.freq.MultiResolutionSTFTLoss:
    """The auraloss module computing ``settings`` (built once per settings object): one
    ``STFTLoss`` per resolution with every option of ``settings``, each with its own
    ``n_bins`` (auraloss's module takes one for all)."""
    module = settings.cache.get("auraloss")
    if module is None:
        module = auraloss.freq.MultiResolutionSTFTLoss(
            fft_sizes=[r.n_fft for r in settings.resolutions],
            hop_sizes=[r.hop for r in settings.resolutions],
            win_lengths=[r.win_length for r in settings.resolutions])
        stft_loss = (PerSignalScaleSTFTLoss if settings.scale_invariance
                     else auraloss.freq.STFTLoss)
        module.stft_losses = torch.nn.ModuleList([  # a list: torch.compile traces no generator
            stft_loss(r.n_fft, r.hop, r.win_length, w_sc=settings.w_sc,
                      w_log_mag=settings.w_log_mag, w_lin_mag=settings.w_lin_mag,
                      w_phs=settings.w_phs, sample_rate=settings.sample_rate,
                      scale=settings.scale, n_bins=n_bins,
                      perceptual_weighting=settings.perceptual_weighting,
                      scale_invariance=settings.scale_invariance, eps=settings.eps,
                      mag_distance=settings.mag_distance)
            for r, n_bins in zip(settings.resolutions,
                                 settings.n_bins or (None,) * len(settings.resolutions))])
        for loss, window in zip(module.stft_losses, settings.windows):
            loss.window = window
        settings.cache["auraloss"] = module
    return module


def in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` with its filterbanks and FIR taps in ``dtype`` (auraloss keeps them in float32
    and fails on float64 signals; the float32 values convert exactly)."""
    for loss in module.stft_losses:
        if isinstance(getattr(loss, "fb", None), torch.Tensor) and loss.fb.dtype != dtype:
            loss.fb = loss.fb.to(dtype)
        prefilter = getattr(loss, "prefilter", None)
        if prefilter is not None and prefilter.fir.weight.dtype != dtype:
            prefilter.fir.to(dtype)
    return module


def mrstft_loss(x: torch.Tensor, y: torch.Tensor, settings: MRSTFTSettings, *,
                fft_grouping: str = "per_resolution", clamped: bool = False) -> torch.Tensor:
    """auraloss's MRSTFT (``torch.stft`` per resolution: ``fft_grouping`` does not apply), or
    ``max(MRSTFT, 0)`` with ``clamped``."""
    dtype = compute_dtype(x, y)
    loss = in_dtype(auraloss_module(settings), dtype)(x.to(dtype), y.to(dtype))
    return torch.clamp(loss, min=0.0) if clamped else loss


def combined_loss(recon, target, mu, logvar, config, kl_weight, stft, *,
                  fft_grouping: str = "per_resolution") -> Combined:
    """The seed's computation, line for line (``fft_grouping`` does not apply)."""
    dtype = compute_dtype(recon, target, mu, logvar)
    recon, target, mu, logvar = (t.to(dtype) for t in (recon, target, mu, logvar))
    batch = recon.shape[0]
    rm, ri = recon[:, 0], recon[:, 1]
    tm, ti = target[:, 0], target[:, 1]

    mag_recon_loss = torch.nn.functional.l1_loss(rm, tm)
    if_weight = tm / (tm.mean() + 1e-8)
    if_recon_loss = (torch.abs(ri - ti) * if_weight).mean()
    rc = config.reconstruction
    recon_loss = rc.weight * (rc.magnitude_weight * mag_recon_loss
                              + rc.if_weight * if_recon_loss)

    stft_fn = auraloss_module(stft) if isinstance(stft, MRSTFTSettings) else stft
    stft_loss = stft_fn(rm.reshape(batch, 1, -1), tm.reshape(batch, 1, -1)).to(dtype)
    stft_loss = torch.clamp(stft_loss, min=0.0)

    total_loss, kl_loss, finite = _kl_and_total(mu, logvar, config, kl_weight, stft_loss,
                                                recon_loss)
    return dict(zip(LOSS_KEYS, (total_loss, stft_loss, mag_recon_loss, if_recon_loss, kl_loss,
                                recon_loss))), finite


def _kl_and_total(mu, logvar, config, kl_weight, stft_loss, recon_loss):
    """The seed's free-bits KL, and its total with the non-finite fallback (a host read)."""
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    kl = torch.clamp(kl, min=config.kl.free_bits)
    kl_loss = kl.sum(dim=1).mean()

    total_loss = config.stft.weight * stft_loss + recon_loss
    if kl_weight > 0:
        total_loss = total_loss + kl_weight * kl_loss
    finite = torch.isfinite(total_loss)
    if not finite:
        total_loss = recon_loss
    return total_loss, kl_loss, finite


# --------------------------------------------------------------------------------------------
# Per-example losses, padded batches, per-resolution terms: the oracle, by its definition
# (``backends/per_example.py``): auraloss on each example alone, cropped to its length
# ("none", "sum"), and the batch-level loss over the crops from auraloss's own STFT ("mean")
# --------------------------------------------------------------------------------------------

def _full_module(settings: MRSTFTSettings) -> auraloss.freq.MultiResolutionSTFTLoss:
    """auraloss's module for ``settings`` returning each resolution's terms
    (``output="full"``)."""
    module = settings.cache.get("auraloss-full")
    if module is None:
        module = copy.deepcopy(auraloss_module(settings))
        for loss in module.stft_losses:
            loss.output = "full"
        settings.cache["auraloss-full"] = module
    return module


def _resolution_weights(settings: MRSTFTSettings):
    return settings.resolution_weights or (1.0,) * len(settings.resolutions)


def _stft_with_terms(x: torch.Tensor, y: torch.Tensor, settings: MRSTFTSettings):
    """``(MRSTFT, per-resolution terms)`` of ``[B, C, T]`` signals: auraloss's resolutions, each
    weighted by its resolution weight."""
    mrstft, terms = 0.0, {}
    for r, (loss, weight) in enumerate(zip(in_dtype(_full_module(settings), x.dtype).stft_losses,
                                           _resolution_weights(settings))):
        loss_r, sc, log_mag, lin_mag, phs = loss(x, y)
        mrstft = mrstft + weight * loss_r
        for name, term, w in (("sc", sc, settings.w_sc), ("log_mag", log_mag, settings.w_log_mag),
                              ("lin_mag", lin_mag, settings.w_lin_mag),
                              ("phs", phs, settings.w_phs)):
            if w:
                terms[f"stft_{name}_loss_{r}"] = term
    return mrstft / len(settings.resolutions), terms


def _batch_stft_over_crops(xs, ys, settings: MRSTFTSettings):
    """The batch-level ``(MRSTFT, terms)`` over signals of different lengths (``[C, n_b]``
    each): every resolution's norms, sums and counts over all of them, magnitudes and phases
    from auraloss's own steps (``magnitudes_as_auraloss``)."""
    mrstft, terms = 0.0, {}
    distance = torch.square if settings.mag_distance == "L2" else torch.abs
    module = in_dtype(auraloss_module(settings), xs[0].dtype)
    for r, (loss, weight) in enumerate(zip(module.stft_losses, _resolution_weights(settings))):
        num2 = den2 = log_sum = lin_sum = phs_sum = 0.0
        count = bins = 0
        for x, y in zip(xs, ys):
            x_mag, y_mag, x_phs, y_phs = magnitudes_as_auraloss(loss, x, y)
            num2 = num2 + torch.norm(y_mag - x_mag, p="fro") ** 2
            den2 = den2 + torch.norm(y_mag, p="fro") ** 2
            log_sum = log_sum + distance(torch.log(y_mag) - torch.log(x_mag)).sum()
            lin_sum = lin_sum + distance(y_mag - x_mag).sum()
            phs_sum = phs_sum + (x_phs - y_phs).square().sum()
            count += x_mag.numel()
            bins += x_phs.numel()
        loss_r = 0.0
        for name, term, w in (("sc", num2.sqrt() / den2.sqrt(), settings.w_sc),
                              ("log_mag", log_sum / count, settings.w_log_mag),
                              ("lin_mag", lin_sum / count, settings.w_lin_mag),
                              ("phs", phs_sum / bins, settings.w_phs)):
            if w:
                terms[f"stft_{name}_loss_{r}"] = term
                loss_r = loss_r + w * term
        mrstft = mrstft + weight * loss_r
    return mrstft / len(settings.resolutions), terms


def magnitudes_as_auraloss(loss: auraloss.freq.STFTLoss, x: torch.Tensor, y: torch.Tensor):
    """``(x_mag, y_mag, x_phs, y_phs)`` of signals ``[S, n]`` as ``loss.forward`` forms them
    before its terms: A-weighting, STFT, filterbank, and scale invariance with one alpha per
    signal (``[S]``: auraloss 0.4.0 writes ``alpha.unsqueeze(-1)``, which multiplies bin j by
    signal j's alpha, or fails, unless S = 1)."""
    if loss.perceptual_weighting:
        loss.prefilter.to(x.device)
        x, y = (t[:, 0] for t in loss.prefilter(x[:, None], y[:, None]))
    loss.window = loss.window.to(x.device)
    x_mag, x_phs = loss.stft(x)
    y_mag, y_phs = loss.stft(y)
    if loss.scale is not None:
        loss.fb = loss.fb.to(x.device)
        x_mag, y_mag = torch.matmul(loss.fb, x_mag), torch.matmul(loss.fb, y_mag)
    if loss.scale_invariance:
        alpha = (x_mag * y_mag).sum([-2, -1]) / (y_mag**2).sum([-2, -1])
        y_mag = y_mag * alpha[:, None, None]
    return x_mag, y_mag, x_phs, y_phs


class PerSignalScaleSTFTLoss(auraloss.freq.STFTLoss):
    """auraloss's ``STFTLoss`` with ``scale_invariance``'s alpha per signal (the oracle of
    that option: ``magnitudes_as_auraloss``); the rest of its ``forward`` as auraloss has it."""

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        x_mag, y_mag, x_phs, y_phs = magnitudes_as_auraloss(
            self, input.reshape(-1, input.size(-1)), target.reshape(-1, target.size(-1)))
        sc_mag_loss = self.spectralconv(x_mag, y_mag) if self.w_sc else 0.0
        log_mag_loss = self.logstft(x_mag, y_mag) if self.w_log_mag else 0.0
        lin_mag_loss = self.linstft(x_mag, y_mag) if self.w_lin_mag else 0.0
        phs_loss = torch.nn.functional.mse_loss(x_phs, y_phs) if self.w_phs else 0.0
        loss = (self.w_sc * sc_mag_loss + self.w_log_mag * log_mag_loss
                + self.w_lin_mag * lin_mag_loss + self.w_phs * phs_loss)
        loss = auraloss.utils.apply_reduction(loss, reduction=self.reduction)
        if self.output == "full":
            return loss, sc_mag_loss, log_mag_loss, lin_mag_loss, phs_loss
        return loss


def _lengths_list(lengths, batch: int, width: int):
    return [width] * batch if lengths is None else [int(v) for v in lengths.tolist()]


def _crop(t: torch.Tensor, b: int, length: int) -> torch.Tensor:
    return t[b:b + 1, ..., :length]


def _stacked(entries):
    return {key: torch.stack([torch.as_tensor(e[key]) for e in entries]) for key in entries[0]}


def _as_reduction(losses, reduction):
    """Per-example losses ``[B]`` as ``reduction`` returns them (``sum``: summed)."""
    return {key: value.sum(0) if reduction == "sum" else value for key, value in losses.items()}


def mrstft_loss_per_example(x: torch.Tensor, y: torch.Tensor, settings: MRSTFTSettings,
                            options) -> torch.Tensor:
    """The module's loss under ``options`` (``per_example.Options``), by definition, and with
    ``options.per_resolution_terms`` its per-resolution terms: ``(loss, terms)``. Without
    lengths, ``mean`` is auraloss's own module, bit for bit."""
    dtype = compute_dtype(x, y)
    x, y = x.to(dtype), y.to(dtype)
    lengths = _lengths_list(options.lengths, x.shape[0], x.shape[-1])
    if options.reduction == "mean" and options.lengths is None:
        loss, terms = _stft_with_terms(x, y, settings)
    elif options.reduction == "mean":
        xs = [x[b, :, :n] for b, n in enumerate(lengths)]
        ys = [y[b, :, :n] for b, n in enumerate(lengths)]
        loss, terms = _batch_stft_over_crops(xs, ys, settings)
    else:
        entries = [_stft_with_terms(_crop(x, b, n), _crop(y, b, n), settings)
                   for b, n in enumerate(lengths)]
        losses = _as_reduction(_stacked([{"loss": loss, **terms} for loss, terms in entries]),
                               options.reduction)
        loss = losses.pop("loss")
        terms = losses
    return (loss, terms) if options.per_resolution_terms else loss


def _combined_of(recon, target, mu, logvar, config, kl_weight, settings, terms_of):
    """The seed's computation with the STFT term and its per-resolution terms from
    ``terms_of(x, y)``."""
    found = {}

    def stft_fn(x, y):
        mrstft, terms = terms_of(x, y)
        found.update(terms)
        return mrstft

    losses, finite = combined_loss(recon, target, mu, logvar, config, kl_weight, stft_fn)
    return losses, found, finite


def combined_loss_per_example(recon, target, mu, logvar, config, kl_weight, stft, options):
    """The combined loss under ``options`` (``per_example.Options``), by definition: "none"
    (and "sum") from the seed's computation on each example alone, cropped to its length;
    "mean" from the seed's on the batch, or, with lengths, the batch-level loss over the
    crops."""
    dtype = compute_dtype(recon, target, mu, logvar)
    recon, target, mu, logvar = (t.to(dtype) for t in (recon, target, mu, logvar))
    lengths = _lengths_list(options.lengths, recon.shape[0], recon.shape[-1])

    def with_terms(losses, terms):
        return {**losses, **terms} if options.per_resolution_terms else losses

    if options.reduction != "mean":
        entries, all_finite = [], True
        for b, n in enumerate(lengths):
            losses, terms, finite = _combined_of(
                _crop(recon, b, n), _crop(target, b, n), mu[b:b + 1], logvar[b:b + 1], config,
                kl_weight, stft, lambda x, y: _stft_with_terms(x, y, stft))
            entries.append(with_terms(losses, terms))
            all_finite = all_finite and bool(finite)
        return _as_reduction(_stacked(entries), options.reduction), torch.tensor(all_finite)
    if options.lengths is None:
        losses, terms, finite = _combined_of(recon, target, mu, logvar, config, kl_weight, stft,
                                             lambda x, y: _stft_with_terms(x, y, stft))
        return with_terms(losses, terms), finite

    # "mean" with lengths: every sum over the valid elements of the whole batch.
    height = recon.shape[2]
    crops = [(_crop(recon, b, n)[0], _crop(target, b, n)[0]) for b, n in enumerate(lengths)]
    mrstft, terms = _batch_stft_over_crops([r[:1].reshape(1, -1) for r, _ in crops],
                                           [t[:1].reshape(1, -1) for _, t in crops], stft)
    count = height * sum(lengths)
    mag = sum((r[0] - t[0]).abs().sum() for r, t in crops) / count
    mean_tm = sum(t[0].sum() for _, t in crops) / count
    if_loss = sum(((r[1] - t[1]).abs() * t[0]).sum() for r, t in crops) / count / (
        mean_tm + 1e-8)
    rc = config.reconstruction
    recon_loss = rc.weight * (rc.magnitude_weight * mag + rc.if_weight * if_loss)
    stft_loss = torch.clamp(mrstft, min=0.0)
    total, kl_loss, finite = _kl_and_total(mu, logvar, config, kl_weight, stft_loss, recon_loss)
    losses = dict(zip(LOSS_KEYS, (total, stft_loss, mag, if_loss, kl_loss, recon_loss)))
    return with_terms(losses, terms), finite
