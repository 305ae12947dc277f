"""Fast exact samplers for the autoregressive models: cached PixelCNN, incremental MADE / MAF.

An autoregressive model samples one variable at a time. The naive sampler reruns the whole network
per variable (PixelCNN: H * W passes; MAF: D MADE passes per transform). The samplers here compute
every activation once, so a whole sample costs about one network pass of arithmetic, in as many
small sequential steps as there are variables:

* :mod:`.pixelcnn_cache` - PixelCNN, each masked conv's activations cached and extended one
  position per pixel;
* :mod:`.made_incremental` - MADE-based transforms (MAF's affine, the autoregressive spline), each
  hidden unit computed once, degree block by degree block.

They return what the naive samplers return from the same seed (module docstrings give the exactness
each one guarantees). Progress of the sequential loops: :mod:`.progress`.

No sampling kernel (yet). The steps are plain PyTorch because their cost is not arithmetic: measured on
the 2-core CPU (one thread, 2026-12-03), the default PixelCNN at 28 x 28 spends 545 us per pixel step
at batch 1, 676 us at batch 16 and 870 us at batch 64 - about 80 % of a batch-16 step is per-op
overhead that does not grow with the batch, so a kernel computing one masked-conv output position
would save little; the incremental MADE step is likewise ~27 small tensor ops per feature. What would
help is fewer launches per step (one fused step kernel, or a CUDA graph of the step), which only a GPU
run can weigh: the harness's ``sample_*`` rows (benchmarks/bench_sampling.py) are the measurement to
decide it by.
"""
from __future__ import annotations

from .made_incremental import (MADE_METHODS, affine_autoregressive_inverse, autoregressive_inverse,
                               autoregressive_method, incremental_made_inverse, sample_autoregressive,
                               spline_autoregressive_inverse)
from .pixelcnn_cache import sample_cached
from .pixelcnn_reference import draw_pixel, sample_naive, sample_window
from .progress import reporting, tick

__all__ = ["PIXELCNN_METHODS", "MADE_METHODS", "sample_pixelcnn", "sample_cached", "sample_naive", "sample_window",
           "draw_pixel", "incremental_made_inverse", "affine_autoregressive_inverse", "spline_autoregressive_inverse",
           "autoregressive_inverse", "autoregressive_method", "sample_autoregressive", "sequential_steps",
           "reporting", "tick"]

#: PixelCNN's samplers by ``method`` name; the first is the default.
PIXELCNN_METHODS = {"cached": sample_cached, "naive": sample_naive, "window": sample_window}


def sample_pixelcnn(model, num_samples: int, method: str = "cached") -> "torch.Tensor":  # noqa: F821
    """``num_samples`` images from a PixelCNN with the sampler named ``method`` (:data:`PIXELCNN_METHODS`):
    ``"cached"`` (default; each activation once), ``"naive"`` (H * W full passes, the reference) or
    ``"window"`` (H * W passes over each pixel's exact window)."""
    if method not in PIXELCNN_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, PIXELCNN_METHODS))}; got {method!r}")
    return PIXELCNN_METHODS[method](model, num_samples)


def sequential_steps(model) -> int:
    """How many sequential steps (:func:`tick` calls) one ``model.sample`` call makes with the default
    sampler: H * W for a PixelCNN, D per MADE-based transform of a flow, 0 for a model that samples in
    one go."""
    from ..nn.made import MADE

    if getattr(model, "name", None) == "pixelcnn":
        return model.shape[1] * model.shape[2]
    return sum(m.features for m in model.modules() if isinstance(m, MADE))
