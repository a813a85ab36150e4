"""A small, strict GGUF header reader: metadata and a size check, without loading the model."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Sanity bounds: a corrupt header must give an error, never a multi-gigabyte allocation or a long loop.
_MAX_TENSORS = 1_000_000
_MAX_KV = 100_000
_MAX_DIMS = 8
_MAX_STRING = 64 * 1024 * 1024

# GGUF metadata value types (gguf-py GGUFValueType) -> struct format of the scalar ones.
_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9

# ggml tensor types -> (elements per block, bytes per block), from gguf-py GGML_QUANT_SIZES.
_QK_K = 256
GGML_BLOCK_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 2 + 2 + _QK_K // 16 + _QK_K // 4),  # Q2_K
    11: (256, 2 + _QK_K // 4 + _QK_K // 8 + 12),  # Q3_K
    12: (256, 2 + 2 + _QK_K // 2 + 12),  # Q4_K
    13: (256, 2 + 2 + _QK_K // 2 + _QK_K // 8 + 12),  # Q5_K
    14: (256, 2 + _QK_K // 2 + _QK_K // 4 + _QK_K // 16),  # Q6_K
    15: (256, 4 + _QK_K + _QK_K // 8),  # Q8_K
    16: (256, 2 + _QK_K // 4),  # IQ2_XXS
    17: (256, 2 + _QK_K // 4 + _QK_K // 32),  # IQ2_XS
    18: (256, 2 + _QK_K // 4 + _QK_K // 8),  # IQ3_XXS
    19: (256, 2 + _QK_K // 8 + _QK_K // 16),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 2 + _QK_K // 4 + _QK_K // 8 + _QK_K // 32 + 4),  # IQ3_S
    22: (256, 2 + _QK_K // 4 + _QK_K // 16),  # IQ2_S
    23: (256, 2 + 2 + _QK_K // 2 + _QK_K // 64),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, _QK_K // 8 + _QK_K // 16 + _QK_K // 32),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 2 + 4 * 13),  # TQ1_0
    35: (256, 2 + 64),  # TQ2_0
    39: (32, 17),  # MXFP4
}

# llama_ftype (general.file_type) -> the usual quantisation name.
FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
}


class GGUFError(ValueError):
    """A file that is missing, not GGUF, or damaged; the message names the file and says what is wrong."""


@dataclass(frozen=True)
class GGUFInfo:
    """What `autoresearch models` shows and what loading needs to know, read from the header alone."""

    path: Path
    size: int
    version: int
    n_tensors: int
    metadata: dict[str, Any] = field(repr=False)
    """Scalar and string values; arrays are summarised as `<array of N>` (the vocabulary is big)."""
    data_end: int
    """Where the last tensor's data ends; the file must be at least this long."""

    @property
    def name(self) -> str:
        value = self.metadata.get("general.name")
        return str(value) if value else self.path.stem

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    @property
    def quantisation(self) -> str:
        file_type = self.metadata.get("general.file_type")
        if isinstance(file_type, int):
            return FILE_TYPES.get(file_type, f"type {file_type}")
        return "?"

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.context_length")
        return int(value) if isinstance(value, int) else None

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value.strip() else None


class _Reader:
    """Bounds-checked little-endian reads from a buffer; running off the end is a GGUFError."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.path = path

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise self.fail(f"truncated GGUF file: the header ends inside {what} (file is {self.size} bytes)")
        self.pos = start + n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self, what: str) -> str:
        length = self.scalar("<Q", what)
        if length > _MAX_STRING:
            raise self.fail(f"corrupt GGUF header: {what} claims {length} bytes")
        start = self.take(length, what)
        return bytes(self.buf[start : start + length]).decode("utf-8", errors="replace")

    def skip_string(self, what: str) -> None:
        length = self.scalar("<Q", what)
        if length > _MAX_STRING:
            raise self.fail(f"corrupt GGUF header: {what} claims {length} bytes")
        self.take(length, what)

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype], f"the value of {key}")
        if vtype == _STRING:
            return self.string(f"the value of {key}")
        if vtype == _ARRAY:
            item_type = self.scalar("<I", f"the array type of {key}")
            count = self.scalar("<Q", f"the array length of {key}")
            if count > self.size:
                raise self.fail(f"corrupt GGUF header: {key} claims {count} items")
            if item_type in _SCALAR_FORMATS:
                self.take(count * struct.calcsize(_SCALAR_FORMATS[item_type]), f"the array {key}")
            elif item_type == _STRING:
                for _ in range(count):
                    self.skip_string(f"the array {key}")
            else:
                raise self.fail(f"corrupt GGUF header: {key} is an array of unknown type {item_type}")
            return f"<array of {count}>"
        raise self.fail(f"corrupt GGUF header: {key} has unknown value type {vtype}")


def read_gguf(path: Path | str) -> GGUFInfo:
    """Parse a GGUF file's header and check that all tensor data is present; GGUFError if anything is off."""
    path = Path(path)
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if not path.is_file():
        raise GGUFError(f"{path}: not a file")
    size = path.stat().st_size
    if size < 24:
        raise GGUFError(f"{path}: not a GGUF model file ({size} bytes, too short for a GGUF header)")
    try:
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, path, size)
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _parse(buf: Any, path: Path, size: int) -> GGUFInfo:
    reader = _Reader(buf, path)
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        shown = magic.decode("ascii", errors="replace")
        raise GGUFError(f"{path}: not a GGUF model file (starts with {shown!r}, expected 'GGUF')")
    reader.pos = 4
    version = reader.scalar("<I", "the version")
    if version not in (2, 3):
        raise GGUFError(f"{path}: unsupported GGUF version {version} (2 and 3 are supported)")
    n_tensors = reader.scalar("<Q", "the tensor count")
    n_kv = reader.scalar("<Q", "the metadata count")
    if n_tensors > _MAX_TENSORS or n_kv > _MAX_KV:
        raise GGUFError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} metadata keys)")

    metadata: dict[str, Any] = {}
    for index in range(n_kv):
        key = reader.string(f"metadata key {index}")
        vtype = reader.scalar("<I", f"the type of {key}")
        metadata[key] = reader.value(vtype, key)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: corrupt GGUF header: general.alignment is {alignment!r}")

    data_needed = 0
    for index in range(n_tensors):
        name = reader.string(f"tensor name {index}")
        n_dims = reader.scalar("<I", f"the dimensions of {name}")
        if n_dims > _MAX_DIMS:
            raise GGUFError(f"{path}: corrupt GGUF header: tensor {name} has {n_dims} dimensions")
        dims = [reader.scalar("<Q", f"the shape of {name}") for _ in range(n_dims)]
        ggml_type = reader.scalar("<I", f"the type of {name}")
        offset = reader.scalar("<Q", f"the offset of {name}")
        n_bytes = _tensor_bytes(dims, ggml_type)
        data_needed = max(data_needed, offset + n_bytes)

    data_start = -(-reader.pos // alignment) * alignment
    data_end = data_start + data_needed
    if data_end > size:
        missing = data_end - size
        raise GGUFError(
            f"{path}: truncated GGUF file: the tensors need {data_end} bytes but the file has {size} "
            f"({missing} bytes missing; was a download or copy interrupted?)"
        )
    return GGUFInfo(
        path=path, size=size, version=version, n_tensors=n_tensors, metadata=metadata, data_end=data_end
    )


def _tensor_bytes(dims: list[int], ggml_type: int) -> int:
    """Bytes of one tensor's data; 0 for a type this reader does not know (the offset still counts)."""
    block = GGML_BLOCK_SIZES.get(ggml_type)
    if block is None:
        return 0
    elements_per_block, bytes_per_block = block
    count = 1
    for dim in dims:
        count *= dim
    return count // elements_per_block * bytes_per_block
