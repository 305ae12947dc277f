"""The op table: every fused op of fastdensity, declared once.

An op has one name, and that name finds all of it:

==========================================  ===============================================================
file                                        what it holds
==========================================  ===============================================================
``kernels/<name>.py``                       the Triton kernels, launchers and ``torch.library`` registration
                                            (installed as ``fastdensity.kernels.<name>``)
``fastdensity/reference/<name>.py``         the pure-PyTorch ground truth, also the CPU path
``tests/test_<name>.py``                    its tests in every tier
``benchmarks/bench_<name>.py``              ``cases(settings)``: its benchmark cases; ``verify_cases(cuda)``:
                                            the shapes ``fastdensity verify`` checks
==========================================  ===============================================================

plus its public function(s) in ``fastdensity/ops.py`` and its entry in :data:`OPS` below. Everything
else derives from this table: which kernel modules are imported (and so which ``torch.ops.fastdensity``
ops exist), ``fastdensity.ops.__all__``, the ops ``fastdensity verify --op`` and ``fastdensity bench
--op`` accept, their help texts, and README's op table (``fastdensity info --ops --readme README.md`` rewrites it between
its markers). ``tests/test_op_table.py`` fails when an op lacks one of
its files, functions or its entry. CONTRIBUTING.md walks through adding one.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["OpSpec", "OPS", "BY_NAME", "names", "public_functions", "resolve", "markdown_table",
           "update_readme", "README_BEGIN", "README_END"]


@dataclass(frozen=True)
class OpSpec:
    """One op. ``name`` names its four files and is what ``verify --op`` / ``bench --op`` accept."""

    name: str
    #: its public functions in ``fastdensity.ops`` (``verify --op`` accepts these too, as aliases)
    functions: tuple[str, ...]
    #: one or two sentences for README's op table: what it computes and what the kernel saves
    summary: str
    #: other kernel modules that only this op's kernel module imports (kept beside it in ``kernels/``)
    kernel_parts: tuple[str, ...] = ()

    @property
    def kernel_module(self) -> str:
        return f"fastdensity.kernels.{self.name}"

    @property
    def reference_module(self) -> str:
        return f"fastdensity.reference.{self.name}"

    @property
    def bench_module(self) -> str:
        return f"fastdensity.benchmarks.bench_{self.name}"

    def files(self) -> dict[str, str]:
        """The op's four files, relative to the source checkout's root."""
        return {"kernel": f"kernels/{self.name}.py", "reference": f"fastdensity/reference/{self.name}.py",
                "test": f"tests/test_{self.name}.py", "bench": f"benchmarks/bench_{self.name}.py"}


OPS: tuple[OpSpec, ...] = (
    OpSpec("coupling", ("affine_coupling",),
           "y = x·s + shift with s from `\"sigmoid\"` (σ(h+2)+1e-3, Glow/nflows), `\"exp\"`, `\"softclamp\"` "
           "(exp(c·tanh(h/c))) or `\"additive\"`, and the per-sample log-det Σ log s, in one pass; shift and "
           "scale are read in place from strided views of the conditioner output"),
    OpSpec("logsumexp", ("logsumexp",),
           "drop-in for `torch.logsumexp` over any dim, one pass with a running max; ±inf and NaN as torch"),
    OpSpec("mixture", ("gaussian_mixture_log_prob", "logistic_mixture_log_prob"),
           "diagonal Gaussian or continuous logistic mixture log-likelihood, x [..., D], logits [..., K], "
           "means/log_scales [..., K, D], parameters shared, per sample or broadcast; online log-sum-exp "
           "over K, no [B, K, D] tensor stored",
           kernel_parts=("mixture_shared",)),
    OpSpec("dmol", ("dmol_log_prob",),
           "PixelCNN++'s discretized mixture of logistics (10K channels RGB, 3K one channel; its clamps, edge "
           "bins and 1e-5 fallback), log-likelihood in nats, forward and backward in one pass each"),
    OpSpec("masked_conv", ("masked_conv2d",),
           "PixelCNN-masked convolution (types A/B, colour groups) as an implicit GEMM over the live taps "
           "only; on CUDA a cached autotune picks the fastest of the kernel, cuDNN on the masked weight and "
           "a PixelCNN++-style split"),
    OpSpec("masked_linear", ("masked_linear",),
           "x @ (W ⊙ M)ᵀ + b skipping all-zero mask tiles (MADE's block-triangular masks); the weight "
           "gradient is exactly 0 under the mask"),
    OpSpec("spline", ("rational_quadratic_spline",),
           "monotonic rational-quadratic spline on [−B, B] with identity tails (neural spline flows), "
           "forward or inverse, in nflows' or zuko's parameterisation (equal to each to float64 round-off); "
           "one pass per element from the raw widths, heights and derivatives read in place, log-det "
           "per sample or per element"),
)

BY_NAME: dict[str, OpSpec] = {op.name: op for op in OPS}


def names() -> list[str]:
    """The op names, in table order."""
    return [op.name for op in OPS]


def public_functions() -> list[str]:
    """Every public function of every op, in table order: ``fastdensity.ops.__all__``."""
    return [f for op in OPS for f in op.functions]


def resolve(requested: list[str] | None) -> list[str] | None:
    """Op names for a command's ``--op`` list, which may give op names or their functions' names.

    None stays None (all ops). An unknown name is a ``ValueError`` that lists the choices.
    """
    if requested is None:
        return None
    by_function = {f: op.name for op in OPS for f in op.functions}
    out, unknown = [], []
    for r in requested:
        name = r if r in BY_NAME else by_function.get(r)
        if name is None:
            unknown.append(r)
        elif name not in out:
            out.append(name)
    if unknown:
        raise ValueError(f"unknown op {', '.join(unknown)}; choose from {', '.join(names())} "
                         f"(or a function name: {', '.join(by_function)})")
    return out


# ------------------------------------------------------------------------------------------------------
# README's op table, generated
# ------------------------------------------------------------------------------------------------------

README_BEGIN = "<!-- fastdensity-ops:begin -->"
README_END = "<!-- fastdensity-ops:end -->"


def _signature(function: str) -> str:
    """``name(arg, ..., *, kw=default, ...)`` of a public op, defaults shown as written in ops.py."""
    from fastdensity import ops

    params = []
    star = False
    for p in inspect.signature(getattr(ops, function)).parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            params.append("*")
            star = True
        params.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return f"{function}({', '.join(params)})"


def markdown_table() -> str:
    """README's op table: one row per public function, with what it does and where its kernel lives."""
    lines = ["| op | function | what | kernel |", "|---|---|---|---|"]
    for op in OPS:
        for i, function in enumerate(op.functions):
            what = op.summary if i == 0 else "the same, " + function.replace("_log_prob", "").replace("_", " ")
            lines.append(f"| `{op.name}` | `{_signature(function)}` | {what} | `kernels/{op.name}.py` |")
    return "\n".join(lines)


def update_readme(path: str | Path) -> bool:
    """Rewrite the op table between README's markers; True when the file changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{path} has no op-table markers {README_BEGIN} ... {README_END}")
    new = pattern.sub(lambda _: f"{README_BEGIN}\n{markdown_table()}\n{README_END}", text)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text

