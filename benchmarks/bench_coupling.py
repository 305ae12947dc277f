"""Affine coupling: the fused op, and a whole coupling layer against nflows, zuko and normflows.

``affine_coupling`` (op level): x, shift, scale_raw [B, ...] with N = x.numel() elements of e bytes
(``kernels/coupling.py``): forward reads x, shift, scale_raw and writes y -> 4 N e (the B log-dets are
negligible); backward reads gy, x, scale_raw and writes gx, g_scale_raw (g_shift is gy itself) -> 5 N e;
forward+backward 9 N e. Shapes: [256, 6, 32, 32] (half of a Glow step's 12 channels at 32x32, long
rows) and [65536, 64] (tabular, short rows), bf16 and fp32 on a GPU.

``coupling_layer`` (layer level): ``fastdensity.nn.AffineCoupling`` on [B, D] with the MLP conditioner
D/2 -> H -> H -> D every peer uses too (nflows ``AffineCouplingTransform``, zuko
``GeneralCouplingTransform``, normflows ``AffineCouplingBlock``); gradients for x and every
parameter. The matmuls dominate here: it shows what a user of those layers gains end to end.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fastdensity.verify import VerifyCase, dims, public_ops

from .harness import Case, Runner, Settings, element_size, op_providers, op_unavailable, peer, randn, traffic

OP = "coupling"


def _coupling(x, shift, scale_raw):
    from fastdensity import ops

    return ops.affine_coupling(x, shift, scale_raw, scale="sigmoid")


def _op_case(settings: Settings, shape, dtype) -> Case:
    n, e = math.prod(shape), element_size(dtype)
    return Case(
        op="affine_coupling",
        shape="x" + str(list(shape)).replace(" ", ""),
        dtype=dtype,
        make_inputs=lambda: tuple(randn(shape, settings, dtype) for _ in range(3)),
        providers=op_providers(_coupling, settings.device, "coupling"),
        min_bytes=traffic(4 * n * e, 5 * n * e),
        unavailable=op_unavailable("affine_coupling"),
    )


class _MLP(nn.Module):
    """n_in -> hidden -> hidden -> n_out with ReLUs; ``context`` accepted (and unused) as nflows passes it."""

    def __init__(self, n_in: int, n_out: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, n_out))

    def forward(self, x, context=None):
        return self.net(x)


def _with_params(module: nn.Module, call):
    """A Runner differentiating ``call(x)`` w.r.t. x and every parameter of ``module``."""
    params = list(module.parameters())
    return Runner(call, wrt=lambda inputs: [inputs[0], *params])


def _layer_case(settings: Settings, batch: int, features: int, hidden: int, dtype) -> Case:
    device = settings.device
    half = features // 2
    state: dict[str, nn.Module] = {}  # fastdensity, eager and compiled share one layer (the backend differs)

    def setup():
        if "layer" not in state:
            import fastdensity.nn as fnn

            mask = torch.arange(features) % 2  # 1 = transformed, as in nflows
            state["layer"] = fnn.AffineCoupling(mask, lambda i, o: _MLP(i, o, hidden)).to(device, dtype)

    def layer_fn(x):
        return state["layer"](x)

    providers = op_providers(layer_fn, device, "coupling", setup=setup,
                             wrt=lambda inputs: [inputs[0], *state["layer"].parameters()])

    def nflows_build():
        from nflows.transforms.coupling import AffineCouplingTransform

        mask = torch.arange(features) % 2 * 2 - 1  # nflows: > 0 transformed
        layer = AffineCouplingTransform(mask, lambda i, o: _MLP(i, o, hidden)).to(device, dtype)
        return _with_params(layer, lambda x: layer(x))

    def zuko_build():
        import zuko

        mask = torch.arange(features) % 2 == 0  # zuko: True = conditioning features
        lazy = zuko.flows.GeneralCouplingTransform(features, mask=mask, hidden_features=(hidden, hidden))
        lazy = lazy.to(device, dtype)
        return _with_params(lazy, lambda x: lazy().call_and_ladj(x))

    def normflows_build():
        import normflows as nf

        block = nf.flows.AffineCouplingBlock(nf.nets.MLP([half, hidden, hidden, features]), scale_map="sigmoid")
        block = block.to(device, dtype)
        return _with_params(block, lambda x: block.inverse(x))  # normflows' inverse is data -> noise

    providers += [peer("nflows", "nflows", nflows_build), peer("zuko", "zuko", zuko_build),
                  peer("normflows", "normflows", normflows_build)]
    return Case(
        op="coupling_layer",
        shape=f"x[{batch},{features}] mlp{hidden}",
        dtype=dtype,
        make_inputs=lambda: (randn((batch, features), settings, dtype),),
        providers=providers,
        unavailable=None if _has_layer() else "fastdensity.nn.AffineCoupling is not in this build",
    )


def _has_layer() -> bool:
    try:
        from fastdensity.nn import AffineCoupling  # noqa: F401
    except ImportError:
        return False
    return True


def cases(settings: Settings) -> list[Case]:
    if settings.cuda:
        op_shapes = [(256, 6, 32, 32)] + ([] if settings.quick else [(65536, 64)])
        layer = (4096, 64, 256)
    elif settings.quick:
        op_shapes, layer = [(64, 6, 16, 16)], (512, 16, 64)
    else:
        op_shapes, layer = [(256, 6, 32, 32), (16384, 64)], (1024, 32, 128)
    dtypes = settings.pick_dtypes([torch.bfloat16, torch.float32] if settings.cuda else [torch.float32])
    out = [_op_case(settings, shape, dtype) for dtype in dtypes for shape in op_shapes]
    return out + [_layer_case(settings, *layer, dtype) for dtype in dtypes]


# ------------------------------------------------------------------------------------------------------
# The shapes `fastdensity verify` checks (kernel vs eager vs float64 reference)
# ------------------------------------------------------------------------------------------------------


def verify_cases(cuda: bool) -> list[VerifyCase]:
    variants = ([((256, 6, 32, 32), "sigmoid", False), ((65536, 64), "exp", True), ((7, 3, 33, 31), "softclamp", False)]
                if cuda else [((3, 5, 7), "sigmoid", False), ((2, 37), "softclamp", True), ((1, 9), "exp", False)])
    out = []
    for shape, scale, inverse in variants:
        def make(device, shape=shape, scale=scale):
            h = torch.randn((shape[0], 2 * shape[1], *shape[2:]), device=device)
            x = torch.randn(shape, device=device)
            return [x, h]

        def call(x, h, scale=scale, inverse=inverse):
            shift, scale_raw = h.chunk(2, dim=1)  # strided views, as coupling layers pass them
            return public_ops().affine_coupling(x, shift, scale_raw, scale=scale, inverse=inverse)

        label = f"x{dims(shape)} {scale}" + (" inverse" if inverse else "")
        out.append(VerifyCase("affine_coupling", label, make, call, ("x", "h"), (0, 1), ("y", "logdet")))
    return out
