"""The filterbanks of auraloss's ``scale="mel"`` (without librosa) and ``scale="chroma"``
(librosa's own).

auraloss builds it as ``librosa.filters.mel(sr=sample_rate, n_fft=fft_size, n_mels=n_bins)``
(librosa's defaults: ``fmin = 0``, ``fmax = sr / 2``, Slaney's mel scale, Slaney's area
normalisation, float32). ``mel_filterbank`` repeats librosa 0.11's arithmetic step for step in
numpy, float64 rounded into float32 where librosa rounds, so that the weights are the same
floats (``tests/test_stft_options.py`` compares them with librosa's, bit for bit)::

    mel(f)  = 3 f / 200                            f < 1000 Hz
            = 15 + 27 ln(f / 1000) / ln 6.4        f >= 1000 Hz
    m_0 .. m_{n+1}: n + 2 points evenly spaced in mel from mel(0) to mel(sr / 2), in Hz
    W[i, k] = max(0, min((f_k - m_i) / (m_{i+1} - m_i), (m_{i+2} - f_k) / (m_{i+2} - m_{i+1})))
              * 2 / (m_{i+2} - m_i)

for the ``n_fft // 2 + 1`` bin frequencies ``f_k = k sr / n_fft``.
"""

from __future__ import annotations

import numpy as np
import torch

_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def _hz_to_mel(hz: float) -> float:
    mel = hz / _F_SP
    if hz >= _MIN_LOG_HZ:
        mel = _MIN_LOG_MEL + np.log(hz / _MIN_LOG_HZ) / _LOGSTEP
    return mel


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    hz = _F_SP * mels
    log_part = mels >= _MIN_LOG_MEL
    hz[log_part] = _MIN_LOG_HZ * np.exp(_LOGSTEP * (mels[log_part] - _MIN_LOG_MEL))
    return hz


def mel_filterbank(sample_rate: float, n_fft: int, n_mels: int) -> torch.Tensor:
    """``[n_mels, n_fft // 2 + 1]`` float32: librosa's ``filters.mel(sr=sample_rate,
    n_fft=n_fft, n_mels=n_mels)``. A filter that covers no bin is all zeros (librosa warns of
    it; the loss then takes ``ln 0``, as auraloss's does)."""
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(float(sample_rate) / 2),
                                   n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, np.newaxis]
    return torch.from_numpy(weights)


def chroma_filterbank(sample_rate: float, n_fft: int, n_chroma: int) -> torch.Tensor:
    """``[n_chroma, n_fft // 2 + 1]`` float32: librosa's ``filters.chroma(sr=sample_rate,
    n_fft=n_fft, n_chroma=n_chroma)``, as auraloss asks for it (auraloss 0.4.0 then fails to
    register the numpy array as a buffer: docs/loss.md). Needs librosa, as auraloss does."""
    try:
        import librosa.filters
    except ImportError as exc:
        raise ImportError("scale='chroma' needs librosa (pip install librosa), as auraloss's "
                          f"does: {exc}") from exc
    return torch.from_numpy(librosa.filters.chroma(sr=sample_rate, n_fft=n_fft,
                                                   n_chroma=n_chroma))
