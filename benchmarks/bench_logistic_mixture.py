"""Logistic mixture log-likelihood (continuous logistic components), per-sample and shared parameters.

Same layout, traffic model and shapes as ``bench_gaussian_mixture`` (its docstring has the formulas);
the component is ``log p = -u - log s - 2 softplus(-u)``, u = (x - mu) / s, s = exp(log_scales), so
each (row, component, dim) costs one exp and one log1p-like softplus more than the Gaussian.
Shapes: per-sample B=65536, K=16, D=32 and shared N=65536, K=256, D=64 on a GPU.
"""
from __future__ import annotations

from .bench_gaussian_mixture import mixture_cases
from .harness import Case, Settings

OP = "logistic_mixture"


def _lmm(x, logits, means, log_scales):
    from fastdensity import ops

    return ops.logistic_mixture_log_prob(x, logits, means, log_scales)


def cases(settings: Settings) -> list[Case]:
    if settings.cuda:
        per_sample, shared = [(65536, 16, 32)], ([] if settings.quick else [(65536, 256, 64)])
    elif settings.quick:
        per_sample, shared = [(2048, 8, 8)], []
    else:
        per_sample, shared = [(16384, 16, 32)], [(16384, 64, 32)]
    return mixture_cases(settings, "logistic_mixture_log_prob", _lmm, per_sample, shared)
