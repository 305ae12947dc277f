"""Training steps of whole models: fastdensity's RealNVP, Glow, MAF, NSF and PixelCNN, and the peers' flows.

A step is ``loss = -log_prob(x).mean()`` and its gradients with respect to every parameter (the
optimizer update, the same for every library, is left out). ``forward`` is the loss alone,
``backward`` its gradients from a recorded graph, ``forward+backward`` the step. No GB/s: a model has
no single minimum-traffic figure.

Models come from ``fastdensity.models.build_model(name, shape, **config)``; one model per case is
shared by the fastdensity (kernels), eager (reference) and compiled providers, so they time the same
weights. Sizes:

* GPU: RealNVP and Glow on 3x32x32 images (batch 64, the models' default widths), PixelCNN on 3x32x32
  (batch 32), RealNVP and MAF on 64-dimensional vectors (batch 4096);
* CPU: RealNVP and MAF on vectors, beside zuko's and nflows' flows **of the same size** - the issue-6
  comparison: D features, L coupling (or MADE) layers, conditioners with two hidden layers of H
  units, a standard-normal base, batch B. Peers are built from their public classes:

  =========  ==========================================================================================
  RealNVP    zuko ``flows.RealNVP(D, transforms=L, hidden_features=(H, H))``; nflows ``Flow`` of L
             ``AffineCouplingTransform`` with alternating masks and an MLP D/2 -> H -> H -> D
  MAF        zuko ``flows.MAF(D, transforms=L, hidden_features=(H, H))``; nflows ``Flow`` of L
             ``MaskedAffineAutoregressiveTransform(D, H, num_blocks=1, use_residual_blocks=False)``
             (two hidden layers) with ``ReversePermutation`` between them
  NSF        spline couplings, K bins on [-5, 5] (zuko's default bound): zuko ``flows.NSF(D,
             transforms=L, hidden_features=(H, H), bins=K, passes=2)`` (its coupling form: a masked MLP
             over all D inputs); nflows ``Flow`` of L ``PiecewiseRationalQuadraticCouplingTransform``
             with alternating masks, ``tails="linear"`` and an MLP D/2 -> H -> H -> D/2 (3K - 1)
  =========  ==========================================================================================

  Ours: ``RealNVP([D], num_layers=L, hidden=H, num_hidden=2, scale="sigmoid", actnorm=False)``,
  ``MAF([D], num_layers=L, hidden=H, num_hidden=2, scale="sigmoid", actnorm=False)`` (nflows' scale
  function, and without the ActNorm our models put in front by default, which the peers do not have)
  and ``NSF([D], kind="coupling", num_layers=L, hidden=H, num_hidden=2, num_bins=K, tail_bound=5,
  actnorm=False)``; zuko uses its own soft-clipped exp scale, of the same cost order, and its own
  spline parameterisation (soft-clipped logits, exp slopes), of the same cost order too.

  Accelerated peers (issue 12): in the MAF and NSF cases, ``fastdensity.accelerate[nflows]`` and
  ``fastdensity.accelerate[zuko]`` time the same peer flow - a deep copy of the very model the nflows
  and zuko providers time, same weights - after ``fastdensity.accelerate``, under the ``auto`` backend
  (the kernels on a GPU, the reference on a CPU): the speed-up a user of that library gets from the one
  line. Their names start with "fastdensity", so the report counts them as fastdensity's, not as peers.
"""
from __future__ import annotations

import torch
from torch import nn

from .harness import Case, Runner, Settings, op_providers, peer_pair, randn

OP = "models"
SPLINE_BOUND = 5.0  # zuko's default; nflows and ours are given the same


def _model_unavailable(name: str) -> str | None:
    try:
        from fastdensity.models import MODELS
    except ImportError:
        return "fastdensity.models is not in this build"
    return None if name in MODELS else f"fastdensity.models has no {name!r} model in this build"


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return -model.log_prob(x).mean()


def _data(settings: Settings, shape, batch: int, discrete_levels: int | None):
    if discrete_levels:
        return torch.randint(0, discrete_levels, (batch, *shape), device=settings.device)
    return randn((batch, *shape), settings, torch.float32, grad=False)


def _model_case(settings: Settings, name: str, shape, batch: int, config: dict, peers=(), label: str = "",
                kernel: str = "coupling") -> Case:
    state: dict = {}
    levels = config.get("levels")  # discrete models (PixelCNN) take integer levels

    def setup():
        if "model" not in state:
            from fastdensity.models import build_model

            m = build_model(name, shape, **config).to(settings.device)
            m.initialize(_data(settings, shape, batch, levels))  # data-dependent init (ActNorm), once
            state["model"] = m

    def step(x):
        return _loss(state["model"], x)

    # fastdensity runs every kernel the model uses; ``kernel`` only names the availability check.
    # Compiling a whole flow takes minutes on a CPU: not in quick runs, and only with 90 s in hand.
    providers = op_providers(step, settings.device, kernel, setup=setup, compile_reserve_s=90.0,
                             wrt=lambda inputs: list(state["model"].parameters()))
    if settings.quick:
        providers = [p for p in providers if not p.compiles]
    providers += list(peers)
    dims = "x".join(map(str, shape))
    return Case(
        op=f"train_step_{name}",
        shape=f"{dims} B={batch}" + (f" {label}" if label else ""),
        dtype=torch.float32,
        make_inputs=lambda: (_data(settings, shape, batch, levels),),
        providers=providers,
        unavailable=_model_unavailable(name),
    )


# --------------------------------------------------------------------------------------------------
# Peers of the same size (vectors)
# --------------------------------------------------------------------------------------------------


class _MLP(nn.Module):
    def __init__(self, n_in, n_out, hidden):
        super().__init__()
        self.hidden_features = hidden  # as nflows' ResidualNet: its spline coupling scales the logits by it
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, n_out))

    def forward(self, x, context=None):
        return self.net(x)


def _peer_runner(settings: Settings, flow: nn.Module, log_prob) -> Runner:
    flow = flow.to(settings.device)
    params = list(flow.parameters())
    return Runner(lambda x: -log_prob(flow, x).mean(), wrt=lambda inputs: params)


def _zuko(settings, kind: str, d: int, layers: int, hidden: int, bins: int = 8, accelerated: bool = False):
    def make_flow():
        import zuko

        if kind == "nsf":
            return zuko.flows.NSF(d, transforms=layers, hidden_features=(hidden, hidden), bins=bins, passes=2)
        cls = zuko.flows.RealNVP if kind == "realnvp" else zuko.flows.MAF
        return cls(d, transforms=layers, hidden_features=(hidden, hidden))

    pair = peer_pair("zuko", make_flow, lambda flow: _peer_runner(settings, flow, lambda f, x: f().log_prob(x)),
                     twin_backend="auto")
    return pair if accelerated else pair[:1]


def _nflows(settings, kind: str, d: int, layers: int, hidden: int, bins: int = 8, accelerated: bool = False):
    def make_flow():
        from nflows.distributions.normal import StandardNormal
        from nflows.flows.base import Flow
        from nflows.transforms import CompositeTransform
        from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform
        from nflows.transforms.coupling import AffineCouplingTransform, PiecewiseRationalQuadraticCouplingTransform
        from nflows.transforms.permutations import ReversePermutation

        transforms = []
        for k in range(layers):
            mask = (torch.arange(d) + k) % 2 * 2 - 1
            if kind == "realnvp":
                transforms.append(AffineCouplingTransform(mask, lambda i, o: _MLP(i, o, hidden)))
            elif kind == "nsf":
                transforms.append(PiecewiseRationalQuadraticCouplingTransform(
                    mask, lambda i, o: _MLP(i, o, hidden), num_bins=bins, tails="linear", tail_bound=SPLINE_BOUND))
            else:
                # num_blocks=1: a first masked layer and one more, two hidden layers as in the others.
                transforms.append(MaskedAffineAutoregressiveTransform(d, hidden, num_blocks=1,
                                                                      use_residual_blocks=False))
                if k < layers - 1:
                    transforms.append(ReversePermutation(d))
        return Flow(CompositeTransform(transforms), StandardNormal([d]))

    pair = peer_pair("nflows", make_flow, lambda flow: _peer_runner(settings, flow, lambda f, x: f.log_prob(x)),
                     twin_backend="auto")
    return pair if accelerated else pair[:1]


def _vector_cases(settings: Settings, d: int, layers: int, hidden: int, batch: int, bins: int = 8) -> list[Case]:
    size = f"L={layers} H={hidden}"
    return [
        _model_case(settings, "realnvp", (d,), batch, {"num_layers": layers, "hidden": hidden, "num_hidden": 2,
                                                       "scale": "sigmoid", "actnorm": False},
                    [*_zuko(settings, "realnvp", d, layers, hidden), *_nflows(settings, "realnvp", d, layers, hidden)],
                    size),
        _model_case(settings, "maf", (d,), batch, {"num_layers": layers, "hidden": hidden, "num_hidden": 2,
                                                   "scale": "sigmoid", "actnorm": False},
                    [*_zuko(settings, "maf", d, layers, hidden, accelerated=True),
                     *_nflows(settings, "maf", d, layers, hidden, accelerated=True)],
                    size),
        _model_case(settings, "nsf", (d,), batch, {"kind": "coupling", "num_layers": layers, "hidden": hidden,
                                                   "num_hidden": 2, "num_bins": bins, "tail_bound": SPLINE_BOUND,
                                                   "actnorm": False},
                    [*_zuko(settings, "nsf", d, layers, hidden, bins, accelerated=True),
                     *_nflows(settings, "nsf", d, layers, hidden, bins, accelerated=True)],
                    f"{size} K={bins}", kernel="spline"),
    ]


def cases(settings: Settings) -> list[Case]:
    if settings.cuda:
        out = _vector_cases(settings, 64, 8, 512, 4096)
        if not settings.quick:
            out += [_model_case(settings, "realnvp", (3, 32, 32), 64, {}),
                    _model_case(settings, "glow", (3, 32, 32), 64, {}),
                    _model_case(settings, "pixelcnn", (3, 32, 32), 32, {"levels": 256})]
        return out
    if settings.quick:
        return _vector_cases(settings, 8, 4, 64, 256)
    return _vector_cases(settings, 16, 6, 128, 512) + [_model_case(settings, "glow", (3, 8, 8), 16, {})]
