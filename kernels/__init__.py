"""Triton kernels of fastdensity, one op per module (installed as ``fastdensity.kernels``).

Modules are imported lazily by :mod:`fastdensity.backend` on the first call that needs them, so that
``TRITON_INTERPRET`` can still be chosen before then. Nothing here knows about nn.Modules.
"""
