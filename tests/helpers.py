"""Helpers shared by the test modules: running an op on both backends and comparing values and grads."""
from __future__ import annotations

import pytest
import torch

import fastdensity

try:
    from fastdensity.kernels.utils import INTERPRETED
except ImportError:  # no Triton: neither the interpreter tier nor the GPU tier can run
    INTERPRETED = False

# The GPU tier tests the compiled kernels: it needs CUDA, and TRITON_INTERPRET unset (conftest.py leaves it
# unset on a CUDA machine). The interpreter tier forces backend "triton" on CPU tensors, which only Triton's
# interpreter runs; on a CUDA machine it is skipped unless the run sets TRITON_INTERPRET=1 (which in turn
# skips the GPU tier).
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRETED,
    reason="GPU tier: needs a CUDA device and compiled kernels (TRITON_INTERPRET unset)")
requires_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="interpreter tier: the kernels are compiled here (run with TRITON_INTERPRET=1)")


def leaves(*tensors):
    """Detached copies of ``tensors`` that require grad (None passes through)."""
    return [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def run_op(fn, args, grad_leaves, upstream, backend: str):
    """``fn(*args)`` under ``backend``: returns (outputs, grads of sum(out * upstream) w.r.t. grad_leaves).

    A random ``upstream`` per output checks every output's gradient path at once (a plain sum would
    hide sign and scaling errors); outputs that are not floating point carry no gradient.
    """
    with fastdensity.set_backend(backend):
        outs = fn(*args)
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    loss = sum((o.double() * u.double()).sum() for o, u in zip(outs, upstream) if o.is_floating_point())
    grads = torch.autograd.grad(loss, grad_leaves, allow_unused=True) if grad_leaves else ()
    return [o.detach() for o in outs], list(grads)


def assert_kernel_matches_reference(fn, make_inputs, *, rtol=None, atol=None):
    """Kernel (backend 'triton') and reference agree on every output and every leaf's gradient.

    ``make_inputs()`` returns ``(args, grad_leaves)`` built from fresh leaves on each call, so that
    strided views (``h[:, 0::2]``) can be passed as arguments while gradients land in their base.
    """
    r_args, r_leaves = make_inputs()
    with fastdensity.set_backend("reference"), torch.no_grad():
        probe = fn(*r_args)
    probe = tuple(probe) if isinstance(probe, (tuple, list)) else (probe,)
    upstream = [torch.randn(o.shape, dtype=torch.float64, device=o.device) for o in probe]
    r_outs, r_grads = run_op(fn, r_args, r_leaves, upstream, "reference")
    k_args, k_leaves = make_inputs()
    k_outs, k_grads = run_op(fn, k_args, k_leaves, upstream, "triton")
    for i, (k, r) in enumerate(zip(k_outs, r_outs)):
        assert k.dtype == r.dtype, f"output {i}: dtype {k.dtype} != reference {r.dtype}"
        assert k.shape == r.shape, f"output {i}: shape {tuple(k.shape)} != reference {tuple(r.shape)}"
        torch.testing.assert_close(k, r, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"output {i}: {m}")
    for i, (k, r) in enumerate(zip(k_grads, r_grads)):
        assert (k is None) == (r is None), f"leaf {i}: gradient present in one path only"
        if r is not None:
            torch.testing.assert_close(k, r, rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda m: f"gradient of leaf {i}: {m}")


def assert_compiles_like_reference(loss_fn, inputs, params, *, backend: str = "inductor", rtol=None, atol=None):
    """``torch.compile(loss_fn, fullgraph=True)`` with the kernels (backend "triton") gives the eager
    reference's loss and gradients w.r.t. ``params``: no graph break, and the registered fake/autograd
    implementations agree with the real ones. ``backend="aot_eager"`` traces forward and backward as
    Inductor does, in a fraction of Inductor's CPU compile time."""
    torch._dynamo.reset()
    params = list(params)
    with fastdensity.set_backend("triton"):
        loss_c = torch.compile(loss_fn, fullgraph=True, backend=backend)(*inputs)
        grads_c = torch.autograd.grad(loss_c, params)
    with fastdensity.set_backend("reference"):
        loss_r = loss_fn(*inputs)
        grads_r = torch.autograd.grad(loss_r, params)
    torch.testing.assert_close(loss_c, loss_r, rtol=rtol, atol=atol)
    for i, (gc, gr) in enumerate(zip(grads_c, grads_r)):
        torch.testing.assert_close(gc, gr, rtol=rtol, atol=atol, msg=lambda m: f"gradient of parameter {i}: {m}")


class StopTraining(Exception):
    """Raised from inside the training loop by :func:`stop_training_at`: a run cut short, like a kill."""


def stop_training_at(patch, step: int) -> None:
    """Make the loss of training step ``step`` (1-based) raise :class:`StopTraining`, through ``patch`` (a
    ``monkeypatch`` or its ``context()``)."""
    from fastdensity.training import loop

    forward, calls = loop.Objective.forward, {"n": 0}

    def stopping(self, y, logdet, context=None):
        calls["n"] += 1
        if calls["n"] == step:
            raise StopTraining
        return forward(self, y, logdet, context)

    patch.setattr(loop.Objective, "forward", stopping)
