"""Mutation check of the test suite: does it catch small, realistic bugs?

Each mutant below is one edit (an exact string, replaced once) of the package, the kind of slip
a reviewer could miss; every one changes a result a user sees. For each, this script copies the
working tree to a scratch directory, applies the edit, runs the test suite there (stopping at
the first failure, the test files most likely to catch it first) and reports the mutant as

- ``caught``: a test failed;
- ``SURVIVED``: the whole suite passed;
- ``crashed``: pytest died (a segfault, say): not a deterministic catch;
- ``invalid``: the edit did not apply once, or the suite could not be collected.

A mutant that is not ``caught`` is a gap in the suite (or an equivalent mutant, to be dropped
from the list). Usage (``make mutants``; too slow for CI: a survivor runs the whole suite)::

    python tools/mutants.py [--only NAME ...] [--list] [--record tests/MUTANTS.md]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parents[1]
TORCH_BACKEND = "src/distill_fused/backends/torch_backend.py"
ASSEMBLE = "src/distill_fused/backends/assemble.py"
CHECKS = "src/distill_fused/api/checks.py"
PER_EXAMPLE = "src/distill_fused/backends/per_example.py"
STFT_OPTIONS = "kernels/stft_options.py"
OPTION_TESTS = ("tests/test_stft_options.py",)


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    why: str
    first: Tuple[str, ...] = ()  # test files run first (the rest of the suite follows)
    occurrence: int = 1          # which occurrence of ``old`` is replaced (1-based)


MUTANTS: List[Mutant] = [
    # The free-bits floor: torch.clamp passes the gradient at k == free_bits.
    Mutant("free-bits-boundary-torch", TORCH_BACKEND,
           "active = (k >= free_bits)", "active = (k > free_bits)",
           "no KL gradient for elements exactly on the free-bits floor",
           ("tests/test_boundaries.py",)),
    Mutant("free-bits-boundary-triton", "kernels/kl.py",
           "active = (k >= free_bits).to(ACC)", "active = (k > free_bits).to(ACC)",
           "no KL gradient for elements exactly on the free-bits floor",
           ("tests/test_boundaries.py",)),
    # The reflect padding folded back in the STFT adjoint (kernels/stft_frames.py).
    Mutant("reflect-near-edge", "kernels/stft_frames.py",
           "(t >= 1) & (t <= pad)", "(t >= 1) & (t < pad)",
           "d/dx of the outermost near-boundary sample misses its reflected copy",
           ("tests/test_boundaries.py",)),
    Mutant("reflect-near-start", "kernels/stft_frames.py",
           "(t >= 1) & (t <= pad)", "(t >= 0) & (t <= pad)",
           "sample 0 counted twice (it is not reflected)",
           ("tests/test_boundaries.py",)),
    Mutant("reflect-far-edge", "kernels/stft_frames.py",
           "(t >= length - 1 - pad)", "(t > length - 1 - pad)",
           "d/dx of the outermost far-boundary sample misses its reflected copy",
           ("tests/test_boundaries.py",)),
    Mutant("reflect-far-end", "kernels/stft_frames.py",
           "(t <= length - 2)", "(t <= length - 1)",
           "the last sample counted twice (it is not reflected)",
           ("tests/test_boundaries.py",)),
    Mutant("frame-reflect-far", "kernels/stft_frames.py",
           "u = tl.where(u >= length, 2 * (length - 1) - u, u)",
           "u = tl.where(u > length, 2 * (length - 1) - u, u)",
           "framing reads one sample past the signal instead of reflecting",
           ("tests/test_boundaries.py",)),
    # kl_weight <= 0 leaves the KL out, even a non-finite one (0 * inf must not get in).
    Mutant("kl-gate-float-torch", ASSEMBLE,
           "elif kl_weight > 0:", "elif kl_weight >= 0:",
           "kl_weight = 0 lets 0 * inf = NaN into the total (then the fallback)",
           ("tests/test_boundaries.py",)),
    Mutant("kl-gate-tensor-torch", ASSEMBLE,
           "torch.where(kl_weight > 0,", "torch.where(kl_weight >= 0,",
           "a tensor kl_weight = 0 lets 0 * inf = NaN into the total",
           ("tests/test_boundaries.py",)),
    Mutant("kl-gate-triton", "kernels/combined.py",
           "total64 += tl.where(kw > 0, kw * kl.to(tl.float64), 0.0)",
           "total64 += tl.where(kw >= 0, kw * kl.to(tl.float64), 0.0)",
           "kl_weight = 0 lets 0 * inf = NaN into the fused kernel's total",
           ("tests/test_boundaries.py",)),
    Mutant("kl-gate-triton-backward", "kernels/combined.py",
           "total_reaches_kl = HAS_G_TOTAL & finite & (kw > 0)",
           "total_reaches_kl = HAS_G_TOTAL & finite",
           "kl_weight < 0 sends a (negative) KL gradient to the latent",
           ("tests/test_boundaries.py",)),
    # Argument checks.
    Mutant("check-latent-dim", CHECKS,
           "if mu.shape[1] == 0:", "if False:",
           "mu/logvar with latent dim 0 reach the backends",
           ("tests/test_bad_input.py",)),
    Mutant("check-kl-weight-numel", CHECKS,
           "if kl_weight.numel() != 1 or", "if False or",
           "a kl_weight tensor of several elements is let through",
           ("tests/test_bad_input.py",)),
    Mutant("check-kl-weight-device", CHECKS,
           "kl_weight.device not in (recon.device, torch.device(\"cpu\"))", "False",
           "a kl_weight tensor on another device is let through",
           ("tests/test_bad_input.py",)),
    # Off-by-one masks: every store past a buffer's end lands in the tests' guard band, every
    # load past an input's end reads the NaN the tests put there.
    Mutant("mask-recon-forward", "kernels/recon.py",
           "mask = index < n_elements", "mask = index <= n_elements",
           "the reconstruction sums read one element past the inputs",
           ("tests/test_kernels.py",), occurrence=1),
    Mutant("mask-recon-partials", "kernels/recon.py",
           "mask = idx < n_programs", "mask = idx <= n_programs",
           "the partial sums read one slot too many",
           ("tests/test_kernels.py",)),
    Mutant("mask-recon-backward", "kernels/recon.py",
           "mask = index < n_elements", "mask = index <= n_elements",
           "the reconstruction gradient writes one element past its buffer",
           ("tests/test_kernels.py",), occurrence=2),
    Mutant("mask-kl-forward", "kernels/kl.py",
           "mask = index < n_elements", "mask = index <= n_elements",
           "the KL reads (and writes its gradient) one element past mu/logvar",
           ("tests/test_kernels.py",), occurrence=1),
    Mutant("mask-kl-backward", "kernels/kl.py",
           "mask = index < n_elements", "mask = index <= n_elements",
           "the KL gradient's scaling writes one element past its buffer",
           ("tests/test_kernels.py",), occurrence=2),
    Mutant("mask-combined-recon-grad", "kernels/combined.py",
           "mask = index < n_elements", "mask = index <= n_elements",
           "the fused backward writes one reconstruction gradient too many",
           ("tests/test_combined_loss.py",)),
    Mutant("mask-combined-kl-grad", "kernels/combined.py",
           "mask = index < kl_numel", "mask = index <= kl_numel",
           "the fused backward writes one latent gradient too many",
           ("tests/test_combined_loss.py",)),
    Mutant("mask-frames-rows", "kernels/stft_frames.py",
           "mask = (rows < side_rows)[:, None]", "mask = (rows <= side_rows)[:, None]",
           "the framing writes one frame too many",
           ("tests/test_kernels.py",)),
    Mutant("mask-frames-columns", "kernels/stft_frames.py",
           "& (cols < fft_n)[None, :]", "& (cols <= fft_n)[None, :]",
           "the framing writes one column too many per frame",
           ("tests/test_kernels.py",)),
    Mutant("mask-spectral-partials", "kernels/stft_spectral.py",
           "mask = e < count", "mask = e <= count",
           "the spectral sums take one bin too many",
           ("tests/test_kernels.py",)),
    Mutant("mask-spectral-grad", "kernels/stft_spectral.py",
           "mask = e < signals * tl.load(row_meta + FRAMES) * spec_row",
           "mask = e <= signals * tl.load(row_meta + FRAMES) * spec_row",
           "the spectral gradient writes one bin too many",
           ("tests/test_combined_loss.py",)),
    Mutant("mask-frames-adjoint", "kernels/stft_frames.py",
           "mask = t < length", "mask = t <= length",
           "the STFT adjoint writes one sample too many",
           ("tests/test_kernels.py",)),
    # Index math (issue 13): magic numbers, the 64-bit path, the reductions' tile strides, the
    # reflected passes of the adjoint, the framing tiles of each resolution.
    Mutant("magic-shift", "kernels/_common.py",
           "shift = 30 + (divisor - 1).bit_length()", "shift = 30 + divisor.bit_length()",
           "magic numbers one bit short: some quotients off by one",
           ("tests/test_index_math.py",)),
    Mutant("divide-wide", "kernels/_common.py",
           "        return n // divisor\n", "        return (n + 1) // divisor\n",
           "the 64-bit division off by one past the multiple",
           ("tests/test_index_math.py",)),
    Mutant("partials-tile-stride", "kernels/stft_spectral.py",
           "start += n_programs * BLOCK", "start += (n_programs + 1) * BLOCK",
           "the spectral sums skip tiles when a program sums several",
           ("tests/test_small_blocks.py",)),
    Mutant("recon-tile-stride", "kernels/recon.py",
           "start += n_programs * BLOCK", "start += 2 * BLOCK",
           "the reconstruction sums count tiles twice when a program sums several",
           ("tests/test_small_blocks.py",)),
    Mutant("adjoint-edge-passes", "kernels/stft_frames.py",
           "passes = tl.where(near_edge, 3, 1)", "passes = tl.where(near_edge, 2, 1)",
           "the adjoint leaves out the far edge's reflected samples",
           ("tests/test_boundaries.py",)),
    Mutant("frame-tile-order", "kernels/stft_plan.py",
           "for k in tl.static_range(1, N_RES):", "for k in tl.static_range(2, N_RES):",
           "programs of the second resolution's tiles work on the first's",
           ("tests/test_stft_module.py",)),
    # Half precision: each input's gradient summed over the terms in float32, rounded once.
    Mutant("half-grads-per-term", ASSEMBLE,
           "    recon, target, mu, logvar = (t.to(dtype) for t in (recon, target, mu, logvar))\n",
           "", "half-precision gradients rounded per term, then added in half precision",
           ("tests/test_combined_loss.py",)),
    # The house (issue 14): an option's argument beats its environment variable; the weights
    # tensor is kept per value; a term no gradient reaches sends exactly 0.
    Mutant("grouping-argument-precedence", "src/distill_fused/api/environment.py",
           "    if value is None:\n", "    if True:\n",
           "DISTILL_FFT_GROUPING overrides the fft_grouping argument",
           ("tests/test_fft_grouping.py",)),
    Mutant("device-constants-key", "kernels/_common.py",
           "key = (values, device)", "key = (len(values), device)",
           "a second config's weights are read from the first config's cached tensor",
           ("tests/test_combined_loss.py",)),
    Mutant("gated-grad-triton", "kernels/_common.py",
           "return tl.where(reached, scale * grad, 0.0)", "return scale * grad",
           "a term cut off by the guard sends 0 * nan to the inputs",
           ("tests/test_nonfinite_semantics.py",)),
    Mutant("store-target-if-grad", "kernels/channels.py",
           "(-grad_ri).to(dtype)", "grad_ri.to(dtype)",
           "d/dti written with the sign of d/dri",
           ("tests/test_combined_loss.py",)),
    # Formulas (the suite caught these before: kept so that it goes on catching them).
    Mutant("if-eps", "kernels/recon.py",
           "IF_EPS = 1e-8", "IF_EPS = 1e-6",
           "the IF term's normaliser epsilon",
           ("tests/test_kernels.py",)),
    Mutant("half-spectrum-weight", "kernels/stft_spectral.py",
           "(j == 0) | (2 * j == n_fft), 1.0, 0.5)", "(j == 0), 1.0, 0.5)",
           "the Nyquist bin counted as an interior bin in the adjoint",
           ("tests/test_stft_module.py",)),
    Mutant("sc-target-term", TORCH_BACKEND,
           "coef.addcmul_(m, -w_sc * num / den.pow(3))", "coef.addcmul_(m, -w_sc * num / den)",
           "the spectral convergence gradient for the target",
           ("tests/test_combined_loss.py",)),
    Mutant("stft-clamp", TORCH_BACKEND,
           "return (loss.clamp_min(0.0), loss, grad) if clamped",
           "return (loss, loss, grad) if clamped",
           "max(MRSTFT, 0) left out of the combined loss",
           ("tests/test_nonfinite_semantics.py",)),
    Mutant("fallback-guard", ASSEMBLE,
           "total = torch.where(finite, total, recon_loss)",
           "total = torch.where(finite, total, total)",
           "a non-finite total returned instead of recon_loss",
           ("tests/test_guard.py",)),
    Mutant("log-mag-sign", TORCH_BACKEND,
           "coef.add_(torch.sign(log_ratio).div_(m), alpha=sign * w_log / count)",
           "coef.add_(torch.sign(log_ratio).div_(m), alpha=w_log / count)",
           "the log-magnitude gradient's sign for the target",
           ("tests/test_combined_loss.py",)),
    # python -m distill_fused: its verdict and tolerances, and auto's reason.
    Mutant("selfcheck-gradient-verdict", "src/distill_fused/selfcheck.py",
           "and all(e <= self.grad_tolerances[k] for k, e in self.grad_errors.items()))",
           "and True)",
           "a gradient outside its tolerance reported as PASS",
           ("tests/test_cli.py",)),
    Mutant("selfcheck-float32-tolerance", "src/distill_fused/selfcheck.py",
           "max(GRAD_FLOOR_FLOAT32, 2 * own[k])", "max(GRAD_FLOOR_FLOAT32, own[k])",
           "float32 gradients judged against the reference's own error, not twice it",
           ("tests/test_cli.py",)),
    Mutant("selfcheck-fresh-leaves", "src/distill_fused/selfcheck.py",
           "t.to(dtype).to(device).clone().requires_grad_(",
           "t.to(dtype).to(device).requires_grad_(",
           "leaves that alias the batch: gradients pile up, and an error can compare a tensor "
           "with itself", ("tests/test_cli.py",)),
    Mutant("auto-says-why", "src/distill_fused/dispatch.py",
           'logger.debug("loss backend auto -> %s: %s", chosen.name, why)', "pass",
           "auto's choice made silently",
           ("tests/test_packaging.py",)),
    Mutant("auto-logs-while-tracing", "src/distill_fused/dispatch.py",
           "if not tracing() and why not in _auto_reasons_logged:",
           "if why not in _auto_reasons_logged:",
           "a logger call inside a compiled step: a graph break, so fullgraph fails",
           ("tests/test_compile.py",)),
    # The per-example path (issue 16): crops, masks, reductions.
    Mutant("crop-flattened-as-contiguous", PER_EXAMPLE,
           "return row * width + (j - row * lengths[:, None])",
           "return row * lengths[:, None] + (j - row * lengths[:, None])",
           "a cropped example's signal read as if its valid columns were contiguous",
           ("tests/test_per_example.py",)),
    Mutant("crop-reflect-far-edge", PER_EXAMPLE,
           "j = torch.where(j >= n, 2 * (n - 1) - j, j)",
           "j = torch.where(j > n, 2 * (n - 1) - j, j)",
           "the cropped signal's far reflection reads one sample too far",
           ("tests/test_per_example.py",)),
    Mutant("sc-norm-gradient-at-zero", PER_EXAMPLE,
           "grad[..., 0] = torch.where(num == 0, 0.0, c / (2 * num * den))",
           "grad[..., 0] = c / (2 * num * den)",
           "an example reconstructed exactly gets 0 * inf = NaN gradients",
           ("tests/test_per_example.py",)),
    Mutant("torch-padding-masked-after-the-terms", PER_EXAMPLE,
           "recon, target = torch.where(valid, recon, 0.0), torch.where(valid, target, 0.0)",
           "recon, target = recon, target",
           "the padding's values reach the reconstruction sums",
           ("tests/test_per_example.py",)),
    Mutant("sum-reduction-averages-the-kl", PER_EXAMPLE,
           'kl = kl.mean() if reduction == "mean" else kl',
           'kl = kl.mean() if reduction != "none" else kl',
           "reduction='sum' gets the batch's mean KL",
           ("tests/test_per_example.py",)),
    Mutant("resolution-weights-ignored", PER_EXAMPLE,
           "loss_r = weights[r] * loss_r", "loss_r = 1.0 * loss_r",
           "resolution_weights have no effect",
           ("tests/test_per_example.py",)),
    Mutant("counts-miss-the-channels", PER_EXAMPLE,
           "counts.append(torch.stack([frames * (channels * features),",
           "counts.append(torch.stack([frames * features,",
           "the module's log-magnitude mean divides by one channel's count",
           ("tests/test_per_example.py",)),
    Mutant("triton-valid-frames", "kernels/per_example.py",
           "mask = (e < per_example) & (frame < valid_frames)",
           "mask = (e < per_example) & (frame <= valid_frames)",
           "one frame past the cropped signal's last is summed",
           ("tests/test_per_example.py",)),
    Mutant("triton-recon-lengths", "kernels/per_example.py",
           "mask = (e < hw) & (w < valid_width)", "mask = (e < hw) & (w <= valid_width)",
           "the first padded column is summed",
           ("tests/test_per_example.py",)),
    Mutant("triton-recon-grad-on-padding", "kernels/per_example.py",
           "valid = in_range & (w < valid_width)", "valid = in_range",
           "the padding gets a gradient",
           ("tests/test_per_example.py",)),
    Mutant("triton-spectral-grad-target-norm", "kernels/per_example.py",
           "+ 2.0 * g_py * my", "+ g_py * my",
           "half the gradient of ||My||^2",
           ("tests/test_per_example.py",)),
    # auraloss's options (tests/test_stft_options.py).
    Mutant("mel-filterbank-normalisation", "src/distill_fused/core/filterbanks.py",
           "weights *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))",
           "weights *= (1.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))",
           "the mel filters lose Slaney's area normalisation", OPTION_TESTS),
    Mutant("mel-filterbank-upper-slope", "src/distill_fused/core/filterbanks.py",
           "upper = ramps[i + 2] / fdiff[i + 1]", "upper = ramps[i + 2] / fdiff[i]",
           "each mel filter's falling slope has its rising slope's width", OPTION_TESTS),
    Mutant("chroma-is-mel", "src/distill_fused/core/settings.py",
           "return chroma_filterbank(sample_rate, n_fft, n_bins)",
           "return mel_filterbank(sample_rate, n_fft, n_bins)",
           "scale='chroma' applies a mel filterbank", OPTION_TESTS),
    Mutant("a-weighting-left-out", PER_EXAMPLE,
           "taps = settings.prefilter(x.device, x.dtype)", "taps = None",
           "perceptual_weighting is silently left out", OPTION_TESTS),
    Mutant("a-weighting-reads-the-padded-block", PER_EXAMPLE,
           "source = torch.where(valid, row * width + (j - row * crop), 0)",
           "source = torch.where(valid, j, 0)",
           "with lengths, the FIR filters the padded block's first samples, not the crop",
           OPTION_TESTS),
    Mutant("mel-count", PER_EXAMPLE,
           "features = (settings.n_bins[index] if settings.scale else None) or bins",
           "features = bins",
           "mel log/lin means divide by the STFT's bin count", OPTION_TESTS),
    Mutant("phase-count", PER_EXAMPLE,
           "return count[..., 1 if column == 4 else 0]", "return count[..., 0]",
           "the phase mean divides by the mel bins' count", OPTION_TESTS),
    Mutant("phase-grad-target-sign", PER_EXAMPLE,
           "torch.cat([d_phase, -d_phase])", "torch.cat([d_phase, d_phase])",
           "the target's phase gradient has the input's sign", OPTION_TESTS),
    Mutant("torch-l2-log-slope", PER_EXAMPLE,
           "slope_log, slope_d = 2 * torch.log(sx / sy), 2 * diff",
           "slope_log, slope_d = torch.log(sx / sy), 2 * diff",
           "half the L2 log-magnitude gradient", OPTION_TESTS),
    Mutant("scale-invariance-per-example", PER_EXAMPLE,
           "alpha = (_masked(sx * sy, valid).sum((2, 3), keepdim=True)",
           "alpha = (_masked(sx * sy, valid).sum((1, 2, 3), keepdim=True)",
           "one alpha per example, its channels' products summed together", OPTION_TESTS),
    Mutant("scale-invariance-grad", PER_EXAMPLE,
           "d_sy = alpha * d_sy + _masked(", "d_sy = d_sy + _masked(",
           "the target's gradient misses alpha", OPTION_TESTS),
    Mutant("triton-l2-slope", STFT_OPTIONS,
           "        return 2.0 * u\n", "        return u\n",
           "half the L2 gradients in the kernel", OPTION_TESTS),
    Mutant("triton-l2-lin-sum", STFT_OPTIONS,
           "sum_d += tl.where(valid, _distance(diff, L2), 0.0)",
           "sum_d += tl.where(valid, _distance(diff, False), 0.0)",
           "the linear term stays L1 under mag_distance='L2'", OPTION_TESTS),
    Mutant("triton-feature-frames", STFT_OPTIONS,
           "valid = (e < per_example) & ((e // width) % n_frames < valid_frames)",
           "valid = (e < per_example) & ((e // width) % n_frames <= valid_frames)",
           "one frame past the cropped signal's last is summed", OPTION_TESTS),
    Mutant("triton-magnitude-grad-target-im", STFT_OPTIONS,
           "tl.store(grad_ptr + 2 * y_index + 1, coef_y * yim, mask=in_range)",
           "tl.store(grad_ptr + 2 * y_index + 1, coef_y * yre, mask=in_range)",
           "the target's imaginary gradient from its real part", OPTION_TESTS),
    Mutant("lengths-upper-bound", CHECKS,
           "in_range = (lengths >= shortest) & (lengths <= width)",
           "in_range = (lengths >= shortest) & (lengths < width)",
           "an unpadded example's length is refused",
           ("tests/test_per_example.py",)),
    # Verified dispatch (tests/test_verified_dispatch.py) and the MPS path
    # (tests/test_mps_path.py).
    Mutant("verification-always-passes", "src/distill_fused/verification.py",
           "return all(e <= t for e, t in table.values()), table", "return True, table",
           "a faulty kernel is trusted", ("tests/test_verified_dispatch.py",)),
    Mutant("verification-loose-value-bound", "src/distill_fused/core/contract.py",
           "LOSS_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}",
           "LOSS_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-2}",
           "a loss off by 1e-3 passes the check", ("tests/test_verified_dispatch.py",)),
    Mutant("plan-key-without-shapes", "src/distill_fused/verification.py",
           'return ("tensor", *facts) if traced else ("tensor", *facts, tuple(t.shape),',
           'return ("tensor", *facts) if True else ("tensor", *facts, tuple(t.shape),',
           "a new batch size is trusted on another's check", ("tests/test_verified_dispatch.py",)),
    Mutant("traced-trusts-a-failed-check", "src/distill_fused/verification.py",
           "if found and all(d.passed for d in found):", "if found:",
           "a compiled step runs kernels that failed their check",
           ("tests/test_verified_dispatch.py",)),
    Mutant("mps-float64-sums", "src/distill_fused/core/devices.py",
           '"mps": DevicePolicy(float64=False,', '"mps": DevicePolicy(float64=True,',
           "float64 sums on MPS, which has no float64", ("tests/test_mps_path.py",)),
    Mutant("mps-lengths-without-device-asserts", CHECKS,
           "if not tracing() and (device_policy.host or not device_policy.device_asserts):",
           "if not tracing() and device_policy.host:",
           "torch._assert_async on MPS before torch 2.13, which has no kernel for it",
           ("tests/test_mps_path.py",)),
    Mutant("reflect-adjoint-far-edge", TORCH_BACKEND,
           "grad[..., length - 1 - pad:length - 1] += padded[..., pad + length:].flip(-1)",
           "grad[..., length - pad:length] += padded[..., pad + length:].flip(-1)",
           "the far reflection folded back one sample late", ("tests/test_boundaries.py",)),
    Mutant("fir-blocks-shifted", PER_EXAMPLE,
           "padded = F.pad(signals, (half, blocks * FIR_BLOCK - n + half))",
           "padded = F.pad(signals, (0, blocks * FIR_BLOCK - n + 2 * half))",
           "a long signal's A-weighting shifted by half the filter", OPTION_TESTS),
]


def scratch_copy(dest: Path) -> None:
    """The working tree as git sees it (tracked and untracked-but-not-ignored files), with the
    kernels linked into the package (the editable install maps them from the repository)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / "src/distill_fused/kernels").symlink_to("../../kernels")


def apply(mutant: Mutant, tree: Path) -> bool:
    path = tree / mutant.path
    text = path.read_text()
    parts = text.split(mutant.old)
    if len(parts) <= mutant.occurrence:
        return False
    i = mutant.occurrence
    path.write_text(mutant.old.join(parts[:i]) + mutant.new + mutant.old.join(parts[i:]))
    return True


def run_suite(tree: Path, first, python: str, log: Path) -> int:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), TRITON_INTERPRET="1",
               PYTHONDONTWRITEBYTECODE="1")
    # Every test file named, in order (the likely catchers first): pytest keeps that order.
    rest = sorted(str(p.relative_to(tree)) for p in (tree / "tests").glob("test_*.py"))
    files = list(first) + [name for name in rest if name not in first]
    cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *files]
    with open(log, "w") as out:
        return subprocess.run(cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT
                              ).returncode


def first_failure(log: Path) -> str:
    found = re.search(r"^(?:FAILED|ERROR) (\S+)", log.read_text(), re.M)
    return found.group(1) if found else ""


def check_mutant(mutant: Mutant, python: str, workdir: Path) -> Tuple[str, str, float]:
    tree = workdir / mutant.name
    scratch_copy(tree)
    if not apply(mutant, tree):
        return "invalid", f"{mutant.old!r} not found {mutant.occurrence} time(s)", 0.0
    probe = subprocess.run(
        [python, "-c", "import distill_fused.kernels, distill_fused; "
         "print(distill_fused.kernels.__file__)"],
        env=dict(os.environ, PYTHONPATH=str(tree / "src"), TRITON_INTERPRET="1"),
        capture_output=True, text=True)
    if str(tree) not in probe.stdout:
        return "invalid", f"the scratch package did not import: {probe.stderr[-300:]}", 0.0
    start = time.monotonic()
    log = workdir / f"{mutant.name}.log"
    rc = run_suite(tree, mutant.first, python, log)
    elapsed = time.monotonic() - start
    if rc == 1:
        return "caught", first_failure(log), elapsed
    if rc == 0:
        return "SURVIVED", "", elapsed
    if rc in (2, 3, 4, 5):
        return "invalid", f"pytest exit {rc} (see {log})", elapsed
    return "crashed", f"pytest exit {rc} (see {log})", elapsed


def record(results, path: Path, python: str) -> None:
    version = subprocess.run([python, "-c", "import torch, triton; "
                              "print(f'torch {torch.__version__}, triton {triton.__version__}')"],
                             capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split()[1::2]
    caught = sum(r[1] == "caught" for r in results)
    lines = [
        "# Mutation check of the test suite",
        "",
        f"`make mutants` (`tools/mutants.py`) at {commit}"
        f"{' with uncommitted changes to ' + ', '.join(dirty) if dirty else ''}, "
        f"{version}, TRITON_INTERPRET=1 on this CPU machine: **{caught} of {len(results)} "
        "mutants caught**. Each is one edit of the package; the suite runs on it until a "
        "test fails (the test named here is the first to fail).",
        "",
        "| mutant | file | what it breaks | result | first failing test | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for mutant, status, detail, seconds in results:
        lines.append(f"| {mutant.name} | `{mutant.path}` | {mutant.why} | {status} | "
                     f"{detail.replace('|', '/')} | {seconds:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="mutant names to run")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter whose environment runs the suite")
    parser.add_argument("--record", type=Path, default=None,
                        help="write the results as a markdown table here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies and logs")
    args = parser.parse_args()

    chosen = [m for m in MUTANTS if args.only is None or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:28} {m.path}: {m.why}")
        return 0
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants: {sorted(unknown)}")

    workdir = Path(tempfile.mkdtemp(prefix="distill-mutants-"))
    results = []
    for mutant in chosen:
        status, detail, seconds = check_mutant(mutant, args.python, workdir)
        results.append((mutant, status, detail, seconds))
        print(f"{mutant.name:28} {status:9} {seconds:6.0f} s  {detail}", flush=True)
        if not args.keep:
            shutil.rmtree(workdir / mutant.name, ignore_errors=True)
            if status == "caught":
                (workdir / f"{mutant.name}.log").unlink(missing_ok=True)
    print(f"pytest logs of the mutants not caught{' and the scratch copies' if args.keep else ''}:"
          f" {workdir}")
    if args.record:
        record(results, args.record, args.python)
    missed = [r for r in results if r[1] != "caught"]
    print(f"{len(results) - len(missed)} of {len(results)} caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
