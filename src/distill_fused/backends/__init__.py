"""The backends: each computes the combined loss (``combined_loss``) and the multi-resolution
STFT loss (``mrstft_loss``) with one signature, and imports only ``core`` and ``kernels``.
``distill_fused.dispatch`` chooses among them."""
