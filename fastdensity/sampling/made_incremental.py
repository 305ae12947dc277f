"""Incremental MADE inversion: MAF's and the autoregressive spline's inverse with each hidden unit computed once.

A MADE-based transform maps x to z elementwise, ``z_d = f(x_d; p_d)``, with feature d's parameters
``p_d = MADE(x, c)[d]`` depending only on the features before d in the MADE's order. Its inverse is
sequential. The naive scheme (nflows') runs the whole MADE D times; this one runs it once, in D steps.

**Degrees** (:mod:`fastdensity.nn.made`). Let position k = 0 .. D-1 be the k-th feature generated
(``generation_order[k]``), with input degree k + 1. A hidden unit of degree q sees inputs of degree
<= q, i.e. positions < q, through every layer (hidden <- hidden connects deg >= deg); the outputs of
position k see hidden units of degree <= k. So at step k, with positions < k known::

    1. every layer's units of degree k, layer by layer       (they need positions < k only)
    2. position k's m parameters, from the last layer's units of degree <= k
    3. x at position k = f^-1(z; parameters)

and over the D steps every hidden unit is computed exactly once. With the units of each layer sorted
by degree (the MADE sorts them; here they are sorted again by a stable argsort, so any degree order
works - nflows' MADE interleaves them - and batch norm's per-unit statistics are read through the same
permutation), "degree k" is a contiguous block of rows and "degree <= k" a prefix, so step 1 is, per layer,
one product ``W[block, :prefix] @ h_prev[:prefix]`` - the lower block triangle of the dense product,
about half its flops over the whole inversion - and step 2 one ``[m, prefix]`` product. Activations
are kept transposed, [units, B], so a block's rows and a prefix are contiguous slices.

**What is supported**: both block structures of :class:`~fastdensity.nn.MADE` (plain, with the
context entering every layer; nflows' residual blocks, with the context through the activation in
the first layer and in each block), nflows' MADE and zuko's plain ``MaskedMLP`` through views of
them (:mod:`fastdensity.peers.nflows`, :mod:`fastdensity.peers.zuko`), layers of different widths,
any ordering, random or sequential degrees, any elementwise activation, batch norm in eval mode (its
per-unit affine map applies block by block), dropout in eval mode (the identity). In training mode
batch norm normalises by the batch of the current pass and dropout draws a new mask per pass, so no
incremental scheme equals the D-pass result there:
:func:`incremental_unsupported` says so and :func:`autoregressive_inverse` runs the D passes. The
masks are checked against the degrees (a mask that connects outside the degree rule is refused).

**Exactness.** Same parameters as the last naive pass up to the order of floating-point sums (the
products skip the exact zeros the masked dense product adds): float64 results agree to ~1e-14
relative, float32 to round-off (``tests/test_sampling.py``). The elementwise inverse and the log-det
are computed by the transform's own code on the full parameters at the end, as in its last naive pass.

**Autograd.** The buffers are written in place, so the incremental inverse builds no graph; where a
graph is needed (grad mode on and the inputs, context or parameters require grad)
:func:`autoregressive_inverse` runs the naive passes, which autograd differentiates.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from ..reference.masked_linear import masked_weight
from .progress import tick

__all__ = ["MADE_METHODS", "incremental_unsupported", "incremental_made_inverse", "affine_autoregressive_inverse",
           "spline_autoregressive_inverse", "autoregressive_inverse", "autoregressive_method", "sample_autoregressive",
           "needs_graph"]

#: ``sample(n, method=...)`` of the MADE-based models; the first is the default.
MADE_METHODS = ("incremental", "naive")

Solve = Callable[[int, torch.Tensor, torch.Tensor], None]


# --------------------------------------------------------------------------------------------------
# Reading a MADE: masked weights in sorted-unit order, degree blocks, batch norms
# --------------------------------------------------------------------------------------------------


def _masked(layer) -> torch.Tensor:
    """``where(mask, weight, 0)``: dead weights are never read (they may hold anything, as in the op)."""
    return masked_weight(layer.weight, layer.mask)


def _bias(layer) -> torch.Tensor:
    """The bias as a column [out, 1] (zeros without one)."""
    b = layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
    return b[:, None]


def _check_within(mask: torch.Tensor, prefix: torch.Tensor, what: str) -> None:
    """Every live connection of row u must lie in columns ``< prefix[u]`` (the degree rule)."""
    columns = torch.arange(mask.shape[1], device=mask.device)
    if bool((mask & (columns[None, :] >= prefix[:, None])).any()):
        raise ValueError(f"MADE {what} connects units outside the degree rule; incremental sampling needs "
                         f"masks that follow the degrees (hidden >= source, output > hidden)")


def _batch_norms(made):
    """All BatchNorm1d layers of a MADE (plain or residual)."""
    return [m for m in made.modules() if isinstance(m, torch.nn.BatchNorm1d)]


def incremental_unsupported(made) -> Optional[str]:
    """Why the incremental scheme cannot equal the D-pass inverse of ``made`` now, or None when it can."""
    if made.training:
        dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in made.modules())
        if dropout or _batch_norms(made):
            return ("the MADE is in training mode with dropout or batch norm, which change with each pass; "
                    "call .eval() to sample incrementally")
    if any(bn.running_mean is None for bn in _batch_norms(made)):
        return "the MADE's batch norm keeps no running statistics (track_running_stats=False)"
    if made.use_residual_blocks and not bool((made.hidden_degrees == made.hidden_degrees[0]).all()):
        return "the residual MADE's layers have different degrees"
    return None


def _normalize(norm, block: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Eval-mode batch norm of a block [units, B] of sorted rows, as ``norm`` computes it per unit;
    ``units`` are the rows' indices in the layer's own (unsorted) order, which the statistics follow."""
    if norm is None:
        return block
    weight = None if norm.weight is None else norm.weight[units]
    bias = None if norm.bias is None else norm.bias[units]
    return F.batch_norm(block.t(), norm.running_mean[units], norm.running_var[units], weight, bias,
                        False, 0.0, norm.eps).t()


def _activate(activation, block: torch.Tensor) -> None:
    """Apply the MADE's (elementwise) activation to ``block`` in place."""
    if activation is F.relu or activation is torch.relu:
        torch.relu_(block)
    else:
        block.copy_(activation(block))


class _Degrees:
    """A layer's units sorted by degree: ``perm`` (sorted -> original), ``start[q]:end[q]`` the rows of
    degree q, for q = 0 .. D-1 (Python ints, read once per step)."""

    def __init__(self, degrees: torch.Tensor, features: int):
        self.perm = torch.argsort(degrees, stable=True)
        ordered = degrees[self.perm].cpu()
        q = torch.arange(features)
        self.start = torch.searchsorted(ordered, q, right=False).tolist()
        self.end = torch.searchsorted(ordered, q, right=True).tolist()
        self.sorted = ordered.to(degrees.device)

    def prefix_of(self, degrees: torch.Tensor) -> torch.Tensor:
        """For units of the given degrees: how many of these units have degree <= theirs."""
        return torch.searchsorted(self.sorted, degrees.contiguous(), right=True)


# --------------------------------------------------------------------------------------------------
# The inversion
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def incremental_made_inverse(made, z: torch.Tensor, context: Optional[torch.Tensor], solve: Solve):
    """Invert a MADE-based transform incrementally (module docstring).

    Args:
        made: a :class:`~fastdensity.nn.MADE` (plain or residual), ready (:func:`incremental_unsupported`).
        z: [B, D], the transform's output to invert.
        context: [B, C] or None, as the MADE takes it.
        solve: ``solve(d, params [m, B], out [B])`` writes feature d's value, found from its m
            parameters, into ``out`` (z is the caller's to read).

    Returns:
        ``(x [B, D], params [B, D, m])``: the solved features and every feature's parameters, equal to
        ``made(x, context).view(B, D, m)`` up to round-off.
    """
    reason = incremental_unsupported(made)
    if reason is not None:
        raise ValueError(f"incremental MADE inversion is not possible: {reason}")
    D, m = made.features, made.output_multiplier
    B = z.shape[0]
    order = made.generation_order.to(z.device)
    positions = made.generation_order.tolist()
    terms = None
    if made.use_residual_blocks:
        degrees, run_hidden = _residual_layers(made, context, order, B)
    else:
        terms = made.context_terms(context)
        degrees, run_hidden = _plain_layers(made, terms, order, B)
    out_layer = made.output_layer
    out_weight = _masked(out_layer)[:, degrees[-1].perm]
    # Output row r belongs to feature r // m at position ordering[r // m]: it reads last-layer units of
    # degree <= that position.
    out_prefix = degrees[-1].prefix_of(made.ordering.repeat_interleave(m).to(z.device))
    _check_within(out_layer.mask[:, degrees[-1].perm], out_prefix, "output layer")
    out_offset = _bias(out_layer)
    if terms is not None and terms[-1] is not None:
        out_offset = out_offset + terms[-1].t()
    out_prefix = out_prefix.tolist()

    x_by_position = z.new_zeros(D, B)
    params = z.new_empty(D * m, B)
    for k, d in enumerate(positions):
        last = run_hidden(k, x_by_position)
        rows = slice(d * m, (d + 1) * m)
        p = out_prefix[d * m]
        torch.addmm(out_offset[rows], out_weight[rows, :p], last[:p], out=params[rows])
        solve(d, params[rows], x_by_position[k])
        tick()
    x = x_by_position.t()[:, made.ordering.to(z.device)]  # feature i sits at position ordering[i]
    return x, params.t().reshape(B, D, m)


def _plain_layers(made, terms, order, batch):
    """Degrees and the per-step function of the plain structure: h_l = a(W_l bn(h_(l-1)) + b_l + U_l c)
    (``terms``: the context's contribution to each layer and the output, None where there is none)."""
    D, activation = made.features, made.activation
    linears = [made.input_layer, *made.hidden_layers]
    degrees = [_Degrees(deg, D) for deg in made.hidden_degrees]
    norms = [None] + (list(made.batch_norms) if made.batch_norms is not None else [None] * made.num_blocks)
    weights, offsets, prefixes = [], [], []
    for l, (linear, deg) in enumerate(zip(linears, degrees)):
        if l == 0:
            weight = _masked(linear)[deg.perm][:, order]  # columns: positions
            prefix = deg.sorted  # a unit of degree q sees positions < q
        else:
            weight = _masked(linear)[deg.perm][:, degrees[l - 1].perm]
            prefix = degrees[l - 1].prefix_of(deg.sorted)
        mask = linear.mask[deg.perm][:, order if l == 0 else degrees[l - 1].perm]
        _check_within(mask, prefix, f"layer {l}")
        offset = _bias(linear)[deg.perm]
        if terms[l] is not None:
            offset = offset + terms[l][:, deg.perm].t()
        weights.append(weight)
        offsets.append(offset)
        prefixes.append(prefix.tolist())
    like = weights[0]
    hidden = [like.new_zeros(linear.out_features, batch) for linear in linears]  # widths may differ (zuko)
    # What layer l + 1 reads: bn_l(h_l) with batch norm, else h_l itself.
    feeds = [torch.zeros_like(h) if norm is not None else h for norm, h in zip(norms[1:], hidden)] + [hidden[-1]]

    def run(k: int, x_by_position: torch.Tensor) -> torch.Tensor:
        for l, deg in enumerate(degrees):
            s, e = deg.start[k], deg.end[k]
            if s == e:
                continue
            source = x_by_position if l == 0 else feeds[l - 1]
            p = prefixes[l][s]
            block = hidden[l][s:e]
            torch.addmm(offsets[l][s:e], weights[l][s:e, :p], source[:p], out=block)
            _activate(activation, block)
            if l + 1 < len(norms) and norms[l + 1] is not None:
                feeds[l][s:e] = _normalize(norms[l + 1], block, deg.perm[s:e])
        return hidden[-1]

    return degrees, run


def _residual_layers(made, context, order, batch):
    """Degrees and the per-step function of nflows' residual structure (see :mod:`fastdensity.nn.made`):
    h_0 = W_0 x + b_0 + a(U_0 c);  h_(i+1) = h_i + W_i'' a(bn'(W_i' a(bn(h_i)) + U_i c)) + b_i''."""
    D, activation = made.features, made.activation
    deg = _Degrees(made.hidden_degrees[0], D)
    perm = deg.perm
    prefix = deg.prefix_of(deg.sorted)  # a block's units of degree q read the stream's units of degree <= q
    first = made.input_layer
    _check_within(first.mask[perm][:, order], deg.sorted, "input layer")
    w0 = _masked(first)[perm][:, order]
    offset0 = _bias(first)[perm]
    if made.context_layer is not None:
        offset0 = offset0 + activation(made.context_layer(context))[:, perm].t()
    blocks = []
    for i, block in enumerate(made.blocks):
        inner, outer = block.linear_layers
        for layer in (inner, outer):
            _check_within(layer.mask[perm][:, perm], prefix, f"block {i}")
        offset = _bias(inner)[perm]
        if block.context_layer is not None:
            offset = offset + block.context_layer(context)[:, perm].t()
        norms = (None, None) if block.batch_norm_layers is None else tuple(block.batch_norm_layers)
        blocks.append((_masked(inner)[perm][:, perm], offset, _masked(outer)[perm][:, perm], _bias(outer)[perm], norms))
    prefix = prefix.tolist()
    like = w0
    H = made.hidden_features
    stream = [like.new_zeros(H, batch) for _ in range(len(blocks) + 1)]
    inputs = [like.new_zeros(H, batch) for _ in blocks]  # a(bn(h_i)), what W_i' reads
    gated = [like.new_zeros(H, batch) for _ in blocks]  # a(bn'(W_i' ... + U_i c)), what W_i'' reads

    def run(k: int, x_by_position: torch.Tensor) -> torch.Tensor:
        s, e = deg.start[k], deg.end[k]
        if s == e:
            return stream[-1]
        torch.addmm(offset0[s:e], w0[s:e, :k], x_by_position[:k], out=stream[0][s:e])
        p = prefix[s]
        for i, (w_in, offset, w_out, b_out, (norm_in, norm_mid)) in enumerate(blocks):
            a = inputs[i][s:e]
            a.copy_(_normalize(norm_in, stream[i][s:e], perm[s:e]))
            _activate(activation, a)
            t = gated[i][s:e]
            torch.addmm(offset[s:e], w_in[s:e, :p], inputs[i][:p], out=t)
            if norm_mid is not None:
                t.copy_(_normalize(norm_mid, t, perm[s:e]))
            _activate(activation, t)
            torch.add(stream[i][s:e], torch.addmm(b_out[s:e], w_out[s:e, :p], gated[i][:p]), out=stream[i + 1][s:e])
        return stream[-1]

    return [deg], run


# --------------------------------------------------------------------------------------------------
# The transforms' inverses
# --------------------------------------------------------------------------------------------------


def _affine_solver(transform, z: torch.Tensor) -> Solve:
    """Feature d's ``x_d = (z_d - shift) / s(u)`` with the transform's scale function (nflows' softplus
    among them), in the reference op's arithmetic (``fastdensity.reference.coupling``), on contiguous
    [B] rows: the public op's argument checks would cost more than the arithmetic, once per feature."""
    from ..reference.coupling import scale_and_log_scale

    shift_at, scale_at, scale = transform.shift_index, transform.scale_index, transform.scale
    z_rows = z.t().contiguous()  # [D, B]

    def solve(d: int, p: torch.Tensor, out: torch.Tensor) -> None:
        s, _ = scale_and_log_scale(p[scale_at], scale)
        torch.div(z_rows[d] - p[shift_at], s, out=out)

    return solve


def affine_autoregressive_inverse(transform, z: torch.Tensor, context: Optional[torch.Tensor] = None, made=None):
    """``(x, logabsdet)`` of a MAF transform (:class:`~fastdensity.nn.MaskedAffineAutoregressive` or nflows'
    layout, :class:`~fastdensity.nn.MaskedAffineAutoregressiveTransform`), each MADE unit computed once;
    ``made``: the transform's MADE as :func:`_made_of` gives it, when the caller has it already."""
    from ..nn.autoregressive import affine_step

    made = _made_of(transform) if made is None else made
    _, params = incremental_made_inverse(made, z, context, _affine_solver(transform, z))
    # The elementwise inverse and the log-det once more on all parameters: the naive last pass's call.
    params = params.contiguous()
    return affine_step(z, params[:, :, transform.shift_index], params[:, :, transform.scale_index],
                       transform.scale, inverse=True)


def spline_autoregressive_inverse(transform, z: torch.Tensor, context: Optional[torch.Tensor] = None, made=None):
    """``(x, logabsdet)`` of a :class:`~fastdensity.nn.MaskedPiecewiseRationalQuadraticAutoregressive`,
    each MADE unit computed once (the per-feature spline inverse is the transform's own call); ``made`` as
    for :func:`affine_autoregressive_inverse`."""

    def solve(d: int, p: torch.Tensor, out: torch.Tensor) -> None:
        x, _ = transform._spline_from(z[:, d:d + 1], p.t().unsqueeze(1), inverse=True)
        out.copy_(x[:, 0])

    made = _made_of(transform) if made is None else made
    _, params = incremental_made_inverse(made, z, context, solve)
    return transform._spline_from(z, params.contiguous(), inverse=True)


def _made_of(transform):
    """The MADE the incremental scheme reads: ``transform.incremental_made`` where the transform gives
    one (a view of another library's MADE: :class:`fastdensity.peers.nflows.NflowsMADEView`), else its own
    ``made`` or ``autoregressive_net``."""
    view = getattr(transform, "incremental_made", None)
    if view is not None:
        return view
    return transform.made if hasattr(transform, "made") else transform.autoregressive_net


def _incremental_of(transform):
    """The incremental inverse of a MADE-based transform, or None for any other module."""
    if not (hasattr(transform, "made") or hasattr(transform, "autoregressive_net")):
        return None
    if hasattr(transform, "shift_index"):
        return affine_autoregressive_inverse
    return spline_autoregressive_inverse if hasattr(transform, "_spline_from") else None


def needs_graph(transform, tensors) -> bool:
    """Whether an inverse of ``transform`` on ``tensors`` (None entries ignored) must build an autograd
    graph: grad mode on, and a tensor or a parameter of the transform requires grad."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors) or \
        any(p.requires_grad for p in transform.parameters())


def autoregressive_inverse(transform, inputs: torch.Tensor, context: Optional[torch.Tensor], naive):
    """A MADE-based transform's inverse: incremental unless its ``inverse_method`` is ``"naive"`` (see
    :func:`autoregressive_method`), a graph is needed, or the MADE's mode rules it out
    (:func:`incremental_unsupported`); ``naive(inputs, context)`` (the D passes) otherwise.

    This is the hook a transform's ``inverse`` calls (after checking its arguments)."""
    incremental = _incremental_of(transform)
    if incremental is None:
        raise TypeError(f"{type(transform).__name__} is not a MADE-based transform")
    method = getattr(transform, "inverse_method", MADE_METHODS[0])
    if method == "incremental" and not needs_graph(transform, (inputs, context)):
        made = _made_of(transform)
        if incremental_unsupported(made) is None:
            return incremental(transform, inputs, context, made)
    return naive(inputs, context)


def _check_method(method: str) -> None:
    if method not in MADE_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, MADE_METHODS))}; got {method!r}")


@contextlib.contextmanager
def autoregressive_method(module: torch.nn.Module, method: str) -> Iterator[None]:
    """Within the block, every MADE-based transform inside ``module`` inverts with ``method``
    (``"incremental"`` or ``"naive"``); each transform's own setting comes back afterwards."""
    _check_method(method)
    saved = []
    for transform in module.modules():
        if _incremental_of(transform) is not None:
            saved.append((transform, transform.__dict__.get("inverse_method")))
            transform.inverse_method = method
    try:
        yield
    finally:
        for transform, before in saved:
            if before is None:
                del transform.inverse_method
            else:
                transform.inverse_method = before


def sample_autoregressive(model: torch.nn.Module, method: str, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``draw()`` (a model's sampling) with every MADE-based transform inverting by ``method``.

    ``"incremental"`` (the default of the models' ``sample``) runs without autograd, as
    ``torch.distributions``' ``sample`` and PixelCNN's do; ``"naive"`` runs the D passes per transform
    as before, under whatever grad mode the caller has (differentiable samples)."""
    _check_method(method)
    with autoregressive_method(model, method):
        if method == "naive":
            return draw()
        with torch.no_grad():
            return draw()
