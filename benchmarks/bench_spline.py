"""Rational-quadratic spline: the fused op against the reference, torch.compile and nflows' and zuko's splines.

``rational_quadratic_spline`` on x [B, D] with K = 8 bins, the parameters sliced from one conditioner
output h [B, D, 3K - 1] (as a neural spline flow's coupling or autoregressive layer produces them and
passes them on). With N = B D elements, P = 3K - 1 parameters per element and e bytes per element
(``kernels/spline.py``): forward reads x and the P parameters and writes y -> (P + 2) N e; backward
reads gy, x and the parameters and writes gx and the parameter gradients -> (2P + 3) N e (the B
log-dets are negligible). Shapes: [65536, 16] (tabular NSF) and [256, 1536] (an image coupling: half
of 3x32x32), bf16 and fp32 on a GPU; [4096, 16] on a CPU ([512, 16] with --quick).

Each shape runs in both parameterisations (nflows only with --quick), each with its library as the peer: nflows'
``unconstrained_rational_quadratic_spline`` (boolean-mask indexing, host syncs) and zuko's
``MonotonicRQSTransform(...).call_and_ladj``; the peers' per-element log-dets are summed to [B] as a
flow would. Bound 3 for nflows (the usual NSF tail bound), zuko's default 5.
"""
from __future__ import annotations

import math

import torch

from fastdensity.verify import VerifyCase, dims, public_ops

from .harness import Case, Runner, Settings, element_size, op_providers, op_unavailable, peer, randn, traffic

OP = "spline"
BINS = 8
BOUND = {"nflows": 3.0, "zuko": 5.0}


def _split(h, K: int):
    """widths, heights, derivatives: three strided views of the conditioner output, no copies."""
    return h[..., :K], h[..., K:2 * K], h[..., 2 * K:]


def _fastdensity_call(parameterization: str):
    def call(x, h):
        from fastdensity import ops

        w, hh, d = _split(h, h.shape[-1] // 3 + 1)
        return ops.rational_quadratic_spline(x, w, hh, d, parameterization=parameterization,
                                             bound=BOUND[parameterization])

    return call


# One function object per parameterisation: torch.compile's cache is keyed by it (harness.compiled).
_CALLS = {p: _fastdensity_call(p) for p in BOUND}


def _nflows_build() -> Runner:
    from nflows.transforms.splines.rational_quadratic import unconstrained_rational_quadratic_spline

    def call(x, h):
        w, hh, d = _split(h, BINS)
        y, ld = unconstrained_rational_quadratic_spline(x, w, hh, d, tails="linear", tail_bound=BOUND["nflows"])
        return y, ld.sum(dim=-1)

    return Runner(call)


def _zuko_build() -> Runner:
    from zuko.transforms import MonotonicRQSTransform

    def call(x, h):
        w, hh, d = _split(h, BINS)
        y, ld = MonotonicRQSTransform(w, hh, d, bound=BOUND["zuko"]).call_and_ladj(x)
        return y, ld.sum(dim=-1)

    return Runner(call)


def _case(settings: Settings, shape, parameterization: str, dtype) -> Case:
    n, e, p = math.prod(shape), element_size(dtype), 3 * BINS - 1
    providers = op_providers(_CALLS[parameterization], settings.device, OP)
    providers.append(peer(parameterization, parameterization,
                          _nflows_build if parameterization == "nflows" else _zuko_build))
    return Case(
        op=f"rational_quadratic_spline_{parameterization}",
        shape=f"x{dims(shape)} K={BINS}",
        dtype=dtype,
        make_inputs=lambda: (randn(shape, settings, dtype), randn((*shape, p), settings, dtype)),
        providers=providers,
        min_bytes=traffic((p + 2) * n * e, (2 * p + 3) * n * e),
        unavailable=op_unavailable("rational_quadratic_spline"),
    )


def cases(settings: Settings) -> list[Case]:
    if settings.cuda:
        shapes = [(65536, 16)] + ([] if settings.quick else [(256, 3 * 32 * 32 // 2)])
    else:
        shapes = [(512, 16)] if settings.quick else [(4096, 16)]
    parameterizations = ["nflows"] if settings.quick else ["nflows", "zuko"]
    dtypes = settings.pick_dtypes([torch.bfloat16, torch.float32] if settings.cuda else [torch.float32])
    return [_case(settings, shape, par, dtype) for dtype in dtypes for shape in shapes for par in parameterizations]


def verify_cases(cuda: bool) -> list[VerifyCase]:
    """The conditioner output h is one tensor; widths, heights and derivatives are strided views of it.
    ``[B, D, 3K - 1]`` as an MLP conditioner gives it, or ``[B, C, H, W, 3K - 1]`` permuted from a conv
    output [B, C (3K - 1), H, W] (parameter stride H W). x spreads past the bound: the identity tails."""
    # (x shape, K, parameterization, inverse, reduction, conv layout)
    variants = ([((65536, 16), 8, "nflows", False, "sum", False), ((256, 1536), 8, "zuko", True, "sum", False),
                 ((7, 3, 33, 31), 5, "nflows", True, "none", True)]
                if cuda else [((3, 5), 4, "nflows", False, "sum", False), ((2, 3, 2, 3), 3, "zuko", True, "none", True),
                              ((1, 7), 32, "nflows", True, "sum", False)])
    out = []
    for shape, K, par, inverse, reduction, conv in variants:
        bound = BOUND[par]

        def make(device, shape=shape, K=K, conv=conv, bound=bound):
            x = 0.8 * bound * torch.randn(shape, device=device)
            if conv:  # a conv conditioner's output, channels grouped per input channel
                B, C, *spatial = shape
                return [x, torch.randn(B, C * (3 * K - 1), *spatial, device=device)]
            return [x, torch.randn(*shape, 3 * K - 1, device=device)]

        def call(x, h, K=K, par=par, inverse=inverse, reduction=reduction, conv=conv, bound=bound):
            if conv:
                B, C, *spatial = x.shape
                h = h.view(B, C, 3 * K - 1, *spatial).movedim(2, -1)
            w, hh, d = _split(h, K)
            return public_ops().rational_quadratic_spline(x, w, hh, d, inverse=inverse, parameterization=par,
                                                          bound=bound, reduction=reduction)

        label = (f"x{dims(shape)} K={K} {par}" + (" inverse" if inverse else "")
                 + (" per-element" if reduction == "none" else "") + (" conv layout" if conv else ""))
        out.append(VerifyCase("rational_quadratic_spline", label, make, call, ("x", "h"), (0, 1), ("y", "logdet")))
    return out
