"""Packaging for fastdensity.

The Triton kernels live in the top-level ``kernels/`` folder of the source tree and are installed as
``fastdensity.kernels``, and the benchmark harness in ``benchmarks/`` as ``fastdensity.benchmarks``
(``package_dir`` below), so nothing called plain ``kernels`` reaches anyone's site-packages and
``fastdensity bench`` works from an installed copy. Both ``pip install .`` and ``pip install -e .`` work on a machine without a GPU.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

extras = {
    # PNGs of samples and densities, benchmark plots.
    "plot": ["matplotlib>=3.7"],
    # scikit-learn ships the 8x8 digits set used as the built-in image data.
    "data": ["scikit-learn>=1.3"],
    "bench": ["matplotlib>=3.7", "pytest-benchmark>=4.0"],
    # Peer libraries the benchmarks compare against when installed.
    "peers": ["nflows>=0.14", "zuko>=1.1", "normflows>=1.7"],
    # The peers are in the test set: equivalence tests (MADE vs nflows, model sizes vs zuko) and the
    # CI benchmark smoke test compare against them.
    "test": [
        "pytest>=7.4",
        "pytest-xdist>=3.3",
        "pytest-benchmark>=4.0",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
        "nflows>=0.14",
        "zuko>=1.1",
        "normflows>=1.7",
    ],
}
extras["all"] = sorted({req for name in ("plot", "data", "bench") for req in extras[name]})

setup(
    name="fastdensity",
    version="0.1.0",
    description="Fused Triton kernels for explicit-density generative models: flows, autoregressive models, mixtures",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastdensity", "fastdensity.*"]) + ["fastdensity.kernels", "fastdensity.benchmarks"],
    package_dir={"fastdensity.kernels": "kernels", "fastdensity.benchmarks": "benchmarks"},
    install_requires=[
        "torch>=2.11",
        "numpy>=1.24",
        "tqdm>=4.60",
        'triton>=3.6; platform_system == "Linux"',
    ],
    extras_require=extras,
    entry_points={"console_scripts": ["fastdensity = fastdensity.cli:main"]},
    license="MIT",
)
