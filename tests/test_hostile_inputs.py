"""Hostile inputs that cut across ops and layers: each test is one finding of a hostile-input pass that
returned a silently wrong answer or an unclear error, and fails without its fix.

Per-op findings live beside their op (test_masked_linear.py, test_mixture.py, test_coupling.py,
test_dmol.py) and the model-level ones in test_models.py; here are the layers (ActNorm, permutations,
Squeeze), data loading, and what every kernel must do alike (double backward, FP fusion).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastdensity
from fastdensity import ops
from fastdensity.data import load_data
from fastdensity.nn import ActNorm, Permutation, RandomPermutation, ReversePermutation, Squeeze
from helpers import requires_interpreter

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on infinities, interpreter only

# ------------------------------------------------------------------------------------------------
# ActNorm's data-dependent initialisation
# ------------------------------------------------------------------------------------------------


def test_actnorm_initialised_from_one_sample_stays_finite():
    """A first batch of one vector: the unbiased std of one value is NaN, and the parameters were NaN
    for good. With no spread to measure the scale stays 1 and the sample is centred."""
    layer = ActNorm(3).train()
    x = torch.tensor([[0.5, -2.0, 7.0]])
    z, logdet = layer(x)
    assert torch.isfinite(layer.loc).all() and torch.isfinite(layer.log_scale).all()
    torch.testing.assert_close(layer.loc.detach(), x[0])
    assert torch.equal(layer.log_scale.detach(), torch.zeros(3))
    assert torch.equal(z, torch.zeros(1, 3)) and torch.equal(logdet, torch.zeros(1))
    # The next batch is mapped by the (finite) affine map, no longer initialised from.
    z2, _ = layer(torch.randn(4, 3))
    assert torch.isfinite(z2).all()


def test_actnorm_constant_channel_keeps_unit_scale():
    """A channel whose first batch is constant has no spread either: its log-scale was -log(eps) = 13.8,
    which multiplies every later input of that channel by 10^6."""
    layer = ActNorm(2).train()
    x = torch.stack([torch.full((8,), 3.0), torch.linspace(-1.0, 1.0, 8)], dim=1)
    layer(x)
    assert layer.log_scale[0] == 0.0 and layer.loc[0] == 3.0
    torch.testing.assert_close(layer.log_scale[1].detach(), -torch.log(x[:, 1].std() + layer.eps))


def test_actnorm_image_batch_of_one_uses_its_pixels():
    """[1, C, H, W] has H W values per channel: one image is enough to initialise from."""
    layer = ActNorm(2).train()
    x = torch.randn(1, 2, 4, 4) * torch.tensor([2.0, 0.5]).view(1, 2, 1, 1)
    z, _ = layer(x)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.ones(2), rtol=1e-4, atol=1e-4)  # eps = 1e-6 in std


def test_actnorm_empty_batch_initialises_nothing():
    layer = ActNorm(3).train()
    z, logdet = layer(torch.zeros(0, 3))
    assert z.shape == (0, 3) and logdet.shape == (0,)
    assert not layer._initialized and not bool(layer.initialized)
    layer(torch.randn(5, 3))
    assert layer._initialized and torch.isfinite(layer.log_scale).all()


def test_actnorm_checks_the_shape_before_initialising():
    """ActNorm(3) on [2, 4] initialised first (a size-mismatch RuntimeError from copy_) and only then
    checked the shape; now the shape error names the expected shape and nothing is initialised."""
    layer = ActNorm(3).train()
    with pytest.raises(ValueError, match=r"inputs must be \[B, 3\] or \[B, 3, H, W\]; got shape \(2, 4\)"):
        layer(torch.randn(2, 4))
    assert not layer._initialized and torch.equal(layer.loc.detach(), torch.zeros(3))


# ------------------------------------------------------------------------------------------------
# Permutations and Squeeze
# ------------------------------------------------------------------------------------------------


def test_permutation_must_hold_integers():
    """Permutation(tensor([0.5, 1.5])) was truncated to [0, 1] and accepted."""
    with pytest.raises(TypeError, match=r"permutation must hold integers .*got dtype torch.float32: \[0.5, 1.5\]"):
        Permutation(torch.tensor([0.5, 1.5]))
    with pytest.raises(TypeError, match="got dtype torch.bool"):
        Permutation(torch.tensor([True, False]))
    assert Permutation([1, 0]).permutation.tolist() == [1, 0]
    assert Permutation(np.array([2, 0, 1], dtype=np.int32)).permutation.dtype == torch.long


@pytest.mark.parametrize("cls", [RandomPermutation, ReversePermutation])
def test_permutation_sizes_must_be_positive_integers(cls):
    with pytest.raises(ValueError, match="features must be an integer >= 1; got -1"):
        cls(-1)
    with pytest.raises(TypeError, match=r"features must be an integer >= 1; got 2.5 \(float\)"):
        cls(2.5)
    assert cls(3).permutation.numel() == 3


def test_squeeze_factor_must_be_a_positive_integer():
    """Squeeze(1.5) was accepted, and failed later inside a reshape."""
    with pytest.raises(TypeError, match=r"factor must be an integer >= 1; got 1.5 \(float\)"):
        Squeeze(1.5)
    with pytest.raises(ValueError, match="factor must be an integer >= 1; got 0"):
        Squeeze(0)
    assert Squeeze(2.0).factor == 2


# ------------------------------------------------------------------------------------------------
# Data files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i2", ">u2"])
def test_big_endian_npy_loads_like_native(tmp_path, dtype):
    """Big-endian arrays are valid .npy data; torch.from_numpy refused them."""
    rng = np.random.RandomState(0)
    values = rng.rand(40, 3) * 5 if dtype[1] == "f" else rng.randint(0, 9, size=(40, 3))
    native_dtype = np.dtype(dtype).newbyteorder("=")
    np.save(tmp_path / "big.npy", values.astype(dtype))
    np.save(tmp_path / "native.npy", values.astype(native_dtype))
    big, native = load_data(str(tmp_path / "big.npy")), load_data(str(tmp_path / "native.npy"))
    assert big.kind == native.kind and big.levels == native.levels
    for part in ("train", "valid", "test"):
        assert torch.equal(getattr(big, part), getattr(native, part))


@pytest.mark.parametrize("missing", [(), ("valid", "test")])
def test_big_endian_npz_loads_like_native(tmp_path, missing):
    """.npz archives too, whether their splits are given or carved out of 'train'."""
    rng = np.random.RandomState(1)
    parts = {k: rng.randint(0, 300, size=(n, 4)) for k, n in (("train", 30), ("valid", 5), ("test", 5))
             if k not in missing}
    np.savez(tmp_path / "big.npz", **{k: a.astype(">i2") for k, a in parts.items()})
    np.savez(tmp_path / "native.npz", **{k: a.astype("=i2") for k, a in parts.items()})
    big, native = load_data(str(tmp_path / "big.npz")), load_data(str(tmp_path / "native.npz"))
    assert big.levels == native.levels
    for part in ("train", "valid", "test"):
        assert torch.equal(getattr(big, part), getattr(native, part))


# ------------------------------------------------------------------------------------------------
# Kernels alike: bf16 under the interpreter, double backward, FP fusion
# ------------------------------------------------------------------------------------------------


def test_interpretable_dtype_check_refuses_bf16_on_cpu():
    """The refusal a kernel path calls when its interpreted tl.dot cannot compute a dtype (bf16: the
    interpreter multiplies the bit patterns, ~1e10), instead of returning garbage."""
    from fastdensity._validation import check_interpretable_dtype

    x = torch.zeros(2, 2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"masked_conv2d: x is bfloat16 on the CPU.*interpreter.*"
                                         r"set_backend\('reference'\)"):
        check_interpretable_dtype("x", x, "masked_conv2d")
    for ok in (x.float(), x.half(), torch.zeros(2, 2, dtype=torch.bfloat16, device="meta")):
        check_interpretable_dtype("x", ok, "masked_conv2d")


def _double_backward_cases():
    """(op name, fn(*leaves) -> output, leaves) for every op whose kernel this suite owns."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64)
    mask = torch.tril(torch.ones(5, 4, dtype=torch.bool))
    pix = (torch.randint(0, 256, (1, 3, 2, 2)) / 127.5 - 1).double()
    return [
        ("affine_coupling", lambda a, b, c: ops.affine_coupling(a, b, c, scale="exp")[0],
         [x, torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)]),
        ("masked_linear", lambda a, w: ops.masked_linear(a, w, mask), [x, torch.randn(5, 4, dtype=torch.float64)]),
        ("logsumexp", lambda a: ops.logsumexp(a, 1), [x]),
        ("mixture", lambda a, lg, m, s: ops.gaussian_mixture_log_prob(a, lg, m, s),
         [x, torch.randn(2, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64),
          0.3 * torch.randn(2, 4, dtype=torch.float64)]),
        ("dmol_log_prob", lambda p: ops.dmol_log_prob(pix, p), [torch.randn(1, 10, 2, 2, dtype=torch.float64)]),
        ("masked_conv2d", lambda a, w: ops.masked_conv2d(a, w, mask_type="B", color_groups=3),
         [torch.randn(1, 3, 3, 3, dtype=torch.float64), torch.randn(3, 3, 3, 3, dtype=torch.float64)]),
        # x inside [-1, 1] mostly, so the spline (not only the identity tails) is differentiated
        ("rational_quadratic_spline", lambda a, w, h, d: ops.rational_quadratic_spline(a, w, h, d)[0],
         [0.5 * x, torch.randn(3, 4, 3, dtype=torch.float64), torch.randn(3, 4, 3, dtype=torch.float64),
          torch.randn(3, 4, 2, dtype=torch.float64)]),
    ]


@requires_interpreter
@pytest.mark.parametrize("case", range(len(_double_backward_cases())), ids=[c[0] for c in _double_backward_cases()])
def test_double_backward_through_a_kernel_says_what_to_do(case):
    """A gradient of a gradient through a kernel failed with PyTorch's "no autograd formula was
    registered" for an internal op; now the error says it is unsupported and names the way out, which
    works: the reference path is twice differentiable."""
    name, fn, tensors = _double_backward_cases()[case]

    def second_order(backend):
        leaves = [t.clone().requires_grad_() for t in tensors]
        with fastdensity.set_backend(backend):
            out = fn(*leaves)
            grads = torch.autograd.grad(out.sin().sum(), leaves, create_graph=True)
            return torch.autograd.grad(sum(g.pow(2).sum() for g in grads), leaves)

    with pytest.raises(RuntimeError, match=rf"double backward .* through fastdensity's Triton kernel for .*{name}.* "
                                           r"not supported.*set_backend\('reference'\)"):
        second_order("triton")
    assert all(torch.isfinite(g).all() for g in second_order("reference"))


@requires_interpreter
def test_every_launch_pins_fp_fusion(monkeypatch):
    """Triton's FP-fusion default comes from TRITON_DEFAULT_FP_FUSION and flips to off in Triton 3.10:
    every launch passes enable_fp_fusion explicitly (kernels/utils.py, FP_FUSION, says why)."""
    from triton.runtime.interpreter import InterpretedFunction

    from fastdensity.kernels import mixture as kmix
    from fastdensity.kernels.utils import FP_FUSION

    seen = {}
    original = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        seen.setdefault(f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}", set()).add(
            kwargs.get("enable_fp_fusion", "missing"))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    for shared in (False, True):  # the per-sample and the shared-parameter mixture kernels
        monkeypatch.setattr(kmix, "SHARED_MIN_KD", 1 if shared else 10 ** 9)
        for _, fn, tensors in _double_backward_cases():
            leaves = [t.clone().requires_grad_() for t in tensors]
            with fastdensity.set_backend("triton"):
                torch.autograd.grad(fn(*leaves).sum(), leaves)
    owned = ("coupling", "masked_linear", "logsumexp", "mixture", "mixture_shared", "dmol", "masked_conv", "spline")
    launched = {k: v for k, v in seen.items() if k.split(".")[0] in owned}
    assert {k.split(".")[0] for k in launched} == set(owned)
    assert all(v == {FP_FUSION} for v in launched.values()), launched
