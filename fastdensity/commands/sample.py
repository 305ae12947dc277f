"""``fastdensity sample``: draw samples from a trained checkpoint into a PNG or a .npy file.

``fastdensity sample runs/maf-digits -n 64 --out digits.png``. Samples are in the data's own space:
real values for continuous data, integer levels (uint8 when they fit) for discrete data.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pt, or the run directory holding it")
    parser.add_argument("-n", "--num-samples", type=int, default=64, help="how many samples")
    parser.add_argument("--out", required=True, metavar="FILE.png|FILE.npy", help="where to write them")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the draw")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")


def run(args: argparse.Namespace) -> int:
    try:
        path = sample_checkpoint(args.checkpoint, args.num_samples, args.out, seed=args.seed, device=args.device)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"fastdensity sample: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.num_samples} samples to {path}")
    return 0


def sample_checkpoint(checkpoint: str, num_samples: int, out: str, *, seed: int = 0, device: str = "auto") -> str:
    """Draw ``num_samples`` from ``checkpoint`` and write them to ``out`` (.png or .npy); returns ``out``."""
    import os

    import numpy as np
    import torch

    from fastdensity import train as ftrain

    if num_samples < 1:
        raise ValueError(f"-n must be >= 1; got {num_samples}")
    ext = os.path.splitext(out)[1].lower()
    if ext not in (".png", ".npy"):
        raise ValueError(f"--out must end in .png or .npy; got {out!r}")
    ckpt = ftrain.load_checkpoint(checkpoint)
    model, preprocess = ftrain.model_from_checkpoint(ckpt, ftrain.resolve_device(device))
    torch.manual_seed(seed)
    samples = ftrain.draw_samples(model, preprocess, num_samples)
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    if ext == ".npy":
        array = samples.numpy()
        if not samples.is_floating_point():
            levels = ckpt["data"].get("levels") or 0
            array = array.astype(np.uint8 if 0 < levels <= 256 else np.int32)
        with open(out, "wb") as f:  # a file object: np.save would append ".npy" to a name ending in ".NPY"
            np.save(f, array, allow_pickle=False)
    else:
        ftrain.save_samples_png(samples, out, title=f"{model.name} samples ({ckpt['data']['name']})")
    return out
