"""What every layer may import, and which imports nothing of this package above it: the loss
configuration, the STFT settings, what a combined loss returns, the gradient rules of the
hand-written backwards, and whether a step is being traced."""
