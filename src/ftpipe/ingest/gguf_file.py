"""Read a GGUF file's header without loading it: metadata, tensor table, and whether the file is whole.

import-gguf's `check` must refuse an unknown architecture or a truncated file before anything heavy
runs, and must stay pure and cheap; so this reads the header with the standard library (the format:
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) and skips the vocabulary arrays instead of
building them. The tensor table gives the size the file must have; only the block sizes of the
quantization types come from the `gguf` package (imported here, in the train environment).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ftpipe.core.errors import InputError

MAGIC = b"GGUF"
# Value types of the metadata (gguf.md: gguf_metadata_value_type): struct format per scalar type.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 1 << 26  # a longer "string" is a corrupt length field, not a chat template
_MAX_COUNT = 1 << 32


@dataclass(frozen=True)
class GgufHeader:
    """What import-gguf needs from a GGUF before loading it."""

    path: Path
    version: int
    metadata: dict[str, Any]  # scalars and strings; arrays as their length (`array_lengths`)
    array_lengths: dict[str, int] = field(default_factory=dict)
    tensor_count: int = 0
    expected_bytes: int | None = None  # the size the tensor table implies (None: a type unknown to `gguf`)

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None


class _Truncated(Exception):
    pass


def _read(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise _Truncated
    return data


def _unpack(fh: BinaryIO, fmt: str):
    return struct.unpack(fmt, _read(fh, struct.calcsize(fmt)))[0]


def _string(fh: BinaryIO) -> str:
    n = _unpack(fh, "<Q")
    if n > _MAX_STRING:
        raise ValueError(f"string length {n}")
    return _read(fh, n).decode("utf-8", errors="replace")


def _value(fh: BinaryIO, kind: int, keep: bool):
    if kind in _SCALARS:
        return _unpack(fh, _SCALARS[kind])
    if kind == _STRING:
        return _string(fh)
    if kind == _ARRAY:
        item, count = _unpack(fh, "<I"), _unpack(fh, "<Q")
        if count > _MAX_COUNT:
            raise ValueError(f"array length {count}")
        if item in _SCALARS:  # skipped in one seek: the vocabulary's scores and types are large
            size = struct.calcsize(_SCALARS[item]) * count
            if keep:
                return [struct.unpack(_SCALARS[item], _read(fh, struct.calcsize(_SCALARS[item])))[0]
                        for _ in range(count)]
            _read(fh, size) if size < (1 << 20) else fh.seek(size, 1)
            return count
        values = [_value(fh, item, keep) for _ in range(count)]
        return values if keep else count
    raise ValueError(f"unknown metadata value type {kind}")


def read_header(path: Path, keep_arrays: tuple[str, ...] = ()) -> GgufHeader:
    """The header of the GGUF at `path`, checked against the file's size.

    Args:
        path: the .gguf file.
        keep_arrays: metadata keys whose arrays are returned whole (others as their length).

    Raises:
        InputError: not a GGUF (magic), a truncated or corrupt header, or a file shorter than its
            tensor table says (one line, naming the file).
    """
    path = Path(path)
    hint = "check the file (a complete download has the size its source lists), or import another one"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            if fh.read(4) != MAGIC:
                raise InputError(f"{path.name} is not a GGUF file (no GGUF magic at its start)", hint=hint)
            version = _unpack(fh, "<I")
            if version not in (2, 3):
                raise InputError(f"{path.name}: GGUF version {version} is not supported (2 or 3)", hint=hint)
            tensor_count, kv_count = _unpack(fh, "<Q"), _unpack(fh, "<Q")
            metadata: dict[str, Any] = {}
            lengths: dict[str, int] = {}
            for _ in range(kv_count):
                key = _string(fh)
                kind = _unpack(fh, "<I")
                value = _value(fh, kind, key in keep_arrays)
                if kind == _ARRAY and key not in keep_arrays:
                    lengths[key] = value
                else:
                    metadata[key] = value
            tensors = []
            for _ in range(tensor_count):
                _string(fh)
                dims = [_unpack(fh, "<Q") for _ in range(_unpack(fh, "<I"))]
                tensors.append((dims, _unpack(fh, "<I"), _unpack(fh, "<Q")))
            alignment = int(metadata.get("general.alignment", 32))
            data_start = -(-fh.tell() // alignment) * alignment
    except _Truncated:
        raise InputError(f"{path.name} is truncated: the file ends inside its header", hint=hint) from None
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        raise InputError(f"{path.name} is corrupt: its header does not parse ({exc})", hint=hint) from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}", hint=hint) from None
    expected = _expected_size(tensors, data_start)
    if expected is not None and size < expected:
        raise InputError(f"{path.name} is truncated: {size:,} bytes, its tensor table needs {expected:,}", hint=hint)
    return GgufHeader(path, version, metadata, lengths, tensor_count, expected)


def _expected_size(tensors: list[tuple[list[int], int, int]], data_start: int) -> int | None:
    """data_start + the end of the last tensor's data; None when a tensor type is unknown to `gguf`."""
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:  # not the train environment: the loaders check the size later
        return None
    end = 0
    for dims, kind, offset in tensors:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            return None
        count = 1
        for d in dims:
            count *= d
        end = max(end, offset + count // block * type_size)
    return data_start + end
