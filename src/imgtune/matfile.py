"""Numeric arrays from MATLAB level-5 .mat files (Oxford flowers-102 ships its labels and split this way).

Forty lines of format instead of a SciPy dependency for two small files: a 128-byte header, then tagged data
elements; a matrix element holds flags, dimensions, a name and its column-major data, and a compressed element
is zlib around one of those. Anything that is not a numeric matrix is skipped.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from imgtune.errors import UserError

_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MATRIX, _COMPRESSED = 14, 15
_NUMERIC_CLASSES = range(6, 16)  # double, single, int8 .. uint64


class MatError(UserError, ValueError):
    """A .mat file imgtune cannot read; the message names the file."""


def _elements(buf: bytes, order: str, origin: str) -> list[tuple[int, bytes]]:
    """(type, payload) of each data element, small-element form and 8-byte padding included."""
    out, pos = [], 0
    while pos + 8 <= len(buf):
        kind, size = struct.unpack(order + "II", buf[pos : pos + 8])
        if kind >> 16:  # small element: size and type in one word, data in the next four bytes
            kind, size = kind & 0xFFFF, kind >> 16
            out.append((kind, buf[pos + 4 : pos + 4 + size]))
            pos += 8
            continue
        if pos + 8 + size > len(buf):
            raise MatError(f"{origin}: truncated data element ({size} bytes announced at offset {pos})")
        out.append((kind, buf[pos + 8 : pos + 8 + size]))
        pos += 8 + (size if kind == _COMPRESSED else -(-size // 8) * 8)
    return out


def _matrix(payload: bytes, order: str, origin: str) -> tuple[str, np.ndarray] | None:
    parts = _elements(payload, order, origin)
    if len(parts) < 4:
        return None
    flags = struct.unpack(order + "I", parts[0][1][:4])[0]
    if flags & 0xFF not in _NUMERIC_CLASSES or flags & 0x800:  # not numeric, or complex
        return None
    dims = struct.unpack(order + f"{len(parts[1][1]) // 4}i", parts[1][1])
    name = parts[2][1].decode("ascii", "replace")
    kind, data = parts[3]
    if kind not in _TYPES:
        return None
    values = np.frombuffer(data, dtype=np.dtype(order + _TYPES[kind]))
    if values.size != int(np.prod(dims)):
        raise MatError(f"{origin}: variable {name!r} has {values.size} values for dimensions {dims}")
    return name, values.reshape(dims, order="F")


def load_mat(path: Path) -> dict[str, np.ndarray]:
    """name -> array for every numeric matrix in a level-5 .mat file (compressed or not)."""
    raw = Path(path).read_bytes()
    if raw[:128].find(b"MATLAB 7.3") >= 0:
        raise MatError(f"{path}: a MATLAB 7.3 (HDF5) file; save it with -v7 or earlier")
    if len(raw) < 128 or raw[126:128] not in (b"IM", b"MI"):
        raise MatError(f"{path}: not a MATLAB level-5 .mat file")
    order = "<" if raw[126:128] == b"IM" else ">"
    out: dict[str, np.ndarray] = {}
    for kind, payload in _elements(raw[128:], order, str(path)):
        if kind == _COMPRESSED:
            try:
                payload = zlib.decompress(payload)
            except zlib.error as e:
                raise MatError(f"{path}: damaged compressed data ({e})") from None
            kind, payload = _elements(payload, order, str(path))[0]
        if kind == _MATRIX and (found := _matrix(payload, order, str(path))) is not None:
            out[found[0]] = found[1]
    return out
