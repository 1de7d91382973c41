"""torch tensors <-> `dspark.v1.Tensor` messages: raw little-endian row-major bytes with an
explicit dtype and shape. Never pickle.

`decode_tensor` validates everything a peer could get wrong — dtype (against the allowed ones),
shape (against the expected one, `None` = any size on that axis), byte size (prod(shape) times the
item size), element count, and finite values for floating dtypes — and raises `InvalidRequest`
naming the field."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch

from dspark_common.errors import InvalidRequest
from dspark_common.proto import tensor_pb2

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INT_DTYPES = ("int64", "int32")

if sys.byteorder != "little":  # pragma: no cover - every platform we run on is little-endian
    raise ImportError("dspark tensors travel little-endian; big-endian hosts are not supported")


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise InvalidRequest(f"dtype {dtype} cannot travel; use one of {sorted(DTYPES)}", "dtype") from None


def encode_tensor(t: torch.Tensor, dtype: torch.dtype | None = None) -> tensor_pb2.Tensor:
    """A tensor (any device; optionally cast to `dtype` first) as a Tensor message."""
    t = t.detach()
    if dtype is not None:
        t = t.to(dtype)
    name = dtype_name(t.dtype)
    flat = t.to("cpu").contiguous().reshape(-1)
    return tensor_pb2.Tensor(dtype=name, shape=list(t.shape), data=flat.view(torch.uint8).numpy().tobytes())


def decode_tensor(
    msg: tensor_pb2.Tensor,
    field: str,
    *,
    dtypes: Sequence[str] = tuple(DTYPES),
    shape: Sequence[int | None] | None = None,
    finite: bool = True,
    max_elements: int | None = None,
) -> torch.Tensor:
    """Validate a Tensor message and return a CPU tensor of its dtype (owning its memory)."""
    if msg is None or not msg.dtype:
        raise InvalidRequest(f"{field} is missing (a Tensor with dtype, shape and data)", field)
    if msg.dtype not in DTYPES:
        raise InvalidRequest(f"{field} has unknown dtype {msg.dtype!r}; expected one of {list(dtypes)}", field)
    if msg.dtype not in dtypes:
        raise InvalidRequest(f"{field} must have dtype {' or '.join(dtypes)}, got {msg.dtype}", field)
    dims = list(msg.shape)
    if any(d < 0 for d in dims):
        raise InvalidRequest(f"{field} has a negative dimension in shape {dims}", field)
    if shape is not None and (
        len(dims) != len(shape) or any(want is not None and got != want for got, want in zip(dims, shape))
    ):
        expected = "[" + ", ".join("n" if w is None else str(w) for w in shape) + "]"
        raise InvalidRequest(f"{field} must have shape {expected}, got {dims}", field)
    numel = math.prod(dims)
    if max_elements is not None and numel > max_elements:
        raise InvalidRequest(f"{field} has {numel} elements; at most {max_elements} are accepted", field)
    dtype = DTYPES[msg.dtype]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if len(msg.data) != numel * itemsize:
        raise InvalidRequest(
            f"{field} carries {len(msg.data)} bytes but shape {dims} of {msg.dtype} needs {numel * itemsize}", field
        )
    if numel == 0:
        return torch.empty(dims, dtype=dtype)
    t = torch.frombuffer(bytearray(msg.data), dtype=dtype).reshape(dims)
    if finite and msg.dtype in FLOAT_DTYPES and not bool(torch.isfinite(t).all()):
        raise InvalidRequest(f"{field} contains non-finite values (NaN or inf)", field)
    return t
