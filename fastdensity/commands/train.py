"""``fastdensity train``: fit a density model by maximum likelihood and write its results.

With no arguments it trains RealNVP on the 2-D checkerboard density for 3000 steps (about a minute
of one core's time; longer when the machine is busy) and prints the test NLL beside the true NLL of
the data and the KL gap between them. Writes to ``--out`` (default ``runs/MODEL-DATA``):
``metrics.json``, ``checkpoint.pt``, ``log.jsonl``, ``samples.png`` and, for 2-D data,
``density.png`` (the learned density beside the data). The same command under
``torchrun --nproc_per_node=N`` trains with DistributedDataParallel.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

MODELS = ("realnvp", "glow", "maf", "pixelcnn", "gmm")
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
    parser.add_argument("--lr", type=float, default=None, help="peak Adam learning rate (default: 2e-3 for the 2-D "
                                                                "densities, 1e-3 otherwise)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--out", default=None, metavar="DIR", help="output directory (default runs/MODEL-DATA)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint (model, data and settings come from "
                             "the checkpoint; --steps may extend it)")
    parser.add_argument("--seed", type=int, default=None, help="seed of initial weights, batches and noise "
                                                                "(default 0)")
    parser.add_argument("--set", dest="model_args", type=_key_value, action="append", default=None,
                        metavar="KEY=VALUE", help="model option, repeatable, e.g. --set hidden=64 --set num_layers=8")
    parser.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default steps/10)")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="checkpoint every N steps (default: as --eval-every)")
    parser.add_argument("--grad-clip", type=float, default=None, help="gradient-norm clip (default 10)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up (default 100)")
    parser.add_argument("--weight-decay", type=float, default=None, help="Adam's L2 weight decay (default 0)")
    parser.add_argument("--logit-alpha", type=float, default=None,
                        help="alpha of the logit after dequantization, for continuous models on discrete data; "
                             "0 for no logit (default 0.01)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: 1 for low-dimensional data, else half the cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plots", action="store_true", help="no PNGs")
    parser.add_argument("--json", action="store_true", help="print the final metrics as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from fastdensity.train import TrainConfig, TrainingDiverged, train

    model = args.model or DEFAULT_MODEL
    data = args.data or DEFAULT_DATA
    config = TrainConfig(model=model, data=data)
    if args.resume:
        # --model and --data only locate the default --out directory; the rest would change the run.
        given = [f"--{n.replace('_', '-')}" for n in ("batch_size", "lr", "seed", "model_args", "grad_clip",
                                                      "warmup_steps", "logit_alpha", "weight_decay")
                 if getattr(args, n) is not None]
        if given:
            print(f"fastdensity train: error: --resume continues with the settings stored in the checkpoint; "
                  f"{', '.join(given)} cannot change (only --steps, --device, --eval-every, --checkpoint-every)",
                  file=sys.stderr)
            return 2
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                 "eval_every": args.eval_every, "checkpoint_every": args.checkpoint_every,
                 "grad_clip": args.grad_clip, "warmup_steps": args.warmup_steps, "logit_alpha": args.logit_alpha,
                 "weight_decay": args.weight_decay}
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    config.device = args.device
    config.threads = args.threads
    config.out = args.out or default_out(model, data)
    config.model_args = dict(args.model_args or [])
    try:
        metrics = train(config, resume=args.resume, progress=not args.no_progress, plots=not args.no_plots)
    except TrainingDiverged as exc:
        print(f"fastdensity train: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"fastdensity train: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(metrics, indent=2))
    return 0
