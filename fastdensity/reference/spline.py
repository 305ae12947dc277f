"""Reference monotonic rational-quadratic spline (Durkan et al., 2019): ground truth and CPU path.

One spline per element of x, on the interval [-B, B] with the identity outside it. Each element owns
K unconstrained widths, K unconstrained heights and K-1 unconstrained interior derivatives.

Knots. Bin widths ``w_k`` and heights ``h_k`` (k = 0..K-1) are positive and sum to 2B; the knots are
``x_k = -B + sum_{i<k} w_i`` and ``y_k = -B + sum_{i<k} h_i`` (k = 0..K), so x_0 = y_0 = -B and
x_K = y_K = B; the knot derivatives are d_0 = d_K = 1 (the spline meets the identity tails with slope 1)
and d_1..d_{K-1} from the unconstrained derivatives. Two parameterisations, each equal to its
library's to float64 round-off:

    "nflows"  (nflows.transforms.splines.rational_quadratic.unconstrained_rational_quadratic_spline,
               tails="linear", default bound 1.0)
        w = 2B (m_w + (1 - K m_w) softmax(widths))       m_w = min_bin_width, same for heights
        d = m_d + softplus(derivatives)                  m_d = min_derivative; torch's softplus
        x_K = y_K = B set exactly. nflows pads the derivatives with log(exp(1 - m_d) - 1), whose
        m_d + softplus is 1 up to one rounding: the boundary derivatives are 1 here.
    "zuko"    (zuko.transforms.MonotonicRQSTransform(widths, heights, derivatives, bound, slope),
               default bound 5.0)
        soft clip with L = |log slope|: u -> u / (1 + |2u| / L) for widths and heights,
                                        u -> u / (1 + |u| / L) for derivatives
        knots x_k = B (2 sum_{i<k} softmax_i - 1) (x_K is B up to a rounding), d = exp(clipped)
        so every slope lies in (slope, 1/slope).

Bins. nflows puts an x lying exactly on an interior knot in the bin to its right, zuko in the bin to
its left; inside is -B <= x <= B for nflows and -B < x <= x_K for zuko, whose last knot x_K (y_K for
the inverse) is B only up to a rounding. (The spline and its slope are continuous at the knots, so
this only decides which formula gives the same value.)

Forward, in bin k with z = (x - x_k) / w_k in [0, 1], s = h_k / w_k:

    y           = y_k + h_k (s z^2 + d_k z (1 - z)) / (s + (d_k + d_{k+1} - 2 s) z (1 - z))
    dy/dx       = s^2 (d_{k+1} z^2 + 2 s z (1 - z) + d_k (1 - z)^2) / (s + (d_k + d_{k+1} - 2 s) z (1 - z))^2

Inverse: z is the root in [0, 1] of a z^2 + b z + c = 0 with, for t = y - y_k and e = d_k + d_{k+1} - 2s,

    a = h_k (s - d_k) + t e        b = h_k d_k - t e        c = -s t
    z = 2c / (-b - sqrt(b^2 - 4ac))     (the stable root: no cancellation, finite where a = 0)

with the discriminant clamped at zero (it is positive in exact arithmetic; rounding may not be), z
clamped into [0, 1] (rounding can push it out in a steep bin), and log|dx/dy| = -log|dy/dx| there.

Robustness. x is clipped into [-B, B] before the spline is evaluated and the identity chosen with
``where`` afterwards, so the unused branch never sees an x outside its bins: outputs and gradients are
finite for every finite input (flowjax#239: NaN gradients from evaluating the spline out of range).
Nothing here synchronises with the host, indexes with a boolean mask or has a data-dependent shape:
``torch.compile(fullgraph=True)`` makes one graph of it.

Speed (this is the CPU path). The values are computed by the libraries' own expressions, in their order
- in float64 torch's softmax included, so that the knots round exactly as theirs and a point on a knot
falls in the same bin - and the work around them is cut: the softmax's and zuko's soft clip's backwards
are written out and, in other dtypes, the softmax's forward too (:class:`_Softmax`, :class:`_SoftClip`;
ATen's softmax and its backward over a short last dim are slow on a CPU), both ends of the bin come
from one gather per knot tensor, and strided parameter slices are made dense where several elementwise
passes follow. Forward + backward at x [4096, 16], K = 8, one CPU thread, against nflows' and zuko's
own spline functions (``benchmarks/bench_spline.py``): ~1.8x faster in float32, ~1.35x in float64.

Shapes: x [B, ...]; widths, heights [B, ..., K]; derivatives [B, ..., K-1]. Returns y like x and the
log|det| either summed over all non-batch dims ([B], ``reduction="sum"``) or per element (x's shape,
``reduction="none"``), in float64 for float64 inputs and float32 otherwise.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._dtypes import acc_dtype

PARAMETERIZATIONS = ("nflows", "zuko")
REDUCTIONS = ("sum", "none")
#: each library's default bound: nflows' ``tail_bound``, zuko's ``bound``
DEFAULT_BOUND = {"nflows": 1.0, "zuko": 5.0}
DEFAULT_MIN_BIN_WIDTH = 1e-3
DEFAULT_MIN_BIN_HEIGHT = 1e-3
DEFAULT_MIN_DERIVATIVE = 1e-3
DEFAULT_SLOPE = 1e-3


class _SoftClip(torch.autograd.Function):
    """``u / (1 + |u / limit|)`` - zuko's expression, so the value rounds as zuko's does - with the
    derivative written out, ``1 / (1 + |u / limit|)^2``: five passes over [..., K] in the backward where
    autograd of the expression takes about nine (the quotient's two partials, abs, the scalar division,
    the sum of the two paths to u). Made of differentiable ops on the saved input: double backward works."""

    @staticmethod
    def forward(u, limit):
        return u / (1 + torch.abs(u / limit))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.limit = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        denominator = 1 + torch.abs(u / ctx.limit)
        return grad / (denominator * denominator), None


def soft_clip(u: torch.Tensor, limit: float) -> torch.Tensor:
    """``u / (1 + |u| / limit)``: odd, increasing, slope 1 at 0, values in (-limit, limit)."""
    return _SoftClip.apply(u, limit)


class _Softmax(torch.autograd.Function):
    """Softmax over the last dim, with its backward written out: ``p (g - sum(p g))``.

    Forward, float64: ``torch.softmax`` itself, so that the knots round exactly as nflows' and zuko's
    (which call it) and a point on a knot lands in the same bin as in the library - what the float64
    equality tests check. Other dtypes: ``e / sum(e)`` with ``e = exp(u - max u)``, within an ulp or so
    of torch's (as if the logits moved by an ulp) and about 5x faster on a CPU, where ATen's float32
    softmax over a short last dim (K = 8 bins for 65536 elements) takes ~10 ms on one thread.

    Backward: ATen's ``_softmax_backward_data`` over a short last dim is several times slower than
    these four elementwise passes. Made of differentiable ops on the saved output, so double backward
    (gradient penalties, Hessians) still works.
    """

    @staticmethod
    def forward(raw):
        if raw.dtype == torch.float64:
            return torch.softmax(raw, dim=-1)
        e = torch.exp(raw - raw.amax(dim=-1, keepdim=True))
        return e / e.sum(dim=-1, keepdim=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (p,) = ctx.saved_tensors
        return p * (grad - (p * grad).sum(dim=-1, keepdim=True))


def softmax(raw: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim (see :class:`_Softmax`)."""
    return _Softmax.apply(raw)


def knots(widths, heights, derivatives, *, parameterization: str, bound: float,
          min_bin_width: float = DEFAULT_MIN_BIN_WIDTH, min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
          min_derivative: float = DEFAULT_MIN_DERIVATIVE, slope: float = DEFAULT_SLOPE):
    """The spline's knots ``(xs, ys, ds)``, each [..., K + 1], from the unconstrained parameters."""
    ones = torch.ones_like(widths[..., :1])
    if parameterization == "nflows":
        K = widths.shape[-1]

        def positions(raw, minimum):
            sizes = minimum + (1 - minimum * K) * softmax(raw)
            inner = -bound + 2 * bound * torch.cumsum(sizes, dim=-1)[..., :-1]
            edge = torch.full_like(raw[..., :1], bound)
            return torch.cat([-edge, inner, edge], dim=-1)  # both ends exactly at -B and B

        xs, ys = positions(widths, min_bin_width), positions(heights, min_bin_height)
        # contiguous: softplus of a strided view (a slice of a conditioner's output) takes ATen's slow
        # non-vectorised path, over 10x the cost of the copy (a no-op when the caller made it dense)
        ds = torch.cat([ones, min_derivative + F.softplus(derivatives.contiguous()), ones], dim=-1)
    elif parameterization == "zuko":
        limit = abs(math.log(slope))

        def positions(raw):
            # dense first: the soft clip's four elementwise passes each way run ~3x slower on a strided
            # slice of a conditioner's output than the copy costs (measured)
            cum = torch.cumsum(softmax(soft_clip(raw.contiguous(), limit / 2)), dim=-1)
            return bound * (2 * torch.cat([torch.zeros_like(cum[..., :1]), cum], dim=-1) - 1)

        xs, ys = positions(widths), positions(heights)
        ds = torch.exp(torch.cat([0 * ones, soft_clip(derivatives.contiguous(), limit), 0 * ones], dim=-1))
    else:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}; got {parameterization!r}")
    return xs, ys, ds


def _bin_index(edges: torch.Tensor, v: torch.Tensor, parameterization: str) -> torch.Tensor:
    """The bin of each ``v`` (already inside the interval) among ``edges`` [..., K + 1], as [..., 1]:
    the number of interior knots at or below v (nflows) or strictly below v (zuko)."""
    inner = edges[..., 1:-1]
    below = inner <= v[..., None] if parameterization == "nflows" else inner < v[..., None]
    return below.sum(dim=-1, keepdim=True)


def _bin_ends(t: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t[..., k], t[..., k + 1])`` for ``ends`` = [..., (k, k + 1)]: one gather (and one scatter in the
    backward, into one zero-filled [..., K + 1]) for both ends of the bin rather than one each."""
    return torch.gather(t, -1, ends).unbind(dim=-1)


def _log_slope(z_sq, one_minus_z, zz, s, d0, d1, denominator):
    """log dy/dx at a position z of a bin (see the module docstring), from z^2, 1 - z and z (1 - z)."""
    numerator = s * s * (d1 * z_sq + 2 * s * zz + d0 * (one_minus_z * one_minus_z))
    return torch.log(numerator) - 2 * torch.log(denominator)


def rational_quadratic_spline(
    x: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    *,
    inverse: bool = False,
    bound: float | None = None,
    parameterization: str = "nflows",
    min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = DEFAULT_MIN_DERIVATIVE,
    slope: float = DEFAULT_SLOPE,
    reduction: str = "sum",
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spline (or its inverse) applied elementwise, and its log|det|.

    Args:
        x: [B, ...] the input (the output y with ``inverse=True``).
        widths, heights: [B, ..., K] unconstrained; derivatives: [B, ..., K - 1] unconstrained.
        bound: B of the interval [-B, B]; None takes the parameterisation's library default.
        min_bin_width, min_bin_height, min_derivative: used by "nflows"; slope: used by "zuko".
        reduction: "sum" -> log|det| [B]; "none" -> per element, shaped like x.
        upcast: compute in float64 and cast y back (for tolerance studies).

    Returns:
        ``(y, logdet)``; y like x; logdet in :func:`fastdensity._dtypes.acc_dtype` of x.
    """
    if bound is None:
        bound = DEFAULT_BOUND[parameterization]
    out_dtype, acc = x.dtype, acc_dtype(x.dtype)
    if upcast:
        x, widths, heights, derivatives = (t.double() for t in (x, widths, heights, derivatives))
    # The parameters usually arrive as strided slices of one conditioner output: :func:`knots` makes
    # dense copies where its elementwise passes pay for them (zuko's soft clip, the derivatives' softplus
    # or clip), not for nflows' softmax (measured).
    xs, ys, ds = knots(widths, heights, derivatives, parameterization=parameterization, bound=bound,
                       min_bin_width=min_bin_width, min_bin_height=min_bin_height,
                       min_derivative=min_derivative, slope=slope)
    if inverse:  # search among the output knots
        xs, ys = ys, xs
    if parameterization == "nflows":
        inside = (x >= -bound) & (x <= bound)
    else:  # zuko's last knot is B up to a rounding, and zuko's interval ends there
        inside = (x > -bound) & (x <= xs[..., -1])
    # The spline never sees an x outside its bins (no NaN in the branch that where() discards).
    v = torch.where(inside, x, x.clamp(-bound, bound))
    k = _bin_index(xs, v, parameterization)
    ends = torch.cat([k, k + 1], dim=-1)
    if inverse:  # here xs are the y knots: name them for the formulas below
        (y0, y1), (x0, x1) = _bin_ends(xs, ends), _bin_ends(ys, ends)
    else:
        (x0, x1), (y0, y1) = _bin_ends(xs, ends), _bin_ends(ys, ends)
    d0, d1 = _bin_ends(ds, ends)
    w, h = x1 - x0, y1 - y0
    s = h / w
    if inverse:
        t = v - y0
        e = d0 + d1 - 2 * s
        a = h * (s - d0) + t * e
        b = h * d0 - t * e
        c = -s * t
        # Clamped at the smallest positive normal rather than 0: sqrt's gradient at 0 is inf, and
        # 0 * inf would turn the clamp's zero gradient into NaN. Any real discriminant is far above it.
        disc = (b * b - 4 * a * c).clamp(min=torch.finfo(b.dtype).tiny)
        z = 2 * c / (-b - torch.sqrt(disc))
        # z is in [0, 1] exactly but can round past an end by ~eps d / s in a steep bin, where the formulas
        # below take the log of a negative number: keep its value in the bin. The clamp's gradient would
        # be 0 there (so dx/dy = 0 at y = B, say); the root's own gradient is the right one, so keep it.
        z = z + (z.clamp(0.0, 1.0) - z).detach()
        out = x0 + z * w
    else:
        z = (v - x0) / w
        out = None
    one_minus_z = 1 - z
    z_sq, zz = z * z, z * one_minus_z
    denominator = s + (d0 + d1 - 2 * s) * zz
    log_slope = _log_slope(z_sq, one_minus_z, zz, s, d0, d1, denominator)
    if inverse:
        log_slope = -log_slope
    else:
        out = y0 + h * (s * z_sq + d0 * zz) / denominator
    y = torch.where(inside, out, x)
    log_det = torch.where(inside, log_slope, 0.0).to(acc)
    if reduction == "sum":
        log_det = log_det.sum(dim=tuple(range(1, x.dim()))) if x.dim() > 1 else log_det
    elif reduction != "none":
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    return y.to(out_dtype), log_det
