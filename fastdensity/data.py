"""Datasets for maximum-likelihood training, and the bookkeeping that makes NLL and bits/dim honest.

Three sources, all loaded by :func:`load_data`:

* **2-D densities with an exact log-density** (:data:`DENSITIES_2D`): ``8gaussians``, ``checkerboard``,
  ``moons``, ``rings``. Each can sample, evaluate ``log p(x)``, and report its true NLL: the
  differential entropy ``H = -E_p[log p(X)]``, the lowest test NLL any model can reach in expectation.
  ``checkerboard`` knows it exactly (log 8); the others estimate it by Monte Carlo from the exact
  log-density and report the standard error. Training also reports the *paired* KL gap
  ``mean_i [log p(x_i) - log q(x_i)]`` over the test points, an unbiased estimate of KL(p || q) whose
  standard error is far smaller than that of either NLL alone.
* **digits**: scikit-learn's bundled 8x8 handwritten digits (1797 images, one channel, 17 intensity
  levels 0..16; no download). Needs the ``data`` extra: ``pip install "fastdensity[data]"``.
* **user arrays** from ``.npy`` / ``.npz`` files, read with ``allow_pickle=False``. Float arrays are
  continuous data; integer arrays are discrete (levels = 256 for uint8, else max + 1). Shapes:
  ``[N, D]`` vectors, ``[N, H, W]`` one-channel images, ``[N, C, H, W]`` images. An ``.npz`` with
  ``train`` (and optionally ``valid``/``test``) arrays keeps those splits; any other ``.npz`` must hold
  exactly one array, which is split like an ``.npy`` (80/10/10, by a fixed seed).

Units: every NLL here is in nats per example. For discrete data it is the NLL of the *discrete*
observation (an upper bound on it, for continuous models), so it compares across models.

Discrete data and continuous models (uniform dequantization, documented in :class:`Dequantize`)::

    x in {0, .., L-1}^D,  u ~ U[0, 1)^D,  x~ = x + u                     (a density on [0, L)^D)
    log P(x) = log E_u[p~(x + u)] >= E_u[log p~(x + u)]                 (Jensen)
    y0 = x~ / L in [0, 1)^D,  y = logit(a + (1 - 2a) y0)                 (optional logit, a = alpha)
    log p~(x~) = log q(y) + log|dy/dx~|
    log|dy/dx~| = -D log L + sum_d [log(1 - 2a) - log s_d - log(1 - s_d)],   s = a + (1 - 2a) y0

so ``nll = -(log q(y) + log|dy/dx~|)`` bounds ``-log P(x)`` from above, with every preprocessing
Jacobian included, and ``bits/dim = nll / (D ln 2)``. Models that are discrete themselves (PixelCNN's
discretized logistic mixture) give ``log P(x)`` exactly and see the integer levels unchanged.

For continuous data ``bits/dim`` is the same formula applied to a differential NLL (it can be negative).
"""
from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import numpy as np
import torch

__all__ = [
    "DENSITIES_2D", "BUILTIN", "Density2D", "EightGaussians", "Checkerboard", "TwoMoons", "Rings",
    "Data", "load_data", "density_2d", "Preprocess", "Identity", "Dequantize", "make_preprocess",
    "bits_per_dim", "independent_pixel_baseline",
    "CONDITIONAL_DENSITIES_2D", "ConditionalDensity2D", "ConditionalBanana", "conditional_density_2d",
]

LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------------
# 2-D densities with exact log-densities
# ---------------------------------------------------------------------------------------------------


class Density2D:
    """A density on R^2 that can sample and evaluate its exact log-density.

    Subclasses define :meth:`sample` and :meth:`log_prob`; :meth:`true_nll` estimates the entropy.
    Computation is in float64; samples are returned as float64 [n, 2].
    """

    name = ""
    #: exact entropy in nats when known in closed form (else estimated by Monte Carlo)
    exact_entropy: Optional[float] = None

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) in nats, x [n, 2] -> [n] (float64)."""
        raise NotImplementedError

    def true_nll(self, num_samples: int = 200_000, seed: int = 1234) -> tuple[float, float]:
        """``(H, standard error)``: the entropy, i.e. the expected NLL of the true density.

        Monte Carlo over ``num_samples`` fresh samples (a different stream from the data's), exact when
        the entropy is known in closed form (standard error 0).
        """
        if self.exact_entropy is not None:
            return self.exact_entropy, 0.0
        return _mc_entropy(self, num_samples, seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@lru_cache(maxsize=None)
def _mc_entropy(density: "Density2D", num_samples: int, seed: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    nll = torch.cat([-density.log_prob(density.sample(min(50_000, num_samples - i), g))
                     for i in range(0, num_samples, 50_000)])
    return nll.mean().item(), (nll.std() / math.sqrt(num_samples)).item()


class EightGaussians(Density2D):
    """Eight equally weighted isotropic Gaussians on a circle (the picture FFJORD made familiar).

    Centres at radius ``2 sqrt 2`` and angles k pi/4, standard deviation ``1 / (2 sqrt 2)``:
    neighbouring modes are ~6 standard deviations apart. log p is a log-sum-exp of eight normals.
    """

    name = "8gaussians"

    def __init__(self, radius: float = 2 * math.sqrt(2), std: float = 1 / (2 * math.sqrt(2))):
        angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
        self.centers = radius * torch.stack([angles.cos(), angles.sin()], dim=1)  # [8, 2]
        self.std = std

    def sample(self, n, generator=None):
        k = torch.randint(0, 8, (n,), generator=generator)
        return self.centers[k] + self.std * torch.randn(n, 2, generator=generator, dtype=torch.float64)

    def log_prob(self, x):
        x = x.double()
        sq = ((x[:, None, :] - self.centers[None]) ** 2).sum(-1)  # [n, 8]
        log_normal = -0.5 * sq / self.std ** 2 - 2 * math.log(self.std) - LOG_2PI
        return torch.logsumexp(log_normal, dim=1) - math.log(8)


class Checkerboard(Density2D):
    """Uniform on the 8 "black" unit squares of a 4x4 board on [-2, 2]^2 (squares with i + j even).

    log p = -log 8 on the black squares, -inf elsewhere; the entropy is exactly log 8. The hard edges
    make it the hardest of the four for smooth flows.
    """

    name = "checkerboard"
    exact_entropy = math.log(8)

    def sample(self, n, generator=None):
        # Offsets in [0, 1 - 2^-20): float32 copies of the samples (the datasets' dtype) cannot round up
        # onto the next square's edge, where the true density is 0. (A 1e-6 relative change of scale.)
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64) * (1 - 2.0 ** -20)
        col = torch.randint(0, 4, (n,), generator=generator)
        half = torch.randint(0, 2, (n,), generator=generator)
        row = 2 * half + (col % 2)  # rows with the parity of the column: i + j even
        return torch.stack([col, row], dim=1).double() - 2.0 + u

    def log_prob(self, x):
        x = x.double()
        inside = ((x >= -2) & (x < 2)).all(dim=1)
        cell = torch.floor(x + 2).long()
        black = (cell.sum(dim=1) % 2) == 0
        out = torch.full((x.shape[0],), -math.log(8), dtype=torch.float64)
        return torch.where(inside & black, out, torch.full_like(out, -math.inf))


class _CurveMixture(Density2D):
    """Points uniform (in angle) on circular arcs plus isotropic Gaussian noise.

    ``p(x) = sum_k w_k / (b_k - a_k) int_{a_k}^{b_k} N(x; c_k + r_k (cos t, sin t), s^2 I) dt``.
    """

    def __init__(self, arcs, weights, std):
        self.arcs = arcs  # [(centre (x, y), radius, angle_lo, angle_hi)]
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.std = std

    def _point(self, k, t):
        (cx, cy), r, _, _ = self.arcs[k]
        return torch.stack([cx + r * torch.cos(t), cy + r * torch.sin(t)], dim=-1)

    def sample(self, n, generator=None):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        pts = torch.empty(n, 2, dtype=torch.float64)
        for j, (_, _, lo, hi) in enumerate(self.arcs):
            sel = k == j
            pts[sel] = self._point(j, lo + (hi - lo) * u[sel])
        return pts + self.std * torch.randn(n, 2, generator=generator, dtype=torch.float64)


class TwoMoons(_CurveMixture):
    """scikit-learn's two interleaved half circles with Gaussian noise, centred and scaled by 2.

    Upper moon: 2 (cos t - 1/2, sin t - 1/4); lower: 2 (1/2 - cos t, 1/4 - sin t), t ~ U(0, pi), noise
    std 0.2 (0.1 before scaling). log p is the exact arc integral by Gauss-Legendre quadrature
    in log space (128 nodes); the integrand's width along the arc (0.1 rad) spans many nodes, so the quadrature error
    is far below float32 precision (checked against 512 nodes in the tests).
    """

    name = "moons"

    def __init__(self, nodes: int = 128):
        super().__init__(
            arcs=[((-1.0, -0.5), 2.0, 0.0, math.pi), ((1.0, 0.5), 2.0, math.pi, 2 * math.pi)],
            weights=[0.5, 0.5], std=0.2)
        t, w = np.polynomial.legendre.leggauss(nodes)  # on [-1, 1]; weights sum to 2
        self._t01 = torch.tensor((t + 1) / 2, dtype=torch.float64)  # nodes mapped to [0, 1]
        self._log_w = torch.tensor(np.log(w / 2), dtype=torch.float64)  # mean over the arc's angle

    def log_prob(self, x):
        x = x.double()
        terms = []
        for j, (_, _, lo, hi) in enumerate(self.arcs):
            pts = self._point(j, lo + (hi - lo) * self._t01)  # [nodes, 2]
            terms.append(self._log_arc(x, pts) + torch.log(self.weights[j]))
        return torch.logsumexp(torch.stack(terms, dim=1), dim=1)

    def _log_arc(self, x, pts):
        out = []
        p2 = (pts ** 2).sum(1)
        for chunk in x.split(16384):  # [chunk, nodes] at a time keeps memory bounded
            # |x - p|^2 = |x|^2 + |p|^2 - 2 x.p as one matmul (float64: no cancellation trouble here)
            sq = ((chunk ** 2).sum(1, keepdim=True) + p2[None] - 2 * chunk @ pts.T).clamp_min(0)
            log_n = -0.5 * sq / self.std ** 2 - 2 * math.log(self.std) - LOG_2PI
            out.append(torch.logsumexp(log_n + self._log_w, dim=1))
        return torch.cat(out)


class Rings(_CurveMixture):
    """Four concentric rings (radii 0.75, 1.5, 2.25, 3), equally weighted, isotropic noise std 0.1.

    Closed form: for a ring of radius R, ``p(x) = exp(-(r - R)^2 / 2s^2) i0e(r R / s^2) / (2 pi s^2)``
    with r = |x| and i0e the exponentially scaled Bessel function I0 (no overflow for thin rings).
    """

    name = "rings"

    def __init__(self):
        radii = (0.75, 1.5, 2.25, 3.0)
        super().__init__(arcs=[((0.0, 0.0), r, 0.0, 2 * math.pi) for r in radii], weights=[0.25] * 4, std=0.1)
        self.radii = torch.tensor(radii, dtype=torch.float64)

    def log_prob(self, x):
        r = x.double().norm(dim=1, keepdim=True)  # [n, 1]
        s2 = self.std ** 2
        R = self.radii[None]
        log_ring = -0.5 * (r - R) ** 2 / s2 + torch.log(torch.special.i0e(r * R / s2)) - math.log(2 * math.pi * s2)
        return torch.logsumexp(log_ring + torch.log(self.weights), dim=1)


DENSITIES_2D = {cls.name: cls for cls in (EightGaussians, Checkerboard, TwoMoons, Rings)}
BUILTIN = (*DENSITIES_2D, "digits")


@lru_cache(maxsize=None)
def density_2d(name: str) -> Density2D:
    """The (shared, immutable) :class:`Density2D` called ``name``."""
    if name not in DENSITIES_2D:
        raise ValueError(f"unknown 2-D density {name!r}; choose one of {', '.join(DENSITIES_2D)}")
    return DENSITIES_2D[name]()


# ---------------------------------------------------------------------------------------------------
# Conditional 2-D densities: p(x | c) with an exact conditional log-density
# ---------------------------------------------------------------------------------------------------


class ConditionalDensity2D:
    """A family of densities p(x | c) on R^2 indexed by a context c ~ p(c) in R^C, for conditional models.

    ``sample_context(n)`` draws contexts [n, C], ``sample(context)`` one x [n, 2] per context row,
    ``log_prob(x, context)`` the exact log p(x | c) [n]. ``true_nll()`` is the conditional entropy
    H(X | C) = -E log p(X | C), the lowest expected test NLL of a conditional model; the paired KL gap
    ``mean_i [log p(x_i | c_i) - log q(x_i | c_i)]`` over pairs drawn from the joint estimates
    E_c KL(p(. | c) || q(. | c)), the gap averaged over contexts. float64 throughout.
    """

    name = ""
    context_features = 1
    #: H(X | C) in nats when known in closed form
    exact_entropy: Optional[float] = None

    def sample_context(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, context: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample_joint(self, n: int, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [n, 2], c [n, C])`` drawn from the joint p(c) p(x | c)."""
        c = self.sample_context(n, generator)
        return self.sample(c, generator), c

    def true_nll(self, num_samples: int = 200_000, seed: int = 1234) -> tuple[float, float]:
        """``(H(X | C), standard error)``; exact (error 0) when known in closed form, else Monte Carlo."""
        if self.exact_entropy is not None:
            return self.exact_entropy, 0.0
        x, c = self.sample_joint(num_samples, torch.Generator().manual_seed(seed))
        nll = -self.log_prob(x, c)
        return nll.mean().item(), (nll.std() / math.sqrt(num_samples)).item()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ConditionalBanana(ConditionalDensity2D):
    """A banana whose position and bend follow a scalar context c ~ U(-1, 1)::

        x_1 | c       ~ N(c, 1)
        x_2 | x_1, c  ~ N(c ((x_1 - c)^2 - 1), sigma^2)          sigma = 0.5

    so the banana opens upwards for c > 0, downwards for c < 0 and is a straight Gaussian ridge at
    c = 0. ``log p(x | c) = log N(x_1 - c; 0, 1) + log N(x_2; c ((x_1 - c)^2 - 1), sigma^2)`` exactly,
    and H(X | C) = log(2 pi e) + log sigma for every c (the map (x_1, x_2) -> (x_1 - c, x_2 - mean) has
    unit Jacobian).
    """

    name = "banana"
    sigma = 0.5
    exact_entropy = math.log(2 * math.pi * math.e) + math.log(0.5)

    def sample_context(self, n, generator=None):
        return 2 * torch.rand(n, 1, generator=generator, dtype=torch.float64) - 1

    def _mean_x2(self, u, c):
        return c * (u ** 2 - 1)

    def sample(self, context, generator=None):
        c = context.double().reshape(-1)
        u = torch.randn(c.shape[0], generator=generator, dtype=torch.float64)
        x2 = self._mean_x2(u, c) + self.sigma * torch.randn(c.shape[0], generator=generator, dtype=torch.float64)
        return torch.stack([u + c, x2], dim=1)

    def log_prob(self, x, context):
        x, c = x.double(), context.double().reshape(-1)
        u = x[:, 0] - c
        r = (x[:, 1] - self._mean_x2(u, c)) / self.sigma
        return -0.5 * (u ** 2 + r ** 2) - LOG_2PI - math.log(self.sigma)


CONDITIONAL_DENSITIES_2D = {cls.name: cls for cls in (ConditionalBanana,)}


@lru_cache(maxsize=None)
def conditional_density_2d(name: str) -> ConditionalDensity2D:
    """The (shared, immutable) :class:`ConditionalDensity2D` called ``name``."""
    if name not in CONDITIONAL_DENSITIES_2D:
        raise ValueError(f"unknown conditional 2-D density {name!r}; choose one of "
                         f"{', '.join(CONDITIONAL_DENSITIES_2D)}")
    return CONDITIONAL_DENSITIES_2D[name]()


# ---------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------


@dataclass
class Data:
    """Train / validation / test splits and what a model needs to know about them.

    ``train``/``valid``/``test`` are CPU tensors of shape ``[N, *shape]``: float32 for continuous data,
    integer levels ``0..levels-1`` (uint8 or int32) for discrete data. ``spec`` is a plain dict (stored
    in checkpoints) from which :func:`load_data` rebuilds the same splits.
    """

    name: str
    kind: str  # "continuous" | "discrete"
    shape: tuple
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    levels: Optional[int] = None
    source: str = ""
    split_seed: int = 0
    density: Optional[Density2D] = field(default=None, repr=False)
    #: class labels of the (train, valid, test) examples, int64 [N] each, for data that has them (digits, a
    #: file with ``labels``); what ``fastdensity train --conditional`` conditions on
    labels: Optional[tuple] = field(default=None, repr=False)
    num_classes: Optional[int] = None

    def split_labels(self, split: str) -> Optional[torch.Tensor]:
        """The labels of ``split`` ("train", "valid" or "test"), or None for data without labels."""
        return None if self.labels is None else self.labels[("train", "valid", "test").index(split)]

    @property
    def dim(self) -> int:
        """D, the number of scalar variables per example (bits/dim divides by it)."""
        return int(np.prod(self.shape))

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    def spec(self) -> dict:
        return {"name": self.name, "source": self.source, "kind": self.kind, "shape": list(self.shape),
                "levels": self.levels, "split_seed": self.split_seed}

    def true_nll(self) -> Optional[tuple[float, float]]:
        """``(entropy, standard error)`` for the 2-D densities, None for data with no known density."""
        return None if self.density is None else self.density.true_nll()


#: examples per split for the 2-D densities: the test split's size puts the standard error of a test
#: NLL near 0.01 nats and that of the paired KL gap well below it.
SIZES_2D = {"train": 50_000, "valid": 10_000, "test": 20_000}


def load_data(source: str, *, split_seed: int = 0) -> Data:
    """Load a built-in dataset by name (:data:`BUILTIN`) or a ``.npy`` / ``.npz`` file by path.

    The splits depend only on ``source`` and ``split_seed`` (and the file's contents), so training and
    a later ``fastdensity evaluate`` see the same test set.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"data must be a built-in name ({', '.join(BUILTIN)}) or a .npy/.npz path; got {source!r}")
    if source in DENSITIES_2D:
        density = density_2d(source)
        g = torch.Generator().manual_seed(split_seed)
        splits = {k: density.sample(n, g).float() for k, n in SIZES_2D.items()}
        return Data(source, "continuous", (2,), **splits, source=source, split_seed=split_seed, density=density)
    if source == "digits":
        return _digits(split_seed)
    if source.endswith((".npy", ".npz")) or os.path.sep in source or os.path.exists(source):
        return _from_file(source, split_seed)
    raise ValueError(f"unknown data {source!r}: use a built-in name ({', '.join(BUILTIN)}) or a path to a "
                     ".npy/.npz file")


def _split(x: torch.Tensor, seed: int, fractions=(0.8, 0.1, 0.1), labels: Optional[torch.Tensor] = None):
    """A random partition of the rows of ``x`` (seeded) into ``len(fractions)`` parts; with ``labels`` (one
    per row), ``(parts of x, parts of labels)``, both cut by the same permutation.

    Every part after the first gets ``round(f * N)`` rows but at least one; the first gets the rest.
    """
    n = x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    rest = [max(1, round(f * n)) for f in fractions[1:]]
    if n - sum(rest) < 1:
        raise ValueError(f"data has {n} examples; need at least {len(fractions)} to form "
                         f"{'/'.join(('train', 'validation', 'test')[:len(fractions)])} splits")
    index = perm.split([n - sum(rest), *rest])
    parts = tuple(x[i] for i in index)
    return parts if labels is None else (parts, tuple(labels[i] for i in index))


def _digits(split_seed: int) -> Data:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the digits dataset comes with scikit-learn: pip install \"fastdensity[data]\" "
                          "(or pip install scikit-learn)") from exc
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.uint8)).unsqueeze(1)  # [1797, 1, 8, 8], integers 0..16
    (train, valid, test), labels = _split(x, split_seed, labels=torch.from_numpy(digits.target.astype(np.int64)))
    return Data("digits", "discrete", (1, 8, 8), train, valid, test, levels=17, source="digits",
                split_seed=split_seed, labels=labels, num_classes=10)


_MAGIC = {".npy": b"\x93NUMPY", ".npz": b"PK"}


def _load_arrays(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    ext = os.path.splitext(path)[1]
    if ext not in _MAGIC:
        raise ValueError(f"data file {path!r} must be a .npy or .npz file")
    with open(path, "rb") as f:
        head = f.read(6)
    if not head.startswith(_MAGIC[ext]):
        # NumPy would try to unpickle such a file; fastdensity never does.
        raise ValueError(f"data file {path!r} is not a NumPy .npy/.npz file (no {ext} header); "
                         "write it with np.save / np.savez")

    def refused(exc: Exception) -> ValueError:
        # NumPy reports an object array under allow_pickle=False as a ValueError that mentions pickles.
        if isinstance(exc, ValueError) and "pickle" in str(exc).lower():
            return ValueError(f"data file {path!r} holds pickled Python objects, which fastdensity never loads "
                              "(unsafe); save plain numeric arrays with np.save(path, array) or "
                              "np.savez(path, train=...)")
        return ValueError(f"data file {path!r} could not be read as a NumPy {ext} file: {exc}")

    def native(a: np.ndarray) -> np.ndarray:
        # Big-endian data (">f4", ">i2": written on or for another machine) is valid; torch.from_numpy
        # takes native byte order only, so convert here, once, keeping the values and the dtype's kind.
        return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))

    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"data": native(loaded)}
        with loaded:  # an .npz archive: its arrays are read (and refused) one by one
            return {k: native(loaded[k]) for k in loaded.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise refused(exc) from exc


def _check_array(path: str, key: str, a: np.ndarray) -> np.ndarray:
    where = f"array {key!r} in {path!r}"
    if a.dtype == object or a.dtype.kind not in "biuf":
        raise ValueError(f"{where} must hold numbers (float for continuous data, integers for discrete "
                         f"levels); got dtype {a.dtype}")
    if a.ndim not in (2, 3, 4):
        raise ValueError(f"{where} must have shape [N, D] (vectors), [N, H, W] or [N, C, H, W] (images); "
                         f"got shape {a.shape}")
    if a.ndim == 2 and a.shape[1] < 2:
        raise ValueError(f"{where} has shape {a.shape}: the models need at least 2 features per example")
    if a.shape[0] == 0 or a.size == 0:
        raise ValueError(f"{where} is empty (shape {a.shape})")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():
            first = np.argwhere(bad)[0]
            raise ValueError(f"{where} contains {int(bad.sum())} NaN or infinite value(s), the first at index "
                             f"{tuple(int(i) for i in first)}; clean the data before training")
    elif a.dtype.kind in "iu" and a.min() < 0:
        raise ValueError(f"{where} holds integer (discrete) data, which must be levels >= 0; found {a.min()}")
    if a.ndim == 3:
        a = a[:, None]  # [N, H, W] -> [N, 1, H, W]
    return a


def _check_labels(path: str, key: str, labels: np.ndarray, examples: int) -> np.ndarray:
    where = f"array {key!r} in {path!r}"
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise ValueError(f"{where} must hold class labels: integers of shape [N]; got {labels.dtype} of shape "
                         f"{labels.shape}")
    if labels.shape[0] != examples:
        raise ValueError(f"{where} has {labels.shape[0]} labels for {examples} examples; give one label per example")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{where} holds a negative label ({labels.min()}); labels are classes 0..K-1")
    return labels.astype(np.int64)


def _file_labels(path: str, arrays: dict, parts: dict) -> Optional[dict]:
    """The labels a file gives for its splits ``parts`` (name -> examples): ``labels`` beside a single array,
    or ``<split>_labels`` beside train/valid/test; None when it gives none."""
    if "train" not in arrays:
        if "labels" not in arrays:
            return None
        (key, a), = parts.items()
        return {key: _check_labels(path, "labels", arrays["labels"], a.shape[0])}
    keys = [f"{k}_labels" for k in parts]
    given = [k for k in keys if k in arrays]
    if not given:
        return None
    if len(given) != len(keys):
        raise ValueError(f"data file {path!r} has labels for some splits only ({', '.join(given)}); give "
                         f"{', '.join(keys)}")
    return {k: _check_labels(path, f"{k}_labels", arrays[f"{k}_labels"], a.shape[0]) for k, a in parts.items()}


def _from_file(path: str, split_seed: int) -> Data:
    arrays = _load_arrays(path)
    labels = None
    if "train" in arrays:
        parts = {k: _check_array(path, k, arrays[k]) for k in ("train", "valid", "test") if k in arrays}
        labels = _file_labels(path, arrays, parts)
        for k, a in parts.items():
            if a.shape[1:] != parts["train"].shape[1:] or a.dtype.kind != parts["train"].dtype.kind:
                raise ValueError(f"array {k!r} in {path!r} has shape {a.shape} ({a.dtype}); it must match "
                                 f"'train', {parts['train'].shape} ({parts['train'].dtype}), beyond the first dim")
        missing = [k for k in ("valid", "test") if k not in parts]
        if missing:
            # Carve only the missing split(s) out of train: 80/10/10 as for a single array when both are
            # missing, 90/10 when one is (no rows of train are dropped).
            fractions = (0.8, 0.1, 0.1) if len(missing) == 2 else (0.9, 0.1)
            train = torch.from_numpy(np.ascontiguousarray(parts["train"]))
            if labels is None:
                pieces = _split(train, split_seed, fractions)
            else:
                pieces, label_pieces = _split(train, split_seed, fractions, torch.from_numpy(labels["train"]))
                labels.update(zip(["train", *missing], (piece.numpy() for piece in label_pieces)))
            parts.update(zip(["train", *missing], (piece.numpy() for piece in pieces)))
        arrs = [parts["train"], parts["valid"], parts["test"]]
    else:
        data_keys = [k for k in arrays if k != "labels"]
        if len(data_keys) != 1:
            raise ValueError(f"data file {path!r} holds arrays {sorted(arrays)}; give it one array (and optionally "
                             "'labels', one class per example), or arrays named 'train' (and optionally 'valid', "
                             "'test', 'train_labels', ...)")
        key = data_keys[0]
        a = _check_array(path, key, arrays[key])
        labels = _file_labels(path, arrays, {key: a})
        x = torch.from_numpy(np.ascontiguousarray(a))
        if labels is None:
            arrs = [t.numpy() for t in _split(x, split_seed)]
        else:
            pieces, label_pieces = _split(x, split_seed, labels=torch.from_numpy(labels[key]))
            arrs = [t.numpy() for t in pieces]
            labels = dict(zip(("train", "valid", "test"), (t.numpy() for t in label_pieces)))
    label_args = {}
    if labels is not None:
        label_args = dict(labels=tuple(torch.from_numpy(np.ascontiguousarray(labels[k]))
                                       for k in ("train", "valid", "test")),
                          num_classes=int(max(int(v.max()) for v in labels.values() if v.size)) + 1)
    sample = arrs[0]
    name = os.path.splitext(os.path.basename(path))[0]
    if sample.dtype.kind == "f":
        tensors = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrs]
        return Data(name, "continuous", tuple(sample.shape[1:]), *tensors, source=os.path.abspath(path),
                    split_seed=split_seed, **label_args)
    levels = 256 if sample.dtype == np.uint8 else int(max(a.max() for a in arrs)) + 1
    dtype = np.uint8 if levels <= 256 else np.int32
    tensors = [torch.from_numpy(np.ascontiguousarray(a.astype(dtype))) for a in arrs]
    return Data(name, "discrete", tuple(sample.shape[1:]), *tensors, levels=levels,
                source=os.path.abspath(path), split_seed=split_seed, **label_args)


# ---------------------------------------------------------------------------------------------------
# Preprocessing with its Jacobian, and the accounting
# ---------------------------------------------------------------------------------------------------


class Preprocess:
    """Maps data examples to the model's input space and back, with ``log|d model-input / d data|``.

    ``encode(x, generator) -> (y, logdet [B])``; ``decode(y) -> x``; ``config()`` is a plain dict.
    """

    def encode(self, x: torch.Tensor, generator: Optional[torch.Generator] = None):
        raise NotImplementedError

    def decode(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError


class Identity(Preprocess):
    """No preprocessing: continuous data, or discrete data for a discrete model (levels passed as they
    are, in their integer dtype: a discrete model indexes with them, and uint8 moves 4x fewer bytes)."""

    def encode(self, x, generator=None):
        return x, torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)

    def decode(self, y):
        return y

    def config(self):
        return {"type": "identity"}


class Dequantize(Preprocess):
    """Uniform dequantization of levels ``0..L-1`` to (0, 1), optionally followed by a logit.

    ``encode``: y0 = (x + u) / L with u ~ U[0, 1); with ``logit_alpha`` a, y = logit(a + (1 - 2a) y0).
    ``logdet`` [B] = log|dy/dx~| summed over the example (x~ = x + u): ``-D log L`` plus, for the logit,
    ``sum_d log(1 - 2a) - log s_d - log(1 - s_d)`` with s = a + (1 - 2a) y0. Then
    ``-(log q(y) + logdet)`` is an upper bound on the discrete NLL in nats (see the module docstring).
    ``decode`` inverts it and floors to the level, clamped to 0..L-1.
    """

    def __init__(self, levels: int, logit_alpha: Optional[float] = 0.01):
        if levels < 2:
            raise ValueError(f"levels must be >= 2; got {levels}")
        if logit_alpha is not None and not 0 < logit_alpha < 0.5:
            raise ValueError(f"logit_alpha must be in (0, 0.5) or None; got {logit_alpha}")
        self.levels = int(levels)
        self.alpha = None if logit_alpha is None else float(logit_alpha)

    def encode(self, x, generator=None):
        # The noise is drawn where the generator lives (a CPU generator gives the same noise for data on
        # any device), then moved to the data.
        u = torch.rand(x.shape, generator=generator, device=generator.device if generator is not None else x.device,
                       dtype=torch.float32).to(x.device)
        y = (x.float() + u) / self.levels
        dims = tuple(range(1, x.dim()))
        logdet = torch.full((x.shape[0],), -math.log(self.levels) * x[0].numel(), device=x.device)
        if self.alpha is not None:
            s = self.alpha + (1 - 2 * self.alpha) * y
            y = torch.log(s) - torch.log1p(-s)
            logdet = logdet + (math.log(1 - 2 * self.alpha) - torch.log(s) - torch.log1p(-s)).sum(dims)
        return y, logdet

    def decode(self, y):
        if self.alpha is not None:
            y = (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)
        return torch.floor(y * self.levels).clamp(0, self.levels - 1).to(torch.int64)

    def config(self):
        return {"type": "dequantize", "levels": self.levels, "logit_alpha": self.alpha}


def make_preprocess(config: dict) -> Preprocess:
    """Rebuild a :class:`Preprocess` from its ``config()`` (as stored in checkpoints)."""
    kind = config.get("type")
    if kind == "identity":
        return Identity()
    if kind == "dequantize":
        return Dequantize(config["levels"], config.get("logit_alpha"))
    raise ValueError(f"unknown preprocessing {config!r}")


def bits_per_dim(nll_nats: float, dim: int) -> float:
    """Bits per dimension of a per-example NLL in nats: ``nll / (D ln 2)``."""
    return nll_nats / (dim * math.log(2))


def independent_pixel_baseline(train: torch.Tensor, test: torch.Tensor, levels: int, pseudocount: float = 1.0):
    """Bits/dim of the best model that treats every pixel (dimension) as independent.

    Each dimension gets its own categorical over ``levels`` values, fitted on ``train`` with
    ``pseudocount`` added to every count (so unseen test values cost finitely); returns the test bits/dim.
    This is the floor an image model must go far below to have learned anything about structure.
    """
    tr = train.reshape(train.shape[0], -1).long()
    te = test.reshape(test.shape[0], -1).long()
    D = tr.shape[1]
    counts = torch.full((D, levels), float(pseudocount), dtype=torch.float64)
    counts.scatter_add_(1, tr.t().contiguous(), torch.ones(D, tr.shape[0], dtype=torch.float64))
    log_p = torch.log(counts / counts.sum(1, keepdim=True))  # [D, levels]
    nll = -log_p.gather(1, te.t().contiguous()).sum(0)  # [N_test]
    return bits_per_dim(nll.mean().item(), D)
