"""The masked convolution's three implementations, and the measured choice among them.

The op is :func:`fastdensity.ops.masked_conv2d` (definition: ``fastdensity/reference/masked_conv.py``)::

    x [N, C_in, H, W]   weight [C_out, C_in, KH, KW]   bias [C_out]   ->   out [N, C_out, H_out, W_out]

Three exact ways to compute it, forward and backward:

* ``"triton"``: the implicit-GEMM kernel over the live taps only (``fastdensity.kernels.masked_conv``);
* ``"dense"``: cuDNN (oneDNN on a CPU) on the dense weight with every dead entry set to 0 - it multiplies
  all KH*KW taps, about twice the live work, but at cuDNN's efficiency;
* ``"split"``: the PixelCNN++ vertical/horizontal-stack split into (up to) two dense convolutions, one
  over the cy = KH//2 rows above the centre (a cy x KW kernel) and one over the centre row's left part
  and the centre (a 1 x (KW//2 + 1) kernel), summed: no dead tap is multiplied, only the centre's
  forbidden channel pairs (zeroed), at the price of two launches and their sum.

Which is fastest depends on channels, kernel size, dtype, layout and GPU: for small channel counts or
small kernels cuDNN can beat a kernel that does less arithmetic less efficiently. So under the ``auto``
backend on CUDA, ``impl="auto"`` measures the three candidates' forward (+ backward when gradients are
needed) once per problem key with CUDA events and keeps the winner (:data:`TUNER`, a
:class:`fastdensity.autotune.CachedAutotuner`, cached in memory and in
``~/.cache/fastdensity/autotune-masked_conv2d.json``); ``FASTDENSITY_AUTOTUNE=0`` always uses the kernel.
A forced ``triton`` backend calls the kernel's own op, ``torch.ops.fastdensity.masked_conv2d_triton``,
and never comes here.

The choice has to happen when the op runs (it times real tensors on the GPU), not when
``torch.compile`` traces it, so it happens inside an opaque custom op, ``torch.ops.fastdensity.
masked_conv2d``, with its own backward op; under ``auto`` the backward finds the forward's choice in
the cache (same key). fp32 products: all three use TF32 exactly when ``torch.backends.cudnn.allow_tf32``
says PyTorch's convolutions do, so they are compared at the precision the user granted.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import autotune
from .kernels import masked_conv as kernel
from .kernels.masked_conv import Geometry, centre_mask, geometry, live_mask
from .kernels.utils import on_device_of, refuse_double_backward

__all__ = ["IMPLS", "DEFAULT_IMPL", "TUNER", "IMPLEMENTATIONS", "dense_forward", "dense_backward", "split_forward",
           "split_backward", "tuning_key", "choose_impl", "resolve_impl", "masked_conv2d_op",
           "masked_conv2d_backward_op"]

#: The implementations ``impl`` may name; "auto" chooses among them (on CUDA) with :data:`TUNER`.
IMPLS = ("triton", "dense", "split")
DEFAULT_IMPL = "triton"

#: Measures the candidates once per problem key and remembers the fastest.
TUNER = autotune.CachedAutotuner("masked_conv2d", default=DEFAULT_IMPL)


# ---------------------------------------------------------------------------------------------------
# The two PyTorch candidates. On a GPU they run cuDNN, on a CPU oneDNN; the tests check them against
# the reference on CPU.
# ---------------------------------------------------------------------------------------------------


def _masked_dense_weight(weight: torch.Tensor, g: Geometry) -> torch.Tensor:
    """``weight`` with every dead entry an exact 0 (``where``, so a NaN/inf there does not leak in)."""
    return torch.where(live_mask(g, weight.device), weight, 0)


def _in_format(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s memory format, as the kernel returns its outputs: a tensor of its own, never a
    view (a custom op's output that is a view cannot be edited in place under autograd)."""
    fmt = torch.channels_last if kernel.is_channels_last(like) else torch.contiguous_format
    out = t.contiguous(memory_format=fmt)
    return out if out._base is None else out.clone(memory_format=fmt)


def dense_forward(x, weight, bias, g: Geometry) -> torch.Tensor:
    """cuDNN (or the CPU's dense conv) on the masked dense weight: every tap is multiplied, dead ones by 0."""
    out = F.conv2d(x, _masked_dense_weight(weight, g), bias, g.stride, g.padding, g.dilation)
    return _in_format(out, x)


def dense_backward(grad_out, x, weight, g: Geometry, need_x: bool, need_w: bool):
    """cuDNN's data and weight gradients of :func:`dense_forward`; the dead weights' entries are set to 0."""
    wm = _masked_dense_weight(weight, g)
    grad_x = grad_w = None
    if need_x:
        grad_x = _in_format(torch.nn.grad.conv2d_input(x.shape, wm, grad_out, g.stride, g.padding, g.dilation), x)
    if need_w:
        gw = torch.nn.grad.conv2d_weight(x, weight.shape, grad_out, g.stride, g.padding, g.dilation)
        grad_w = torch.where(live_mask(g, weight.device), gw, 0).contiguous()
    return grad_x, grad_w


def _split_pieces(weight: torch.Tensor, g: Geometry):
    """The dense convolutions whose sum is the masked one: ``(rows, cols, weight piece, ky, kx)`` each.

    Every piece reads the window ``xp[:, :, rows, cols]`` of x zero-padded by (ph, pw) on every side,
    cut so that a padding-free convolution with the op's stride and dilation gives exactly
    [H_out, W_out]; ``ky``/``kx`` say where the piece sits in the full kernel.

    * vertical: the rows above the centre, a (cy x KW) kernel;
    * horizontal: the centre row up to and including the centre (excluding it when the centre is dead),
      a (1 x cx+1) kernel whose last column - the centre - has its forbidden channel pairs zeroed.
    """
    (sh, sw), (dh, dw) = g.stride, g.dilation
    cy, cx = g.cy, g.cx
    pieces = []
    if cy > 0:
        rows = slice(0, (g.H_out - 1) * sh + (cy - 1) * dh + 1)
        pieces.append((rows, slice(None), weight[:, :, :cy, :], slice(0, cy), slice(0, g.KW)))
    ncols = cx + 1 if g.centre else cx
    if ncols > 0:
        w_row = weight[:, :, cy:cy + 1, :ncols]
        if g.centre and g.grouped_centre:
            w_row = w_row.clone()
            w_row[:, :, 0, cx] = torch.where(centre_mask(g, weight.device), w_row[:, :, 0, cx], 0)
        rows = slice(cy * dh, cy * dh + (g.H_out - 1) * sh + 1)
        cols = slice(0, (g.W_out - 1) * sw + (ncols - 1) * dw + 1)
        pieces.append((rows, cols, w_row, slice(cy, cy + 1), slice(0, ncols)))
    return pieces


def _padded(x: torch.Tensor, g: Geometry) -> torch.Tensor:
    ph, pw = g.padding
    return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x


def split_forward(x, weight, bias, g: Geometry) -> torch.Tensor:
    """The vertical/horizontal-stack split: (up to) two dense convolutions over the live rows, summed."""
    xp = _padded(x, g)
    out = None
    for i, (rows, cols, w_piece, _, _) in enumerate(_split_pieces(weight, g)):
        y = F.conv2d(xp[:, :, rows, cols], w_piece, bias if i == 0 else None, g.stride, 0, g.dilation)
        out = y if out is None else out.add_(y)
    if out is None:  # 1x1 type A with one colour group: nothing is live, the output is the bias
        out = x.new_zeros((g.N, g.C_out, g.H_out, g.W_out))
        if bias is not None:
            out += bias[:, None, None]
    return _in_format(out, x)


def split_backward(grad_out, x, weight, g: Geometry, need_x: bool, need_w: bool):
    """Gradients of :func:`split_forward`: each piece's data gradient added into its window of the padded
    input, each piece's weight gradient written into its place in a zero [C_out, C_in, KH, KW]."""
    xp = _padded(x, g)
    grad_xp = torch.zeros_like(xp) if need_x else None
    grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
    for rows, cols, w_piece, ky, kx in _split_pieces(weight, g):
        view = xp[:, :, rows, cols]
        if need_x:
            grad_xp[:, :, rows, cols] += torch.nn.grad.conv2d_input(view.shape, w_piece, grad_out, g.stride, 0,
                                                                    g.dilation)
        if need_w:
            grad_w[:, :, ky, kx] = torch.nn.grad.conv2d_weight(view, w_piece.shape, grad_out, g.stride, 0,
                                                               g.dilation)
    if need_w and g.centre and g.grouped_centre:
        grad_w[:, :, g.cy, g.cx] = torch.where(centre_mask(g, weight.device), grad_w[:, :, g.cy, g.cx], 0)
    grad_x = None
    if need_x:
        ph, pw = g.padding
        # Unpadded, grad_xp is x's own gradient: no slice, so _in_format has no view to copy.
        grad_x = _in_format(grad_xp[:, :, ph:ph + g.H, pw:pw + g.W] if ph or pw else grad_xp, x)
    return grad_x, grad_w


#: impl -> (forward(x, weight, bias, g), backward(grad_out, x, weight, g, need_x, need_w)).
IMPLEMENTATIONS = {
    "triton": (kernel.triton_forward, kernel.triton_backward),
    "dense": (dense_forward, dense_backward),
    "split": (split_forward, split_backward),
}


# ---------------------------------------------------------------------------------------------------
# The choice: which implementation "auto" runs, measured once per problem key.
# ---------------------------------------------------------------------------------------------------


def tuning_key(x: torch.Tensor, weight: torch.Tensor, g: Geometry, training: bool) -> dict:
    """Everything that can change the ranking of the candidates (the bias does not, measurably)."""
    layout = "channels_last" if kernel.is_channels_last(x) else ("contiguous" if x.is_contiguous() else "strided")
    return {
        "x": list(x.shape), "weight": list(weight.shape), "stride": list(g.stride), "padding": list(g.padding),
        "dilation": list(g.dilation), "live": [g.n_full, g.centre, g.cin_g, g.cout_g, g.shift],
        "dtype": str(x.dtype).replace("torch.", ""), "layout": layout, "training": bool(training),
        "tf32": kernel.dot_precision(x.dtype) == "tf32",
        "device": torch.cuda.get_device_name(x.device) if x.device.type == "cuda" else x.device.type,
    }


def choose_impl(x, weight, bias, g: Geometry, training: bool,
                tuner: Optional[autotune.CachedAutotuner] = None) -> str:
    """The implementation "auto" runs for this call: cached, or measured now (forward, plus backward
    when ``training``) and cached. ``tuner`` defaults to :data:`TUNER`; tests pass one with a fake timer."""
    tuner = TUNER if tuner is None else tuner
    if not autotune.autotune_enabled():
        return tuner.default
    key = tuning_key(x, weight, g, training)
    cached = tuner.lookup(key)
    if cached in IMPLS:
        return cached
    # One upstream gradient for every candidate, drawn from a private generator: measuring must not
    # move the user's random stream.
    gen = torch.Generator(device=x.device)
    gen.manual_seed(0)
    grad_out = torch.randn((g.N, g.C_out, g.H_out, g.W_out), generator=gen, dtype=x.dtype, device=x.device)
    grad_out = _in_format(grad_out, x)

    def candidate(impl):
        forward, backward = IMPLEMENTATIONS[impl]

        def run():
            forward(x, weight, bias, g)
            if training:
                backward(grad_out, x, weight, g, True, True)
        return run

    return tuner.choose(key, {impl: candidate(impl) for impl in IMPLS})


def resolve_impl(impl: str, x, weight, bias, g: Geometry, training: bool) -> str:
    """``impl`` itself when it names an implementation; for "auto" the one :func:`choose_impl` picks on
    CUDA, and the kernel elsewhere (CUDA events time nothing off the GPU)."""
    if impl in IMPLS:
        return impl
    if impl != "auto":
        raise ValueError(f"impl must be 'auto' or one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    if x.device.type != "cuda":
        return DEFAULT_IMPL
    return choose_impl(x, weight, bias, g, training)


# ---------------------------------------------------------------------------------------------------
# torch.library registration, as the kernel's own op (fastdensity.kernels.masked_conv) but with the
# implementation as an argument: torch.compile(fullgraph=True) sees two opaque ops with known output
# shapes and layouts, and the choice happens inside them, at run time, invisible to the compiler.
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdensity::masked_conv2d", mutates_args=())
def masked_conv2d_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask_type: str, color_groups: int,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], impl: str, training: bool,
) -> torch.Tensor:
    g = geometry(x, weight, mask_type, color_groups, stride, padding, dilation)
    with on_device_of(x):
        forward, _ = IMPLEMENTATIONS[resolve_impl(impl, x, weight, bias, g, training)]
        return forward(x, weight, bias, g)


@masked_conv2d_op.register_fake
def _(x, weight, bias, mask_type, color_groups, stride, padding, dilation, impl, training):
    g = geometry(x, weight, mask_type, color_groups, stride, padding, dilation)
    return kernel.alloc_nchw((g.N, g.C_out, g.H_out, g.W_out), x)


@torch.library.custom_op("fastdensity::masked_conv2d_backward", mutates_args=())
def masked_conv2d_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask_type: str, color_groups: int,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], impl: str, need_x: bool, need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    g = geometry(x, weight, mask_type, color_groups, stride, padding, dilation)
    with on_device_of(x):
        # "auto" finds the choice the forward made (same key, training=True) in the tuner's cache.
        _, backward = IMPLEMENTATIONS[resolve_impl(impl, x, weight, None, g, True)]
        grad_x, grad_w = backward(grad_out, x, weight, g, need_x, need_w)
    # A custom op cannot return None: an empty tensor stands for "not requested".
    return (grad_x if grad_x is not None else x.new_empty(0),
            grad_w if grad_w is not None else weight.new_empty(0))


@masked_conv2d_backward_op.register_fake
def _(grad_out, x, weight, mask_type, color_groups, stride, padding, dilation, impl, need_x, need_w):
    return kernel.fake_gradients(x, weight, need_x, need_w)


def _setup_context(ctx, inputs, output):
    x, weight, bias, mask_type, color_groups, stride, padding, dilation, impl, training = inputs
    ctx.save_for_backward(x, weight)  # all the backward needs, whichever implementation runs it
    ctx.args = (mask_type, color_groups, stride, padding, dilation, impl)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x = grad_w = grad_b = None
    if need_x or need_w:
        grad_x, grad_w = masked_conv2d_backward_op(grad_out, x, weight, *ctx.args, need_x, need_w)
        grad_x = grad_x if need_x else None
        grad_w = grad_w if need_w else None
    if need_b:
        grad_b = kernel.bias_gradient(grad_out, ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


masked_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(masked_conv2d_backward_op, "masked_conv2d")
