"""The environment variables of distill_fused, read here and nowhere else (the Triton
interpreter's ``TRITON_INTERPRET`` aside). Each is the default of a keyword argument: a call
that passes the argument is not affected by the variable.

=========================  =======================================  ==========================
variable                   the default of                           values
=========================  =======================================  ==========================
``DISTILL_LOSS_BACKEND``   ``backend=``                             ``auto`` (default),
                                                                    ``reference``, ``torch``,
                                                                    ``triton``
``DISTILL_FFT_GROUPING``   ``fft_grouping=``                        ``per_resolution``
                                                                    (default), ``shared``
``DISTILL_NONFINITE``      ``nonfinite=`` (after                    ``silent`` (default),
                           ``set_nonfinite_mode``)                  ``count``, ``warn``
``DISTILL_VERIFY``         ``verify=``                              unset (default: ``auto``
                                                                    verifies triton, an
                                                                    explicit ``triton`` does
                                                                    not), ``1``, ``0``
=========================  =======================================  ==========================

They are read at each call that leaves the argument out, so that a variable set after import
(by a launcher script, a test) takes effect.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

BACKEND_VAR = "DISTILL_LOSS_BACKEND"
FFT_GROUPING_VAR = "DISTILL_FFT_GROUPING"
NONFINITE_VAR = "DISTILL_NONFINITE"
VERIFY_VAR = "DISTILL_VERIFY"

FFT_GROUPINGS = ("per_resolution", "shared")


def backend_choice(argument: Optional[str]) -> Tuple[str, str]:
    """``(name, where it came from)``: the ``backend`` argument, else ``DISTILL_LOSS_BACKEND``,
    else ``"auto"`` (checked by the backend selection, which names the source)."""
    if argument:
        return argument, "the backend argument"
    value = os.environ.get(BACKEND_VAR)
    return (value, BACKEND_VAR) if value else ("auto", "the default")


def fft_grouping(argument: Optional[str]) -> str:
    """The FFT grouping of the ``triton`` backend: the ``fft_grouping`` argument, else
    ``DISTILL_FFT_GROUPING``, else ``"per_resolution"``; a ``ValueError`` naming its source for
    any other value. ``per_resolution``: one FFT per resolution (less memory); ``shared``: one
    FFT per group of resolutions whose sizes divide each other (fewer launches, computed in
    float64)."""
    source, value = "fft_grouping", argument
    if value is None:
        source, value = FFT_GROUPING_VAR, os.environ.get(FFT_GROUPING_VAR) or "per_resolution"
    if value not in FFT_GROUPINGS:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, FFT_GROUPINGS))}, got "
                         f"{value!r}")
    return value


def nonfinite_mode_variable() -> Optional[str]:
    """``DISTILL_NONFINITE`` as set (``None`` where it is unset or empty)."""
    return os.environ.get(NONFINITE_VAR) or None


def verify_choice(argument: Optional[bool]) -> Optional[bool]:
    """Whether the ``triton`` backend is verified against ``torch`` once per plan: the
    ``verify`` argument, else ``DISTILL_VERIFY`` (``1`` or ``0``), else ``None`` (where ``auto``
    picks it); a ``ValueError`` naming its source for any other value."""
    if argument is not None:
        if not isinstance(argument, bool):
            raise TypeError(f"verify must be True, False or None, got {argument!r}")
        return argument
    value = os.environ.get(VERIFY_VAR)
    if not value:
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{VERIFY_VAR} must be 1 or 0 (or unset), got {value!r}")
    return value == "1"
