"""fastdensity.data: the 2-D densities against the math, the datasets, dequantization accounting, bad files."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastdensity import data as fdata

NAMES_2D = list(fdata.DENSITIES_2D)


def _grid(half_width=7.0, n=300):
    xs = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    X, Y = torch.meshgrid(xs, xs, indexing="ij")
    return torch.stack([X.flatten(), Y.flatten()], dim=1), (xs[1] - xs[0]).item() ** 2


# ------------------------------------------------------------------------------------------------
# 2-D densities
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES_2D)
def test_density_integrates_to_one(name):
    pts, cell = _grid()
    mass = fdata.density_2d(name).log_prob(pts).exp().sum().item() * cell
    # Grid spacing 0.047 is below every noise std (0.1 for rings), where the rectangle rule on smooth,
    # fast-decaying densities is accurate far beyond 1e-6; the checkerboard's edges cut grid cells, an
    # O(spacing / side) error of a few percent.
    assert abs(mass - 1) < (0.05 if name == "checkerboard" else 1e-6), mass


@pytest.mark.parametrize("name", NAMES_2D)
def test_samples_follow_the_log_density(name):
    """Histogram of samples against the density's mass in each cell: sample() and log_prob() agree."""
    density = fdata.density_2d(name)
    n = 200_000
    x = density.sample(n, torch.Generator().manual_seed(3))
    edges = torch.linspace(-4, 4, 17, dtype=torch.float64)  # 0.5-wide cells
    counts = torch.histogramdd(x, bins=[edges, edges]).hist / n
    # Cell masses by a 20 x 20 midpoint rule inside every cell.
    sub = (torch.arange(20, dtype=torch.float64) + 0.5) / 20 * 0.5
    cx = (edges[:-1, None] + sub[None]).flatten()
    X, Y = torch.meshgrid(cx, cx, indexing="ij")
    p = density.log_prob(torch.stack([X.flatten(), Y.flatten()], 1)).exp().view(16, 20, 16, 20)
    mass = p.sum((1, 3)) * (0.5 / 20) ** 2
    # Binomial noise of a cell frequency is sqrt(m / n); 5 of those plus the quadrature's own error.
    tol = 5 * (mass / n).sqrt() + 2e-3 * mass + 2e-4
    assert ((counts - mass).abs() <= tol).all(), ((counts - mass).abs() - tol).max()
    assert (x.abs() <= 4).float().mean() > 0.999  # the histogram saw (nearly) everything


@pytest.mark.parametrize("name", [n for n in NAMES_2D if n != "checkerboard"])
def test_true_nll_matches_grid_entropy(name):
    """The Monte Carlo entropy (with its standard error) against -sum p log p on a fine grid."""
    density = fdata.density_2d(name)
    pts, cell = _grid(7.0, 300)
    lp = density.log_prob(pts)
    p = lp.exp()
    grid_entropy = -(p * torch.where(p > 0, lp, torch.zeros_like(lp))).sum().item() * cell
    value, stderr = density.true_nll()
    assert 0 < stderr < 0.01
    assert abs(value - grid_entropy) < 4 * stderr + 2e-3, (value, stderr, grid_entropy)


def test_checkerboard_is_exactly_uniform_on_black_squares():
    d = fdata.density_2d("checkerboard")
    assert d.true_nll() == (math.log(8), 0.0)
    x = torch.tensor([[-1.5, -1.5], [-0.5, -1.5], [0.5, 0.5], [1.99, 0.01], [2.5, 0.0], [0.2, -1.2]],
                     dtype=torch.float64)
    lp = d.log_prob(x)
    assert lp[0] == -math.log(8) and lp[2] == -math.log(8) and lp[5] == -math.log(8)
    assert lp[1] == -math.inf and lp[3] == -math.inf and lp[4] == -math.inf
    s = d.sample(10_000, torch.Generator().manual_seed(0))
    assert torch.isfinite(d.log_prob(s)).all()


def test_moons_quadrature_is_converged():
    x = fdata.density_2d("moons").sample(200, torch.Generator().manual_seed(1))
    x = torch.cat([x, torch.randn(50, 2, dtype=torch.float64) * 3])  # points far from the arcs too
    torch.testing.assert_close(fdata.TwoMoons(128).log_prob(x), fdata.TwoMoons(512).log_prob(x),
                               rtol=0, atol=1e-9)


def test_rings_closed_form_matches_angle_integral():
    rings = fdata.density_2d("rings")
    x = torch.cat([rings.sample(300, torch.Generator().manual_seed(2)), torch.randn(50, 2, dtype=torch.float64)])
    # Midpoint rule over the angle: the integrand is smooth and periodic, so this converges fast.
    t = (torch.arange(4096, dtype=torch.float64) + 0.5) / 4096 * 2 * math.pi
    log_terms = []
    for r in rings.radii:
        pts = r * torch.stack([t.cos(), t.sin()], 1)
        sq = ((x[:, None] - pts[None]) ** 2).sum(-1)
        log_n = -0.5 * sq / rings.std ** 2 - math.log(2 * math.pi * rings.std ** 2)
        log_terms.append(torch.logsumexp(log_n, 1) - math.log(4096) + math.log(0.25))
    torch.testing.assert_close(rings.log_prob(x), torch.logsumexp(torch.stack(log_terms, 1), 1), rtol=0, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------


def test_2d_splits_are_deterministic_and_distinct():
    a, b = fdata.load_data("8gaussians"), fdata.load_data("8gaussians")
    assert torch.equal(a.test, b.test) and torch.equal(a.train, b.train)
    assert a.kind == "continuous" and a.shape == (2,) and a.levels is None and a.dim == 2
    assert a.train.shape == (50_000, 2) and a.valid.shape == (10_000, 2) and a.test.shape == (20_000, 2)
    assert not torch.equal(a.train[:100], a.test[:100])
    c = fdata.load_data("8gaussians", split_seed=1)
    assert not torch.equal(a.test, c.test)
    assert a.spec() == {"name": "8gaussians", "source": "8gaussians", "kind": "continuous", "shape": [2],
                        "levels": None, "split_seed": 0}


def test_digits():
    d = fdata.load_data("digits")
    assert d.kind == "discrete" and d.levels == 17 and d.shape == (1, 8, 8) and d.is_image
    assert d.train.dtype == torch.uint8
    total = d.train.shape[0] + d.valid.shape[0] + d.test.shape[0]
    assert total == 1797 and d.test.shape[0] == 180
    assert int(d.train.max()) == 16 and int(d.train.min()) == 0
    assert torch.equal(fdata.load_data("digits").test, d.test)  # the same split every time


def test_npy_and_npz_files(tmp_path):
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(50, 3)).astype(np.float64)
    np.save(tmp_path / "vec.npy", vec)
    d = fdata.load_data(str(tmp_path / "vec.npy"))
    assert d.kind == "continuous" and d.shape == (3,) and d.train.dtype == torch.float32
    assert d.train.shape[0] + d.valid.shape[0] + d.test.shape[0] == 50
    # Every row lands in exactly one split.
    rows = torch.cat([d.train, d.valid, d.test]).double()
    assert torch.equal(rows[torch.argsort(rows[:, 0])], torch.from_numpy(vec[np.argsort(vec[:, 0])]).float().double())

    img = rng.integers(0, 256, size=(40, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "img.npy", img)
    d = fdata.load_data(str(tmp_path / "img.npy"))
    assert d.kind == "discrete" and d.levels == 256 and d.shape == (1, 6, 6)

    levels = rng.integers(0, 5, size=(30, 2, 4, 4)).astype(np.int64)
    np.savez(tmp_path / "splits.npz", train=levels[:20], valid=levels[20:25], test=levels[25:])
    d = fdata.load_data(str(tmp_path / "splits.npz"))
    assert d.levels == int(levels.max()) + 1 and d.shape == (2, 4, 4)
    assert torch.equal(d.test.long(), torch.from_numpy(levels[25:]))  # given splits are kept as they are

    np.savez(tmp_path / "only_train.npz", train=vec)
    d = fdata.load_data(str(tmp_path / "only_train.npz"))
    assert (d.train.shape[0], d.valid.shape[0], d.test.shape[0]) == (40, 5, 5)

    # One split missing: only it is carved out of train (90/10); no row of train is dropped.
    np.savez(tmp_path / "no_valid.npz", train=vec[:40], test=vec[40:])
    d = fdata.load_data(str(tmp_path / "no_valid.npz"))
    assert (d.train.shape[0], d.valid.shape[0]) == (36, 4)
    assert torch.equal(d.test, torch.from_numpy(vec[40:]).float())
    first_column = torch.cat([d.train, d.valid])[:, 0].sort().values
    assert torch.equal(first_column, torch.from_numpy(vec[:40, 0]).float().sort().values)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fdata.load_data("/nonexistent/dir/data.npy")


def test_unknown_name_lists_the_builtins():
    with pytest.raises(ValueError, match="8gaussians, checkerboard, moons, rings, digits"):
        fdata.load_data("swissroll")


def test_pickled_npy_is_refused(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickled Python objects"):
        fdata.load_data(str(path))
    np.savez(tmp_path / "objects.npz", train=np.array([[1, 2], [3, 4]], dtype=object))
    with pytest.raises(ValueError, match="pickled Python objects"):
        fdata.load_data(str(tmp_path / "objects.npz"))


@pytest.mark.parametrize("shape", [(10,), (4, 1), (2, 3, 4, 5, 6)])
def test_wrong_dimensionality(tmp_path, shape):
    np.save(tmp_path / "bad.npy", np.zeros(shape, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[N, D\]|at least 2 features"):
        fdata.load_data(str(tmp_path / "bad.npy"))


def test_nan_in_data_names_the_first_bad_index(tmp_path):
    a = np.ones((20, 2), dtype=np.float32)
    a[7, 1] = np.nan
    a[9, 0] = np.inf
    np.save(tmp_path / "nan.npy", a)
    with pytest.raises(ValueError, match=r"2 NaN or infinite value\(s\), the first at index \(7, 1\)"):
        fdata.load_data(str(tmp_path / "nan.npy"))


def test_other_bad_files(tmp_path):
    np.save(tmp_path / "neg.npy", -np.ones((10, 2), dtype=np.int32))
    with pytest.raises(ValueError, match="levels >= 0"):
        fdata.load_data(str(tmp_path / "neg.npy"))
    np.savez(tmp_path / "two.npz", a=np.zeros((5, 2)), b=np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"holds arrays \['a', 'b'\]"):
        fdata.load_data(str(tmp_path / "two.npz"))
    np.savez(tmp_path / "mismatch.npz", train=np.zeros((5, 2)), test=np.zeros((5, 3)))
    with pytest.raises(ValueError, match="must match 'train'"):
        fdata.load_data(str(tmp_path / "mismatch.npz"))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 but no zip archive after the magic")
    with pytest.raises(ValueError, match="could not be read as a NumPy .npz file"):
        fdata.load_data(str(tmp_path / "broken.npz"))
    (tmp_path / "garbage.npy").write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match="is not a NumPy .npy/.npz file"):
        fdata.load_data(str(tmp_path / "garbage.npy"))
    np.save(tmp_path / "two_rows.npy", np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="at least 3"):
        fdata.load_data(str(tmp_path / "two_rows.npy"))


# ------------------------------------------------------------------------------------------------
# Dequantization and bits/dim accounting
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [None, 0.05])
def test_dequantize_round_trip_and_jacobian(alpha):
    pre = fdata.Dequantize(17, alpha)
    x = torch.randint(0, 17, (5, 1, 2, 3))
    y, logdet = pre.encode(x, torch.Generator().manual_seed(0))
    assert torch.equal(pre.decode(y), x)
    # logdet = log |dy/dx~| with x~ = x + u: rebuild x~ and differentiate the elementwise map.
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    xt = (x.double() + u.double()).requires_grad_(True)
    y64 = xt / 17
    if alpha is not None:
        s = alpha + (1 - 2 * alpha) * y64
        y64 = torch.log(s) - torch.log1p(-s)
    torch.testing.assert_close(y, y64.float().detach())
    (dydx,) = torch.autograd.grad(y64.sum(), xt)  # diagonal Jacobian: the elementwise derivative
    torch.testing.assert_close(logdet.double(), dydx.log().flatten(1).sum(1), rtol=1e-5, atol=1e-4)


def test_dequantized_uniform_model_costs_log_levels_per_dim():
    """The uniform density on [0, 1)^D, dequantized, is exactly the uniform discrete distribution."""
    levels, D = 17, 6
    x = torch.randint(0, levels, (100, D))
    y, logdet = fdata.Dequantize(levels, None).encode(x, torch.Generator().manual_seed(0))
    nll = -(0.0 + logdet)  # log q(y) = 0 for the uniform density on the unit cube
    torch.testing.assert_close(nll, torch.full_like(nll, D * math.log(levels)))
    assert fdata.bits_per_dim(nll.mean().item(), D) == pytest.approx(math.log2(levels))
    # With the logit: the logistic density is the image of U(a, 1 - a) rescaled; its log q(y) plus the
    # logdet must again give the uniform code length.
    a = 0.05
    y, logdet = fdata.Dequantize(levels, a).encode(x, torch.Generator().manual_seed(0))
    log_q = (torch.log(torch.sigmoid(y)) + torch.log(torch.sigmoid(-y)) - math.log(1 - 2 * a)).sum(1)
    torch.testing.assert_close(-(log_q + logdet), torch.full((100,), D * math.log(levels)), rtol=1e-5, atol=1e-4)


def test_identity_preprocess_and_config_round_trip():
    x = torch.randn(4, 2)
    y, logdet = fdata.Identity().encode(x)
    assert y is x and torch.equal(logdet, torch.zeros(4))
    levels = torch.randint(0, 17, (4, 1, 2, 2), dtype=torch.uint8)  # a discrete model gets its levels as they are
    y, logdet = fdata.Identity().encode(levels)
    assert y is levels and logdet.dtype == torch.float32 and torch.equal(logdet, torch.zeros(4))
    for pre in (fdata.Identity(), fdata.Dequantize(5, 0.1), fdata.Dequantize(256, None)):
        again = fdata.make_preprocess(pre.config())
        assert type(again) is type(pre) and again.config() == pre.config()
    with pytest.raises(ValueError, match="logit_alpha must be in"):
        fdata.Dequantize(5, 0.7)


def test_independent_pixel_baseline():
    # Pixel 0 is always 0, pixel 1 is 0 or 1 with equal frequency: with add-one smoothing over 3 levels
    # the test cost is -log(11/13) and -log(6/13) per image (train: 10 images).
    train = torch.tensor([[0, i % 2] for i in range(10)])
    test = torch.tensor([[0, 0], [0, 1]])
    expected = (-math.log(11 / 13) - math.log(6 / 13)) / (2 * math.log(2))
    assert fdata.independent_pixel_baseline(train, test, 3) == pytest.approx(expected)
    digits = fdata.load_data("digits")
    assert 2.0 < fdata.independent_pixel_baseline(digits.train, digits.test, 17) < 3.0
