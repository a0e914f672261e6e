"""distill: the fused training loss of 2-channel spectrogram VAEs."""
__version__ = "0.1.0"
