"""Verification of every kernel against the float64 reference: the cases behind ``fastdensity verify``.

For each op, several shapes and each dtype the device supports, :func:`check` runs the op three
ways on the same (rounded) inputs - the Triton kernel, the reference in that dtype ("eager") and the
reference in float64 - and applies the rule of DESIGN.md §6 (:func:`fastdensity.testing.compare`) to
every output and to the gradient of every differentiable input, taken with one random upstream
gradient per output (a plain sum would hide sign and scaling errors). Kernel outputs start as NaN
(:func:`fastdensity.testing.poisoned_outputs`), so an element a kernel forgets to write fails.

On CUDA the shapes are realistic and the dtypes float32, bfloat16 (where supported), float16 and
float64. On a CPU the kernels run in Triton's interpreter - which must be chosen before fastdensity
is imported (``TRITON_INTERPRET=1``; ``fastdensity verify`` arranges it) - at tiny shapes, in float32
and float64 (the interpreter's bf16 arithmetic is not faithful; ANCHORS.md).

An op that is not in this build is reported as skipped; an op whose kernel cannot be loaded, or that
raises, fails.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

import fastdensity
from fastdensity.testing import Comparison, compare, poisoned_outputs

__all__ = ["VerifyCase", "Outcome", "cases", "dtypes_for", "check", "verify", "format_row", "format_rule",
           "outcome_rows", "format_table"]


@dataclass
class VerifyCase:
    """One op at one shape. ``make(device)`` returns the arguments (floating tensors in float32, to be
    rounded to each dtype; other arguments as they are); ``call(*args)`` runs the public op."""

    op: str
    label: str
    make: Callable[[torch.device], list]
    call: Callable[..., Any]
    arg_names: tuple[str, ...]
    grad_args: tuple[int, ...]
    out_names: tuple[str, ...]
    #: arguments kept in at least float32 whatever the dtype (DMoL's x: 8-bit grid values are not
    #: representable in bf16, and the op takes float32 x with half params).
    keep_fp32: tuple[int, ...] = ()


@dataclass
class Outcome:
    """The verdicts of one (case, dtype): comparisons, or the reason it was skipped or failed to run."""

    case: VerifyCase
    dtype: torch.dtype
    comparisons: list[Comparison] = field(default_factory=list)
    skipped: str = ""
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and all(c.passed for c in self.comparisons)


# ----------------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------------


def _dims(shape) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def _ops():
    from fastdensity import ops

    return ops


def _coupling_cases(cuda: bool) -> list[VerifyCase]:
    variants = ([((256, 6, 32, 32), "sigmoid", False), ((65536, 64), "exp", True), ((7, 3, 33, 31), "softclamp", False)]
                if cuda else [((3, 5, 7), "sigmoid", False), ((2, 37), "softclamp", True), ((1, 9), "exp", False)])
    out = []
    for shape, scale, inverse in variants:
        def make(device, shape=shape, scale=scale):
            h = torch.randn((shape[0], 2 * shape[1], *shape[2:]), device=device)
            x = torch.randn(shape, device=device)
            return [x, h]

        def call(x, h, scale=scale, inverse=inverse):
            shift, scale_raw = h.chunk(2, dim=1)  # strided views, as coupling layers pass them
            return _ops().affine_coupling(x, shift, scale_raw, scale=scale, inverse=inverse)

        label = f"x{_dims(shape)} {scale}" + (" inverse" if inverse else "")
        out.append(VerifyCase("affine_coupling", label, make, call, ("x", "h"), (0, 1), ("y", "logdet")))
    return out


def _logsumexp_cases(cuda: bool) -> list[VerifyCase]:
    # Many short rows, few long ones (the split-row path), a middle dim. Not the benchmark's 2^26
    # elements: each comparison copies its tensors to the host (fastdensity.testing.compare), and at
    # that size a gradient's comparison alone takes seconds of the GPU run's few minutes.
    shapes = ([((16384, 1024), -1), ((256, 65536), -1), ((33, 65, 7), 1)] if cuda
              else [((5, 37), -1), ((3, 4, 5), 1)])
    out = []
    for shape, dim in shapes:
        def make(device, shape=shape):
            x = 3 * torch.randn(shape, device=device)
            x.view(-1)[0] = float("-inf")  # an -inf entry, handled as torch does
            return [x]

        out.append(VerifyCase("logsumexp", f"x{_dims(shape)} dim={dim}", make,
                              lambda x, dim=dim: _ops().logsumexp(x, dim=dim), ("x",), (0,), ("out",)))
    return out


def _mixture_cases(op: str, cuda: bool) -> list[VerifyCase]:
    # (B, K, D, shared parameters?)
    shapes = ([(4096, 16, 32, False), (8192, 256, 64, True), (1000, 7, 5, True)] if cuda
              else [(5, 3, 4, False), (7, 5, 3, True), (6, 64, 8, True)])  # K*D = 512: the shared-parameter kernel
    out = []
    for b, k, d, shared in shapes:
        def make(device, b=b, k=k, d=d, shared=shared):
            lead = () if shared else (b,)
            return [2 * torch.randn(b, d, device=device), torch.randn(*lead, k, device=device),
                    2 * torch.randn(*lead, k, d, device=device), 0.3 * torch.randn(*lead, k, d, device=device)]

        def call(x, logits, means, log_scales, op=op):
            return getattr(_ops(), op)(x, logits, means, log_scales)

        kind = "shared" if shared else "per-sample"
        out.append(VerifyCase(op, f"{kind} B={b} K={k} D={d}", make, call,
                              ("x", "logits", "means", "log_scales"), (0, 1, 2, 3), ("log_prob",)))
    return out


def _dmol_cases(cuda: bool) -> list[VerifyCase]:
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
                              lambda x, params: _ops().dmol_log_prob(x, params), ("x", "params"), (1,),
                              ("log_prob",), keep_fp32=(0,)))
    return out


def _masked_conv_cases(cuda: bool) -> list[VerifyCase]:
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
            return _ops().masked_conv2d(x, weight, bias, mask_type=mtype, color_groups=groups)

        out.append(VerifyCase("masked_conv2d", f"x[{n},{cin},{h},{w}] {k}x{k} {mtype} groups={groups} ->{cout}",
                              make, call, ("x", "weight", "bias"), (0, 1, 2), ("y",)))
    return out


def _masked_linear_cases(cuda: bool) -> list[VerifyCase]:
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
                              lambda x, weight, mask, bias: _ops().masked_linear(x, weight, mask, bias),
                              ("x", "weight", "mask", "bias"), (0, 1, 3), ("y",)))
    return out


#: op name -> case builder; the keys are the names ``fastdensity verify --op`` accepts.
BUILDERS: dict[str, Callable[[bool], list[VerifyCase]]] = {
    "affine_coupling": _coupling_cases,
    "logsumexp": _logsumexp_cases,
    "gaussian_mixture_log_prob": lambda cuda: _mixture_cases("gaussian_mixture_log_prob", cuda),
    "logistic_mixture_log_prob": lambda cuda: _mixture_cases("logistic_mixture_log_prob", cuda),
    "dmol_log_prob": _dmol_cases,
    "masked_conv2d": _masked_conv_cases,
    "masked_linear": _masked_linear_cases,
}


def cases(device: torch.device, ops: Sequence[str] | None = None) -> list[VerifyCase]:
    """The cases of ``ops`` (all when None) for ``device``, round-robin over the ops: every op's first
    case, then every op's second, ... - a run cut short by a time limit has still checked every op."""
    unknown = sorted(set(ops or ()) - set(BUILDERS))
    if unknown:
        raise ValueError(f"unknown op {', '.join(unknown)}; choose from {', '.join(BUILDERS)}")
    per_op = [build(device.type == "cuda") for name, build in BUILDERS.items() if ops is None or name in ops]
    return [c for rank in itertools.zip_longest(*per_op) for c in rank if c is not None]


def dtypes_for(device: torch.device) -> list[torch.dtype]:
    if device.type == "cuda":
        half = [torch.bfloat16] if torch.cuda.is_bf16_supported() else []
        return [torch.float32, *half, torch.float16, torch.float64]
    return [torch.float32, torch.float64]


# ----------------------------------------------------------------------------------------------------
# Running one case
# ----------------------------------------------------------------------------------------------------


def _cast(case: VerifyCase, args: list, dtype: torch.dtype) -> list:
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            target = dtype
            if i in case.keep_fp32 and dtype in (torch.float16, torch.bfloat16):
                target = torch.float32
            a = a.to(target)
        out.append(a)
    return out


def _run(case: VerifyCase, args: list, backend: str, upstream: list[torch.Tensor] | None):
    """Outputs and gradients of ``sum(out * upstream)`` for the case's differentiable arguments."""
    leaves = [a.detach().clone().requires_grad_(i in case.grad_args) if isinstance(a, torch.Tensor) else a
              for i, a in enumerate(args)]
    with fastdensity.set_backend(backend):
        outs = case.call(*leaves)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    if upstream is None:
        # One random upstream per output, rounded to the output's dtype so every path sees the same values.
        upstream = [torch.randn(o.shape, dtype=torch.float64).to(o.device).to(o.dtype).double() for o in outs]
    loss = sum((o.double() * u).sum() for o, u in zip(outs, upstream))
    targets = [leaves[i] for i in case.grad_args]
    grads = torch.autograd.grad(loss, targets, allow_unused=True)
    return [o.detach() for o in outs], list(grads), upstream


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def check(case: VerifyCase, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Outcome:
    """Kernel vs eager vs float64 reference for one case and dtype, by the rule of DESIGN.md §6."""
    outcome = Outcome(case, dtype)
    ops = _ops()
    if not callable(getattr(ops, case.op, None)):
        outcome.skipped = f"fastdensity.ops.{case.op} is not in this build"
        return outcome
    # Whatever goes wrong fails this case and only this one (out of memory for the inputs, a kernel
    # that raises, outputs of the wrong shape, ...): the other cases still run and report.
    stage = "making the inputs"
    try:
        torch.manual_seed(seed)
        rounded = _cast(case, case.make(device), dtype)
        stage = "kernel"
        torch.manual_seed(seed + 1)
        with poisoned_outputs(True):
            k_outs, k_grads, upstream = _run(case, rounded, "triton", None)
        stage = "reference"
        e_outs, e_grads, _ = _run(case, rounded, "reference", upstream)
        as64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in rounded]
        r_outs, r_grads, _ = _run(case, as64, "reference", upstream)
        stage = "comparison"
        _compare_all(outcome, k_outs, k_grads, e_outs, e_grads, r_outs, r_grads)
    except Exception as exc:
        outcome.error = f"{stage}: {_first_line(exc)}"
    return outcome


def _compare_all(outcome: Outcome, k_outs, k_grads, e_outs, e_grads, r_outs, r_grads) -> None:
    """Apply the rule to every output and every gradient, appending to ``outcome.comparisons``."""
    case = outcome.case
    if len(k_outs) != len(r_outs):
        raise ValueError(f"the kernel path returned {len(k_outs)} outputs, the reference {len(r_outs)}")
    for name, k, e, r in zip(case.out_names, k_outs, e_outs, r_outs):
        outcome.comparisons.append(compare(name, k, e, r))
    for i, k, e, r in zip(case.grad_args, k_grads, e_grads, r_grads):
        name = f"grad {case.arg_names[i]}"
        if r is None and k is None:
            continue
        if k is None or e is None or r is None:
            missing = "kernel" if k is None else ("eager" if e is None else "reference")
            outcome.comparisons.append(Comparison(name, outcome.dtype, float("nan"), float("nan"), float("nan"),
                                                  False, f"no gradient from the {missing} path"))
            continue
        outcome.comparisons.append(compare(name, k, e, r))


def verify(device: torch.device, ops: Sequence[str] | None = None, dtypes: Sequence[torch.dtype] | None = None,
           on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Every case of ``ops`` (all when None) in every dtype of ``dtypes`` (the device's when None);
    ``on_outcome`` sees each result as soon as it is known (the command prints it at once)."""
    outcomes = []
    for case in cases(device, ops):
        for dtype in dtypes or dtypes_for(device):
            outcomes.append(check(case, dtype, device))
            if on_outcome:
                on_outcome(outcomes[-1])
    return outcomes


HEADER = ("op", "case", "dtype", "quantity", "kernel err", "eager err", "bound", "verdict")
_WIDTHS = (25, 36, 8, 15, 10, 10, 9)


def format_row(cells: Sequence[str]) -> str:
    """Cells in fixed-width columns (a longer cell just pushes the rest right), so rows print one by one."""
    return "  ".join(f"{c:<{w}}" for c, w in zip(cells, _WIDTHS)) + "  " + cells[-1]


def format_rule() -> str:
    return format_row(tuple("-" * w for w in _WIDTHS) + ("-" * len(HEADER[-1]),))


def outcome_rows(o: Outcome) -> list[tuple[str, ...]]:
    """One row per comparison (or one saying why there is none)."""
    base = (o.case.op, o.case.label, str(o.dtype).replace("torch.", ""))
    if o.skipped:
        return [(*base, "-", "-", "-", "-", f"skipped: {o.skipped}")]
    rows = [(*base, "-", "-", "-", "-", f"FAIL: {o.error}")] if o.error else []
    for c in o.comparisons:
        rows.append((*base, c.name, f"{c.kernel_err:.2e}", f"{c.eager_err:.2e}", f"{c.bound:.2e}",
                     "ok" if c.passed else f"FAIL: {c.why}"))
    return rows


def format_table(outcomes: Sequence[Outcome]) -> str:
    """The kernel's and eager's max error against float64 per output and gradient, the bound, the verdict."""
    lines = [format_row(HEADER), format_rule()]
    lines += [format_row(r) for o in outcomes for r in outcome_rows(o)]
    return "\n".join(lines)
