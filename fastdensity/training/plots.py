"""Pictures of a model: samples (a scatter plot, or an image grid) and, for 2-D data, the learned density
beside the data and the true density. PNGs, written atomically; matplotlib (``fastdensity[plot]``)
is imported only when a picture is drawn.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from .. import data as fdata
from ..atomic_io import atomic_write
from ..models import DensityModel
from .conditioning import label_context, sample_labels
from .config import TrainConfig
from .seeds import SAMPLES, mix_seed

__all__ = ["SAMPLES_NAME", "DENSITY_NAME", "draw_samples", "save_samples_png", "save_density_png",
           "write_run_plots"]

SAMPLES_NAME = "samples.png"
DENSITY_NAME = "density.png"


@torch.no_grad()
def draw_samples(model: DensityModel, preprocess: fdata.Preprocess, n: int, batch_size: int = 4096,
                 labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``n`` samples [n, *shape] in data space (CPU): decoded through the preprocessing (levels for
    discrete data). Draws from the global RNG, in batches of ``batch_size``. A class-conditional model
    takes ``labels`` [n]: sample i is drawn given class ``labels[i]``."""
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        if labels is None:
            drawn = model.sample(size)
        else:  # one sample per label: [size, 1, *shape] -> [size, *shape]
            drawn = model.sample(1, context=label_context(model, labels[start:start + size])).squeeze(1)
        parts.append(preprocess.decode(drawn).cpu())
    model.train(was_training)
    return torch.cat(parts) if parts else torch.empty(0)


def write_run_plots(model: DensityModel, data: fdata.Data, preprocess: fdata.Preprocess, config: TrainConfig,
                    out: str) -> Optional[list[str]]:
    """A run's pictures in ``out``: ``samples.png`` of ``config.num_samples`` seeded samples, and
    ``density.png`` for 2-D data. Returns the names written; None when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    device = next(model.parameters()).device
    # The draw is seeded, and the global RNG streams (CPU and the model's GPU) are restored after it.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(mix_seed(config.seed, SAMPLES))
        labels = sample_labels(config.num_samples, data.num_classes) if config.conditional else None
        samples = draw_samples(model, preprocess, config.num_samples, labels=labels)
    title = f"{config.model} samples ({data.name}{', class by class' if config.conditional else ''})"
    save_samples_png(samples, os.path.join(out, SAMPLES_NAME), title=title)
    written = [SAMPLES_NAME]
    if data.density is not None or (not data.is_image and data.dim == 2):
        save_density_png(model, data, os.path.join(out, DENSITY_NAME), title=config.model)
        written.append(DENSITY_NAME)
    return written


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("PNG output needs matplotlib: pip install \"fastdensity[plot]\"") from exc
    return plt


def _save_fig(fig, path: str) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def save_samples_png(samples: torch.Tensor, path: str, title: str = "samples") -> None:
    """2-D samples [N, 2] as a scatter plot ([N, 1]: a histogram); images [N, C, H, W] as a grid with
    one pixel of border, scaled to [0, 1] together (channels 1 or 3 shown as is, others: the first)."""
    plt = _pyplot()
    s = samples.detach().cpu()
    if s.dim() == 2:
        fig, ax = plt.subplots(figsize=(5, 5))
        if s.shape[1] >= 2:
            ax.scatter(s[:, 0].numpy(), s[:, 1].numpy(), s=2, alpha=0.5)
            ax.set_aspect("equal")
        else:
            ax.hist(s[:, 0].numpy(), bins=100)
        ax.set_title(title)
    else:
        n = s.shape[0]
        cols = max(1, math.ceil(math.sqrt(n)))
        rows = math.ceil(n / cols)
        img = s.float()
        img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)
        if img.shape[1] not in (1, 3):
            img = img[:, :1]
        c, h, w = img.shape[1:]
        grid = torch.ones(c, rows * (h + 1) + 1, cols * (w + 1) + 1)
        for k in range(n):
            r, q = divmod(k, cols)
            grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = img[k]
        fig, ax = plt.subplots(figsize=(max(3, cols * 0.6), max(3, rows * 0.6)))
        ax.imshow(grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy(), cmap="gray" if c == 1 else None,
                  interpolation="nearest")
        ax.axis("off")
        ax.set_title(title)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


@torch.no_grad()
def save_density_png(model: DensityModel, data: fdata.Data, path: str, title: str = "model",
                     resolution: int = 200) -> None:
    """Data (test split) beside the learned density ``q`` on a ``resolution``² grid spanning the data's
    0.1-99.9 % quantiles plus a margin of 0.5, and the true density when it is known."""
    plt = _pyplot()
    x = data.test
    lo = torch.quantile(x, 0.001, dim=0) - 0.5
    hi = torch.quantile(x, 0.999, dim=0) + 0.5
    gx = torch.linspace(lo[0].item(), hi[0].item(), resolution)
    gy = torch.linspace(lo[1].item(), hi[1].item(), resolution)
    X, Y = torch.meshgrid(gx, gy, indexing="xy")
    grid = torch.stack([X.flatten(), Y.flatten()], dim=1)
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    dev = param.device if param is not None else "cpu"
    q = torch.cat([model.log_prob(g.to(dev)).exp().cpu() for g in grid.split(8192)]).view(resolution, resolution)
    model.train(was_training)
    panels = [("data (test split)", None)]
    if data.density is not None:
        panels.append(("true density", data.density.log_prob(grid.double()).exp().view(resolution, resolution)))
    panels.append((f"{title} density", q))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    extent = [gx[0].item(), gx[-1].item(), gy[0].item(), gy[-1].item()]
    for ax, (name, z) in zip(axes, panels):
        if z is None:
            ax.hist2d(x[:, 0].numpy(), x[:, 1].numpy(), bins=resolution // 3, range=[extent[:2], extent[2:]],
                      cmap="viridis")
        else:
            ax.imshow(z.numpy(), origin="lower", extent=extent, cmap="viridis", aspect="auto")
        ax.set_title(name)
        ax.set_aspect("equal")
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
