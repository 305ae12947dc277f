"""The model as a run starts it, and the preprocessing between data space and model space.

Preprocessing: identity for continuous data and for discrete models (which score the integer levels
directly); for a continuous model of discrete data, uniform dequantization ``y = (x + u) / levels`` with
``u ~ U[0, 1)``, then ``logit(alpha + (1 - 2 alpha) y)`` unless ``logit_alpha`` is 0 (see
:class:`fastdensity.data.Dequantize`; its log-Jacobian is part of the NLL).
"""
from __future__ import annotations

import re

import torch

from .. import data as fdata
from ..atomic_io import format_bytes
from ..models import DensityModel, build_model
from .conditioning import label_context
from .config import TrainConfig
from .seeds import INIT_BATCH, INIT_NOISE, generator

__all__ = ["preprocess_for", "initial_model"]


def preprocess_for(model: DensityModel, data: fdata.Data, logit_alpha: float) -> fdata.Preprocess:
    """Identity for continuous data and for discrete models; dequantization (+ logit) otherwise."""
    if data.kind == "discrete" and not model.discrete:
        return fdata.Dequantize(data.levels, logit_alpha or None)  # alpha 0 (or None): no logit
    if data.kind == "continuous" and model.discrete:
        raise ValueError(f"{model.name} models discrete data; {data.name} is continuous")
    return fdata.Identity()


def initial_model(config: TrainConfig, data: fdata.Data, model_args: dict, device="cpu", *,
                  initialize: bool = True) -> tuple[DensityModel, fdata.Preprocess]:
    """The model as training starts it (in training mode, on ``device``), and its preprocessing.

    Weights come from ``torch.manual_seed(config.seed)``, so every rank of a distributed run builds the
    same ones; with ``initialize`` the data-dependent initialisation (ActNorm statistics, k-means++)
    runs on a fixed batch of ``max(batch_size, 1024)`` training examples drawn from the seed, on
    ``device``. ``config`` must have its defaults resolved (:func:`.config.resolve_defaults`).
    """
    torch.manual_seed(config.seed)
    try:
        model = build_model(config.model, data.shape, **model_args).to(device)
    except (MemoryError, RuntimeError) as exc:
        raise _allocation_error(exc, config.model, model_args, device) from None
    preprocess = preprocess_for(model, data, config.logit_alpha)
    if initialize:
        index = torch.randperm(data.train.shape[0], generator=generator(config.seed, INIT_BATCH))
        index = index[:max(config.batch_size, 1024)]
        y0, _ = preprocess.encode(data.train[index], generator(config.seed, INIT_NOISE))
        if config.conditional:
            model.initialize(y0.to(device), label_context(model, data.split_labels("train")[index]))
        else:
            model.initialize(y0.to(device))
    return model.train(), preprocess


def _allocation_error(exc: BaseException, name: str, model_args: dict, device) -> BaseException:
    """A one-line ValueError for a model too big to allocate (``exc`` unchanged for any other failure).

    :func:`fastdensity.models.build_model` refuses sizes past the machine's memory before allocating; this
    catches what still fails: the memory in use by others, a GPU's smaller memory, the allocator's limits."""
    message = str(exc)
    if not (isinstance(exc, MemoryError) or "allocate" in message or "out of memory" in message):
        return exc
    options = ", ".join(f"{k}={v!r}" for k, v in model_args.items()) or "its default options"
    tried = re.search(r"(?:tried to allocate|Tried to allocate) ([0-9.]+) ?(bytes|[KMGT]iB)", message)
    size = ""
    if tried:
        scale = {"bytes": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30, "TiB": 2 ** 40}[tried.group(2)]
        size = f": one of its tensors alone needs {format_bytes(float(tried.group(1)) * scale)}"
    return ValueError(f"{name} with {options} does not fit in the memory available on {device}{size}; "
                      "choose smaller sizes")
