"""Batched log-sum-exp along the last dim, against the reference, torch.compile and torch.logsumexp.

x [R, L] -> out [R] (``dim=-1``), e bytes per element, N = R * L. Minimum traffic:

    forward             read x, write out                                N e + R e
    backward            read gy, x, out; write gx                        2 N e + 2 R e
    forward + backward                                                   3 N e + 3 R e

Flops: ~4 per element (max, subtract, exp2, add) forward and backward: memory-bound everywhere.
Shapes: [65536, 1024] (many short rows) and [1024, 65536] (few long rows), fp32 and bf16.
``torch.logsumexp`` is listed beside the reference because it is the issue's yardstick.
"""
from __future__ import annotations

import torch

from fastdensity.verify import VerifyCase, dims, public_ops

from .harness import Case, Provider, Runner, Settings, element_size, op_providers, op_unavailable, randn, traffic

OP = "logsumexp"


def _lse(x):
    from fastdensity import ops

    return ops.logsumexp(x, dim=-1)


def _torch_lse(x):
    return torch.logsumexp(x, dim=-1)


def _case(settings: Settings, rows: int, cols: int, dtype) -> Case:
    e, n = element_size(dtype), rows * cols
    providers = op_providers(_lse, settings.device, "logsumexp")
    providers.append(Provider("torch.logsumexp", lambda: Runner(_torch_lse)))
    return Case(
        op="logsumexp",
        shape=f"x[{rows},{cols}] dim=-1",
        dtype=dtype,
        make_inputs=lambda: (randn((rows, cols), settings, dtype, scale=3.0),),
        providers=providers,
        min_bytes=traffic(n * e + rows * e, 2 * n * e + 2 * rows * e),
        unavailable=op_unavailable("logsumexp"),
    )


def cases(settings: Settings) -> list[Case]:
    if settings.cuda:
        shapes = [(65536, 1024)] if settings.quick else [(65536, 1024), (1024, 65536)]
    else:
        shapes = [(4096, 256)] if settings.quick else [(16384, 1024), (256, 65536)]
    dtypes = settings.pick_dtypes([torch.float32, torch.bfloat16] if settings.cuda else [torch.float32])
    return [_case(settings, r, c, dtype) for dtype in dtypes for r, c in shapes]


# ------------------------------------------------------------------------------------------------------
# The shapes `fastdensity verify` checks (kernel vs eager vs float64 reference)
# ------------------------------------------------------------------------------------------------------


def verify_cases(cuda: bool) -> list[VerifyCase]:
    # Many short rows, few long ones (the split-row path), a middle dim. Not the benchmark's 2^26
    # elements: each comparison copies its tensors to the host (fastdensity.testing.compare), and at
    # that size a gradient's comparison alone takes seconds of the GPU run's few minutes.
    shapes = ([((16384, 1024), -1), ((256, 65536), -1), ((33, 65, 7), 1)] if cuda
              else [((5, 37), -1), ((3, 4, 5), 1)])
    out = []
    for shape, dim in shapes:
        def make(device, shape=shape):
            x = 3 * torch.randn(shape, device=device)
            x.view(-1)[0] = float("-inf")  # an -inf entry, handled as torch does
            return [x]

        out.append(VerifyCase("logsumexp", f"x{dims(shape)} dim={dim}", make,
                              lambda x, dim=dim: public_ops().logsumexp(x, dim=dim), ("x",), (0,), ("out",)))
    return out
