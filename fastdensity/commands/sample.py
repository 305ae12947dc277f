"""``fastdensity sample``: draw samples from a trained checkpoint into a PNG or a .npy file.

``fastdensity sample runs/maf-digits -n 64 --out digits.png``. Samples are in the data's own space:
real values for continuous data, integer levels (uint8 when they fit) for discrete data; a .png is a
grid of them. Autoregressive models sample with their fast exact samplers (:mod:`fastdensity.sampling`:
cached PixelCNN, incremental MADE), and on a terminal a progress bar counts the sequential steps -
pixels for PixelCNN, features (per autoregressive transform) for MAF and autoregressive NSF.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

#: samples drawn per ``model.sample`` call (each call runs the sampler's sequential loop once)
DRAW_BATCH = 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pt, or the run directory holding it")
    parser.add_argument("-n", "--num-samples", type=int, default=64, help="how many samples")
    parser.add_argument("--out", required=True, metavar="FILE.png|FILE.npy", help="where to write them")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the draw")
    parser.add_argument("--label", type=int, default=None, metavar="K",
                        help="class of every sample, for a checkpoint trained with --conditional (default: the "
                             "samples spread over all classes, class by class)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (shown only on a terminal anyway)")


def run(args: argparse.Namespace) -> int:
    from fastdensity.commands.train import failure

    try:
        path = sample_checkpoint(args.checkpoint, args.num_samples, args.out, seed=args.seed, device=args.device,
                                 progress=not args.no_progress, label=args.label)
    except Exception as exc:
        code, message = failure(exc)
        if code is None:
            raise
        print(f"fastdensity sample: {message}", file=sys.stderr)
        return code
    print(f"wrote {args.num_samples} samples to {path}")
    return 0


def sample_checkpoint(checkpoint: str, num_samples: int, out: str, *, seed: int = 0, device: str = "auto",
                      progress: bool = False, label: int | None = None) -> str:
    """Draw ``num_samples`` from ``checkpoint`` and write them to ``out`` (.png or .npy); returns ``out``.
    ``progress``: a bar over the sampler's sequential steps on stderr, when that is a terminal. A
    class-conditional checkpoint draws every sample of class ``label``, or (None) spreads them over all
    classes in order."""
    import os

    import numpy as np
    import torch

    from fastdensity import training
    from fastdensity.atomic_io import atomic_write
    from fastdensity.commands.evaluate import check_seed

    check_seed(seed)
    if num_samples < 1:
        raise ValueError(f"-n must be >= 1; got {num_samples}")
    ext = os.path.splitext(out)[1].lower()
    if ext not in (".png", ".npy"):
        raise ValueError(f"--out must end in .png or .npy; got {out!r}")
    dev = training.resolve_device(device)
    ckpt = training.load_checkpoint(checkpoint)
    model, preprocess = training.model_from_checkpoint(ckpt, dev)
    labels = _labels(ckpt, model, num_samples, label)
    torch.manual_seed(seed)
    with _progress_bar(model, num_samples, enabled=progress):
        samples = training.draw_samples(model, preprocess, num_samples, batch_size=DRAW_BATCH, labels=labels)
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    if ext == ".npy":
        array = samples.numpy()
        if not samples.is_floating_point():
            levels = ckpt["data"].get("levels") or 0
            array = array.astype(np.uint8 if 0 < levels <= 256 else np.int32)
        # A file object (np.save would append ".npy" to a name ending in ".NPY"), written atomically.
        atomic_write(out, lambda f: np.save(f, array, allow_pickle=False), size_hint=array.nbytes)
    else:
        training.save_samples_png(samples, out, title=f"{model.name} samples ({ckpt['data']['name']})")
    return out


def _labels(ckpt: dict, model, num_samples: int, label: int | None):
    """The class of each sample for a class-conditional checkpoint (None for an unconditional one)."""
    import torch

    from fastdensity import training

    if not ckpt["config"].get("conditional"):
        if label is not None:
            raise ValueError("--label is for checkpoints trained with --conditional; this one models p(x) alone")
        return None
    classes = training.model_classes(model)
    if label is None:
        return training.sample_labels(num_samples, classes)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < classes:
        raise ValueError(f"--label must be a class in 0..{classes - 1}; got {label!r}")
    return torch.full((num_samples,), label, dtype=torch.long)


def _progress_bar(model, num_samples: int, *, enabled: bool):
    """A tqdm bar ticked by the sampler once per pixel or feature (``fastdensity.sampling.reporting``);
    nothing for models that sample in one go, or when disabled or stderr is not a terminal."""
    from fastdensity import sampling

    steps = sampling.sequential_steps(model) * -(-num_samples // DRAW_BATCH)  # loops x steps per loop
    if not enabled or steps == 0:
        return contextlib.nullcontext()
    from tqdm.auto import tqdm

    unit = "pixel" if model.name == "pixelcnn" else "feature"
    bar = tqdm(total=steps, desc=f"sampling {model.name}", unit=unit, leave=False, disable=None, file=sys.stderr)
    stack = contextlib.ExitStack()
    stack.enter_context(bar)
    stack.enter_context(sampling.reporting(lambda: bar.update(1)))
    return stack
