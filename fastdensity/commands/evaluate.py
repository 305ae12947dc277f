"""``fastdensity evaluate``: test NLL and bits/dim of a trained checkpoint on a dataset.

``fastdensity evaluate runs/realnvp-checkerboard --data checkerboard`` scores the test split (the same
split training held out, rebuilt from the data's name or file and the stored split seed). For the 2-D
densities it adds the true NLL and the KL gap to the truth; ``--json`` prints everything as JSON.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pt, or the run directory holding it")
    parser.add_argument("--data", default=None, metavar="NAME|FILE",
                        help="built-in name or .npy/.npz file (default: the data the checkpoint was trained on)")
    parser.add_argument("--split", choices=("test", "valid", "train"), default="test", help="which split to score")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the dequantization noise (continuous models on discrete data; default: the "
                             "one training scored this split with, so the figures match metrics.json)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from fastdensity.commands.train import failure

    try:
        result = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, device=args.device, seed=args.seed)
    except Exception as exc:
        code, message = failure(exc)
        if code is None:
            raise
        print(f"fastdensity evaluate: {message}", file=sys.stderr)
        return code
    if args.json:
        from fastdensity.training import standard_json

        print(standard_json(result, indent=2))
        return 0
    line = (f"{result['model']} on {result['data']} ({result['split']}, {result['examples']:,} examples): "
            f"NLL {result['nll']:.4f} +- {result['nll_stderr']:.4f} nats, {result['bits_per_dim']:.4f} bits/dim "
            f"[{result['nll_kind']}]")
    print(line)
    if "true_nll" in result:
        print(f"true NLL {result['true_nll']:.4f} +- {result['true_nll_stderr']:.4f}; KL gap to the truth "
              f"{result['kl_gap']:.4f} +- {result['kl_gap_stderr']:.4f} nats")
    return 0


def check_seed(seed: int | None) -> None:
    """ValueError unless ``seed`` is None or an integer in [0, 2**63), the range training's seeds have."""
    from fastdensity.training import SEED_LIMIT

    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"--seed must be in [0, 2**63); got {seed}")


def evaluate_checkpoint(checkpoint: str, data: str | None = None, *, split: str = "test", device: str = "auto",
                        seed: int | None = None) -> dict:
    """Score ``checkpoint`` on a split of ``data`` (default: its own data); returns a plain dict.

    ``seed`` seeds the dequantization noise; None takes the seed training used for that split.
    """
    import os

    from fastdensity import data as fdata
    from fastdensity import training

    check_seed(seed)
    dev = training.resolve_device(device)
    ckpt = training.load_checkpoint(checkpoint)
    model, preprocess = training.model_from_checkpoint(ckpt, dev)
    stored = ckpt["data"]
    source = data or stored["source"]
    # The training data (a built-in name, or the same file by another path) gets its training splits back;
    # other data is split with the default seed.
    same = source == stored["source"] or (
        os.path.exists(source) and os.path.abspath(source) == os.path.abspath(stored["source"]))
    ds = fdata.load_data(source, split_seed=int(stored["split_seed"]) if same else 0)
    conditional = bool(ckpt["config"].get("conditional"))
    training.check_data_matches(model, preprocess, ds, conditional=conditional)
    x = {"test": ds.test, "valid": ds.valid, "train": ds.train}[split]
    if seed is None:
        seed = int(ckpt["config"]["seed"]) + training.EVAL_SEED_OFFSET[split]
    labels = ds.split_labels(split) if conditional else None  # p(x | label): scored given each example's label
    result = training.evaluate(model, x, ds, preprocess, device=dev, seed=seed, labels=labels)
    out = {"model": model.name, "data": ds.name, "split": split, "nll": result["nll"],
           "nll_stderr": result["nll_stderr"], "bits_per_dim": result["bits_per_dim"],
           "nll_kind": training.nll_kind(model, ds), "examples": result["examples"], "step": int(ckpt["step"]),
           "device": str(dev)}
    true = ds.true_nll()
    if true is not None:
        out.update(true_nll=true[0], true_nll_stderr=true[1], kl_gap=result["kl_gap"],
                   kl_gap_stderr=result["kl_gap_stderr"])
    return out
