"""The tensor codec: one binary format for models and updates on the wire and in the blob store.

Layout: ``b"AICF\\x01"``, a little-endian ``uint32`` header length, a UTF-8 JSON
header, then the payload as little-endian float32. Decoding is zero-copy
(``numpy.frombuffer``) so the coordinator can sum large updates without
copying them first.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

MAGIC = b"AICF\x01"
_LEN = struct.Struct("<I")
MAX_HEADER_BYTES = 1 << 20
DTYPE = np.dtype("<f4")
# float32 for models and plaintext updates; uint64 for masked vectors (arithmetic modulo 2**64); uint8
# for a model stored as bytes (a gbdt job's ensemble, shared/gbdt/model.py).
DTYPES: dict[str, np.dtype[Any]] = {"float32": DTYPE, "uint64": np.dtype("<u8"), "uint8": np.dtype("u1")}
MODEL_DTYPES = ("float32", "uint8")
ALIGN = 64


class CodecError(ValueError):
    """Bytes that are not a well-formed aicfl tensor message."""


def encode(header: dict[str, Any], vector: np.ndarray) -> bytes:
    """Serialise a header and a 1-D float32 vector."""
    given = np.asarray(vector).dtype
    name = "uint64" if given == np.uint64 else "uint8" if given == np.uint8 else "float32"
    vec = np.ascontiguousarray(vector, dtype=DTYPES[name])
    if vec.ndim != 1:
        raise CodecError(f"expected a 1-D vector, got shape {vec.shape}")
    head = dict(header)
    head["dtype"] = name
    head["numel"] = int(vec.size)
    raw = json.dumps(head, sort_keys=True, separators=(",", ":")).encode()
    # Pad the header with spaces (valid JSON whitespace) so the payload starts on a
    # 64-byte boundary: aligned float32 views sum at full SIMD speed.
    prefix = len(MAGIC) + _LEN.size + len(raw)
    raw += b" " * (-prefix % ALIGN)
    # join copies the payload straight from the array: one copy of the vector, not two.
    return b"".join([MAGIC, _LEN.pack(len(raw)), raw, memoryview(vec).cast("B")])  # type: ignore[arg-type]


def decode_header(data: bytes | memoryview) -> tuple[dict[str, Any], int]:
    """Read only the header; return it and the payload offset."""
    view = memoryview(data)
    if len(view) < len(MAGIC) + _LEN.size or bytes(view[: len(MAGIC)]) != MAGIC:
        raise CodecError("not an aicfl tensor message (bad magic)")
    (hlen,) = _LEN.unpack_from(view, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if hlen > MAX_HEADER_BYTES or start + hlen > len(view):
        raise CodecError(f"header length {hlen} is out of bounds")
    try:
        header = json.loads(bytes(view[start : start + hlen]))
    except (ValueError, RecursionError) as err:  # ValueError covers bad UTF-8, bad JSON, huge integers
        raise CodecError(f"header is not valid JSON: {type(err).__name__}") from None
    if not isinstance(header, dict):
        raise CodecError("header must be a JSON object")
    return header, start + hlen


def model_dtype(data: bytes | memoryview) -> str:
    """The dtype a stored model's header names, when it is one a model may have (else float32, which
    :func:`decode` then refuses with the reason)."""
    name = decode_header(data)[0].get("dtype")
    return name if name in MODEL_DTYPES else "float32"


def decode(
    data: bytes | memoryview,
    *,
    expected_numel: int | None = None,
    check_finite: bool = True,
    dtype: str = "float32",
) -> tuple[dict[str, Any], np.ndarray]:
    """Parse a message; the vector is a read-only view onto ``data``.

    Raises :class:`CodecError` on a wrong dtype, a payload whose length does
    not match the header, an unexpected size, or non-finite values.
    """
    header, offset = decode_header(data)
    if header.get("dtype") != dtype:
        raise CodecError(f"unsupported dtype {header.get('dtype')!r}; expected {dtype!r}")
    kind = DTYPES[dtype]
    numel = header.get("numel")
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise CodecError("header 'numel' must be a non-negative integer")
    payload = len(data) - offset
    if payload != numel * kind.itemsize:
        raise CodecError(f"payload is {payload} bytes; header says {numel} {dtype} values")
    if expected_numel is not None and numel != expected_numel:
        raise CodecError(f"expected {expected_numel} values, got {numel}")
    vec = np.frombuffer(data, dtype=kind, count=numel, offset=offset)
    if check_finite and kind.kind == "f" and numel and not np.isfinite(vec).all():
        raise CodecError("vector contains NaN or infinite values")
    return header, vec
