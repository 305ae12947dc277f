"""Triton kernels of fastdensity, one op per module (installed as ``fastdensity.kernels``).

``fastdensity.ops`` imports each module (through :func:`fastdensity.backend.load_kernels`) when
fastdensity itself is imported; that registers the ``torch.ops.fastdensity`` ops. Triton decides at
that moment whether the kernels are compiled or interpreted, so ``TRITON_INTERPRET=1`` must be set
before ``import fastdensity``. Nothing here knows about nn.Modules.
"""
