"""The public API: the functions and the module users call, the checks of their arguments,
the environment variables' defaults, the non-finite guard's reporting and ``patch_distill``.
``distill_fused`` hands these names on."""
