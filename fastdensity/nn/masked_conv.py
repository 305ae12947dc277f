"""``MaskedConv2d``: PixelCNN's masked convolution as a drop-in ``nn.Conv2d``."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..reference.masked_conv import check_mask_args, pair, pixelcnn_mask

__all__ = ["MaskedConv2d"]


class MaskedConv2d(nn.Conv2d):
    """A convolution whose output at pixel i sees only pixels before i in raster order (PixelCNN).

    Runs :func:`fastdensity.ops.masked_conv2d`: the mask is applied by the op, never written into
    ``weight.data``, so autograd and ``torch.compile`` see the truth and dead weights get exactly zero
    gradient. Parameters, initialisation and ``state_dict`` are those of ``nn.Conv2d`` (the mask is a
    non-persistent bool buffer: it follows ``.to()`` and is rebuilt, not loaded), so checkpoints move
    freely between this class and ``nn.Conv2d``.

    Args:
        in_channels, out_channels, kernel_size: as ``nn.Conv2d``; kernel sizes must be odd.
        mask_type: "A" for the first layer (the centre tap excludes the output's own colour group: a
            pixel never sees itself) or "B" for later layers (it includes it).
        color_groups: contiguous channel groups at the centre (3 for RGB: R sees nothing of the current
            pixel under "A", G sees R, B sees R and G); must divide both channel counts.
        **conv_kwargs: ``stride``, ``padding``, ``dilation``, ``bias``, ``device``, ``dtype`` as
            ``nn.Conv2d``. ``padding`` defaults to centre padding ``dilation * (k // 2)`` (a stride-1
            layer keeps the image size); ``groups`` must be 1 and ``padding_mode`` "zeros" (other
            paddings would copy later pixels into the border and break the autoregressive order).

    Shapes: [N, in_channels, H, W] -> [N, out_channels, H_out, W_out], in the input's memory format.

    Raises:
        ValueError: an even kernel size, an unknown mask type, channel counts not divisible by
            ``color_groups``, ``groups != 1`` or a non-zero ``padding_mode`` - at construction.
    """

    mask: torch.Tensor

    def __init__(self, in_channels: int, out_channels: int, kernel_size, mask_type: str = "B",
                 color_groups: int = 1, **conv_kwargs):
        kh, kw = check_mask_args(kernel_size, mask_type, color_groups, in_channels, out_channels)
        if conv_kwargs.get("groups", 1) != 1:
            raise ValueError(f"groups must be 1 for a masked convolution; got {conv_kwargs['groups']!r}")
        if conv_kwargs.get("padding_mode", "zeros") != "zeros":
            raise ValueError(f"padding_mode must be 'zeros' (other modes copy later pixels into the border and "
                             f"break the autoregressive order); got {conv_kwargs['padding_mode']!r}")
        dh, dw = pair("dilation", conv_kwargs.get("dilation", 1), minimum=1)
        conv_kwargs.setdefault("padding", (dh * (kh // 2), dw * (kw // 2)))
        super().__init__(in_channels, out_channels, (kh, kw), **conv_kwargs)
        self.mask_type = mask_type
        self.color_groups = color_groups
        mask = pixelcnn_mask(out_channels, in_channels, kh, kw, mask_type, color_groups,
                             dtype=torch.bool, device=self.weight.device)
        self.register_buffer("mask", mask, persistent=False)

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return ops.masked_conv2d(input, weight, bias, mask_type=self.mask_type, color_groups=self.color_groups,
                                 stride=self.stride, padding=self.padding, dilation=self.dilation)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask_type={self.mask_type!r}, color_groups={self.color_groups}"
