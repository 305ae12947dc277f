"""``fastdensity.accelerate(model)``: swap the nflows / zuko / normflows pieces of a model for fused ones.

    report = fastdensity.accelerate(flow)   # an nflows Flow, a zuko Flow / LazyTransform, normflows flows,
    print(report)                           # or any module holding them; dry_run=True only reports

In the spirit of Liger-Kernel's one-line patching: every module of a supported class changes class, in
place, to a subclass of its own class whose computing methods route through :mod:`fastdensity.ops`
(fused coupling, fused spline, tile-skipping masked matmul). Nothing else changes: the same Parameter
and buffer objects, the same ``state_dict`` keys and values, the same construction-time behaviour
(data-dependent initialisation, caches, properties), so the user's optimizer, checkpoints and training
loop keep working and ``log_prob``, ``sample`` (same seed) and gradients equal the original's to round-off.
Calling it again finds the fused classes and changes nothing.

What is supported is one table, :data:`HANDLERS`: the peer class's qualified name -> the fused class
(``"module:Class"``, imported only when a model holds that peer class, so importing fastdensity never
imports a peer). Exact class matches only: a user's subclass of a supported class may override what the
fused class replaces, so it is left alone and reported. A fused class

* subclasses the peer class and overrides only the methods that compute;
* sets ``fused_ops``, a few words on what now runs (for the report);
* may define ``unsupported(module) -> str | None`` (a classmethod): a reason to leave this instance as it
  is, when it uses an option the fused path does not reproduce.

Adding a piece is one entry here plus its fused class (see ``fastdensity/peers/nflows.py``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from torch import nn

__all__ = ["accelerate", "AccelerationReport", "Entry", "HANDLERS", "PEER_PACKAGES"]

_NFLOWS, _ZUKO, _NORMFLOWS = "fastdensity.peers.nflows", "fastdensity.peers.zuko", "fastdensity.peers.normflows"

#: peer class (``module.QualName``) -> fused class (``module:Name``)
HANDLERS: dict[str, str] = {
    "nflows.transforms.coupling.AffineCouplingTransform": f"{_NFLOWS}:FusedAffineCouplingTransform",
    "nflows.transforms.coupling.AdditiveCouplingTransform": f"{_NFLOWS}:FusedAdditiveCouplingTransform",
    "nflows.transforms.autoregressive.MaskedAffineAutoregressiveTransform":
        f"{_NFLOWS}:FusedMaskedAffineAutoregressiveTransform",
    "nflows.transforms.made.MaskedLinear": f"{_NFLOWS}:FusedMaskedLinear",
    "nflows.transforms.normalization.ActNorm": f"{_NFLOWS}:FusedActNorm",
    "nflows.transforms.lu.LULinear": f"{_NFLOWS}:FusedLULinear",
    "nflows.transforms.coupling.PiecewiseRationalQuadraticCouplingTransform":
        f"{_NFLOWS}:FusedPiecewiseRationalQuadraticCouplingTransform",
    "nflows.transforms.autoregressive.MaskedPiecewiseRationalQuadraticAutoregressiveTransform":
        f"{_NFLOWS}:FusedMaskedPiecewiseRationalQuadraticAutoregressiveTransform",
    "nflows.transforms.nonlinearities.PiecewiseRationalQuadraticCDF": f"{_NFLOWS}:FusedPiecewiseRationalQuadraticCDF",
    "zuko.flows.autoregressive.MaskedAutoregressiveTransform": f"{_ZUKO}:FusedMaskedAutoregressiveTransform",
    "zuko.flows.coupling.GeneralCouplingTransform": f"{_ZUKO}:FusedGeneralCouplingTransform",
    "zuko.nn.MaskedLinear": f"{_ZUKO}:FusedMaskedLinear",
    "normflows.flows.affine.coupling.AffineCoupling": f"{_NORMFLOWS}:FusedAffineCoupling",
}

#: the libraries whose unsupported modules the report lists (other modules, torch's or the user's, are not)
PEER_PACKAGES = ("nflows", "zuko", "normflows")

_CONTAINER = "a container: its parts are handled one by one"
_GLUE = "its masked linear layers are handled one by one; activations and sums run as before"
#: why common peer classes without a handler are left (the default says only that none is registered)
_LEFT_REASONS = {
    **dict.fromkeys([
        "nflows.flows.base.Flow", "nflows.flows.autoregressive.MaskedAutoregressiveFlow",
        "nflows.flows.realnvp.SimpleRealNVP", "nflows.transforms.base.CompositeTransform",
        "nflows.nn.nets.resnet.ResidualNet", "nflows.nn.nets.resnet.ResidualBlock",
        "zuko.lazy.Flow", "zuko.lazy.LazyComposedTransform", "zuko.flows.autoregressive.MAF",
        "zuko.flows.coupling.NICE", "zuko.flows.coupling.RealNVP", "zuko.flows.spline.NSF", "zuko.nn.MLP",
        "zuko.nn.Residual", "normflows.core.NormalizingFlow", "normflows.core.ConditionalNormalizingFlow",
        "normflows.flows.affine.coupling.AffineCouplingBlock", "normflows.nets.mlp.MLP",
    ], _CONTAINER),
    **dict.fromkeys(["nflows.transforms.made.MADE", "nflows.transforms.made.MaskedResidualBlock",
                     "nflows.transforms.made.MaskedFeedforwardBlock", "zuko.nn.MaskedMLP"], _GLUE),
    **dict.fromkeys([f"nflows.transforms.permutations.{name}" for name in
                     ("Permutation", "ReversePermutation", "RandomPermutation")],
                    "a permutation: one index gather, nothing to fuse"),
    **dict.fromkeys(["nflows.distributions.normal.StandardNormal", "zuko.lazy.UnconditionalDistribution"],
                    "the base density: one elementwise pass and a sum, nothing to fuse"),
    **dict.fromkeys(["normflows.flows.reshape.Split", "normflows.flows.reshape.Merge"],
                    "a split or merge of tensors, nothing to fuse"),
    "zuko.nn.Linear": "a dense linear layer: already one matmul",
}
_NO_HANDLER = "no fused implementation registered for this class: it runs as before"


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _fused_class(target: str) -> type:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Entry:
    """One module of the model: its name in ``named_modules()`` ("" for the model itself), its peer
    class, and what happened (the fused class and its ops, or the reason it was left)."""

    name: str
    peer: str
    detail: str

    def __str__(self) -> str:
        return f"{self.name or '<model>'} ({self.peer}): {self.detail}"


@dataclass
class AccelerationReport:
    """What :func:`accelerate` replaced, found already fused, and left (with the reason for each)."""

    replaced: list[Entry] = field(default_factory=list)
    already_fused: list[Entry] = field(default_factory=list)
    left: list[Entry] = field(default_factory=list)
    dry_run: bool = False

    def __str__(self) -> str:
        verb = "would replace" if self.dry_run else "replaced"
        lines = [f"fastdensity.accelerate: {verb} {len(self.replaced)}, already fused {len(self.already_fused)}, "
                 f"left {len(self.left)}"]
        for title, entries in ((verb, self.replaced), ("already fused", self.already_fused), ("left", self.left)):
            # One line per (class, outcome): a 20-layer flow repeats the same few classes.
            groups: dict[tuple[str, str], list[str]] = {}
            for e in entries:
                groups.setdefault((e.peer, e.detail), []).append(e.name or "<model>")
            for (peer, detail), names in groups.items():
                where = ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")
                lines.append(f"  {title}: {peer} -> {detail} [{where}]")
        return "\n".join(lines)


def accelerate(model: nn.Module, dry_run: bool = False) -> AccelerationReport:
    """Swap, in place, every supported nflows / zuko / normflows module in ``model`` for its fused class.

    Args:
        model: any ``nn.Module``: an nflows ``Flow``, a zuko ``Flow`` or ``LazyTransform``, a normflows
            flow, or a module holding any of them.
        dry_run: only report what would be replaced; change nothing.

    Returns:
        An :class:`AccelerationReport` (``print`` it): ``replaced`` (module name, peer class, fused class
        and the ops it runs), ``already_fused`` (from an earlier call), ``left`` (peer modules kept as
        they are, with the reason). Parameters, buffers and ``state_dict`` are untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate expects a torch.nn.Module; got {type(model).__name__}")
    report = AccelerationReport(dry_run=bool(dry_run))
    for name, module in model.named_modules():
        cls = type(module)
        peer = qualified_name(cls)
        if getattr(cls, "_fastdensity_fused", False):
            peer_class = next((b for b in cls.__mro__[1:] if qualified_name(b) in HANDLERS), cls.__mro__[1])
            report.already_fused.append(Entry(name, qualified_name(peer_class), f"{cls.__name__} ({cls.fused_ops})"))
            continue
        target = HANDLERS.get(peer)
        if target is None:
            supported = next((qualified_name(b) for b in cls.__mro__[1:] if qualified_name(b) in HANDLERS), None)
            if supported is not None:
                report.left.append(Entry(name, peer, f"a subclass of supported {supported}: it may override what "
                                                      f"the fused class replaces, so it is left as it is"))
            elif peer.split(".")[0] in PEER_PACKAGES:
                report.left.append(Entry(name, peer, _LEFT_REASONS.get(peer, _NO_HANDLER)))
            continue
        fused = _fused_class(target)
        check = getattr(fused, "unsupported", None)
        reason = check(module) if check is not None else None
        if reason is not None:
            report.left.append(Entry(name, peer, reason))
            continue
        if not dry_run:
            module.__class__ = fused
        report.replaced.append(Entry(name, peer, f"{fused.__name__} ({fused.fused_ops})"))
    return report
