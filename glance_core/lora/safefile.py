"""Read safetensors headers defensively: every failure is a LoraFileError naming the file.

Pickle checkpoints are refused before a single byte is unpickled.
"""
import json
import os
import struct

from ..errors import LoraFileError

PICKLE_EXTS = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
PICKLE_PROTOCOLS = (b"\x02", b"\x03", b"\x04", b"\x05")  # the byte after a pickle's 0x80 opcode
MAX_HEADER = 100 * 1024 * 1024
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def read_header(path):
    """Validate a safetensors file and return (tensor entries {key: {dtype, shape, data_offsets}}, metadata)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise LoraFileError(path, "file not found")
    if not os.path.isfile(path):
        raise LoraFileError(path, "not a file")
    ext = os.path.splitext(path)[1].lower()
    if ext in PICKLE_EXTS:
        raise LoraFileError(path, f"'{ext}' files are pickle checkpoints, which can run code when loaded; "
                                  "refused without unpickling. Convert the file to .safetensors")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
        n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
        looks_safetensors = len(head) == 9 and head[8:9] == b"{" and 2 <= n <= MAX_HEADER
        # Only now test pickle magic: a safetensors header length can begin with the same bytes.
        pickled = head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in PICKLE_PROTOCOLS)
        if pickled and not looks_safetensors:
            raise LoraFileError(path, "this is a pickle checkpoint (torch.save) despite its name; refused without "
                                      "unpickling. Convert it to safetensors")
        if len(head) < 8:
            raise LoraFileError(path, f"not a safetensors file: only {size} bytes")
        if not looks_safetensors:
            raise LoraFileError(path, "not a safetensors file (no valid header)")
        if 8 + n > size:
            raise LoraFileError(path, f"truncated: header says {n} bytes, file has {size - 8} after the length")
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise LoraFileError(path, f"corrupt safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoraFileError(path, "corrupt safetensors header (metadata must map strings to strings)")
    data_size = size - 8 - n
    for key, entry in header.items():
        _check_entry(path, key, entry, data_size)
    return header, metadata


def _check_entry(path, key, entry, data_size):
    try:
        dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        numel = 1
        for d in shape:
            numel *= int(d)
        expect = numel * DTYPE_SIZES[dtype]
    except (KeyError, TypeError, ValueError):
        raise LoraFileError(path, f"corrupt safetensors header entry for tensor {key!r}") from None
    if end - start != expect or start < 0:
        raise LoraFileError(path, f"corrupt safetensors header: tensor {key!r} has {end - start} bytes for "
                                  f"shape {shape} {dtype}")
    if end > data_size:
        raise LoraFileError(path, f"truncated: tensor {key!r} ends at byte {end} of a {data_size}-byte data section")
