"""``patch_distill()``: the host application's loss functions replaced by this package's, in
one call and undoably (in the manner of Liger-Kernel's ``apply_liger_kernel_to_*``).

The application is a package named ``distill``. Its training loop imports its loss functions
from ``distill.models.losses`` when it runs, and ``distill.models`` re-exports them. So
``patch_distill`` sets each of them in that module to this package's function of the same
name, and also every other name, in every loaded module of the application, that holds the
original function (a re-export, or a ``from ... import`` made earlier). ``unpatch_distill``
puts every original back, including where a module imported the replacement after the patch.

The replacements take the application's own config objects (``as_loss_config``). Each is a
thin wrapper of this patch's own around this package's function of the same name.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Callable, Dict, List, Optional, Tuple

from . import losses
from .nonfinite import nonfinite_mode

HOST_MODULE = "distill.models.losses"
FUNCTIONS = ("compute_combined_loss", "create_stft_loss", "vae_loss", "get_kl_weight",
             "compute_kl_divergence")

# The patch in force: the host's root package, the originals and their replacements by name.
_active: Optional[Tuple[str, Dict[str, Callable], Dict[str, Callable]]] = None


def _replacement(name: str, nonfinite: Optional[str]) -> Callable:
    """This package's function ``name`` in a wrapper of this patch's own, so that undoing the
    patch finds exactly what it put in (and not a function the application imported from
    ``distill_fused`` itself); ``compute_combined_loss`` runs with ``nonfinite`` unless a call
    says otherwise."""
    ours = getattr(losses, name)
    if name == "compute_combined_loss" and nonfinite is not None:
        @functools.wraps(ours)
        def replacement(*args, nonfinite: Optional[str] = nonfinite, **kwargs):
            return ours(*args, nonfinite=nonfinite, **kwargs)
    else:
        @functools.wraps(ours)
        def replacement(*args, **kwargs):
            return ours(*args, **kwargs)
    return replacement


def _host_modules(root: str) -> List:
    """The loaded modules of the package ``root`` (``distill``, not ``distill_fused``)."""
    return [module for name, module in list(sys.modules.items())
            if module is not None and (name == root or name.startswith(root + "."))]


def _swap(root: str, old: Dict[str, Callable], new: Dict[str, Callable]) -> None:
    """Every name in the ``root`` package's modules bound to ``old[f]`` rebound to ``new[f]``."""
    by_id = {id(fn): new[name] for name, fn in old.items()}
    for module in _host_modules(root):
        namespace = getattr(module, "__dict__", {})
        for attr, value in list(namespace.items()):
            replacement = by_id.get(id(value))
            if replacement is not None and callable(value):
                setattr(module, attr, replacement)


def patch_distill(module: str = HOST_MODULE, *, nonfinite: Optional[str] = None) -> None:
    """Replace the loss functions of the host's ``module`` (``compute_combined_loss``,
    ``create_stft_loss``, ``vae_loss``, ``get_kl_weight``, ``compute_kl_divergence``: those
    it defines) with this package's, everywhere the application holds them.

    ``nonfinite``: the mode of the patched ``compute_combined_loss``
    (``distill_fused.api.nonfinite``); ``None`` (the default) follows ``set_nonfinite_mode``
    (``"silent"`` unless set). ``"warn"`` keeps the application's warning when the total is not
    finite, at the cost of a host read per step (which the seed's loss made too); ``"count"``
    counts without one. Patching again replaces the patch.
    """
    global _active
    if nonfinite is not None:
        nonfinite_mode(nonfinite)  # refuse a bad mode before changing anything
    try:
        host = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"patch_distill: cannot import the application's loss module "
                          f"{module!r} (is the application installed, or on sys.path?): "
                          f"{exc}") from exc
    present = [name for name in FUNCTIONS if callable(getattr(host, name, None))]
    if not present:
        raise ValueError(f"patch_distill: {module!r} defines none of {', '.join(FUNCTIONS)}")
    unpatch_distill()
    originals = {name: getattr(host, name) for name in present}
    replacements = {name: _replacement(name, nonfinite) for name in present}
    root = module.split(".")[0]
    _swap(root, originals, replacements)
    _active = (root, originals, replacements)


def unpatch_distill() -> None:
    """Put the application's own loss functions back wherever ``patch_distill`` (or a module
    imported since) put this package's. Does nothing when no patch is in force."""
    global _active
    if _active is None:
        return
    root, originals, replacements = _active
    _swap(root, replacements, originals)
    _active = None
