"""Maximum-likelihood training: Adam, gradient clipping, a warm-up + cosine learning rate, checkpoints.

The objective is the mean negative log-likelihood per example in nats (for discrete data, with the
dequantization Jacobian included; see :mod:`fastdensity.data`), reported also in bits/dim.

Reproducibility, and ``resume``
    Everything random in step ``s`` is a pure function of ``(seed, s)``: the examples of the global
    batch come from a per-epoch permutation seeded by ``(seed, epoch)``, the dequantization noise from a
    generator seeded by ``(seed, s)``. A checkpoint holds the model, the optimizer state, the step, the
    torch RNG states and the run's configuration, so a run resumed from the checkpoint of step ``k``
    computes exactly the steps ``k+1..`` that the uninterrupted run computes: the final parameters are
    bit-for-bit the same (the tests check this against a run killed with SIGKILL).

Checkpoints
    ``OUT/checkpoint.pt`` is written every ``checkpoint_every`` steps and at the end, atomically: to a
    temporary file in the same directory, flushed to disk, then renamed over the old one, so a kill at
    any moment leaves either the previous checkpoint or the new one. They contain only tensors, numbers,
    strings, lists and dicts, and are read back with ``torch.load(..., weights_only=True)``.

Non-finite loss
    A NaN or infinite loss (or gradient norm) stops the run before the optimizer applies it, with a
    message naming the step; the last checkpoint, written from finite parameters, is kept.

Distributed
    Under ``torchrun --nproc_per_node=N`` (``WORLD_SIZE`` > 1 in the environment) the model trains with
    DistributedDataParallel, NCCL on GPUs and gloo on CPUs. ``batch_size`` is the *global* batch: rank r
    takes its contiguous share of the same global batch a single process would use, so N processes
    follow the single-process run up to floating-point summation order. Only rank 0 prints, logs and
    writes files.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from . import data as fdata
from .models import MODELS, DensityModel, build_model

__all__ = ["TrainConfig", "TrainingDiverged", "train", "evaluate", "load_checkpoint", "model_from_checkpoint",
           "initial_model", "resolve_device", "save_samples_png", "save_density_png", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "fastdensity-checkpoint-1"

#: The dequantization noise that scores a split is seeded by the run's seed plus this offset, in training
#: and in ``fastdensity evaluate`` alike, so that evaluating a checkpoint reproduces the reported figures.
EVAL_SEED_OFFSET = {"valid": 1, "test": 2, "train": 3}


class TrainingDiverged(RuntimeError):
    """The loss or gradient became non-finite; the message names the step and the kept checkpoint."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in its checkpoints as a plain dict).

    ``None`` means "the default for this data": see :func:`resolve_defaults`.
    """

    model: str = "realnvp"
    data: str = "checkerboard"
    steps: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    warmup_steps: int = 100
    grad_clip: float = 10.0
    weight_decay: float = 0.0
    seed: int = 0
    split_seed: int = 0
    eval_every: Optional[int] = None
    checkpoint_every: Optional[int] = None
    device: str = "auto"
    out: Optional[str] = None
    model_args: dict = field(default_factory=dict)
    logit_alpha: Optional[float] = 0.01
    num_samples: Optional[int] = None
    threads: Optional[int] = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def resolve_defaults(config: TrainConfig, data: fdata.Data) -> TrainConfig:
    """Fill the ``None`` fields of ``config`` for ``data`` (returns a new config).

    2-D densities: 3000 steps of 512 at lr 2e-3 (the budget the quality bars are measured with).
    Images: 2000 steps of 64 at lr 1e-3. Other vectors: 3000 steps of 256 at lr 1e-3.
    """
    c = TrainConfig.from_dict(config.to_dict())
    two_d = data.density is not None
    steps, batch, lr = (3000, 512, 2e-3) if two_d else (2000, 64, 1e-3) if data.is_image else (3000, 256, 1e-3)
    c.steps = steps if c.steps is None else int(c.steps)
    c.batch_size = batch if c.batch_size is None else int(c.batch_size)
    c.lr = lr if c.lr is None else float(c.lr)
    c.eval_every = max(1, c.steps // 10) if c.eval_every is None else int(c.eval_every)
    c.checkpoint_every = c.eval_every if c.checkpoint_every is None else int(c.checkpoint_every)
    c.num_samples = (2000 if not data.is_image else 64) if c.num_samples is None else int(c.num_samples)
    if c.out is None:
        c.out = os.path.join("runs", f"{c.model}-{data.name}")
    for name in ("steps", "batch_size", "eval_every", "checkpoint_every"):
        if getattr(c, name) < 1:
            raise ValueError(f"{name} must be >= 1; got {getattr(c, name)}")
    if c.lr <= 0:
        raise ValueError(f"lr must be > 0; got {c.lr}")
    return c


# ---------------------------------------------------------------------------------------------------
# Pieces: the preprocessing a model needs, deterministic batches, the learning rate
# ---------------------------------------------------------------------------------------------------


def preprocess_for(model: DensityModel, data: fdata.Data, logit_alpha: float) -> fdata.Preprocess:
    """Identity for continuous data and for discrete models; dequantization (+ logit) otherwise."""
    if data.kind == "discrete" and not model.discrete:
        return fdata.Dequantize(data.levels, logit_alpha or None)  # alpha 0 (or None): no logit
    if data.kind == "continuous" and model.discrete:
        raise ValueError(f"{model.name} models discrete data; {data.name} is continuous")
    return fdata.Identity()


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64-style mixing): nearby inputs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class Batches:
    """Indices of the examples in global step ``s``: a pure function of ``(seed, s)``.

    Examples are visited epoch by epoch, each epoch in its own permutation seeded by ``(seed, epoch)``;
    a batch may straddle two epochs.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.clear()
            self._cache[epoch] = torch.randperm(self.n, generator=torch.Generator().manual_seed(_mix(self.seed, epoch)))
        return self._cache[epoch]

    def indices(self, step: int) -> torch.Tensor:
        out, pos, end = [], step * self.batch_size, (step + 1) * self.batch_size
        while pos < end:
            epoch, offset = divmod(pos, self.n)
            take = min(end - pos, self.n - offset)
            out.append(self._perm(epoch)[offset:offset + take])
            pos += take
        return torch.cat(out)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``steps``."""
    warm = min(config.warmup_steps, max(config.steps - 1, 0))
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(config.steps - warm, 1)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ---------------------------------------------------------------------------------------------------
# Distributed helpers (all no-ops in a single process)
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def _setup_distributed(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
        owns = True
    return _Dist(rank=rank, world=world, local_rank=local, owns_group=owns)


def resolve_device(device: str, local_rank: Optional[int] = None) -> torch.device:
    """The ``torch.device`` for ``--device`` (``auto``: CUDA when available, else CPU).

    ``local_rank`` (a distributed run) picks ``cuda:local_rank`` for a plain ``cuda``. A name PyTorch
    does not know, or CUDA where there is none, is a ValueError that says what to use instead.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name PyTorch knows; use auto, cpu, cuda or cuda:N") \
            from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
        if dev.index is None and local_rank is not None:
            dev = torch.device("cuda", local_rank)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} was asked for but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    return dev


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------


def _atomic_write(path: str, write) -> None:
    """``write(file_object)`` into a temporary file next to ``path``, fsync, then rename over ``path``.

    A kill at any moment leaves the old file or the new one, never a mixture; a failing ``write``
    leaves the old one and no temporary file. The temporary file is created like ``open(path, "wb")``
    would create ``path``, mode 0o666 less the umask (``tempfile.mkstemp`` would make it 0o600, and the
    renamed checkpoint, metrics and PNGs unreadable to anyone else). The directory is fsynced after the
    rename so that the new name, not only the new bytes, survives a power cut.
    """
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    while True:
        tmp = os.path.join(directory, f".tmp-{os.path.basename(path)}-{os.urandom(6).hex()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:  # another writer's temporary name: draw again
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Flush a directory's entries to disk (POSIX); best effort, as some file systems refuse it."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _save_checkpoint(path, *, config, model, optimizer, step, data, preprocess, elapsed, train_nll):
    state = {
        "format": FORMAT,
        "config": config.to_dict(),
        "model": {"name": model.name, "args": dict(model.config)},
        "data": data.spec(),
        "preprocess": preprocess.config(),
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": int(step),
        "elapsed": float(elapsed),
        "train_nll_ema": None if train_nll is None else float(train_nll),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    _atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by :func:`train` (``weights_only=True``: no code is unpickled)."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path!r} is not a readable fastdensity checkpoint: {type(exc).__name__}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a fastdensity checkpoint (format {FORMAT!r})")
    return ckpt


def model_from_checkpoint(ckpt: dict, device="cpu") -> tuple[DensityModel, fdata.Preprocess]:
    """The trained model (in eval mode, on ``device``) and its preprocessing, from a loaded checkpoint."""
    spec = ckpt["model"]
    model = build_model(spec["name"], **spec["args"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), fdata.make_preprocess(ckpt["preprocess"])


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


class _Objective(nn.Module):
    """Per-example NLL in data units: ``-(log q(y) + log|dy/dx|)``; the module DDP wraps."""

    def __init__(self, model: DensityModel):
        super().__init__()
        self.model = model

    def forward(self, y: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
        return -(self.model.log_prob(y) + logdet)


def _eval_batch_size(data: fdata.Data) -> int:
    return 256 if data.is_image else 8192


@torch.no_grad()
def evaluate(model: DensityModel, x: torch.Tensor, data: fdata.Data, preprocess: fdata.Preprocess, *,
             device="cpu", seed: int = 0, _dist: Optional[_Dist] = None) -> dict:
    """NLL of ``model`` on the examples ``x`` (a split of ``data``): mean, standard error, bits/dim.

    Dequantization noise is drawn from a generator seeded by ``seed``, so the figure is reproducible.
    For the 2-D densities it adds the paired KL gap ``mean(log p - log q)`` and its standard error.
    Under DDP each rank scores its share of ``x`` and the sums are all-reduced.
    """
    d = _dist or _Dist()
    was_training = model.training
    model.eval()
    n = x.shape[0]
    lo, hi = n * d.rank // d.world, n * (d.rank + 1) // d.world
    sums = torch.zeros(5, dtype=torch.float64)  # count, sum nll, sum nll^2, sum gap, sum gap^2
    bs = _eval_batch_size(data)
    g = torch.Generator().manual_seed(_mix(seed, 0xE7A1))
    for start in range(0, n, bs):
        chunk = x[start:start + bs]
        # Draw noise for every chunk on every rank (same stream whatever the world size), use our rows.
        y, logdet = preprocess.encode(chunk, g)
        a, b = max(lo - start, 0), min(hi - start, chunk.shape[0])
        if a >= b:
            continue
        nll = -(model.log_prob(y[a:b].to(device)) + logdet[a:b].to(device)).double().cpu()
        sums[0] += nll.numel()
        sums[1] += nll.sum()
        sums[2] += nll.pow(2).sum()
        if data.density is not None:
            gap = data.density.log_prob(chunk[a:b].double()) + nll
            sums[3] += gap.sum()
            sums[4] += gap.pow(2).sum()
    model.train(was_training)
    if d.world > 1:
        sums = d.all_sum(sums.to(device)).cpu()
    count = sums[0].item()

    def mean_se(s, s2):
        mean = s / count
        var = max(s2 / count - mean * mean, 0.0) * count / max(count - 1, 1)
        return mean, math.sqrt(var / count)

    nll_mean, nll_se = mean_se(sums[1].item(), sums[2].item())
    out = {"nll": nll_mean, "nll_stderr": nll_se, "bits_per_dim": fdata.bits_per_dim(nll_mean, data.dim),
           "examples": int(count)}
    if data.density is not None:
        out["kl_gap"], out["kl_gap_stderr"] = mean_se(sums[3].item(), sums[4].item())
    return out


def check_data_matches(model: DensityModel, preprocess: fdata.Preprocess, data: fdata.Data) -> None:
    """ValueError unless ``data`` is the kind of data ``model`` (with ``preprocess``) was trained on."""
    if tuple(data.shape) != tuple(model.shape):
        raise ValueError(f"the checkpoint's {model.name} models examples of shape {list(model.shape)}; "
                         f"{data.name} has shape {list(data.shape)}")
    trained_discrete = model.discrete or isinstance(preprocess, fdata.Dequantize)
    if trained_discrete != (data.kind == "discrete"):
        was, now = ("discrete", "continuous") if trained_discrete else ("continuous", "discrete")
        raise ValueError(f"the checkpoint's {model.name} was trained on {was} data; {data.name} is {now}")
    levels = model.config.get("levels") if model.discrete else getattr(preprocess, "levels", None)
    if levels is not None and data.levels != levels:
        raise ValueError(f"the checkpoint's {model.name} models {levels} levels; {data.name} has {data.levels}")


def nll_kind(model: DensityModel, data: fdata.Data) -> str:
    if data.kind == "continuous":
        return "differential NLL (nats per example)"
    if model.discrete:
        return "exact discrete NLL (nats per example)"
    return "dequantized NLL, an upper bound on the discrete NLL (nats per example)"


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def model_args_for(model_name: str, data: fdata.Data, model_args: dict) -> dict:
    """The keyword arguments to build ``model_name`` for ``data``: ``model_args`` plus what the data fixes
    (``levels`` for discrete models); raises ValueError when the model cannot model this data."""
    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose one of {', '.join(MODELS)}")
    cls = MODELS[model_name]
    if getattr(cls, "image_only", False) and not data.is_image:
        raise ValueError(f"{model_name} models images ([C, H, W] per example); {data.name} has shape "
                         f"{list(data.shape)} per example")
    args = dict(model_args)
    if cls.discrete:
        if data.kind != "discrete":
            raise ValueError(f"{model_name} models discrete data (integer levels, e.g. digits or a uint8 image "
                             f"file); {data.name} is continuous")
        if args.setdefault("levels", data.levels) != data.levels:
            raise ValueError(f"levels={args['levels']} does not match the data's {data.levels} levels")
    return args


def _set_cpu_threads(threads: Optional[int], data: fdata.Data) -> None:
    """CPU intra-op threads: ``threads`` when given; else 1 for low-dimensional data and half the cores
    otherwise.

    Measured on a shared 2-core machine: a second thread made a 2-D RealNVP step 14x slower (its
    512 x 128 matrices are too small to split, and the threads spin-wait on a busy core) and the digits
    models' steps 5-20x slower; one thread was never slower. Leaving half the cores free keeps that
    collapse away on bigger machines.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1; got {threads}")
        torch.set_num_threads(threads)
    elif data.dim <= 16:
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) // 2)))


def _log(msg: str, d: _Dist) -> None:
    if d.main:
        print(msg, file=sys.stderr, flush=True)


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True, plots: bool = True) -> dict:
    """Train ``config.model`` on ``config.data``; returns the metrics also written to ``OUT/metrics.json``.

    With ``resume=True`` the run continues from ``OUT/checkpoint.pt`` with the configuration stored
    there; only ``steps`` (to train longer), ``device``, ``eval_every`` and ``checkpoint_every`` are
    taken from ``config`` when set. Raises :class:`TrainingDiverged` on a non-finite loss.
    """
    d = _setup_distributed(config.device if config.device != "auto" else
                           ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    try:
        return _train(config, resume, progress and d.main, plots, d)
    finally:
        torch.set_num_threads(threads)  # the run's CPU thread choice does not outlive it
        if d.owns_group:
            dist.destroy_process_group()


def initial_model(config: TrainConfig, data: fdata.Data, model_args: dict, device="cpu", *,
                  initialize: bool = True) -> tuple[DensityModel, fdata.Preprocess]:
    """The model as training starts it (in training mode, on ``device``), and its preprocessing.

    Weights come from ``torch.manual_seed(config.seed)``, so every rank of a distributed run builds the
    same ones; with ``initialize`` the data-dependent initialisation (ActNorm statistics, k-means++)
    runs on a fixed batch of ``max(batch_size, 1024)`` training examples drawn from the seed, on
    ``device``. ``config`` must have its defaults resolved (:func:`resolve_defaults`).
    """
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.shape, **model_args).to(device)
    preprocess = preprocess_for(model, data, config.logit_alpha)
    if initialize:
        index = torch.randperm(data.train.shape[0], generator=torch.Generator().manual_seed(
            _mix(config.seed, 0x1517)))[:max(config.batch_size, 1024)]
        y0, _ = preprocess.encode(data.train[index], torch.Generator().manual_seed(_mix(config.seed, 0x1518)))
        model.initialize(y0.to(device))
    return model.train(), preprocess


def _log_lines_through(path: str, step: int) -> list[str]:
    """The lines of ``log.jsonl`` for steps <= ``step``; a line a crash cut short (it does not parse) is
    dropped rather than stopping the resume."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    return kept


def _train(config: TrainConfig, resume: bool, progress: bool, plots: bool, d: _Dist) -> dict:
    ckpt = None
    if resume:
        if config.out is None:
            raise ValueError("resume needs the run's output directory (--out DIR) to find its checkpoint")
        path = os.path.join(config.out, CHECKPOINT_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(f"cannot resume: no checkpoint at {path!r}")
        ckpt = load_checkpoint(path)
        stored = TrainConfig.from_dict(ckpt["config"])
        for name in ("steps", "eval_every", "checkpoint_every"):
            if getattr(config, name) is not None:
                setattr(stored, name, getattr(config, name))
        stored.device, stored.out, stored.threads = config.device, config.out, config.threads
        config = stored
    data = fdata.load_data(config.data, split_seed=config.split_seed)
    model_args = model_args_for(config.model, data, config.model_args)
    config = resolve_defaults(config, data)
    device = resolve_device(config.device, d.local_rank if d.world > 1 else None)
    if device.type == "cpu":
        _set_cpu_threads(config.threads, data)
    if config.batch_size % d.world:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the number of processes, {d.world}")

    model, preprocess = initial_model(config, data, model_args, device, initialize=ckpt is None)
    batches = Batches(data.train.shape[0], config.batch_size, config.seed)
    start_step, elapsed, smooth = 0, 0.0, None
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        start_step, elapsed, smooth = int(ckpt["step"]), float(ckpt["elapsed"]), ckpt.get("train_nll_ema")
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    objective = _Objective(model)
    if d.world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)

    out = config.out
    ckpt_path = os.path.join(out, CHECKPOINT_NAME)
    true = data.true_nll()
    if d.main:
        os.makedirs(out, exist_ok=True)
        where = f"{d.world} processes" if d.world > 1 else str(device)
        _log(f"fastdensity train: {config.model} ({model.num_parameters():,} parameters) on {data.name} "
             f"({data.kind}, shape {list(data.shape)}, {data.train.shape[0]:,} train / {data.valid.shape[0]:,} valid / "
             f"{data.test.shape[0]:,} test), {config.steps} steps of {config.batch_size} on {where}"
             + (f", resuming at step {start_step}" if start_step else ""), d)
        if true is not None:
            _log(f"  true NLL (entropy of {data.name}): {true[0]:.4f} +- {true[1]:.4f} nats", d)
    shard = slice(config.batch_size // d.world * d.rank, config.batch_size // d.world * (d.rank + 1))
    bar = _progress_bar(progress, start_step, config.steps)
    last_saved = start_step if ckpt is not None else None
    history_path = os.path.join(out, "log.jsonl")
    if d.main:
        ours = tuple(f".tmp-{n}-" for n in (CHECKPOINT_NAME, "metrics.json", "log.jsonl", "samples.png", "density.png"))
        for name in os.listdir(out):  # temporary files of our writes that a kill cut short
            if name.startswith(ours):
                os.remove(os.path.join(out, name))
    if ckpt is not None and d.main and os.path.exists(history_path):
        # A killed run may have logged evaluations past its last checkpoint; they are redone now.
        kept = _log_lines_through(history_path, start_step)
        _atomic_write(history_path, lambda f: f.write("".join(kept).encode()))
    valid_nll = None
    t0 = time.perf_counter()
    try:
        for step in range(start_step, config.steps):
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            xb = data.train[batches.indices(step)]
            y, logdet = preprocess.encode(xb, torch.Generator().manual_seed(_mix(config.seed, 1, step)))
            y, logdet = y[shard].to(device), logdet[shard].to(device)
            loss = objective(y, logdet).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            stats = d.all_sum(torch.stack([loss.detach().double(), grad_norm.detach().double()]).to(device)) / d.world
            loss_value, norm_value = stats.tolist()
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                kept = (f"the last good checkpoint (step {last_saved}) is kept at {ckpt_path}" if last_saved is not None
                        else "no checkpoint had been written yet")
                raise TrainingDiverged(
                    f"training stopped: the {what} became non-finite ({loss_value if what == 'loss' else norm_value}) "
                    f"at step {step + 1}; {kept}. Try a lower --lr or a smaller --grad-clip.")
            optimizer.step()
            done = step + 1
            smooth = loss_value if smooth is None else 0.98 * smooth + 0.02 * loss_value
            if bar is not None:
                bar.update(1)
                post = {"nll": f"{smooth:.4f}", "bpd": f"{fdata.bits_per_dim(smooth, data.dim):.3f}"}
                if valid_nll is not None:
                    post["valid"] = f"{valid_nll:.4f}"
                bar.set_postfix(post, refresh=False)
            if done % config.eval_every == 0 or done == config.steps:
                valid = evaluate(model, data.valid, data, preprocess, device=device,
                                 seed=config.seed + EVAL_SEED_OFFSET["valid"], _dist=d)
                valid_nll = valid["nll"]
                if d.main:
                    record = {"step": done, "train_nll": smooth, "valid_nll": valid_nll,
                              "valid_bits_per_dim": valid["bits_per_dim"], "lr": lr,
                              "seconds": elapsed + time.perf_counter() - t0}
                    if "kl_gap" in valid:
                        record["valid_kl_gap"] = valid["kl_gap"]
                    with open(history_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
            if done % config.checkpoint_every == 0 or done == config.steps:
                if d.main:
                    _save_checkpoint(ckpt_path, config=config, model=model, optimizer=optimizer, step=done, data=data,
                                     preprocess=preprocess, elapsed=elapsed + time.perf_counter() - t0,
                                     train_nll=smooth)
                last_saved = done
    finally:
        if bar is not None:
            bar.close()
    seconds = elapsed + time.perf_counter() - t0

    test = evaluate(model, data.test, data, preprocess, device=device, seed=config.seed + EVAL_SEED_OFFSET["test"],
                    _dist=d)
    metrics = {
        "model": config.model, "data": data.name, "test_nll": test["nll"], "test_nll_stderr": test["nll_stderr"],
        "bits_per_dim": test["bits_per_dim"], "nll_kind": nll_kind(model, data),
        "valid_nll": valid_nll, "steps": config.steps, "batch_size": config.batch_size,
        "seconds": seconds, "device": str(device) if d.world == 1 else f"{device.type} x{d.world}",
        "world_size": d.world, "num_parameters": model.num_parameters(), "dim": data.dim,
        "test_examples": test["examples"], "torch": torch.__version__,
    }
    if true is not None:
        metrics.update(true_nll=true[0], true_nll_stderr=true[1], kl_gap=test["kl_gap"],
                       kl_gap_stderr=test["kl_gap_stderr"])
    if data.kind == "discrete" and data.is_image:
        metrics["baseline_bits_per_dim"] = fdata.independent_pixel_baseline(data.train, data.test, data.levels)
    if d.main:
        _atomic_write(os.path.join(out, "metrics.json"),
                      lambda f: f.write((json.dumps(metrics, indent=2) + "\n").encode()))
        _log(_summary(metrics), d)
        if plots:
            _write_plots(model, data, preprocess, config, out, d)
    d.barrier()
    return metrics


def _progress_bar(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=0.5,
                file=sys.stderr)


def _summary(m: dict) -> str:
    lines = [f"test NLL {m['test_nll']:.4f} +- {m['test_nll_stderr']:.4f} nats ({m['nll_kind']}), "
             f"{m['bits_per_dim']:.4f} bits/dim, {m['steps']} steps in {m['seconds']:.1f} s on {m['device']}"]
    if "true_nll" in m:
        lines.append(f"true NLL {m['true_nll']:.4f} +- {m['true_nll_stderr']:.4f}; KL gap to the truth "
                     f"{m['kl_gap']:.4f} +- {m['kl_gap_stderr']:.4f} nats")
    if "baseline_bits_per_dim" in m:
        lines.append(f"independent-pixel baseline: {m['baseline_bits_per_dim']:.4f} bits/dim")
    return "\n".join(lines)


def _write_plots(model, data, preprocess, config, out, d):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _log("  (no PNGs: matplotlib is not installed; pip install \"fastdensity[plot]\")", d)
        return
    device = next(model.parameters()).device
    # The draw is seeded, and the global RNG streams (CPU and the model's GPU) are restored after it.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(_mix(config.seed, 0x5A3B))
        samples = draw_samples(model, preprocess, config.num_samples)
    save_samples_png(samples, os.path.join(out, "samples.png"), title=f"{config.model} samples ({data.name})")
    written = ["samples.png"]
    if data.density is not None or (not data.is_image and data.dim == 2):
        save_density_png(model, data, os.path.join(out, "density.png"), title=config.model)
        written.append("density.png")
    _log(f"  wrote {', '.join(os.path.join(out, w) for w in ['metrics.json', CHECKPOINT_NAME, *written])}", d)


# ---------------------------------------------------------------------------------------------------
# Samples and pictures
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def draw_samples(model: DensityModel, preprocess: fdata.Preprocess, n: int, batch_size: int = 4096) -> torch.Tensor:
    """``n`` samples in data space (CPU): decoded through the preprocessing (levels for discrete data)."""
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, n, batch_size):
        parts.append(preprocess.decode(model.sample(min(batch_size, n - start))).cpu())
    model.train(was_training)
    return torch.cat(parts) if parts else torch.empty(0)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("PNG output needs matplotlib: pip install \"fastdensity[plot]\"") from exc
    return plt


def save_samples_png(samples: torch.Tensor, path: str, title: str = "samples") -> None:
    """2-D samples as a scatter plot; images [N, C, H, W] as a grid (channels 1 or 3 shown as is)."""
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


def _save_fig(fig, path):
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


@torch.no_grad()
def save_density_png(model: DensityModel, data: fdata.Data, path: str, title: str = "model",
                     resolution: int = 200) -> None:
    """Data (test split) beside the learned density, and the true density when it is known."""
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
