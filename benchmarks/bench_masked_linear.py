"""Masked linear layer (MADE) that skips all-zero tiles, against dense matmul on the masked weight.

``masked_linear(x, weight, mask, bias)`` = x @ (weight * mask)^T + bias, x [B, I], weight and mask
[O, I], bias [O]. The mask is a MADE hidden-layer mask with sorted degrees (unit degrees 1 .. F-1
cycled over the units, then sorted; output unit o sees input unit i when deg(o) >= deg(i)): block
lower-triangular, about half of it zero. Providers besides fastdensity / eager (``F.linear`` on
``weight * mask``) / compiled: ``dense_matmul``, ``F.linear`` on a weight that is already masked
(cuBLAS on a GPU) - the dense product every tile of which is computed.

Minimum traffic, e bytes per element, mask as stored (1 byte per bool):

    forward             read x, weight, mask, bias; write y                 (B I + O I + O + B O) e + O I
    backward            read gy, x, weight, mask; write gx, g_weight, g_b   (B O + 2 B I + 2 O I + O) e + O I
    forward + backward                                                       the sum

Flops 2 B I O d forward (d: the live share of the tiles, ~0.5 here) and twice that backward:
compute-bound. Shape: 2048 -> 2048, batch 8192, bf16 and fp32 on a GPU. PyTorch's default
fp32 matmul (no TF32) is what the fp32 dense rows use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdensity.verify import VerifyCase, public_ops

from .harness import Case, Provider, Runner, Settings, element_size, op_providers, op_unavailable, randn, traffic

OP = "masked_linear"


def made_mask(out_features: int, in_features: int, features: int, device) -> torch.Tensor:
    """MADE hidden-to-hidden mask with sorted degrees, [out, in] bool: deg_out[o] >= deg_in[i]."""
    deg_in = torch.sort(torch.arange(in_features) % (features - 1) + 1).values
    deg_out = torch.sort(torch.arange(out_features) % (features - 1) + 1).values
    return (deg_out[:, None] >= deg_in[None, :]).to(device)


def _masked(x, weight, mask, bias):
    from fastdensity import ops

    return ops.masked_linear(x, weight, mask, bias)


def _dense(x, weight, mask, bias):
    return F.linear(x, weight, bias)  # the weight stands for one masked beforehand


def _case(settings: Settings, batch: int, n_in: int, n_out: int, features: int, dtype) -> Case:
    mask = made_mask(n_out, n_in, features, settings.device)

    def make_inputs():
        x = randn((batch, n_in), settings, dtype)
        weight = randn((n_out, n_in), settings, dtype, scale=n_in ** -0.5)
        bias = randn((n_out,), settings, dtype, scale=0.1)
        return x, weight, mask, bias

    providers = op_providers(_masked, settings.device, "masked_linear")
    providers.append(Provider("dense_matmul", lambda: Runner(_dense)))
    e = element_size(dtype)
    fwd = (batch * n_in + n_out * n_in + n_out + batch * n_out) * e + n_out * n_in
    bwd = (batch * n_out + 2 * batch * n_in + 2 * n_out * n_in + n_out) * e + n_out * n_in
    return Case(
        op="masked_linear",
        shape=f"x[{batch},{n_in}] -> {n_out} MADE(F={features}) {mask.float().mean().item():.0%} live",
        dtype=dtype,
        make_inputs=make_inputs,
        providers=providers,
        min_bytes=traffic(fwd, bwd),
        unavailable=op_unavailable("masked_linear"),
    )


def cases(settings: Settings) -> list[Case]:
    if settings.cuda:
        shapes = [(8192, 2048, 2048, 64)] if settings.quick else [(8192, 2048, 2048, 64), (8192, 1024, 1024, 32)]
    else:
        shapes = [(512, 256, 256, 16)] if settings.quick else [(2048, 1024, 1024, 64)]
    dtypes = settings.pick_dtypes([torch.bfloat16, torch.float32] if settings.cuda else [torch.float32])
    return [_case(settings, *s, dtype) for dtype in dtypes for s in shapes]


# ------------------------------------------------------------------------------------------------------
# The shapes `fastdensity verify` checks (kernel vs eager vs float64 reference)
# ------------------------------------------------------------------------------------------------------


def verify_cases(cuda: bool) -> list[VerifyCase]:
    # (B, in, out, density of the random block mask)
    shapes = [(512, 1024, 768), (8192, 256, 512)] if cuda else [(3, 37, 29), (1, 16, 16)]
    out = []
    for b, n_in, n_out in shapes:
        def make(device, b=b, n_in=n_in, n_out=n_out):
            # MADE-like: sorted degrees make the mask block-triangular, so some tiles are dead.
            deg_in = torch.sort(torch.randint(1, 8, (n_in,))).values
            deg_out = torch.sort(torch.randint(1, 8, (n_out,))).values
            mask = (deg_out[:, None] >= deg_in[None, :]).to(device)
            return [torch.randn(b, n_in, device=device), torch.randn(n_out, n_in, device=device) / n_in ** 0.5,
                    mask, 0.1 * torch.randn(n_out, device=device)]

        out.append(VerifyCase("masked_linear", f"x[{b},{n_in}] -> {n_out}", make,
                              lambda x, weight, mask, bias: public_ops().masked_linear(x, weight, mask, bias),
                              ("x", "weight", "mask", "bias"), (0, 1, 3), ("y",)))
    return out

