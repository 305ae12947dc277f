"""Reference masked autoregressive convolution (PixelCNN, van den Oord et al. 2016): the ground truth.

A masked convolution is an ordinary 2-D convolution whose weight is multiplied by a fixed 0/1 mask,
so that the output at pixel i depends only on pixels that come before i in raster order (and, at
pixel i itself, only on the colour groups the mask type allows)::

    out = conv2d(x, where(mask, weight, 0), bias, stride, padding, dilation)

``where`` rather than ``weight * mask``: the dead weights are not part of the op, so a NaN or inf
stored there must not reach the output (0 * NaN is NaN), and their gradient is exactly zero whatever
flows back - as in the kernel, which never reads them. For finite weights the two are the same. (A
non-finite *input* still reaches every output whose dense window covers it, through 0 * inf; the
kernel, which skips the dead taps, spreads it only forward in raster order.)

    x [N, C_in, H, W]    weight [C_out, C_in, KH, KW] (KH, KW odd)    bias [C_out]    out [N, C_out, H_out, W_out]

The mask, with the centre tap (cy, cx) = (KH // 2, KW // 2)::

    rows below the centre              (ky > cy)             dead
    centre row, right of the centre    (ky = cy, kx > cx)    dead
    rows above, centre row's left      (ky < cy, or kx < cx)  live for every channel pair
    the centre tap itself              (ky = cy, kx = cx)     live for the channel pairs below

At the centre, the input and output channels are each split into ``color_groups`` contiguous groups
(channel c of C belongs to group c // (C / color_groups)); output group g sees input groups < g for
mask type "A" and input groups <= g for type "B". With ``color_groups=1`` type A's centre is dead (the
first layer of a PixelCNN must not see the pixel it predicts) and type B's centre is live. With RGB
groups, R sees nothing of the current pixel under A, G sees R, B sees R and G.

In raster order (ky * KW + kx) the live taps are exactly the taps before the centre, plus the
centre's channel-restricted block: this is what the Triton kernel iterates over.

``padding="same"`` means centre padding, ``dilation * (k // 2)`` zeros on each side, so that a stride-1
convolution keeps the image size and output pixel (i, j) is centred on input pixel (i, j) - the
alignment the autoregressive property is stated in. (Unlike ``F.conv2d``'s "same" it is also defined
for strides above one.)

This module is written to be obviously right, never to be fast; it is the path every op takes on
CPU tensors under the ``auto`` backend, and the kernel's tests compare against it.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["MASK_TYPES", "pair", "check_mask_args", "resolve_padding", "output_size", "pixelcnn_mask",
           "masked_conv2d"]

MASK_TYPES = ("A", "B")

IntPair = Union[int, Sequence[int]]


def pair(name: str, value: IntPair, *, minimum: int) -> tuple[int, int]:
    """``value`` as an ``(h, w)`` pair of ints >= ``minimum``; a clear ValueError names ``name`` otherwise."""
    if isinstance(value, bool):  # bool is an int subclass; True as a stride is a bug, not a request
        raise ValueError(f"{name} must be an int or a pair of ints; got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    try:
        h, w = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints; got {value!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (h, w)):
        raise ValueError(f"{name} must be an int or a pair of ints; got {value!r}")
    if h < minimum or w < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {(h, w)}")
    return h, w


def check_mask_args(kernel_size: IntPair, mask_type: str, color_groups: int, in_channels: int,
                    out_channels: int) -> tuple[int, int]:
    """Validate what defines the mask; returns the kernel size as ``(KH, KW)``.

    Raises ValueError for an even kernel size (it has no centre tap to put the current pixel at), an
    unknown mask type, or channel counts that ``color_groups`` does not divide.
    """
    kh, kw = pair("kernel_size", kernel_size, minimum=1)
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel_size must be odd in both dims (a masked convolution needs a centre tap); "
                         f"got {(kh, kw)}")
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {', '.join(map(repr, MASK_TYPES))}; got {mask_type!r}")
    if isinstance(color_groups, bool) or not isinstance(color_groups, int) or color_groups < 1:
        raise ValueError(f"color_groups must be an int >= 1; got {color_groups!r}")
    for name, channels in (("in_channels", in_channels), ("out_channels", out_channels)):
        if channels % color_groups != 0:
            raise ValueError(f"{name} ({channels}) must be divisible by color_groups ({color_groups}): the "
                             f"centre tap splits the channels into {color_groups} equal contiguous groups")
    return kh, kw


def resolve_padding(padding: Union[str, IntPair], kernel_size: tuple[int, int],
                    dilation: tuple[int, int]) -> tuple[int, int]:
    """``"same"``: centre padding ``dilation * (k // 2)`` per dim; ``"valid"``: 0; ints go through :func:`pair`."""
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0
        if padding != "same":
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair of ints; got {padding!r}")
        return dilation[0] * (kernel_size[0] // 2), dilation[1] * (kernel_size[1] // 2)
    return pair("padding", padding, minimum=0)


def output_size(size: tuple[int, int], kernel_size: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    """Output ``(H_out, W_out)`` of a convolution: ``(size + 2 pad - dil (k - 1) - 1) // stride + 1``."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, k, s, p, d in zip(size, kernel_size, stride, padding, dilation))


def pixelcnn_mask(out_channels: int, in_channels: int, kh: int, kw: int, mask_type: str = "B",
                  color_groups: int = 1, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The PixelCNN mask, [out_channels, in_channels, kh, kw], ones on live taps and zeros on dead ones.

    >>> pixelcnn_mask(1, 1, 3, 3, "A")[0, 0]
    tensor([[1., 1., 1.],
            [1., 0., 0.],
            [0., 0., 0.]])
    """
    check_mask_args((kh, kw), mask_type, color_groups, in_channels, out_channels)
    cy, cx = kh // 2, kw // 2
    mask = torch.ones(out_channels, in_channels, kh, kw, dtype=dtype, device=device)
    mask[:, :, cy + 1:, :] = 0  # rows below the centre
    mask[:, :, cy, cx + 1:] = 0  # right of the centre, in the centre row
    group_out = torch.arange(out_channels, device=device) // (out_channels // color_groups)
    group_in = torch.arange(in_channels, device=device) // (in_channels // color_groups)
    if mask_type == "A":
        allowed = group_in[None, :] < group_out[:, None]
    else:
        allowed = group_in[None, :] <= group_out[:, None]
    mask[:, :, cy, cx] = allowed.to(dtype)
    return mask


def masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    mask_type: str = "B",
    color_groups: int = 1,
    stride: IntPair = 1,
    padding: Union[str, IntPair] = "same",
    dilation: IntPair = 1,
    upcast: bool = False,
) -> torch.Tensor:
    """``F.conv2d(x, where(mask, weight, 0), bias, ...)`` with the PixelCNN mask of :func:`pixelcnn_mask`.

    Args:
        x: [N, C_in, H, W]. weight: [C_out, C_in, KH, KW], KH and KW odd. bias: [C_out] or None.
        mask_type: "A" (centre excludes the output's own colour group) or "B" (includes it).
        color_groups: number of contiguous channel groups at the centre tap (3 for RGB).
        stride, dilation: int or (h, w). padding: "same" (centre padding), "valid" (none), int or (h, w).
        upcast: compute in float64 and cast the result back (for tolerance studies).

    Returns:
        [N, C_out, H_out, W_out] in x's dtype.
    """
    kh, kw = check_mask_args(tuple(weight.shape[2:]), mask_type, color_groups, weight.shape[1], weight.shape[0])
    stride = pair("stride", stride, minimum=1)
    dilation = pair("dilation", dilation, minimum=1)
    padding = resolve_padding(padding, (kh, kw), dilation)
    out_dtype = x.dtype
    if upcast:
        x, weight = x.double(), weight.double()
        bias = None if bias is None else bias.double()
    mask = pixelcnn_mask(weight.shape[0], weight.shape[1], kh, kw, mask_type, color_groups,
                         dtype=torch.bool, device=weight.device)
    out = F.conv2d(x, torch.where(mask, weight, 0), bias, stride=stride, padding=padding, dilation=dilation)
    return out.to(out_dtype)
