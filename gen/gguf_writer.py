"""gguf_writer.py — a small GGUF v3 writer in pure Python + NumPy.

File layout written (all little endian):
    "GGUF" | u32 version = 3 | i64 n_tensors | i64 n_kv
    n_kv × (string key | u32 value type | value)
    n_tensors × (string name | u32 n_dims | i64 ne[n_dims] | u32 ggml type | u64 offset)
    zero padding to `general.alignment` (default 32)
    data blob: each tensor at its offset (a multiple of the alignment), zero padded between
A string is u64 length + UTF-8 bytes (no NUL); an array value is u32 element type, u64 count,
then the elements (arrays of strings and nested arrays are allowed).

Dimensions are GGUF order, innermost first: a Hugging Face [out, in] weight has
ne = (in, out); stacked experts [E, out, in] have ne = (in, out, E). The bytes are the same as
the row-major NumPy array, so `add_tensor(name, arr)` takes the NumPy shape and reverses it.

Usage:
    w = GGUFWriter("model.gguf")
    w.add_string("general.architecture", "qwen3moe")
    w.add_uint32("qwen3moe.block_count", 2)
    w.add_float32("qwen3moe.rope.freq_base", 1e4)
    w.add_array("some.list", [1, 2, 3], GGUFValueType.INT32)
    w.add_tensor("output_norm.weight", np.ones(64, np.float32))              # F32 data
    w.add_tensor_bytes("blk.0.attn_q.weight", raw, ne=(64, 128), ggml_type=8)  # quantized
    w.add_tensor_bytes("big", lambda: make_bytes(), ne=..., ggml_type=...)      # produced lazily
    w.write()
Keys and tensors are written in the order added. A callable data source is called once, at
write time, so files larger than memory can be streamed tensor by tensor.
"""
from __future__ import annotations

import struct

import numpy as np

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32


class GGUFValueType:
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_FMT = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}

# ggml type ids and block geometry (elements per block, bytes per block)
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4),
    27: ("I64", 1, 8), 28: ("F64", 1, 8), 30: ("BF16", 1, 2), 39: ("MXFP4", 32, 17),
}
_NUMPY_TO_GGML = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.int8): 24,
                  np.dtype(np.int16): 25, np.dtype(np.int32): 26, np.dtype(np.int64): 27,
                  np.dtype(np.float64): 28}


def tensor_nbytes(ne, ggml_type: int) -> int:
    name, be, bb = GGML_TYPES[ggml_type]
    n0 = int(ne[0])
    if n0 % be:
        raise ValueError(f"{name}: ne[0] = {n0} is not a multiple of the block size {be}")
    rows = 1
    for d in ne[1:]:
        rows *= int(d)
    return n0 // be * bb * rows


def _pack_string(s) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(b)) + b


def _pack_value(vtype: int, value, elem_type: int | None = None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _pack_string(value)
    if vtype == GGUFValueType.ARRAY:
        if elem_type is None:
            raise ValueError("array value needs an element type")
        items = list(value)
        out = [struct.pack("<IQ", elem_type, len(items))]
        if elem_type in _SCALAR_FMT:
            fmt = _SCALAR_FMT[elem_type]
            out.append(b"".join(struct.pack(fmt, v) for v in items))
        elif elem_type == GGUFValueType.STRING:
            out.extend(_pack_string(v) for v in items)
        elif elem_type == GGUFValueType.ARRAY:
            # nested arrays: each item is (element type, values)
            out.extend(_pack_value(GGUFValueType.ARRAY, vals, et) for et, vals in items)
        else:
            raise ValueError(f"bad array element type {elem_type}")
        return b"".join(out)
    if vtype in _SCALAR_FMT:
        return struct.pack(_SCALAR_FMT[vtype], value)
    raise ValueError(f"bad value type {vtype}")


class GGUFWriter:
    def __init__(self, path: str, alignment: int = DEFAULT_ALIGNMENT):
        self.path = path
        self.alignment = alignment
        self.kv = []          # (key, packed type+value)
        self.keys = set()
        self.tensors = []     # (name, ne, ggml_type, nbytes, source)
        self.names = set()
        if alignment != DEFAULT_ALIGNMENT:
            self.add_uint32("general.alignment", alignment)

    # ---- key/values ----
    def add_kv(self, key: str, vtype: int, value, elem_type: int | None = None):
        if key in self.keys:
            raise ValueError(f"duplicate key {key}")
        self.keys.add(key)
        self.kv.append((key, struct.pack("<I", vtype) + _pack_value(vtype, value, elem_type)))

    def add_uint8(self, k, v): self.add_kv(k, GGUFValueType.UINT8, int(v))
    def add_int8(self, k, v): self.add_kv(k, GGUFValueType.INT8, int(v))
    def add_uint16(self, k, v): self.add_kv(k, GGUFValueType.UINT16, int(v))
    def add_int16(self, k, v): self.add_kv(k, GGUFValueType.INT16, int(v))
    def add_uint32(self, k, v): self.add_kv(k, GGUFValueType.UINT32, int(v))
    def add_int32(self, k, v): self.add_kv(k, GGUFValueType.INT32, int(v))
    def add_uint64(self, k, v): self.add_kv(k, GGUFValueType.UINT64, int(v))
    def add_int64(self, k, v): self.add_kv(k, GGUFValueType.INT64, int(v))
    def add_float32(self, k, v): self.add_kv(k, GGUFValueType.FLOAT32, float(v))
    def add_float64(self, k, v): self.add_kv(k, GGUFValueType.FLOAT64, float(v))
    def add_bool(self, k, v): self.add_kv(k, GGUFValueType.BOOL, bool(v))
    def add_string(self, k, v): self.add_kv(k, GGUFValueType.STRING, v)

    def add_array(self, k, values, elem_type: int):
        self.add_kv(k, GGUFValueType.ARRAY, values, elem_type)

    # ---- tensors ----
    def add_tensor_bytes(self, name: str, data, ne, ggml_type: int):
        """data: bytes-like of exactly tensor_nbytes(ne, ggml_type) bytes, or a callable that
        returns them at write time. ne: GGUF dims, innermost first."""
        if name in self.names:
            raise ValueError(f"duplicate tensor {name}")
        if len(name.encode()) >= 64:
            raise ValueError(f"tensor name too long for ggml (63 bytes max): {name}")
        ne = tuple(int(d) for d in ne)
        if not 1 <= len(ne) <= 4:
            raise ValueError(f"{name}: {len(ne)} dimensions")
        nbytes = tensor_nbytes(ne, ggml_type)
        if not callable(data) and len(data) != nbytes:
            raise ValueError(f"{name}: {len(data)} bytes given, {nbytes} expected")
        self.names.add(name)
        self.tensors.append((name, ne, int(ggml_type), nbytes, data))

    def add_tensor(self, name: str, arr: np.ndarray):
        """An unquantized NumPy array (float32, float16, int*): NumPy shape, outermost first."""
        arr = np.ascontiguousarray(arr)
        t = _NUMPY_TO_GGML.get(arr.dtype)
        if t is None:
            raise ValueError(f"{name}: dtype {arr.dtype} has no ggml type; use add_tensor_bytes")
        self.add_tensor_bytes(name, arr.astype(arr.dtype.newbyteorder("<")).tobytes(),
                              tuple(reversed(arr.shape)), t)

    # ---- output ----
    def _pad(self, n: int) -> int:
        return (self.alignment - n % self.alignment) % self.alignment

    def write(self):
        header = [GGUF_MAGIC, struct.pack("<Iqq", GGUF_VERSION, len(self.tensors), len(self.kv))]
        for key, packed in self.kv:
            header.append(_pack_string(key))
            header.append(packed)
        offset = 0
        for name, ne, t, nbytes, _ in self.tensors:
            header.append(_pack_string(name))
            header.append(struct.pack("<I", len(ne)))
            header.append(struct.pack(f"<{len(ne)}q", *ne))
            header.append(struct.pack("<IQ", t, offset))
            offset += nbytes + self._pad(nbytes)
        head = b"".join(header)
        with open(self.path, "wb") as f:
            f.write(head)
            f.write(b"\0" * self._pad(len(head)))
            for name, ne, t, nbytes, data in self.tensors:
                blob = data() if callable(data) else data
                if len(blob) != nbytes:
                    raise ValueError(f"{name}: source produced {len(blob)} bytes, {nbytes} expected")
                f.write(blob)
                f.write(b"\0" * self._pad(nbytes))


# ---------------------------------------------------------------------------------------------
# a minimal reader, for tests and round trips
# ---------------------------------------------------------------------------------------------
def read_gguf(path: str):
    """Returns (kv dict, tensors dict name -> (ne, ggml_type, bytes)). Arrays come back as lists."""
    buf = open(path, "rb").read()
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return vals

    def take_str():
        nonlocal pos
        (n,) = take("<Q")
        s = buf[pos:pos + n].decode("utf-8")
        pos += n
        return s

    def take_val(t):
        if t == GGUFValueType.STRING:
            return take_str()
        if t == GGUFValueType.ARRAY:
            et, n = take("<IQ")
            return [take_val(et) for _ in range(n)]
        return take(_SCALAR_FMT[t])[0]

    if buf[:4] != GGUF_MAGIC:
        raise ValueError("not a GGUF file")
    pos = 4
    version, n_t, n_kv = take("<Iqq")
    if version != GGUF_VERSION:
        raise ValueError(f"GGUF version {version}")
    kv = {}
    for _ in range(n_kv):
        k = take_str()
        (t,) = take("<I")
        kv[k] = take_val(t)
    align = kv.get("general.alignment", DEFAULT_ALIGNMENT)
    infos = []
    for _ in range(n_t):
        name = take_str()
        (nd,) = take("<I")
        ne = take(f"<{nd}q")
        t, off = take("<IQ")
        infos.append((name, ne, t, off))
    base = pos + (align - pos % align) % align
    tensors = {}
    for name, ne, t, off in infos:
        nb = tensor_nbytes(ne, t)
        tensors[name] = (ne, t, buf[base + off: base + off + nb])
    return kv, tensors
