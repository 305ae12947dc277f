"""``fastdensity train``: fit a density model by maximum likelihood and write its results.

With no arguments it trains RealNVP on the 2-D checkerboard density for 3000 steps (about a minute
of one core's time; longer when the machine is busy) and prints the test NLL beside the true NLL of
the data and the KL gap between them. Writes to ``--out`` (default ``runs/MODEL-DATA``):
``metrics.json``, ``checkpoint.pt`` (and the one before it, ``checkpoint.prev.pt``), ``log.jsonl``,
``samples.png`` and, for 2-D data, ``density.png`` (the learned density beside the data), holding the
folder's lock (``.lock``) while it runs. The same command under ``torchrun --nproc_per_node=N`` trains
with DistributedDataParallel.

Errors are one line on stderr: exit status 2 when the run could not start (bad settings, data or
checkpoint, a folder in use), 1 when it stopped (a non-finite loss, a full disk, out of memory).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

MODELS = ("realnvp", "glow", "maf", "nsf", "pixelcnn", "gmm", "tarflow")
OPTIMIZERS = ("adam", "adamw")  # spelled out, like MODELS, so that --help imports no torch
DEFAULT_MODEL = "realnvp"
DEFAULT_DATA = "checkerboard"


def _key_value(text: str):
    """``KEY=VALUE`` with VALUE read as JSON when it parses (numbers, true/false, lists), else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. hidden=64); got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def default_out(model: str, data: str) -> str:
    name = os.path.splitext(os.path.basename(data))[0] if data.endswith((".npy", ".npz")) else data
    return os.path.join("runs", f"{model}-{name}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODELS, default=None,
                        help=f"model family (default {DEFAULT_MODEL})")
    parser.add_argument("--data", default=None, metavar="NAME|FILE",
                        help=f"8gaussians, checkerboard, moons, rings, digits, or a .npy/.npz file "
                             f"(default {DEFAULT_DATA})")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 2000 for images, "
                                                                  "3000 otherwise)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch size (default: 512 for the "
                                                                       "2-D densities, 64 for images, 256 otherwise)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-3 for the 2-D "
                                                                "densities, 1e-3 otherwise)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--out", default=None, metavar="DIR", help="output directory (default runs/MODEL-DATA)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint (model, data and settings come from "
                             "the checkpoint; --steps may extend it, re-planning the cosine schedule over the new "
                             "total)")
    parser.add_argument("--seed", type=int, default=None, help="seed of initial weights, batches and noise, "
                                                                "in [0, 2**63) (default 0)")
    parser.add_argument("--set", dest="model_args", type=_key_value, action="append", default=None,
                        metavar="KEY=VALUE", help="model option, repeatable, e.g. --set hidden=64 --set num_layers=8")
    parser.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default steps/10)")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="checkpoint every N steps (default: as --eval-every)")
    parser.add_argument("--grad-clip", type=float, default=None,
                        help="gradient-norm clip, > 0 (default 10; inf: no clipping)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up (default 100)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                        help="adam (default) or adamw (decoupled weight decay); with --resume it must be the "
                             "checkpoint's")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="weight decay: an L2 penalty for adam, decoupled decay for adamw (default: 0 for adam, "
                             "0.01 for adamw)")
    parser.add_argument("--logit-alpha", type=float, default=None,
                        help="alpha of the logit after dequantization, for continuous models on discrete data; "
                             "0 for no logit (default 0.01)")
    parser.add_argument("--conditional", action="store_true",
                        help="train p(x | class label) on data with labels (digits; a .npz with 'labels' beside its "
                             "array, or 'train_labels', ... beside 'train'); models: tarflow (num_classes), maf and "
                             "nsf (a one-hot context_features), realnvp and glow on vectors")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: 1 for low-dimensional data, else half the cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plots", action="store_true", help="no PNGs")
    parser.add_argument("--json", action="store_true", help="print the final metrics as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from fastdensity.training import TrainConfig, TrainingDiverged, train

    model = args.model or DEFAULT_MODEL
    data = args.data or DEFAULT_DATA
    config = TrainConfig(model=model, data=data)
    if args.resume:
        # --model and --data only locate the default --out directory; the rest would change the run.
        given = [f"--{n.replace('_', '-')}" for n in ("batch_size", "lr", "seed", "model_args", "grad_clip",
                                                      "warmup_steps", "logit_alpha", "weight_decay")
                 if getattr(args, n) is not None] + (["--conditional"] if args.conditional else [])
        if given:
            print(f"fastdensity train: error: --resume continues with the settings stored in the checkpoint; "
                  f"{', '.join(given)} cannot change (only --steps, --device, --eval-every, --checkpoint-every)",
                  file=sys.stderr)
            return 2
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                 "eval_every": args.eval_every, "checkpoint_every": args.checkpoint_every,
                 "grad_clip": args.grad_clip, "warmup_steps": args.warmup_steps, "logit_alpha": args.logit_alpha,
                 "weight_decay": args.weight_decay, "optimizer": args.optimizer}
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    config.device = args.device
    config.threads = args.threads
    config.out = args.out or default_out(model, data)
    config.model_args = dict(args.model_args or [])
    config.conditional = bool(args.conditional)
    try:
        metrics = train(config, resume=args.resume, progress=not args.no_progress, plots=not args.no_plots)
    except Exception as exc:
        code, message = failure(exc)
        if code is None:
            raise
        print(f"fastdensity train: {message}", file=sys.stderr)
        return code
    if args.json:
        from fastdensity.training import standard_json

        print(standard_json(metrics, indent=2))
    return 0


def one_line(exc: BaseException) -> str:
    """An error's message on one line (a message that spans lines has them joined)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def failure(exc: BaseException) -> tuple[int | None, str]:
    """``(exit status, one-line message)`` for an error a run reports without a traceback; ``(None, "")`` for
    a bug, which keeps its traceback.

    2: the run could not start (bad settings or data, a folder in use, a damaged checkpoint).
    1: it started and stopped (a non-finite loss, a full disk, another rank's failure, out of memory).
    """
    import torch

    from fastdensity.training import OutputFolderInUse, RankZeroFailed, TrainingDiverged

    if isinstance(exc, TrainingDiverged):
        return 1, one_line(exc)
    if isinstance(exc, (ValueError, FileNotFoundError, ImportError, OutputFolderInUse)):
        return 2, f"error: {one_line(exc)}"
    if isinstance(exc, (OSError, RankZeroFailed)):  # a full disk (DiskFull), a folder we may not write...
        return 1, f"error: {one_line(exc)}"
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return 1, f"error: out of memory: {one_line(exc)}"
    return None, ""
