"""Loss configuration: nested dataclasses whose attribute names existing training code reads.

Every value is checked when the object is built, and converted: numpy integer and floating
scalars become Python ``int``/``float``, sequences of sizes become tuples, and a nested config
given as a dict becomes its class. A value that cannot work raises ``ValueError`` naming the
field. ``from_dict`` and ``to_dict`` read and write plain dicts (JSON, YAML) and round-trip.
A field changed after construction is checked again at the next loss call.

``compute_combined_loss`` and ``create_stft_loss`` take this ``LossConfig`` or any object with
the same attributes (the host application's own config classes): ``as_loss_config`` reads the
fields the loss uses into a checked ``LossConfig``, once per distinct set of values.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Protocol, Tuple, Type, TypeVar, Union


def as_weight(owner: str, name: str, value) -> float:
    """``value`` as a finite, non-negative Python float (numpy scalars included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{owner}.{name} must be a real number, got {value!r}")
    value = float(value)
    # Comparisons, not math.isfinite (NaN fails them too): under torch.compile(dynamic=True) a
    # config's float is symbolic, and comparisons trace where math.isfinite cannot.
    if not 0 <= value < math.inf:
        raise ValueError(f"{owner}.{name} must be finite and >= 0, got {value!r}")
    return value


def as_sizes(owner: str, name: str, values) -> Tuple[int, ...]:
    """``values`` (a list, tuple or other sequence) as a non-empty tuple of positive ints."""
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{owner}.{name} must be a sequence of positive ints, got {values!r}")
    try:
        items = tuple(values)
    except TypeError:
        raise ValueError(
            f"{owner}.{name} must be a sequence of positive ints, got {values!r}") from None
    if not items:
        raise ValueError(f"{owner}.{name} must not be empty")
    sizes = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral) or item <= 0:
            raise ValueError(f"{owner}.{name} must hold positive ints, got {values!r}")
        sizes.append(operator.index(item))
    return tuple(sizes)


def as_weights(owner: str, name: str, values, count: int) -> Tuple[float, ...]:
    """``values`` as a tuple of ``count`` finite, non-negative Python floats."""
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{owner}.{name} must be a sequence of {count} weights, got {values!r}")
    try:
        items = tuple(values)
    except TypeError:
        raise ValueError(
            f"{owner}.{name} must be a sequence of {count} weights, got {values!r}") from None
    if len(items) != count:
        raise ValueError(f"{owner}.{name} must hold one weight per resolution ({count}), got "
                         f"{len(items)}: {values!r}")
    return tuple(as_weight(owner, name, item) for item in items)


FieldsT = TypeVar("FieldsT", bound="_Fields")


class _Fields:
    """``from_dict`` / ``to_dict`` for the config dataclasses (JSON and YAML hold dicts and
    lists): ``cls.from_dict(c.to_dict()) == c``."""

    @classmethod
    def from_dict(cls: Type[FieldsT], values: Mapping[str, Any]) -> FieldsT:
        """The config of ``values`` (missing fields keep their defaults; nested configs may be
        dicts). An unknown key is a ``ValueError`` naming it."""
        if not isinstance(values, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict takes a mapping of its fields, got "
                            f"{type(values).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in values if k not in names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field {', '.join(map(repr, unknown))} "
                             f"(its fields: {', '.join(names)})")
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        """The fields as plain Python values: nested configs as dicts, sizes as lists."""
        out: Dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, _Fields):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


@dataclass
class STFTLossConfig(_Fields):
    """Multi-resolution STFT loss on the flattened magnitude channel."""

    weight: float = 1.0
    fft_sizes: Tuple[int, ...] = (512, 1024, 2048)
    hop_sizes: Tuple[int, ...] = (128, 256, 512)
    win_lengths: Tuple[int, ...] = (512, 1024, 2048)
    # One weight per resolution, MRSTFT = (1/R) sum_r w_r L_r; None: all 1 (auraloss's mean).
    resolution_weights: Optional[Tuple[float, ...]] = None

    def __post_init__(self) -> None:
        self.weight = as_weight("STFTLossConfig", "weight", self.weight)
        self.fft_sizes = as_sizes("STFTLossConfig", "fft_sizes", self.fft_sizes)
        self.hop_sizes = as_sizes("STFTLossConfig", "hop_sizes", self.hop_sizes)
        self.win_lengths = as_sizes("STFTLossConfig", "win_lengths", self.win_lengths)
        if not len(self.fft_sizes) == len(self.hop_sizes) == len(self.win_lengths):
            raise ValueError(
                "STFTLossConfig.fft_sizes, hop_sizes and win_lengths must have the same length, "
                f"got {len(self.fft_sizes)}, {len(self.hop_sizes)} and {len(self.win_lengths)}"
            )
        for n_fft, win in zip(self.fft_sizes, self.win_lengths):
            if win > n_fft:
                raise ValueError(
                    f"STFTLossConfig.win_lengths: window {win} is longer than its fft_size {n_fft}"
                )
        if self.resolution_weights is not None:
            self.resolution_weights = as_weights("STFTLossConfig", "resolution_weights",
                                                 self.resolution_weights, len(self.fft_sizes))


@dataclass
class ReconLossConfig(_Fields):
    """L1 on the magnitude channel plus magnitude-weighted L1 on the IF channel."""

    weight: float = 0.1
    magnitude_weight: float = 1.0
    if_weight: float = 0.5

    def __post_init__(self) -> None:
        for name in ("weight", "magnitude_weight", "if_weight"):
            setattr(self, name, as_weight("ReconLossConfig", name, getattr(self, name)))


@dataclass
class KLLossConfig(_Fields):
    """Free-bits KL with a linear warm-up of its weight."""

    weight_max: float = 0.01
    warmup_fraction: float = 0.3
    free_bits: float = 0.1

    def __post_init__(self) -> None:
        for name in ("weight_max", "warmup_fraction", "free_bits"):
            setattr(self, name, as_weight("KLLossConfig", name, getattr(self, name)))
        if self.warmup_fraction > 1:
            raise ValueError(
                f"KLLossConfig.warmup_fraction must lie in [0, 1], got {self.warmup_fraction!r}"
            )


@dataclass
class LossConfig(_Fields):
    """``stft``, ``reconstruction`` and ``kl``: the settings of ``compute_combined_loss``.
    Each may be given as its config class or as a dict of its fields (from JSON or YAML),
    which is converted and checked here."""

    # Annotated as what they hold once built (a dict given here is converted).
    stft: STFTLossConfig = field(default_factory=STFTLossConfig)
    reconstruction: ReconLossConfig = field(default_factory=ReconLossConfig)
    kl: KLLossConfig = field(default_factory=KLLossConfig)

    def __post_init__(self) -> None:
        for f in fields(self):
            value, cls = getattr(self, f.name), _NESTED[f.name]
            if isinstance(value, Mapping):
                try:
                    value = cls.from_dict(value)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"LossConfig.{f.name}: {exc}") from None
            elif not isinstance(value, cls):
                raise TypeError(f"LossConfig.{f.name} must be a {cls.__name__} or a dict of its "
                                f"fields, got {type(value).__name__}")
            setattr(self, f.name, value)


_NESTED = {"stft": STFTLossConfig, "reconstruction": ReconLossConfig, "kl": KLLossConfig}


def _values(config) -> tuple:
    """The fields of ``config`` that the loss reads (a ``LossConfig`` or an object shaped like
    one), each value with its type beside it, so that e.g. ``True``, ``1`` and ``1.0`` are
    told apart (and refused, or converted, each time they are first seen)."""
    try:
        stft, rec = config.stft, config.reconstruction
        scalars = (stft.weight, rec.weight, rec.magnitude_weight, rec.if_weight,
                   config.kl.free_bits)
        sizes = (stft.fft_sizes, stft.hop_sizes, stft.win_lengths,
                 getattr(stft, "resolution_weights", None))
    except AttributeError as exc:
        raise TypeError(
            "loss_config must be a LossConfig or an object with its fields (stft.weight, "
            "stft.fft_sizes, stft.hop_sizes, stft.win_lengths, reconstruction.weight, "
            f"reconstruction.magnitude_weight, reconstruction.if_weight, kl.free_bits): {exc}"
        ) from None
    typed_sizes = tuple(tuple((type(x), x) for x in s) if isinstance(s, (list, tuple)) else s
                        for s in sizes)
    return tuple((type(v), v) for v in scalars) + typed_sizes


def _build(config) -> LossConfig:
    """Our ``LossConfig`` with the fields the loss reads taken from ``config`` (``kl.weight_max``
    and ``kl.warmup_fraction``, which only the application's warm-up reads, keep defaults;
    ``stft.resolution_weights`` is optional: the application's configs have none)."""
    stft, rec = config.stft, config.reconstruction
    return LossConfig(
        stft=STFTLossConfig(weight=stft.weight, fft_sizes=stft.fft_sizes,
                            hop_sizes=stft.hop_sizes, win_lengths=stft.win_lengths,
                            resolution_weights=getattr(stft, "resolution_weights", None)),
        reconstruction=ReconLossConfig(weight=rec.weight, magnitude_weight=rec.magnitude_weight,
                                       if_weight=rec.if_weight),
        kl=KLLossConfig(free_bits=config.kl.free_bits),
    )


_RESOLVED: Dict[tuple, LossConfig] = {}
_MAX_RESOLVED = 64  # distinct configurations kept (a run has one, or a few)


class LossConfigLike(Protocol):
    """What the loss functions take for a config: a ``LossConfig``, or any object with its three
    parts (the application's own config classes), each with the fields the loss reads."""

    stft: Any
    reconstruction: Any
    kl: Any


def as_loss_config(config: Union[LossConfigLike, None]) -> LossConfig:
    """A checked ``LossConfig`` with the values ``config`` holds now in the fields the loss
    reads (``None``: the defaults).

    ``config`` may be this module's ``LossConfig`` (fields changed after it was built are
    checked here too) or any object with the same attributes. Raises ``TypeError`` for an
    object without them and ``ValueError`` naming the field for a value that cannot work.
    """
    if config is None:
        config = _DEFAULT
    key = _values(config)
    try:
        resolved = _RESOLVED.get(key)
    except TypeError:  # an unhashable value, which _build refuses with its field's name
        return _build(config)
    if resolved is None:
        resolved = _build(config)
        if len(_RESOLVED) >= _MAX_RESOLVED:
            _RESOLVED.clear()
        _RESOLVED[key] = resolved
    return resolved


_DEFAULT = LossConfig()
