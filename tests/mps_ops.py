"""What a step dispatches, as an MPS device would run it, and whether MPS can run each op.

``DispatchRecorder`` records every aten op a step dispatches (forward and backward), with the
dtypes of its tensor arguments and results. Run on CPU tensors under MPS's device policy
(``distill_fused.core.devices.emulated("cpu", like="mps")``), the package takes every branch
it takes on a Mac; the ops are those an MPS device would be asked to run, since the code
between the package and the kernels (autograd, torch's composite ops) is the same for every
device.

``MPSKernels`` reads torchgen's ``native_functions.yaml`` (which ships with torch) and says
whether the installed torch has an MPS kernel for an op: a ``dispatch`` entry naming ``MPS``,
or one of the composite kernels (written in other aten ops, so they run wherever those do),
following ``structured_delegate`` to the op whose kernel a structured op shares. It is used by
``tests/test_mps_path.py`` and by the bench (the ops a step launches on MPS).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from aten_launches import launches_kernel

# The kernels that run wherever the ops they are written in run.
COMPOSITE = {"CompositeImplicitAutograd", "CompositeExplicitAutograd",
             "CompositeExplicitAutogradNonFunctional"}


@dataclass(frozen=True)
class TensorMeta:
    """What a known failure may depend on: a tensor's shape, strides, storage offset, dtype."""

    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    offset: int
    dtype: torch.dtype
    contiguous: bool
    numel: int

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorMeta:
        return cls(tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype,
                   t.is_contiguous(), t.numel())


def _described(value):
    return TensorMeta.of(value) if isinstance(value, torch.Tensor) else value


@dataclass(frozen=True)
class Dispatched:
    """One dispatched op: its overload, the dtypes of its tensor inputs and outputs, and its
    arguments and results with each tensor described (``TensorMeta``)."""

    op: torch._ops.OpOverload
    inputs: Tuple[torch.dtype, ...]
    outputs: Tuple[torch.dtype, ...]
    args: tuple = ()
    results: tuple = ()

    def tensor(self, index: int) -> TensorMeta:
        """Positional argument ``index``, a tensor."""
        return self.args[index]

    def tensors(self) -> List[TensorMeta]:
        return [a for a in tree_leaves(self.args) if isinstance(a, TensorMeta)]

    def output(self, index: int) -> TensorMeta:
        return self.results[index]

    @property
    def name(self) -> str:
        """``aten::name.overload`` (``.default`` left out), as native_functions.yaml has it."""
        schema = self.op._schema
        return schema.name + (f".{schema.overload_name}" if schema.overload_name else "")

    @property
    def dtypes(self) -> Tuple[torch.dtype, ...]:
        return self.inputs + self.outputs


class DispatchRecorder(TorchDispatchMode):
    """Every op dispatched while it is active, in order (``records``)."""

    def __init__(self):
        super().__init__()
        self.records: List[Dispatched] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        dtypes = [tuple(t.dtype for t in tree_leaves(tree) if isinstance(t, torch.Tensor))
                  for tree in ((args, kwargs or {}), out)]
        results = out if isinstance(out, (tuple, list)) else (out,)
        self.records.append(Dispatched(
            func, *dtypes, args=tuple(tree_map(_described, list(args))),
            results=tuple(tree_map(_described, list(results)))))
        return out

    def launches(self) -> int:
        """How many of the ops launch a kernel (views and allocations left out): what a step
        costs in launches on MPS (or on a GPU, for the torch backend)."""
        return sum(1 for r in self.records if launches_kernel(r.op))

    def inventory(self) -> Dict[str, set]:
        """Each op's name, and every dtype it met."""
        seen = collections.defaultdict(set)
        for r in self.records:
            seen[r.name].update(r.dtypes)
        return dict(seen)


def native_functions_path() -> Path:
    import torchgen
    return Path(torchgen.__file__).parent / "packaged" / "ATen" / "native" / \
        "native_functions.yaml"


class MPSKernels:
    """The installed torch's MPS kernels, from its ``native_functions.yaml``."""

    def __init__(self, path: Optional[Path] = None):
        import yaml

        self.path = path or native_functions_path()
        entries = yaml.load(self.path.read_text(), Loader=getattr(yaml, "CSafeLoader",
                                                                  yaml.SafeLoader))
        self.entries = {}
        for entry in entries:
            name = "aten::" + entry["func"].split("(", 1)[0]
            self.entries[name] = entry

    def dispatch_keys(self, name: str) -> set:
        entry = self.entries[name]
        keys = set()
        for spec in (entry.get("dispatch") or {}):
            keys.update(k.strip() for k in spec.split(","))
        return keys

    def why_covered(self, name: str, _seen=()) -> Optional[str]:
        """How the op runs on MPS (``"MPS kernel"``, ``"composite"``, or either through its
        structured delegate), or ``None`` where nothing does (or the op is unknown)."""
        if name.endswith(".default"):
            name = name[:-len(".default")]
        entry = self.entries.get(name)
        if entry is None or name in _seen:
            return None
        keys = self.dispatch_keys(name)
        if "MPS" in keys:
            return "MPS kernel"
        if keys & COMPOSITE:
            return "composite (" + ", ".join(sorted(keys & COMPOSITE)) + ")"
        delegate = entry.get("structured_delegate")
        if delegate:
            via = self.why_covered("aten::" + delegate, (*_seen, name))
            return f"{via} of {delegate}" if via else None
        if not keys:
            return "composite (CompositeImplicitAutograd: no dispatch entry)"
        return None
