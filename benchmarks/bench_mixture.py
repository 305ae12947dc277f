"""Mixture log-likelihoods (``gaussian_mixture_log_prob`` and ``logistic_mixture_log_prob``), per-sample
parameters and shared parameters.

``log p(x) = logsumexp_k [log_softmax(logits)_k + sum_d log N(x_d | mu_kd, exp(log_scales_kd))]``,
x [B, D], logits [B, K] or [K], means and log_scales [B, K, D] or [K, D]; out [B].

Minimum traffic, with P the elements of all inputs as stored (x plus the parameters: B(K + 2KD) when
per-sample, K + 2KD when shared), G the elements that receive gradients (the parameters; x is data
here, as in density estimation and mixture density networks), e bytes per element and o = 4 bytes
per output (fp32 log-likelihood; 8 for fp64):

    forward             read every input once, write out                 P e + B o
    backward            read gy and every input, write the gradients     B o + P e + G e
    forward + backward                                                   the sum

Per-sample flops ~ 6 B K D (forward) + ~10 B K D (backward), plus B K D exps: memory-bound.
Shared flops ~ 4 N K D as two matmuls (x^2 against the precisions, x against mean * precision) plus
N K exps: compute-bound on the tensor cores for large K and D.

Shapes: per-sample B=65536, K=16, D=32; shared N=1,048,576, K=256, D=64 (eager PyTorch
materialises [N, K, D] there - 64 GiB in fp32 - and is expected to run out of memory on one GPU, so
N=65536 is measured too). fp32 and bf16 on a GPU.

The logistic mixture has the same layout and traffic; its component is ``log p = -u - log s -
2 softplus(-u)``, u = (x - mu) / s, s = exp(log_scales), so each (row, component, dim) costs one exp and
one log1p-like softplus more than the Gaussian. Shapes: per-sample B=65536, K=16, D=32 and shared
N=65536, K=256, D=64 on a GPU.
"""
from __future__ import annotations

import torch

from fastdensity.verify import VerifyCase

from .harness import Case, Settings, element_size, op_providers, op_unavailable, randn, traffic

OP = "mixture"


def _gmm(x, logits, means, log_scales):
    from fastdensity import ops

    return ops.gaussian_mixture_log_prob(x, logits, means, log_scales)


def _lmm(x, logits, means, log_scales):
    from fastdensity import ops

    return ops.logistic_mixture_log_prob(x, logits, means, log_scales)


def mixture_case(settings: Settings, op: str, fn, kernel: str, batch: int, k: int, d: int, dtype,
                 shared: bool) -> Case:
    """One mixture case (used by the Gaussian and the logistic benchmarks alike)."""
    lead = () if shared else (batch,)

    def make_inputs():
        x = randn((batch, d), settings, dtype, grad=False, scale=2.0)
        logits = randn((*lead, k), settings, dtype)
        means = randn((*lead, k, d), settings, dtype, scale=2.0)
        log_scales = randn((*lead, k, d), settings, dtype, scale=0.3)
        return x, logits, means, log_scales

    e = element_size(dtype)
    o = 8 if dtype == torch.float64 else 4
    params = (1 if shared else batch) * (k + 2 * k * d)
    p = batch * d + params
    fwd = p * e + batch * o
    bwd = batch * o + p * e + params * e
    kind = "shared" if shared else "per-sample"
    return Case(
        op=op,
        shape=f"{kind} B={batch} K={k} D={d}",
        dtype=dtype,
        make_inputs=make_inputs,
        providers=op_providers(fn, settings.device, kernel),
        min_bytes=traffic(fwd, bwd),
        unavailable=op_unavailable(op),
    )


def mixture_cases(settings: Settings, op: str, fn, per_sample, shared) -> list[Case]:
    """Cases of one mixture op for (B, K, D) shapes with per-sample and with shared parameters, in
    fp32 and bf16 on a GPU, fp32 on CPU."""
    dtypes = settings.pick_dtypes([torch.float32, torch.bfloat16] if settings.cuda else [torch.float32])
    out = [mixture_case(settings, op, fn, "mixture", *s, dtype, False) for dtype in dtypes for s in per_sample]
    return out + [mixture_case(settings, op, fn, "mixture", *s, dtype, True) for dtype in dtypes for s in shared]


def _gaussian_shapes(settings: Settings):
    if settings.cuda:
        shared = [(65536, 256, 64)] if settings.quick else [(1048576, 256, 64), (65536, 256, 64)]
        return [(65536, 16, 32)], shared
    if settings.quick:
        return [(2048, 8, 8)], [(4096, 32, 16)]
    return [(16384, 16, 32)], [(16384, 64, 32)]


def _logistic_shapes(settings: Settings):
    if settings.cuda:
        return [(65536, 16, 32)], ([] if settings.quick else [(65536, 256, 64)])
    if settings.quick:
        return [(2048, 8, 8)], []
    return [(16384, 16, 32)], [(16384, 64, 32)]


def cases(settings: Settings) -> list[Case]:
    return (mixture_cases(settings, "gaussian_mixture_log_prob", _gmm, *_gaussian_shapes(settings))
            + mixture_cases(settings, "logistic_mixture_log_prob", _lmm, *_logistic_shapes(settings)))


def _verify_cases_of(function: str, call, cuda: bool) -> list[VerifyCase]:
    # (B, K, D, shared parameters?); on CPU K*D = 512 reaches the shared-parameter kernel
    shapes = ([(4096, 16, 32, False), (8192, 256, 64, True), (1000, 7, 5, True)] if cuda
              else [(5, 3, 4, False), (7, 5, 3, True), (6, 64, 8, True)])
    out = []
    for b, k, d, shared in shapes:
        def make(device, b=b, k=k, d=d, shared=shared):
            lead = () if shared else (b,)
            return [2 * torch.randn(b, d, device=device), torch.randn(*lead, k, device=device),
                    2 * torch.randn(*lead, k, d, device=device), 0.3 * torch.randn(*lead, k, d, device=device)]

        kind = "shared" if shared else "per-sample"
        out.append(VerifyCase(function, f"{kind} B={b} K={k} D={d}", make, call,
                              ("x", "logits", "means", "log_scales"), (0, 1, 2, 3), ("log_prob",)))
    return out


def verify_cases(cuda: bool) -> list[VerifyCase]:
    """Both mixtures at each shape, alternating, so a run cut short has checked both."""
    gaussian = _verify_cases_of("gaussian_mixture_log_prob", _gmm, cuda)
    logistic = _verify_cases_of("logistic_mixture_log_prob", _lmm, cuda)
    return [c for pair in zip(gaussian, logistic) for c in pair]
