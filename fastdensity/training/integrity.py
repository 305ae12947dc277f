"""What makes a checkpoint trustworthy: a checksum of its contents, and finite tensors.

Checksum
    SHA-256 of a canonical serialisation of the checkpoint's contents (everything but the checksum
    itself), so it can be recomputed from what ``torch.load(..., weights_only=True)`` returns, whatever
    byte layout ``torch.save`` chose. Each value is fed as a type tag and its length, then:

        tensor      dtype, shape, then its elements' bytes (contiguous, native byte order)
        dict        its items in a fixed key order (sorted by key type name, then repr)
        list/tuple  its items in order (the tag tells the two apart)
        str         UTF-8 bytes;  int, float, bool, None: ``repr`` (exact for floats)

    Any flipped bit in a tensor, a number or a name changes the digest; a file truncated or garbled
    past parsing fails to load at all. Both are "corrupt" to :mod:`.checkpoint`.

Finite
    A checkpoint is only good if every floating tensor in it (weights, optimizer moments) is finite:
    :func:`non_finite_tensors` lists the ones that are not.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterator

import torch

__all__ = ["ALGORITHM", "payload_digest", "named_tensors", "non_finite_tensors"]

ALGORITHM = "sha256"


_SCALAR_TAGS = {bool: b"?", int: b"I", float: b"F", type(None): b"N"}


def payload_digest(payload: Any) -> str:
    """Hex SHA-256 of ``payload`` (nested dicts, lists, tuples, tensors, strings, numbers, None)."""
    h = hashlib.sha256()
    _feed(h, payload)
    return h.hexdigest()


def _tagged(h, tag: bytes, body: bytes) -> None:
    h.update(tag + len(body).to_bytes(8, "little") + body)


def _feed(h, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        _tagged(h, b"T", f"{t.dtype}{tuple(t.shape)}".encode())
        _tagged(h, b"B", t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        _tagged(h, b"D", str(len(value)).encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, key)
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        _tagged(h, b"L" if isinstance(value, list) else b"U", str(len(value)).encode())
        for item in value:
            _feed(h, item)
    elif isinstance(value, str):
        _tagged(h, b"S", value.encode("utf-8"))
    elif type(value) in _SCALAR_TAGS:
        _tagged(h, _SCALAR_TAGS[type(value)], repr(value).encode())
    else:
        raise TypeError(f"a checkpoint holds only tensors, dicts, lists, tuples, strings, numbers and None; "
                        f"got {type(value).__name__}")


def named_tensors(value: Any, where: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in ``value`` with its dotted path (``state_dict.layers.0.weight``)."""
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from named_tensors(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from named_tensors(item, f"{where}[{i}]")


def non_finite_tensors(payload: Any) -> tuple[list[str], int]:
    """``(names of the floating tensors holding a NaN or an infinity, how many tensors there are)``;
    names are dotted paths such as ``state_dict.layers.0.weight``."""
    bad, count = [], 0
    for name, t in named_tensors(payload):
        count += 1
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad, count
