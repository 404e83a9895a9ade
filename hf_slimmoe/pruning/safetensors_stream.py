"""Write a safetensors file as a stream: header first, then each tensor's bytes as soon as they are computed.

`safetensors.torch.save_file` needs every tensor of a file in memory at once. Streaming surgery knows the name, dtype
and shape of every output tensor before it reads a single weight (they follow from the input headers and the target
sizes), so [`SafetensorsStreamWriter`] writes the header up front and then appends each tensor in pieces, holding at
most one piece. The bytes on disk are exactly those `save_file` writes for the same tensors and metadata: the same
compact JSON header padded with spaces to a multiple of 8 bytes, the same data order (dtype from widest to narrowest
as safetensors orders them, then name), little-endian data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable

import torch

# safetensors' dtype enum order (`safetensors::Dtype`); `save_file` stores tensors by this order descending, then name.
DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
               "C64", "F64", "I64", "U64")
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "C64": 8, "F64": 8, "I64": 8, "U64": 8}


def tensor_nbytes(dtype: str, shape: Iterable[int]) -> int:
    """Bytes of a tensor of safetensors dtype `dtype` (e.g. `"BF16"`) and `shape`."""
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"safetensors dtype {dtype!r} is not supported by the streaming writer "
                         f"(supported: {', '.join(DTYPE_ORDER)}).")
    count = 1
    for size in shape:
        count *= int(size)
    return count * DTYPE_SIZES[dtype]


def data_order(specs: dict[str, tuple[str, list[int]]]) -> list[str]:
    """Names of `specs` (`name -> (dtype, shape)`) in the order `safetensors.torch.save_file` stores their data."""
    for name, (dtype, _) in specs.items():
        tensor_nbytes(dtype, ())  # raises for an unknown dtype
    return sorted(specs, key=lambda name: (-DTYPE_ORDER.index(specs[name][0]), name))


class SafetensorsStreamWriter:
    """
    Writes one safetensors file whose tensors are declared up front and whose data arrives piece by piece.

    Args:
        path (`str`): the file to write.
        specs (`dict[str, tuple[str, list[int]]]`): every tensor's safetensors dtype (`"BF16"`, `"F32"`, ...)
            and shape.
        metadata (`dict[str, str]`, *optional*): the header's `__metadata__` (e.g. `{"format": "pt"}`).

    Use [`order`] for the sequence in which tensors must be written, [`write`] once per tensor with an iterable of
    contiguous pieces that concatenate (along dim 0, in storage order) to the tensor, and [`close`] at the end; a
    piece of the wrong dtype, a tensor with too few or too many bytes, or a tensor never written raises `ValueError`.
    """

    def __init__(self, path: str | os.PathLike, specs: dict[str, tuple[str, list[int]]],
                 metadata: dict[str, str] | None = None):
        self.path = os.fspath(path)
        self.order = data_order(specs)
        header: dict = {} if metadata is None else {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
        self.sizes, offset = {}, 0
        for name in self.order:
            dtype, shape = specs[name]
            size = tensor_nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": [int(s) for s in shape], "data_offsets": [offset, offset + size]}
            self.sizes[name] = size
            offset += size
        self.dtypes = {name: specs[name][0] for name in self.order}
        encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)
        self._next = 0

    def write(self, name: str, pieces: Iterable[torch.Tensor]) -> None:
        """Append the data of tensor `name` (the next one in [`order`]) from its pieces, freeing each when written."""
        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing (all written)"
            raise ValueError(f"{self.path}: tensors must be written in data order; got {name!r}, "
                             f"expected {expected!r}.")
        written = 0
        for piece in pieces:
            if _safetensors_dtype(piece.dtype) != self.dtypes[name]:
                raise ValueError(f"{self.path}: {name} is declared {self.dtypes[name]} but a piece is {piece.dtype}.")
            data = piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._file.write(data.data)
            written += data.nbytes
            del piece, data  # before the next piece is produced
        if written != self.sizes[name]:
            raise ValueError(f"{self.path}: {name} received {written} bytes, its header declares {self.sizes[name]}.")
        self._next += 1

    def close(self) -> None:
        """Flush and close; raises `ValueError` when a declared tensor was never written."""
        self._file.close()
        if self._next != len(self.order):
            raise ValueError(f"{self.path}: {len(self.order) - self._next} declared tensors were never written "
                             f"(first: {self.order[self._next]!r}).")

    def abort(self) -> None:
        """Close without checks (the file is incomplete; the caller removes it)."""
        self._file.close()


_TORCH_TO_SAFETENSORS = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e8m0fnu: "F8_E8M0", torch.int16: "I16", torch.uint16: "U16",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
    torch.complex64: "C64", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
}


def _safetensors_dtype(dtype: torch.dtype) -> str:
    if dtype not in _TORCH_TO_SAFETENSORS:
        raise ValueError(f"torch dtype {dtype} has no safetensors equivalent in the streaming writer.")
    return _TORCH_TO_SAFETENSORS[dtype]


__all__ = ["SafetensorsStreamWriter", "data_order", "tensor_nbytes", "DTYPE_ORDER"]
