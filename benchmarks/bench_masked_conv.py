"""PixelCNN masked convolution (3x3, 5x5, 7x7; mask types A and B) against the dense alternatives.

``masked_conv2d(x, weight, bias, mask_type=...)`` with x [B, C, H, W], weight [C, C, k, k], "same"
padding, one colour group. Of the k*k taps, L = p*k + p + 1 are live for type B (p = k // 2: the
p rows above the centre, the p taps left of it and the centre itself) and one fewer for type A:
5 of 9, 13 of 25 and 25 of 49 for 3x3, 5x5 and 7x7 type B.

Providers besides eager (``F.conv2d`` on ``weight * mask``) and compiled:

* ``fastdensity``: the op under the ``auto`` backend, as users call it: on CUDA its dispatcher runs
  the fastest of the kernel, cuDNN on the masked weight and the split into dense convolutions
  (autotuned on the first call, which the warm-up absorbs);
* ``fastdensity_kernel``: the Triton kernel alone (backend ``triton``);
* ``dense_conv``: ``F.conv2d`` on a weight that is already masked (cuDNN on a GPU): the dense
  convolution a user would run, without even the mask multiply; every tap is computed.
* ``shifted_conv``: the PixelCNN++-style split into cropped dense convolutions over live taps only:
  a (p x k) "vertical stack" convolution over the rows above, on the input shifted down one row,
  plus a (1 x p(+1)) convolution over the centre row's left taps (and the centre for type B), on the
  input shifted right. It computes exactly the masked convolution (``shifted_masked_conv2d``).

Minimum traffic, e bytes per element, X = B C H W (input and output alike), W = C C k k:

    forward             read x, the live weights (W L / k^2), bias; write y      (2 X + W L / k^2 + C) e
    backward            read gy, x, live weights; write gx, g_weight, g_bias     (3 X + W L / k^2 + W + C) e
    forward + backward                                                            the sum

Flops 2 B H W C^2 L forward and twice that backward: compute-bound, so GB/s here only says how far
from the memory floor a provider is. Shapes: [64, 256, 32, 32] with 5x5 and 7x7, and
[64, 128, 32, 32] with 3x3, both mask types, bf16 and fp32 on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdensity.verify import VerifyCase, public_ops

from .harness import Case, Provider, Runner, Settings, element_size, op_providers, op_unavailable, randn, traffic

OP = "masked_conv"


def live_taps(k: int, mask_type: str) -> int:
    p = k // 2
    return p * k + p + (1 if mask_type == "B" else 0)


def shifted_masked_conv2d(x, weight, bias, mask_type: str):
    """The masked convolution (one colour group, odd square kernel, stride 1, "same") as two dense
    convolutions over the live taps only. ``weight`` is read only at live taps, so its gradient is
    zero at the dead ones, as with the masked op."""
    k = weight.shape[-1]
    p = k // 2
    # Rows above the centre: pad p on top and crop the last row, so output row i sees rows i-p .. i-1.
    vertical = F.conv2d(F.pad(x, (p, p, p, -1)), weight[:, :, :p, :])
    # Centre row: pad p on the left (and crop one column for type A), so column j sees j-p .. j (B)
    # or j-p .. j-1 (A).
    width = p + 1 if mask_type == "B" else p
    horizontal = F.conv2d(F.pad(x, (p, width - p - 1, 0, 0)), weight[:, :, p:p + 1, :width])
    out = vertical + horizontal
    return out if bias is None else out + bias[None, :, None, None]


def _case(settings: Settings, batch: int, channels: int, size: int, k: int, mask_type: str, dtype) -> Case:
    def masked(x, weight, bias):
        from fastdensity import ops

        return ops.masked_conv2d(x, weight, bias, mask_type=mask_type)

    def dense(x, weight, bias):
        return F.conv2d(x, weight, bias, padding=k // 2)

    def shifted(x, weight, bias):
        return shifted_masked_conv2d(x, weight, bias, mask_type)

    def make_inputs():
        scale = (channels * k * k) ** -0.5
        x = randn((batch, channels, size, size), settings, dtype)
        weight = randn((channels, channels, k, k), settings, dtype, scale=scale)
        bias = randn((channels,), settings, dtype, scale=0.1)
        return x, weight, bias

    # One function object per case so the compiled provider's graph is shared across modes.
    providers = op_providers(masked, settings.device, "masked_conv", fastdensity_backend="auto")
    kernel_only = op_providers(masked, settings.device, "masked_conv")[0]
    kernel_only.name = "fastdensity_kernel"
    providers.insert(1, kernel_only)
    providers += [Provider("dense_conv", lambda: Runner(dense)), Provider("shifted_conv", lambda: Runner(shifted))]
    e = element_size(dtype)
    xs = batch * channels * size * size
    w = channels * channels * k * k
    w_live = channels * channels * live_taps(k, mask_type)
    fwd = (2 * xs + w_live + channels) * e
    bwd = (3 * xs + w_live + w + channels) * e
    return Case(
        op=f"masked_conv2d_{k}x{k}_{mask_type}",
        shape=f"x[{batch},{channels},{size},{size}]",
        dtype=dtype,
        make_inputs=make_inputs,
        providers=providers,
        min_bytes=traffic(fwd, bwd),
        unavailable=op_unavailable("masked_conv2d"),
    )


def cases(settings: Settings) -> list[Case]:
    if settings.cuda:
        batch, size = 64, 32
        configs = [(7, "A", 256), (5, "B", 256), (3, "B", 128), (7, "B", 256), (5, "A", 256), (3, "A", 128)]
        if settings.quick:
            configs = configs[:3]
    elif settings.quick:
        batch, size, configs = 4, 16, [(3, "B", 16), (7, "A", 16)]
    else:
        batch, size = 8, 32
        configs = [(7, "A", 64), (5, "B", 64), (3, "B", 64), (7, "B", 64), (5, "A", 64), (3, "A", 64)]
    dtypes = settings.pick_dtypes([torch.bfloat16, torch.float32] if settings.cuda else [torch.float32])
    return [_case(settings, batch, c, size, k, t, dtype) for k, t, c in configs for dtype in dtypes]


# ------------------------------------------------------------------------------------------------------
# The shapes `fastdensity verify` checks (kernel vs eager vs float64 reference)
# ------------------------------------------------------------------------------------------------------


def verify_cases(cuda: bool) -> list[VerifyCase]:
    # (N, C_in, C_out, H, W, k, mask type, colour groups)
    shapes = ([(8, 64, 64, 16, 16, 3, "B", 1), (4, 96, 96, 12, 12, 7, "A", 3), (2, 30, 45, 9, 11, 5, "B", 3)]
              if cuda else [(1, 4, 5, 5, 6, 3, "B", 1), (2, 3, 6, 4, 5, 5, "A", 3)])
    out = []
    for n, cin, cout, h, w, k, mtype, groups in shapes:
        def make(device, n=n, cin=cin, cout=cout, h=h, w=w, k=k):
            return [torch.randn(n, cin, h, w, device=device),
                    torch.randn(cout, cin, k, k, device=device) / (cin * k * k) ** 0.5,
                    0.1 * torch.randn(cout, device=device)]

        def call(x, weight, bias, mtype=mtype, groups=groups):
            return public_ops().masked_conv2d(x, weight, bias, mask_type=mtype, color_groups=groups)

        out.append(VerifyCase("masked_conv2d", f"x[{n},{cin},{h},{w}] {k}x{k} {mtype} groups={groups} ->{cout}",
                              make, call, ("x", "weight", "bias"), (0, 1, 2), ("y",)))
    return out
