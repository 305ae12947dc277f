"""``fastdensity info``: versions, devices, and which backend ``auto`` picks and why."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``info`` takes no options."""


def _version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return "not installed"


def run(args: argparse.Namespace) -> int:
    import platform

    import torch

    import fastdensity
    from fastdensity import backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"fastdensity  {fastdensity.__version__}",
        f"python       {platform.python_version()} ({platform.platform()})",
        f"torch        {torch.__version__}",
        f"triton       {triton_version}",
        f"CUDA         {torch.version.cuda or 'none (CPU build of torch)'}"
        + (f", cuDNN {torch.backends.cudnn.version()}" if torch.cuda.is_available() else ""),
        f"CPU          {_cpu()} - torch uses {torch.get_num_threads()} threads",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}        {p.name}, compute capability {p.major}.{p.minor}, "
                         f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
    else:
        lines.append("GPU          none visible to torch")
    lines.append("peers        " + ", ".join(f"{m} {_version(m)}" for m in ("nflows", "zuko", "normflows")))
    lines.append("")
    lines.append(backend.describe())
    print("\n".join(lines))
    return 0


def _cpu() -> str:
    from fastdensity.benchmarks.harness import _cpu_model

    return _cpu_model()


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="fastdensity info")
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
