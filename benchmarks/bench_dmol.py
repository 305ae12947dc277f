"""PixelCNN++'s discretized mixture of logistics (DMoL) log-likelihood, fused vs eager vs compiled.

x [B, 3, H, W] (fp32, pixel values on the 8-bit grid of [-1, 1], edges included), params
[B, 10K, H, W] (the network's output, in the benchmarked dtype), out [B] (``reduction="sum"``).
Gradients go to params only: x is data. With e bytes per params element and M = B H W pixels:

    forward             read x (12 M bytes) and params (10 K M e), write out (4 B; 8 B for fp64)
    backward            read gy, x, params; write g_params (10 K M e)
    forward + backward                                          the sum

Per (pixel, channel, component) the op evaluates about nine transcendentals (two sigmoids, two
softpluses, exp of the log-scale, tanh of a coefficient, the log of the bin mass, ...), so on a GPU
it may be bound by the special-function units rather than by memory (docs/design.md, Machines); the fallback
branch adds a few more. Shape: x [64, 3, 32, 32], params [64, 100, 32, 32] (K = 10),
fp32 and bf16 params.
"""
from __future__ import annotations

import torch

from fastdensity.verify import VerifyCase, public_ops

from .harness import Case, Settings, element_size, op_providers, op_unavailable, randn, traffic

OP = "dmol"


def _dmol(x, params):
    from fastdensity import ops

    # validate_args=False, as its docstring advises in a GPU training loop: the range check of x
    # synchronises with the host on every call.
    return ops.dmol_log_prob(x, params, validate_args=False)


def _case(settings: Settings, batch: int, k: int, size: int, dtype) -> Case:
    def make_inputs():
        levels = torch.randint(0, 256, (batch, 3, size, size), device=settings.device)
        x = levels.to(torch.float32) / 127.5 - 1.0  # includes the edge bins 0 and 255
        params = randn((batch, 10 * k, size, size), settings, dtype)
        return x, params

    m = batch * size * size
    e = element_size(dtype)
    o = 8 if dtype == torch.float64 else 4  # the log-likelihood is float32 (float64 for float64 params)
    fwd = 12 * m + 10 * k * m * e + o * batch
    bwd = o * batch + 12 * m + 2 * 10 * k * m * e
    return Case(
        op="dmol_log_prob",
        shape=f"x[{batch},3,{size},{size}] K={k}",
        dtype=dtype,
        make_inputs=make_inputs,
        providers=op_providers(_dmol, settings.device, "dmol"),
        min_bytes=traffic(fwd, bwd),
        unavailable=op_unavailable("dmol_log_prob"),
    )


def cases(settings: Settings) -> list[Case]:
    if settings.cuda:
        shapes = [(64, 10, 32)] if not settings.quick else [(16, 10, 32)]
    else:
        shapes = [(4, 5, 16)] if settings.quick else [(16, 10, 32)]
    dtypes = settings.pick_dtypes([torch.float32, torch.bfloat16] if settings.cuda else [torch.float32])
    return [_case(settings, *s, dtype) for dtype in dtypes for s in shapes]


# ------------------------------------------------------------------------------------------------------
# The shapes `fastdensity verify` checks (kernel vs eager vs float64 reference)
# ------------------------------------------------------------------------------------------------------


def verify_cases(cuda: bool) -> list[VerifyCase]:
    # (B, C, H, W, K)
    shapes = [(8, 3, 32, 32, 10), (4, 1, 17, 15, 5)] if cuda else [(2, 3, 3, 4, 3), (2, 1, 5, 3, 2)]
    out = []
    for b, c, h, w, k in shapes:
        def make(device, b=b, c=c, h=h, w=w, k=k):
            levels = torch.randint(0, 256, (b, c, h, w), device=device)
            levels.view(-1)[:2] = torch.tensor([0, 255], device=device)  # both open-ended edge bins
            x = levels.float() / 127.5 - 1.0
            params = torch.randn(b, (10 if c == 3 else 3) * k, h, w, device=device)
            return [x, params]

        out.append(VerifyCase("dmol_log_prob", f"x[{b},{c},{h},{w}] K={k}", make,
                              lambda x, params: public_ops().dmol_log_prob(x, params), ("x", "params"), (1,),
                              ("log_prob",), keep_fp32=(0,)))
    return out
