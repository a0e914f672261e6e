"""placeholder"""
from ..backends.per_example import TorchSums


def spectral_sums(spec, frames, settings, index):
    return TorchSums.spectral(spec, frames, settings, index)


def spectral_grad(spec, frames, settings, index, grad_sums):
    return TorchSums.spectral_grad(spec, frames, settings, index, grad_sums)
