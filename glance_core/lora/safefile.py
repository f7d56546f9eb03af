"""Read safetensors headers defensively: every failure is a LoraFileError naming the file.

Pickle checkpoints are refused before a single byte is unpickled.
"""
import json
import math
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
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LoraFileError(path, f"corrupt safetensors header ({e})") from None
    header = json_object(text, path, "safetensors header")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoraFileError(path, "corrupt safetensors header (__metadata__ must map strings to strings)")
    data_size = size - 8 - n
    spans = sorted((_check_entry(path, key, entry, data_size), key) for key, entry in header.items())
    _check_tiling(path, spans, data_size)
    return header, metadata


def json_object(text, path, what):
    """Parse `text` as a JSON object (dict); LoraFileError naming `path` and `what` otherwise."""
    try:
        d = json.loads(text)  # the C scanner raises RecursionError on hostile nesting, caught here
    except (ValueError, RecursionError) as e:
        raise LoraFileError(path, f"corrupt {what}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(d, dict):
        raise LoraFileError(path, f"corrupt {what}: a JSON {type(d).__name__}, not an object")
    return d


def _check_entry(path, key, entry, data_size):
    """Validate one tensor entry; returns its (start, end) byte span in the data section."""
    def bad(why):
        raise LoraFileError(path, f"corrupt safetensors header: tensor {key!r} {why}")
    if not isinstance(entry, dict):
        bad(f"is described by a JSON {type(entry).__name__}, not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        bad(f"has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_whole(d) and d >= 0 for d in shape):
        bad(f"has shape {shape!r}: needs a list of non-negative whole numbers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(o) and o >= 0 for o in offsets):
        bad(f"has data_offsets {offsets!r}: needs [start, end], non-negative whole numbers")
    start, end = offsets
    expect = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - start != expect:
        bad(f"has {end - start} bytes for shape {shape} {dtype} ({expect} needed)")
    if end > data_size:
        raise LoraFileError(path, f"truncated: tensor {key!r} ends at byte {end} of a {data_size}-byte data section")
    return start, end


def _whole(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _check_tiling(path, spans, data_size):
    # The format's rule: the tensors cover the data section exactly, with no overlap and no gap.
    pos, prev = 0, None
    for (start, end), key in spans:
        if start < pos:
            raise LoraFileError(path, f"corrupt safetensors header: tensor {key!r} overlaps {prev!r} "
                                      f"(bytes {start}..{end})")
        if start > pos:
            raise LoraFileError(path, f"corrupt safetensors header: {start - pos} unused bytes before tensor "
                                      f"{key!r} (offsets must leave no gap)")
        pos, prev = end, key
    if pos != data_size:
        raise LoraFileError(path, f"corrupt safetensors header: {data_size - pos} bytes after the last tensor "
                                  "belong to none")
