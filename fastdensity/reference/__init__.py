"""Pure-PyTorch ground truth for every op, one module per op: obviously right, never optimised.

Each kernel is judged against its reference; each reference is judged against the math (Jacobians,
``torch.distributions``). These are also the path every op takes on CPU under the ``auto`` backend.
"""
