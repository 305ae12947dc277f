"""Verification of every kernel against the float64 reference: the cases behind ``fastdensity verify``.

For each op, several shapes and each dtype the device supports, :func:`check` runs the op three
ways on the same (rounded) inputs - the Triton kernel, the reference in that dtype ("eager") and the
reference in float64 - and applies the tolerance rule (docs/design.md, Tests; :func:`fastdensity.testing.compare`) to
every output and to the gradient of every differentiable input, taken with one random upstream
gradient per output (a plain sum would hide sign and scaling errors). Kernel outputs start as NaN
(:func:`fastdensity.testing.poisoned_outputs`), so an element a kernel forgets to write fails.

On CUDA the shapes are realistic and the dtypes float32, bfloat16 (where supported), float16 and
float64. On a CPU the kernels run in Triton's interpreter - which must be chosen before fastdensity
is imported (``TRITON_INTERPRET=1``; ``fastdensity verify`` arranges it) - at tiny shapes, in float32
and float64 (the interpreter's bf16 arithmetic is not faithful; docs/design.md, Kernel checklist).

An op that is not in this build is reported as skipped; an op whose kernel cannot be loaded, or that
raises, fails.
"""
from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

import fastdensity
from fastdensity import op_table
from fastdensity.testing import Comparison, compare, poisoned_outputs

__all__ = ["VerifyCase", "Outcome", "dims", "public_ops", "builders", "cases", "dtypes_for", "check", "verify",
           "format_row", "format_rule", "outcome_rows", "format_table"]


@dataclass
class VerifyCase:
    """One public function at one shape. ``make(device)`` returns the arguments (floating tensors in
    float32, to be rounded to each dtype; other arguments as they are); ``call(*args)`` runs
    ``fastdensity.ops.<function>``. Each op's bench module builds its cases (``verify_cases(cuda)``)."""

    function: str
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


def dims(shape) -> str:
    """``[2,3,4]``: a shape as case labels write it."""
    return "[" + ",".join(map(str, shape)) + "]"


def public_ops():
    """``fastdensity.ops``, looked up at call time (so a test can remove or patch a function)."""
    from fastdensity import ops

    return ops


def builders() -> dict[str, Callable[[bool], list[VerifyCase]]]:
    """Op name -> its case builder ``verify_cases(cuda)``, from each op's bench module, in table order."""
    return {op.name: importlib.import_module(op.bench_module).verify_cases for op in op_table.OPS}


def cases(device: torch.device, ops: Sequence[str] | None = None) -> list[VerifyCase]:
    """The cases of ``ops`` (op names or their functions' names; all when None) for ``device``,
    round-robin over the ops: every op's first case, then every op's second, ... - a run cut short by
    a time limit has still checked every op."""
    wanted = op_table.resolve(list(ops) if ops is not None else None)
    per_op = [build(device.type == "cuda") for name, build in builders().items() if wanted is None or name in wanted]
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
    """Kernel vs eager vs float64 reference for one case and dtype, by the tolerance rule (docs/design.md, Tests)."""
    outcome = Outcome(case, dtype)
    if not callable(getattr(public_ops(), case.function, None)):
        outcome.skipped = f"fastdensity.ops.{case.function} is not in this build"
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


HEADER = ("function", "case", "dtype", "quantity", "kernel err", "eager err", "bound", "verdict")
_WIDTHS = (25, 36, 8, 15, 10, 10, 9)


def format_row(cells: Sequence[str]) -> str:
    """Cells in fixed-width columns (a longer cell just pushes the rest right), so rows print one by one."""
    return "  ".join(f"{c:<{w}}" for c, w in zip(cells, _WIDTHS)) + "  " + cells[-1]


def format_rule() -> str:
    return format_row(tuple("-" * w for w in _WIDTHS) + ("-" * len(HEADER[-1]),))


def outcome_rows(o: Outcome) -> list[tuple[str, ...]]:
    """One row per comparison (or one saying why there is none)."""
    base = (o.case.function, o.case.label, str(o.dtype).replace("torch.", ""))
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
