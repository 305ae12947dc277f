"""Public functional API: one function per op, each validating its arguments and dispatching.

The ops, their kernel modules and this module's ``__all__`` are declared in ``fastdensity.op_table``.
Every function checks its inputs (the same errors whichever backend runs), then asks
:func:`fastdensity.backend.use_kernels` whether the Triton kernel (registered as
``torch.ops.fastdensity.<op>``) or the reference in :mod:`fastdensity.reference` runs. Both paths
are differentiable in every input and compile under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import math

import torch

from . import backend, op_table
from ._validation import check_bias, check_choice, check_real, check_same, check_tensor
from .reference import coupling as _ref_coupling
from .reference import dmol as _ref_dmol
from .reference import logsumexp as _ref_logsumexp
from .reference import masked_conv as _ref_masked_conv
from .reference import masked_linear as _ref_masked_linear
from .reference import mixture as _ref_mixture
from .reference import spline as _ref_spline

# Importing the kernel modules registers torch.ops.fastdensity.*; one that cannot be imported (no
# Triton, a Triton too old) leaves its op on the reference path under "auto" (see backend.py). Which
# modules, and which functions this module exports, come from the op table.
backend.load_kernels(*op_table.names())

__all__ = op_table.public_functions()


def affine_coupling(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale_raw: torch.Tensor | None = None,
    *,
    scale: str = "sigmoid",
    inverse: bool = False,
    clamp: float = _ref_coupling.DEFAULT_CLAMP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused affine coupling: ``y = x * s + shift`` with ``s = scale_fn(scale_raw)`` and its log-det.

    Args:
        x: [B, ...] the part of the input the coupling transforms (any layout).
        shift: same shape, dtype and device as x; may be a strided view such as ``h[:, 0::2]``
            or one half of ``h.chunk(2, 1)``, read in place.
        scale_raw: like ``shift``; the unconstrained scale. Not read (may be None) for "additive".
        scale: ``"sigmoid"`` (s = sigmoid(h + 2) + 1e-3, Glow and nflows' couplings), ``"exp"``
            (s = exp(h)), ``"softclamp"`` (s = exp(c tanh(h / c))), ``"softplus"`` (s = softplus(h) + 1e-3,
            nflows' MAF) or ``"additive"`` (s = 1, NICE).
        inverse: compute ``x = (y - shift) / s`` from ``y`` (passed as ``x``) instead.
        clamp: ``c`` of "softclamp", positive and finite: |log s| stays below it. A real number whatever
            the scale (both paths pass it on as one).

    Returns:
        ``(y, logdet)``: y [B, ...] like x; logdet [B] = sum of log s over all non-batch dims
        (negated for the inverse), float32 for half inputs and float64 for float64 inputs.
    """
    check_choice("scale", scale, _ref_coupling.SCALES)
    check_tensor("x", x, min_dim=1)
    check_tensor("shift", shift)
    tensors = {"x": x, "shift": shift}
    if scale != "additive":
        if scale_raw is None:
            raise ValueError(f"scale_raw is required for scale={scale!r} (only 'additive' has no scale)")
        tensors["scale_raw"] = check_tensor("scale_raw", scale_raw)
    clamp = check_real("clamp", clamp)
    if scale == "softclamp" and not 0.0 < clamp < math.inf:
        raise ValueError(f"clamp must be a positive finite number for scale='softclamp'; got {clamp!r}")
    check_same(tensors)
    if backend.use_kernels(x, "coupling"):
        return torch.ops.fastdensity.affine_coupling(x, shift, scale_raw, scale, bool(inverse), clamp)
    return _ref_coupling.affine_coupling(x, shift, scale_raw, scale=scale, inverse=inverse, clamp=clamp)


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked linear layer ``x @ (weight * mask)^T + bias`` that skips the all-zero tiles of the mask.

    MADE's masks with sorted degrees are block-triangular, so about half of the matmul is skipped
    (forward and backward); partially masked tiles apply the mask elementwise.

    Args:
        x: [..., in] (any leading dims).
        weight: [out, in], same dtype and device as x.
        mask: [out, in], bool or 0/1 numeric, on weight's device. A connectivity pattern: any non-zero
            entry keeps its weight, and masked-out weights are never read (NaN there is harmless).
            The kernels cache a tile summary per mask tensor. On CPU the cached pattern is compared
            with the mask's contents on every call, so every edit is seen. On CUDA that comparison
            would synchronise the host on every call, so the cache follows the mask's version counter
            only: on CUDA, change a mask only through PyTorch ops on the tensor itself (``mask[i] = 0``,
            ``copy_``, ``load_state_dict``), never through ``.data``, a NumPy or DLPack alias, or a kernel.
        bias: [out] or None.

    Returns:
        [..., out] in x's dtype. Gradients flow to x, weight (exactly zero where the mask is zero) and
        bias; the mask gets none.
    """
    check_tensor("x", x, min_dim=1)
    check_tensor("weight", weight, dims=2)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor; got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise ValueError(f"mask must be bool or a real 0/1 tensor; got {mask.dtype}")
    if mask.shape != weight.shape:
        raise ValueError(f"mask must have weight's shape [out, in] = {tuple(weight.shape)}; got {tuple(mask.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"mask must be on the same device as weight, {weight.device}; got {mask.device}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have in_features = weight.shape[1] = {weight.shape[1]} in its last dim; "
                         f"got shape {tuple(x.shape)}")
    tensors = {"x": x, "weight": weight}
    check_bias(bias, weight.shape[0], "out", tensors)
    check_same(tensors, shape=False)
    if backend.use_kernels(x, "masked_linear"):
        return torch.ops.fastdensity.masked_linear(x, weight, mask, bias)
    return _ref_masked_linear.masked_linear(x, weight, mask, bias)


def masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    mask_type: str = "B",
    color_groups: int = 1,
    stride=1,
    padding="same",
    dilation=1,
) -> torch.Tensor:
    """PixelCNN masked convolution ``conv2d(x, weight * mask) + bias`` that never touches the dead taps.

    The mask (``fastdensity.reference.masked_conv.pixelcnn_mask``): taps in rows below the centre and
    right of the centre in its row are dead; at the centre the channels split into ``color_groups``
    contiguous groups and output group g sees input groups < g (type "A") or <= g (type "B"). The
    weight stays dense; dead weights are never read (a NaN there is harmless) and get exactly zero
    gradient.

    On CUDA under the ``auto`` backend the fastest of three implementations runs - the Triton kernel
    over the live taps, cuDNN on the masked weight, or a split into two dense convolutions - measured
    once per problem and cached (``fastdensity.masked_conv_impls``; ``FASTDENSITY_AUTOTUNE=0`` keeps
    the kernel). A forced ``triton`` backend always runs the kernel; CPU tensors under ``auto`` run the
    reference. fp32 products use TF32 exactly when ``torch.backends.cudnn.allow_tf32`` says PyTorch's
    own convolutions do.

    Args:
        x: [N, C_in, H, W], NCHW, channels_last or any strided layout.
        weight: [C_out, C_in, KH, KW] with KH, KW odd; same dtype and device as x.
        bias: [C_out] or None.
        mask_type: "A" (the first layer: the centre excludes the output's own group) or "B".
        color_groups: channel groups at the centre tap (3 for RGB); must divide C_in and C_out.
        stride, dilation: int or (h, w), >= 1.
        padding: "same" (centre padding dilation * (k // 2), for any stride), "valid" (none), int or (h, w).

    Returns:
        [N, C_out, H_out, W_out] in x's dtype and memory format.
    """
    check_tensor("x", x, dims=4)
    check_tensor("weight", weight, dims=4)
    tensors = {"x": x, "weight": weight}
    check_bias(bias, weight.shape[0], "C_out", tensors)
    check_same(tensors, shape=False)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must have C_in = weight.shape[1] = {weight.shape[1]} channels; got shape "
                         f"{tuple(x.shape)}")
    kernel_size = _ref_masked_conv.check_mask_args(tuple(weight.shape[2:]), mask_type, color_groups,
                                                   weight.shape[1], weight.shape[0])
    stride = _ref_masked_conv.pair("stride", stride, minimum=1)
    dilation = _ref_masked_conv.pair("dilation", dilation, minimum=1)
    padding = _ref_masked_conv.resolve_padding(padding, kernel_size, dilation)
    out_hw = _ref_masked_conv.output_size(tuple(x.shape[2:]), kernel_size, stride, padding, dilation)
    if min(out_hw) < 1:
        raise ValueError(f"x of spatial size {tuple(x.shape[2:])} is too small for kernel {kernel_size} with "
                         f"padding {padding} and dilation {dilation}: the output would be {out_hw}")
    if backend.use_kernels(x, "masked_conv"):
        args = (x, weight, bias, mask_type, color_groups, list(stride), list(padding), list(dilation))
        if backend.get_backend() != "auto":  # a forced "triton" means the kernel itself
            return torch.ops.fastdensity.masked_conv2d_triton(*args)
        # "auto": the op that picks the fastest of the kernel, cuDNN and the split. It lives in the package
        # layer and imports the kernel module, which use_kernels has just vouched for: imported here.
        from . import masked_conv_impls  # noqa: F401  (registers torch.ops.fastdensity.masked_conv2d)
        training = torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values())
        return torch.ops.fastdensity.masked_conv2d(*args, "auto", training)
    return _ref_masked_conv.masked_conv2d(x, weight, bias, mask_type=mask_type, color_groups=color_groups,
                                          stride=stride, padding=padding, dilation=dilation)


def dmol_log_prob(
    x: torch.Tensor,
    params: torch.Tensor,
    *,
    num_bits: int = _ref_dmol.DEFAULT_NUM_BITS,
    reduction: str = "sum",
    validate_args: bool = True,
) -> torch.Tensor:
    """log p(x) under PixelCNN++'s discretized mixture of logistics, fused (one pass each way).

    Exactly PixelCNN++'s ``discretized_mix_logistic_loss`` with the sign flipped (a log-likelihood; the
    loss is its negative): K logits shared by the colours; per colour K means, K log-scales (clamped
    at -7) and K tanh coefficients; G's mean shifted by c_0 x_R and B's by c_1 x_R + c_2 x_G using the
    data values; bins of half-width 1 / (2^bits - 1); the lowest and highest values' bins open-ended;
    bin masses below 1e-5 replaced by the density at the bin centre times the bin width. Details and
    constants: ``fastdensity.reference.dmol``.

    Args:
        x: [B, C, H, W] with C = 3 (RGB) or 1, values on [-1, 1] (pixel value v as 2 v / (2^bits - 1) - 1);
            float32, float64 or ``params``' dtype, on ``params``' device. Any layout.
        params: [B, 10K, H, W] for C = 3 (K logits, then for R, G and B in turn: K means, K log-scales,
            K coefficients) or [B, 3K, H, W] for C = 1 (K logits, K means, K log-scales); any float
            dtype and layout (a network's NCHW or channels-last output is read in place).
        num_bits: bit depth of the data, 1 to 16.
        reduction: ``"sum"`` -> [B] (summed over H and W) or ``"none"`` -> [B, H, W].
        validate_args: check that x lies in [-1, 1]. This reads x's minimum and maximum back to the
            host (one device synchronisation per call); pass False in a GPU training loop. Skipped
            inside ``torch.compile``, which cannot raise on data, and for meta tensors, which hold none.

    Returns:
        The log-likelihood in nats, float32 (float64 for float64 params). Gradients reach params (every
        channel) and x (the derivative of the smooth piece x lies in; x is usually data and needs none).
    """
    check_choice("reduction", reduction, _ref_dmol.REDUCTIONS)
    if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not 1 <= num_bits <= 16:
        raise ValueError(f"num_bits must be an integer from 1 to 16; got {num_bits!r}")
    check_tensor("x", x, dims=4)
    check_tensor("params", params, dims=4)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"x must be [B, C, H, W] with C = 3 (RGB) or 1; got shape {tuple(x.shape)}")
    _ref_dmol.mixture_count(params.shape[1], x.shape[1])  # raises, stating the expected channel count
    if params.shape[0] != x.shape[0] or params.shape[2:] != x.shape[2:]:
        raise ValueError(f"params must be [B, P, H, W] with x's B, H, W = {x.shape[0]}, {x.shape[2]}, {x.shape[3]}; "
                         f"got shape {tuple(params.shape)}")
    if x.dtype not in (torch.float32, torch.float64, params.dtype):
        raise ValueError(f"x must be float32, float64 or params' dtype ({params.dtype}); got {x.dtype}")
    if x.device != params.device:
        raise ValueError(f"x must be on the same device as params, {params.device}; got {x.device}")
    if validate_args and x.numel() > 0 and x.device.type != "meta" and not torch.compiler.is_compiling():
        low, high = (float(v) for v in torch.aminmax(x.detach()))
        if not (-1.0 <= low and high <= 1.0):
            raise ValueError(f"x must lie in [-1, 1] (pixel value v scaled as 2 v / (2^bits - 1) - 1); "
                             f"got values from {low} to {high}")
    if backend.use_kernels(params, "dmol"):
        out, _, _ = torch.ops.fastdensity.dmol_log_prob(x, params, int(num_bits), reduction == "sum")
        return out
    return _ref_dmol.dmol_log_prob(x, params, num_bits=num_bits, reduction=reduction)


def logsumexp(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """``log(sum(exp(x), dim))`` without overflow: a drop-in for ``torch.logsumexp`` over one dim.

    Args:
        x: any shape, any strides (a reduction over a middle dim reads in place).
        dim: the dim to reduce (negative counts from the end).
        keepdim: keep the reduced dim with size 1.

    Returns:
        ``x``'s shape without ``dim`` (size 1 there with ``keepdim``), in ``x``'s dtype; computed in
        float32 for half inputs. As torch: a row of -inf (or an empty row) gives -inf, a +inf entry
        +inf, a NaN NaN; the gradient is ``g * softmax(x)`` along ``dim``.
    """
    check_tensor("x", x)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int; got {type(dim).__name__}")
    ndim = max(x.dim(), 1)
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim must be in [{-ndim}, {ndim - 1}] for x of shape {tuple(x.shape)}; got {dim}")
    if x.dim() == 0:  # as torch: a scalar is its own log-sum-exp
        return logsumexp(x.reshape(1), 0, False).reshape(())
    dim = dim % x.dim()
    if backend.use_kernels(x, "logsumexp"):
        return torch.ops.fastdensity.logsumexp(x, dim, bool(keepdim)).to(x.dtype)
    return _ref_logsumexp.logsumexp(x, dim, bool(keepdim))


def _check_mixture_args(x, logits, means, log_scales) -> None:
    """Shapes x [..., D], logits [..., K], means/log_scales [..., K, D] with broadcastable batch dims."""
    check_tensor("x", x, min_dim=1)
    check_tensor("logits", logits, min_dim=1)
    check_tensor("means", means, min_dim=2)
    check_tensor("log_scales", log_scales, min_dim=2)
    check_same({"x": x, "logits": logits, "means": means, "log_scales": log_scales}, shape=False)
    K, D = logits.shape[-1], x.shape[-1]
    if K == 0 or D == 0:
        raise ValueError(f"a mixture needs K >= 1 components and D >= 1 features; got K={K} (logits "
                         f"{tuple(logits.shape)}) and D={D} (x {tuple(x.shape)})")
    for name, t in (("means", means), ("log_scales", log_scales)):
        if tuple(t.shape[-2:]) != (K, D):
            raise ValueError(
                f"{name} must have shape [..., K, D] = [..., {K}, {D}] (K from logits {tuple(logits.shape)}, "
                f"D from x {tuple(x.shape)}); got {tuple(t.shape)}")
    try:
        torch.broadcast_shapes(x.shape[:-1], logits.shape[:-1], means.shape[:-2], log_scales.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"the batch dims do not broadcast: x {tuple(x.shape[:-1])}, logits {tuple(logits.shape[:-1])}, "
            f"means {tuple(means.shape[:-2])}, log_scales {tuple(log_scales.shape[:-2])}") from None


def _mixture_log_prob(x, logits, means, log_scales, kind: str) -> torch.Tensor:
    _check_mixture_args(x, logits, means, log_scales)
    if backend.use_kernels(x, "mixture"):
        # The shared-parameter kernel's tensor-core forward only pays where no backward follows: a backward
        # recomputes log p in the direct form (kernels/mixture_shared.py), so when a gradient will be needed
        # the forward takes the direct form at once.
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, logits, means, log_scales))
        return torch.ops.fastdensity.mixture_log_prob(x, logits, means, log_scales, kind, not grad)
    return _ref_mixture.mixture_log_prob(x, logits, means, log_scales, kind)


def gaussian_mixture_log_prob(x: torch.Tensor, logits: torch.Tensor, means: torch.Tensor,
                              log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of a diagonal Gaussian mixture, fused (no [B, K, D] intermediates).

    ``log p(x) = logsumexp_k(log softmax(logits)_k + sum_d log N(x_d; means_kd, exp(log_scales_kd)^2))``,
    the same as ``MixtureSameFamily(Categorical(logits=logits), Independent(Normal(means,
    log_scales.exp()), 1)).log_prob(x)``.

    Args:
        x: [..., D] samples.
        logits: [..., K] unnormalised log mixture weights.
        means, log_scales: [..., K, D] component means and log standard deviations.
        The batch dims ``...`` broadcast: parameters may be shared ([K], [K, D]), per sample
        ([B, K], [B, K, D], as in a mixture density network) or broadcast over leading dims.

    Returns:
        [broadcast batch shape] log-likelihoods, float32 for half inputs (float64 for float64).
        Differentiable in all four inputs.
    """
    return _mixture_log_prob(x, logits, means, log_scales, "gaussian")


def logistic_mixture_log_prob(x: torch.Tensor, logits: torch.Tensor, means: torch.Tensor,
                              log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of a mixture of continuous logistic components; layout as
    :func:`gaussian_mixture_log_prob`.

    Per feature, the component with location mu and scale s = exp(l) has density
    ``exp(-u) / (s (1 + exp(-u))^2)`` with ``u = (x - mu) / s``.
    """
    return _mixture_log_prob(x, logits, means, log_scales, "logistic")


# ------------------------------------------------------------------------------------------------------
# Rational-quadratic spline
# ------------------------------------------------------------------------------------------------------


def _check_spline_args(x, widths, heights, derivatives, parameterization, bound, reduction, min_bin_width,
                       min_bin_height, min_derivative, slope) -> float:
    """Validate :func:`rational_quadratic_spline`'s arguments; returns the bound in force."""
    check_choice("parameterization", parameterization, _ref_spline.PARAMETERIZATIONS)
    check_choice("reduction", reduction, _ref_spline.REDUCTIONS)
    check_tensor("x", x, min_dim=1)
    for name, t in (("widths", widths), ("heights", heights), ("derivatives", derivatives)):
        check_tensor(name, t)
    if widths.dim() != x.dim() + 1 or widths.shape[:-1] != x.shape or widths.shape[-1] < 1:
        raise ValueError(f"widths must have shape [*x.shape, K] = ({', '.join(map(str, x.shape))}, K) with K >= 1 "
                         f"bins; got {tuple(widths.shape)}")
    K = widths.shape[-1]
    if heights.shape != widths.shape:
        raise ValueError(f"heights must have the same shape as widths, {tuple(widths.shape)} (K = {K} bins); "
                         f"got {tuple(heights.shape)}")
    if derivatives.shape != (*x.shape, K - 1):
        raise ValueError(f"derivatives must have shape [*x.shape, K - 1] = {(*x.shape, K - 1)} (the K - 1 = {K - 1} "
                         f"interior knots of K = {K} bins); got {tuple(derivatives.shape)}")
    check_same({"x": x, "widths": widths, "heights": heights, "derivatives": derivatives}, shape=False)
    bound = _ref_spline.DEFAULT_BOUND[parameterization] if bound is None else bound
    if not isinstance(bound, (int, float)) or not 0.0 < float(bound) < math.inf:
        raise ValueError(f"bound must be a positive finite number; got {bound!r}")
    if parameterization == "nflows":
        for name, value in (("min_bin_width", min_bin_width), ("min_bin_height", min_bin_height)):
            if not 0.0 <= float(value) or not float(value) * K < 1.0:
                raise ValueError(f"{name} must be >= 0 with {name} * K < 1 (K = {K} bins); got {value!r}")
        if not 0.0 <= float(min_derivative) < math.inf:
            raise ValueError(f"min_derivative must be a finite number >= 0; got {min_derivative!r}")
    elif not 0.0 < float(slope) < 1.0:
        raise ValueError(f"slope must lie in (0, 1) for parameterization='zuko'; got {slope!r}")
    return float(bound)


def rational_quadratic_spline(
    x: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    *,
    inverse: bool = False,
    bound: float | None = None,
    parameterization: str = "nflows",
    min_bin_width: float = _ref_spline.DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = _ref_spline.DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = _ref_spline.DEFAULT_MIN_DERIVATIVE,
    slope: float = _ref_spline.DEFAULT_SLOPE,
    reduction: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monotonic rational-quadratic spline on [-bound, bound], identity outside, and its log-det.

    One spline per element of x, from that element's unconstrained parameters (Neural Spline Flows);
    the math and both parameterisations are in :mod:`fastdensity.reference.spline`. The kernel reads
    the parameters in place - e.g. three slices ``h[..., :K], h[..., K:2K], h[..., 2K:]`` of a
    conditioner output ``h`` [B, D, 3K - 1] - normalises them in registers and never stores the knots.

    Args:
        x: [B, ...] input (the spline's output y with ``inverse=True``).
        widths, heights: [B, ..., K] unconstrained bin widths and heights (K >= 1).
        derivatives: [B, ..., K - 1] unconstrained slopes at the interior knots (1 at -bound and bound).
        inverse: apply the inverse spline instead (the stable quadratic root; never asserts).
        bound: the interval's half-width; None takes the library default of the parameterisation:
            1.0 for "nflows" (its ``tail_bound``), 5.0 for "zuko" (its ``bound``).
        parameterization: "nflows" (equal to nflows' ``unconstrained_rational_quadratic_spline(...,
            tails="linear")``) or "zuko" (equal to ``zuko.transforms.MonotonicRQSTransform``), each to
            float64 round-off.
        min_bin_width, min_bin_height: >= 0, with K times each < 1 ("nflows" only).
        min_derivative: >= 0, added to the softplus of the derivatives ("nflows" only). A zero minimum
            (nflows accepts it) lets extreme logits - differences past ~100 in fp32 - give an empty
            bin or a zero slope, and so an infinite log-det; the defaults keep everything finite.
        slope: in (0, 1), the smallest slope; the logits are soft-clipped by |log slope| ("zuko" only).
        reduction: "sum" -> log-det [B], summed over all non-batch dims; "none" -> per element, shaped
            like x (what per-feature or masked sums need).

    Returns:
        ``(y, logdet)``: y like x; logdet float32 for half inputs, float64 for float64. Finite, with
        finite gradients for x and all three parameter tensors, for every finite input, including
        inputs outside the interval, exactly on a knot or on +-bound.
    """
    bound = _check_spline_args(x, widths, heights, derivatives, parameterization, bound, reduction, min_bin_width,
                               min_bin_height, min_derivative, slope)
    if backend.use_kernels(x, "spline"):
        return torch.ops.fastdensity.rational_quadratic_spline(
            x, widths, heights, derivatives, bool(inverse), parameterization, bound, float(min_bin_width),
            float(min_bin_height), float(min_derivative), float(slope), reduction == "none")
    return _ref_spline.rational_quadratic_spline(
        x, widths, heights, derivatives, inverse=inverse, bound=bound, parameterization=parameterization,
        min_bin_width=min_bin_width, min_bin_height=min_bin_height, min_derivative=min_derivative, slope=slope,
        reduction=reduction)
