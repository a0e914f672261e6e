"""Triton's interpreter, made faster for the tests, where ``TRITON_INTERPRET=1`` (the kernels'
results are the same: only interpretation work that changes nothing is left out). The tests'
own process applies it (``conftest.py``), and so does every Python process they start, this
folder being on its ``PYTHONPATH`` (Python runs a ``sitecustomize`` module it finds there at
start-up). Nothing of it is in the package: a user's interpreter runs as Triton ships it."""

import importlib.abc
import importlib.util
import os
import sys


def _interpreter_without_overflow_checks():
    """Triton's interpreter checks every 32-bit integer add, subtract and multiply for
    overflow (six more interpreted operations each; compiled code checks nothing unless built
    with debug=True). The kernels' 32-bit index math (WIDE false) is bounded by
    ``kernels._common.INDEX_LIMIT`` on the host, and the test shapes lie far below it: the
    checks would only make the suite some three times slower."""
    import dataclasses

    from triton.runtime import interpreter
    builder = interpreter.interpreter_builder
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


def _interpreter_patches_triton_language_once_per_launch():
    """Triton's interpreter runs a kernel with ``triton.language`` patched (each builtin
    swapped for its numpy version, found by ``inspect.getmembers``) for the launch, and patches
    it again, never to restore, at every call of a ``@triton.jit`` helper inside the kernel: the
    same modules, already patched, so nothing changes but the time (a third of an interpreted
    kernel's here, the helpers being called per program). Here a helper's call skips the
    repeat when its launch has patched every language module the helper sees; the launch's own
    patch, and any other, is Triton's."""
    import functools
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    @functools.cache
    def language_modules(fn):
        return frozenset(id(value) for value in fn.__globals__.values()
                         if inspect.ismodule(value) and value in (tl, tl.core))

    patch_lang, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    launches: list = []  # per launch in progress: the modules it patched, once it has

    def tracked_launch(self, *args, **kwargs):
        launches.append(None)
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    def patched_once(fn):
        if not launches:
            return patch_lang(fn)
        if launches[-1] is None:  # the launch's own patch
            launches[-1] = language_modules(fn)
            return patch_lang(fn)
        if language_modules(fn) <= launches[-1]:  # a helper's, patched already
            return interpreter._LangPatchScope()
        # A helper that sees another module (tl.sum's combine function sees triton.language.core):
        # Triton patches it and never restores it, so it stays patched for the launch.
        launches[-1] = launches[-1] | language_modules(fn)
        return patch_lang(fn)

    interpreter.GridExecutor.__call__ = tracked_launch
    interpreter._patch_lang = patched_once


class _OnceTritonsInterpreterLoads(importlib.abc.MetaPathFinder):
    """Applies the two above when ``triton.runtime.interpreter`` is first imported, so that a
    process imports nothing it would not (Triton included) to get them."""

    def find_spec(self, name, path, target=None):
        if name != "triton.runtime.interpreter":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_and_apply(module):
                exec_module(module)
                _interpreter_without_overflow_checks()
                _interpreter_patches_triton_language_once_per_launch()

            spec.loader.exec_module = exec_and_apply
        return spec


if os.environ.get("TRITON_INTERPRET") == "1":
    if "triton.runtime.interpreter" in sys.modules:
        _interpreter_without_overflow_checks()
        _interpreter_patches_triton_language_once_per_launch()
    else:
        sys.meta_path.insert(0, _OnceTritonsInterpreterLoads())
