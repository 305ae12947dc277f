"""What a run tells its user on stderr (rank 0 only): the opening lines, a progress bar, the final
metrics dict and its summary; and :func:`standard_json`, how every record it writes becomes JSON."""
from __future__ import annotations

import json
import math
import sys
from typing import Optional

import torch

from .. import data as fdata
from ..models import DensityModel
from .config import TrainConfig
from .distributed import World
from .evaluation import nll_kind

__all__ = ["log", "run_header", "ProgressBar", "run_metrics", "summary", "json_ready", "standard_json"]


def json_ready(record: dict) -> dict:
    """``record`` (a flat dict of numbers, strings, None) for JSON: each NaN or infinite float becomes None
    (``null``), and a ``"non_finite"`` entry lists those keys, so the value's absence is said, not hidden.
    Python's ``json`` would otherwise write ``NaN``/``Infinity``, which standard JSON readers refuse."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return dict(record)
    out = {k: (None if k in bad else v) for k, v in record.items()}
    out["non_finite"] = bad
    return out


def standard_json(record: dict, indent: Optional[int] = None) -> str:
    """``record`` as standard JSON text (:func:`json_ready`; ``allow_nan=False`` makes any other stray
    non-finite number an error rather than invalid output)."""
    return json.dumps(json_ready(record), indent=indent, allow_nan=False)


def log(msg: str, world: World) -> None:
    if world.main:
        print(msg, file=sys.stderr, flush=True)


def run_header(config: TrainConfig, model: DensityModel, data: fdata.Data, device: torch.device, world: World,
               start_step: int) -> str:
    """What is trained on what, where, and (with the data's entropy known) the NLL to aim for."""
    where = f"{world.size} processes" if world.size > 1 else str(device)
    line = (f"fastdensity train: {config.model} ({model.num_parameters():,} parameters) on {data.name} "
            f"({data.kind}, shape {list(data.shape)}, {data.train.shape[0]:,} train / {data.valid.shape[0]:,} valid / "
            f"{data.test.shape[0]:,} test), {config.steps} steps of {config.batch_size} on {where}"
            + (f", resuming at step {start_step}" if start_step else ""))
    if config.conditional:
        line += f"\n  class-conditional: p(x | label) over {data.num_classes} classes"
    true = data.true_nll()
    if true is not None:
        line += f"\n  true NLL (entropy of {data.name}): {true[0]:.4f} +- {true[1]:.4f} nats"
    return line


class ProgressBar:
    """A tqdm bar on stderr showing the smoothed training NLL, its bits/dim and the last validation NLL;
    does nothing when ``enabled`` is false (tqdm is imported only when it is true)."""

    def __init__(self, enabled: bool, start: int, total: int, dim: int):
        self.dim = dim
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                             mininterval=0.5, file=sys.stderr)

    def step(self, train_nll: float, valid_nll: Optional[float]) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        post = {"nll": f"{train_nll:.4f}", "bpd": f"{fdata.bits_per_dim(train_nll, self.dim):.3f}"}
        if valid_nll is not None:
            post["valid"] = f"{valid_nll:.4f}"
        self._bar.set_postfix(post, refresh=False)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


def run_metrics(config: TrainConfig, model: DensityModel, data: fdata.Data, test: dict, valid_nll: Optional[float],
                seconds: float, device: torch.device, world: World) -> dict:
    """The final metrics (``metrics.json``) from the test split's :func:`.evaluation.evaluate` result."""
    metrics = {
        "model": config.model, "data": data.name, "test_nll": test["nll"], "test_nll_stderr": test["nll_stderr"],
        "bits_per_dim": test["bits_per_dim"], "nll_kind": nll_kind(model, data),
        "valid_nll": valid_nll, "steps": config.steps, "batch_size": config.batch_size,
        "seconds": seconds, "device": str(device) if world.size == 1 else f"{device.type} x{world.size}",
        "world_size": world.size, "num_parameters": model.num_parameters(), "dim": data.dim,
        "test_examples": test["examples"], "torch": torch.__version__,
    }
    true = data.true_nll()
    if true is not None:
        metrics.update(true_nll=true[0], true_nll_stderr=true[1], kl_gap=test["kl_gap"],
                       kl_gap_stderr=test["kl_gap_stderr"])
    if data.kind == "discrete" and data.is_image:
        metrics["baseline_bits_per_dim"] = fdata.independent_pixel_baseline(data.train, data.test, data.levels)
    return metrics


def summary(m: dict) -> str:
    """The metrics in a few lines."""
    lines = [f"test NLL {m['test_nll']:.4f} +- {m['test_nll_stderr']:.4f} nats ({m['nll_kind']}), "
             f"{m['bits_per_dim']:.4f} bits/dim, {m['steps']} steps in {m['seconds']:.1f} s on {m['device']}"]
    if "true_nll" in m:
        lines.append(f"true NLL {m['true_nll']:.4f} +- {m['true_nll_stderr']:.4f}; KL gap to the truth "
                     f"{m['kl_gap']:.4f} +- {m['kl_gap_stderr']:.4f} nats")
    if "baseline_bits_per_dim" in m:
        lines.append(f"independent-pixel baseline: {m['baseline_bits_per_dim']:.4f} bits/dim")
    if not math.isfinite(m["test_nll"]):
        lines.append(f"warning: the test NLL is not finite ({m['test_nll']}): some test examples get zero or "
                     "non-finite density; metrics.json records it as null")
    return "\n".join(lines)

