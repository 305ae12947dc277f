"""Cached PixelCNN sampling: every activation of every layer computed exactly once per image.

The network (:class:`fastdensity.models.PixelCNN`) is a stack of stride-1 masked convolutions with
pointwise work between them::

    h_0 = A(x)                                    type-A masked k x k conv: pixels strictly before (i, j)
    h_l = h_(l-1) + O_l(tanh(a) sigmoid(b)),      [a, b] = B_l(h_(l-1)), type-B masked 3 x 3 conv:
                                                  h_(l-1) at positions up to and including (i, j)
    params = 1x1(ReLU(1x1(ReLU(h_L))))            pointwise

**Schedule.** Pixels are generated in raster order. At step (i, j), before pixel (i, j) is drawn,
every layer is computed at the one position (i, j), first to last: layer 0 reads pixels strictly
before (i, j) (all drawn), block l reads h_(l-1) at positions up to (i, j) in raster order (computed
at earlier steps, or at this one by the layer below), and the head reads h_L at (i, j). That gives
pixel (i, j)'s parameters exactly, and no activation is computed twice: over the H * W steps the
sampler does the arithmetic of one forward pass. (The naive sampler does H * W forward passes.)

**Each masked conv in two parts**, by the rows its live taps read (tap (a, b) reads the input at
``(i + a d_h - p_h, j + b d_w - p_w)``, d the dilation, p the centre padding)::

    rows above (dy < 0)          fixed once row i - 1 is done: one small convolution per row gives
                                 all W positions' share at once ("row term", bias included)
    current row (dy = 0, dx <= 0)  per step: [B, taps * C_in] x [taps * C_in, C_out]

The masks are read from the layers (``where(mask, weight, 0)``, so a NaN stored under a dead tap is
never read, as in the op), and checked to be causal: a live tap of layer 0 right of or at (i, j) in
its row, or of a later layer right of (i, j), is a ValueError.

**Caches.** Each conv's input lives in a zero-padded channels-last buffer [B, top + H, left + W +
right, C]: the padding is the conv's own zero padding, so border taps read zeros as ``F.conv2d``
does, and a layer's output at (i, j) is written straight into the next conv's buffer. Positions not
yet computed hold zeros and are only ever read through dead (zero) taps. Memory: one activation
tensor per layer, as a forward pass.

**Random stream.** Each pixel is drawn by the call the naive sampler makes
(:func:`~.pixelcnn_reference.draw_pixel`, parameters of the same shape), so both consume torch's
global RNG identically and, from the same seed, return the same images except where round-off in
the parameters flips a draw (float32 only in practice; counted in ``tests/test_sampling.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .pixelcnn_reference import Draw, draw_pixel
from .progress import tick

__all__ = ["CachedMaskedConv", "sample_cached"]


class CachedMaskedConv:
    """One stride-1 masked convolution (a :class:`fastdensity.nn.MaskedConv2d`) as row term + current row.

    Args:
        conv: the layer (its ``weight``, ``bias``, ``mask``, ``dilation`` and ``padding`` are read).
        strict: the output at (i, j) may not read its input at (i, j) (true for the first layer,
            whose input is the image being drawn).
    """

    def __init__(self, conv: nn.Conv2d, strict: bool):
        if tuple(conv.stride) != (1, 1) or conv.groups != 1:
            raise ValueError(f"the cached sampler needs stride-1, groups-1 convolutions; got {conv}")
        kh, kw = conv.kernel_size
        dh, dw = conv.dilation
        if tuple(conv.padding) != (dh * (kh // 2), dw * (kw // 2)):
            raise ValueError(f"the cached sampler needs centre padding (output (i, j) centred on input (i, j)); "
                             f"got padding {conv.padding} for kernel {conv.kernel_size}, dilation {conv.dilation}")
        live = conv.mask.any(dim=1).any(dim=0)  # [kh, kw]: taps with any live channel pair
        cy, cx = kh // 2, kw // 2
        last = cx - 1 if strict else cx  # right-most tap the current row may use
        if bool(live[cy + 1:].any()) or bool(live[cy, last + 1:].any()):
            raise ValueError(f"mask of {conv} reads positions at or after the output's own "
                             f"({'strictly ' if strict else ''}causal order needed for cached sampling)")
        weight = torch.where(conv.mask, conv.weight, torch.zeros((), dtype=conv.weight.dtype,
                                                                 device=conv.weight.device))
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.dilation = (dh, dw)
        self.rows_above = cy  # kernel rows above the centre
        self.top, self.side = dh * cy, dw * cx  # buffer padding: rows above, columns on each side
        self.bias = conv.bias
        self.above = weight[:, :, :cy].contiguous()  # [C_out, C_in, cy, kw]
        # Current row, taps 0..last: [C_out, C_in, taps] -> [taps * C_in, C_out], tap-major as the buffer.
        self.taps = last + 1
        self.current = weight[:, :, cy, :self.taps].permute(2, 1, 0).reshape(-1, self.out_channels)

    def buffer(self, batch: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """A zeroed input cache [B, top + H, W + 2 side, C_in] for this layer."""
        return like.new_zeros(batch, self.top + height, width + 2 * self.side, self.in_channels)

    def row_term(self, buffer: torch.Tensor, i: int, width: int) -> torch.Tensor:
        """[B, W, C_out]: bias plus every tap above the centre row, for all positions of row i."""
        batch = buffer.shape[0]
        if self.rows_above == 0:
            bias = self.bias if self.bias is not None else buffer.new_zeros(self.out_channels)
            return bias.expand(batch, width, self.out_channels)
        # Buffer rows i .. i + top - d_h are image rows i - top .. i - d_h (the buffer starts top rows early).
        rows = buffer[:, i:i + self.top - self.dilation[0] + 1].permute(0, 3, 1, 2)  # [B, C_in, rows, W']
        out = F.conv2d(rows, self.above, self.bias, dilation=self.dilation)  # [B, C_out, 1, W]
        return out[:, :, 0].transpose(1, 2)

    def at(self, buffer: torch.Tensor, row_term: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """[B, C_out]: the output at (i, j) (``row_term`` is row i's)."""
        if self.taps == 0:
            return row_term[:, j]
        dw = self.dilation[1]
        # Buffer column j + b d_w is image column j + b d_w - side: taps b = 0 .. taps - 1 of row i.
        window = buffer[:, self.top + i, j:j + (self.taps - 1) * dw + 1:dw]  # [B, taps, C_in]
        return torch.addmm(row_term[:, j], window.reshape(window.shape[0], -1), self.current)

    def store(self, buffer: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """The view of ``buffer`` holding this layer's input at image position (i, j), [B, C_in]."""
        return buffer[:, self.top + i, self.side + j]


class _Pointwise:
    """A 1x1 convolution as ``addmm``: [B, C_in] -> [B, C_out]."""

    def __init__(self, conv: nn.Conv2d):
        if tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or conv.groups != 1 \
                or tuple(conv.padding) != (0, 0):
            raise ValueError(f"expected a plain 1x1 convolution; got {conv}")
        self.weight = conv.weight[:, :, 0, 0].t()  # [C_in, C_out]
        self.bias = conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, h, self.weight)


def _head(layers: nn.Sequential):
    """``model.out`` (ReLU and 1x1 convolutions) as a function of one position's features [B, F]."""
    steps = []
    for layer in layers:
        if isinstance(layer, nn.ReLU):
            steps.append(torch.relu)
        elif isinstance(layer, nn.Conv2d):
            steps.append(_Pointwise(layer))
        else:
            raise ValueError(f"the cached sampler knows ReLU and 1x1 convolutions in the head; got {layer}")

    def head(h: torch.Tensor) -> torch.Tensor:
        for step in steps:
            h = step(h)
        return h

    return head


@torch.no_grad()
def sample_cached(model, num_samples: int, draw: Draw = draw_pixel) -> torch.Tensor:
    """``num_samples`` images [n, C, H, W] (int64 levels) from a :class:`~fastdensity.models.PixelCNN`,
    each activation computed once (module docstring). Same random stream as
    :func:`~.pixelcnn_reference.sample_naive`."""
    c, height, width = model.shape
    device = model.grid_values.device
    v = torch.zeros((num_samples, c, height, width), dtype=torch.long, device=device)
    if num_samples == 0:
        return v
    first = CachedMaskedConv(model.first, strict=True)
    blocks = [(CachedMaskedConv(block.conv, strict=False), _Pointwise(block.out)) for block in model.blocks]
    head = _head(model.out)
    like = model.first.weight
    # Layer l's input cache; the last block's output feeds only the head at the same position.
    image = first.buffer(num_samples, height, width, like)
    caches = [conv.buffer(num_samples, height, width, like) for conv, _ in blocks]
    hidden = model.first.out_channels
    last = like.new_empty(num_samples, hidden)  # h_L at the current position
    for i in range(height):
        first_row = first.row_term(image, i, width)
        block_rows = [conv.row_term(cache, i, width) for (conv, _), cache in zip(blocks, caches)]
        for j in range(width):
            outputs = [conv.store(cache, i, j) for (conv, _), cache in zip(blocks, caches)] + [last]
            outputs[0].copy_(first.at(image, first_row, i, j))
            for l, ((conv, out), cache, row) in enumerate(zip(blocks, caches, block_rows)):
                a, b = conv.at(cache, row, i, j).chunk(2, dim=1)
                gated = torch.tanh(a).mul_(torch.sigmoid(b))
                torch.add(outputs[l], out(gated), out=outputs[l + 1])  # h + 1x1(gate), as the block
            params = head(outputs[-1])
            levels = draw(model, params[:, :, None, None])  # [B, C]
            v[:, :, i, j] = levels
            first.store(image, i, j).copy_(model._input(levels))
            tick()
    return v
