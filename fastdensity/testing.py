"""Checking a fast path against the reference: the tolerance rule of the GPU tier, made reusable.

The tolerance rule (docs/design.md, Tests): a kernel's output in dtype ``d`` passes when

    max |kernel - ref64|  <=  2 * max |torch_d - ref64|  +  atol_d

where ``ref64`` is the reference evaluated in float64 on the same (rounded) inputs and ``torch_d`` is
the reference evaluated in ``d`` itself, i.e. what eager PyTorch would have given the user. The kernel
may be at most twice as far from the truth as eager PyTorch already is, plus a small floor ``atol_d``
for the case where eager happens to be exact. NaN must appear exactly where ``ref64`` has NaN and
infinities must match. Used by the test tiers and by ``fastdensity verify``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["ATOL", "Comparison", "compare", "poisoned_outputs"]

#: Floors of the rule per dtype. fp32/fp64: a few ulps of O(1) values; fp16/bf16: about one ulp at 1
#: (2^-10 and 2^-7), because half-precision outputs are rounded on store whatever the compute dtype.
ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


@dataclass
class Comparison:
    """Outcome of one comparison: the kernel's error, the eager error, the bound and the verdict."""

    name: str
    dtype: torch.dtype
    kernel_err: float
    eager_err: float
    bound: float
    passed: bool
    why: str = ""

    def __str__(self) -> str:
        verdict = "ok" if self.passed else f"FAIL {self.why}".rstrip()
        return (f"{self.name:<24} {str(self.dtype).replace('torch.', ''):<9} kernel {self.kernel_err:.2e}  "
                f"eager {self.eager_err:.2e}  bound {self.bound:.2e}  {verdict}")


def _special_mismatch(a: torch.Tensor, ref: torch.Tensor) -> str:
    if not torch.equal(torch.isnan(a), torch.isnan(ref)):
        return "NaN where the reference is not (or the reverse)"
    inf = torch.isinf(ref)
    if not torch.equal(torch.isinf(a), inf) or not torch.equal(a[inf], ref[inf]):
        return "infinities differ from the reference"
    return ""


def _max_abs_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| over the elements where both are finite (0 when there are none)."""
    both = torch.isfinite(a) & torch.isfinite(ref)
    diff = torch.where(both, (a - ref).abs(), torch.zeros((), dtype=a.dtype, device=a.device))
    return diff.max().item() if diff.numel() else 0.0


def compare(name: str, kernel: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor,
            atol: float | None = None) -> Comparison:
    """Apply the rule to one output (values or a gradient). Shapes must match."""
    if kernel.shape != ref64.shape or eager.shape != ref64.shape:
        raise ValueError(f"{name}: shapes differ: kernel {tuple(kernel.shape)}, eager {tuple(eager.shape)}, "
                         f"reference {tuple(ref64.shape)}")
    dtype = kernel.dtype
    # In float64 on the kernel's device: copying 10^8-element gradients to the host costs seconds.
    device = kernel.device
    k, e, r = (t.detach().to(device=device, dtype=torch.float64) for t in (kernel, eager, ref64))
    why = _special_mismatch(k, r)
    k_err = _max_abs_diff(k, r)
    e_err = _max_abs_diff(e, r)
    bound = 2.0 * e_err + (ATOL.get(dtype, 1e-5) if atol is None else atol)
    if not why and k_err > bound:
        why = f"error {k_err:.3e} > bound {bound:.3e}"
    return Comparison(name, dtype, k_err, e_err, bound, not why, why)


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    """Within the block, every buffer a kernel launcher allocates starts as NaN (see kernels.utils)."""
    from fastdensity.kernels import utils

    previous = utils.POISON_OUTPUTS
    utils.POISON_OUTPUTS = enabled
    try:
        yield
    finally:
        utils.POISON_OUTPUTS = previous
