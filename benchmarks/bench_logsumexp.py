"""Batched log-sum-exp along the last dim, against the reference, torch.compile and torch.logsumexp.

x [R, L] -> out [R] (``dim=-1``), e bytes per element, N = R * L. Minimum traffic:

    forward             read x, write out                                N e + R e
    backward            read gy, x, out; write gx                        2 N e + 2 R e
    forward + backward                                                   3 N e + 3 R e

Flops: ~4 per element (max, subtract, exp2, add) forward and backward: memory-bound everywhere.
Shapes (issue 3): [65536, 1024] (many short rows) and [1024, 65536] (few long rows), fp32 and bf16.
``torch.logsumexp`` is listed beside the reference because it is the issue's yardstick.
"""
from __future__ import annotations

import torch

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
