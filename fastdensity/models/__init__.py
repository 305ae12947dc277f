"""Density models trained by maximum likelihood: the same config -> construct -> train path for all.

=================  ======================================================================================
``realnvp``        :class:`RealNVP`: affine coupling flow; MLP couplings for vectors, multi-scale
                   (checkerboard and channel couplings, squeeze, factor-out) for images
``glow``           :class:`Glow`: ActNorm -> invertible 1x1 conv -> affine coupling steps; multi-scale with
                   learned-prior splits for images
``maf``            :class:`MAF`: stacked MADE affine autoregressive transforms with permutations
``nsf``            :class:`NSF`: neural spline flow, rational-quadratic spline couplings or MADE-based
                   autoregressive splines
``pixelcnn``       :class:`PixelCNN`: masked convolutions, gated residual blocks, discretized logistic
                   mixture head (discrete images)
``gmm``            :class:`GaussianMixture`: a diagonal Gaussian mixture
``tarflow``        :class:`TarFlow`: causal-transformer affine autoregressive flow over image patches
=================  ======================================================================================

Every model takes its per-example ``shape`` first and keyword arguments after; ``build_model(name,
shape, **kwargs)`` constructs one by name and ``model.config`` holds the arguments as plain values.
"""
from __future__ import annotations

import inspect
import os
import types
import typing

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .._validation import check_int
from .base import DensityModel
from .glow import Glow
from .gmm import GaussianMixture
from .maf import MAF
from .pixelcnn import PixelCNN
from .nsf import NSF
from .realnvp import RealNVP
from .tarflow import TarFlow

MODELS = {cls.name: cls for cls in (RealNVP, Glow, MAF, NSF, PixelCNN, GaussianMixture, TarFlow)}

__all__ = ["DensityModel", "RealNVP", "Glow", "MAF", "NSF", "PixelCNN", "GaussianMixture", "TarFlow", "MODELS",
           "build_model", "stored_model_args"]


def build_model(name: str, shape, **kwargs) -> DensityModel:
    """Construct the model registered as ``name`` for examples of ``shape`` with keyword ``kwargs``.

    Every problem with the options is a ValueError that names the option: an unknown or missing one, a
    value of the wrong type (``hidden="wide"``; integer options take ints or whole floats such as
    ``1e3``, flags take booleans, names take strings), and sizes whose parameters would not fit in this
    machine's memory (``hidden=1e9``: the error gives the size, and nothing that large is allocated).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    cls = MODELS[name]
    kwargs = _checked_options(name, cls, kwargs)
    return _build_within_memory(name, cls, shape, kwargs)


def stored_model_args(name: str, args: dict) -> dict:
    """The keyword arguments that rebuild the model a checkpoint stored as ``(name, args)`` (its
    ``model.config``): ``args`` plus, for every option the model gained after the checkpoint was written,
    the value that reproduces the model of that time (``cls.added_options``). Without this, a new option's
    default (TarFlow's value spline, say) would build a model whose weights the checkpoint lacks."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return {**MODELS[name].added_options, **args}


# ---------------------------------------------------------------------------------------------------
# Option checks: from the constructor's signature and type hints, so every model gets them unasked.
# ---------------------------------------------------------------------------------------------------


def _option_type(hint):
    """``(int | bool | str | None, optional)`` for a constructor's type hint: the plain type an option must
    have (None: not checked here, e.g. a sequence or a tensor) and whether None is also allowed."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 and rest[0] in (int, bool, str) else None), True
    return (hint if hint in (int, bool, str) else None), False


def _checked_options(name: str, cls, kwargs: dict) -> dict:
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
              if n not in ("self", "shape") and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; its options are {', '.join(params)}")
    missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs]
    if missing:
        raise ValueError(f"{name}: option(s) {', '.join(missing)} must be given; its options are "
                         f"{', '.join(params)}")
    hints = typing.get_type_hints(cls.__init__)
    checked = dict(kwargs)
    for key, value in kwargs.items():
        kind, optional = _option_type(hints.get(key))
        if kind is None or (value is None and optional):
            continue
        if kind is int:
            try:
                checked[key] = check_int(f"{name}: {key}", value, minimum=None)
            except TypeError as exc:
                raise ValueError(str(exc)) from None
        elif kind is bool and not isinstance(value, bool):
            raise ValueError(f"{name}: {key} must be true or false; got {value!r} ({type(value).__name__})")
        elif kind is str and not isinstance(value, str):
            raise ValueError(f"{name}: {key} must be a string; got {value!r} ({type(value).__name__})")
    return checked


# ---------------------------------------------------------------------------------------------------
# The memory check. A model's size follows from its options through its own construction code, so the
# model is built under a dispatch mode that watches every tensor it creates. Once the requests add up to
# more than _DRY_RUN_ABOVE bytes, the rest of the build is a dry run: each further request (bar small
# ones, which may be read back, such as a seed) is answered with a meta tensor - shape and dtype, no
# memory, no initialisation work. The parameters and buffers then give the size the options ask for:
# past the machine's memory, a ValueError names it; otherwise the model is built again, for real, from
# the same RNG state. Ordinary models (under the threshold) are built once.
# ---------------------------------------------------------------------------------------------------

_DRY_RUN_ABOVE = 1 << 30  # bytes, all requests together
_ALWAYS_REAL = 1 << 20  # bytes: a request this small is served for real even in a dry run


def _tensor_bytes(tree) -> int:
    flat, _ = pytree.tree_flatten(tree)
    return sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))


class _AllocationGuard(TorchDispatchMode):
    """Serves factory calls (empty, zeros, randn, arange...) with meta tensors once the build is a dry
    run (see above), and runs any op with a meta input on the meta device; everything else runs as
    usual. ``dry`` records whether the build became a dry run."""

    def __init__(self):
        super().__init__()
        self.dry = False
        self.requested = 0  # bytes asked for by factory calls so far

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = pytree.tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if any(t.is_meta for t in tensors):
            meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t  # noqa: E731
            return func(*pytree.tree_map(meta, args), **pytree.tree_map(meta, kwargs))
        if not tensors and any(a.name == "device" for a in func._schema.arguments):
            try:  # the same call on the meta device: the size of what it would allocate, for free
                probe = func(*args, **{**kwargs, "device": torch.device("meta")})
            except Exception:  # e.g. a CPU generator for a meta tensor: run it as it is
                probe = None
            if probe is not None:
                size = _tensor_bytes(probe)
                self.requested += size
                self.dry = self.dry or self.requested > _DRY_RUN_ABOVE
                if self.dry and size > _ALWAYS_REAL:
                    return probe
        return func(*args, **kwargs)


def _memory_bytes() -> int | None:
    """This machine's memory (or its cgroup's limit, if lower), or None where neither can be read."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                total = min(total, int(f.read().strip()))
        except (OSError, ValueError):  # absent, or "max"
            continue
    return total


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def _too_large(name: str, shape, kwargs: dict, what: str, available: int) -> ValueError:
    options = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return ValueError(
        f"{name} with {options or 'its defaults'} for shape {list(shape)} would need {what}, more than this "
        f"machine's {_format_bytes(available)} of memory (and training needs about 4x its parameters: "
        f"gradients and the optimizer's state); choose smaller sizes")


def _build_within_memory(name: str, cls, shape, kwargs: dict) -> DensityModel:
    rng = torch.get_rng_state()
    guard = _AllocationGuard()
    available = _memory_bytes()
    try:
        with guard:
            model = cls(shape, **kwargs)
    except Exception:
        if not guard.dry:
            raise  # the model's own error (a bad option), not the dry run's
        # A dry build that read a meta tensor's values back cannot finish: judge by what it asked for.
        if available is not None and guard.requested > available:
            raise _too_large(name, shape, kwargs, f"more than {_format_bytes(guard.requested)} for its tensors",
                             available) from None
        model = None
    if model is not None:
        tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
        size = sum(t.numel() * t.element_size() for t in tensors)
        if available is not None and size > available:
            values = sum(t.numel() for t in tensors)
            raise _too_large(name, shape, kwargs, f"{_format_bytes(size)} for its {values:,} parameter and "
                             f"buffer values", available)
        if not guard.dry:
            return model
        del model
    torch.set_rng_state(rng)  # the real build draws exactly what a direct construction would
    return cls(shape, **kwargs)
