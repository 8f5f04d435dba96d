"""quants.py — NumPy quantize / dequantize for the ggml block types moe reads.

Types (ggml type id, elements per block, bytes per block):

    F32    0    1    4      IEEE binary32
    F16    1    1    2      IEEE binary16
    BF16  30    1    2      upper half of binary32
    Q8_0   8   32   34      fp16 d | int8 q[32]                      x = q·d
    Q4_0   2   32   18      fp16 d | u8 qs[16]                       x = (nib - 8)·d
                            element j in the low nibble of qs[j], element j+16 in the high one
    Q4_K  12  256  144      fp16 d | fp16 dmin | u8 scales[12] | u8 qs[128]
                            8 sub-blocks of 32, each with a 6-bit scale sc and 6-bit min m:
                            x = (d·sc)·q - (dmin·m),  q in 0..15
    Q5_K  13  256  176      fp16 d | fp16 dmin | u8 scales[12] | u8 qh[32] | u8 qs[128]
                            as Q4_K with a fifth bit from qh: q in 0..31
    Q6_K  14  256  210      u8 ql[128] | u8 qh[64] | int8 scales[16] | fp16 d
                            16 sub-blocks of 16: x = (d·sc)·(q - 32),  q in 0..63
    MXFP4 39   32   17      u8 e (E8M0) | u8 qs[16]
                            x = kv[nib]·2^(e-128), kv = doubled E2M1 values; nibble order as Q4_0

Dequantization reproduces ggml's reference dequantize_row_* exactly: every product and
difference is a float32 operation in the same order as the C code, e.g. for Q4_K
    d1 = f32(d) * f32(sc);  m1 = f32(dmin) * f32(m);  y = d1 * f32(q) - m1
(d·sc and dmin·m are exact, and so is d1·q: at most 22 significant bits, so an FMA gives the
same bits here). For Q6_K the order matters: (d·sc)·q can round, d·(sc·q) may differ.
Each value is therefore reproducible bit for bit by a C implementation that follows the
same order.

Quantization is reference quality, not byte-identical to llama.cpp: Q8_0/Q4_0 use the
classic absmax scale; the K-quants search a grid of candidate scales per sub-block with a
least-squares refit (min-error), then quantize the sub-block scales to 6 bits (Q4_K/Q5_K)
or int8 (Q6_K) and recompute the codes against the final, rounded scales. MXFP4 picks the
exponent (of the absmax guess and its neighbours) with the smallest squared error.

Public API:
    TYPES                              name -> TypeInfo(name, id, block_elems, block_bytes)
    type_info(name_or_id)
    row_bytes(type, n)                 bytes for n elements (n a multiple of the block size)
    quantize(x, type)   -> bytes       x: float array, size a multiple of the block size
    dequantize(buf, type, n) -> float32 array of n values
Everything works on flat data; a tensor of any shape is quantized row by row when its
innermost dimension is a multiple of the block size, which equals flattening it.
"""
from __future__ import annotations

import collections

import numpy as np

TypeInfo = collections.namedtuple("TypeInfo", "name id block_elems block_bytes")

TYPES = {
    "F32": TypeInfo("F32", 0, 1, 4),
    "F16": TypeInfo("F16", 1, 1, 2),
    "Q4_0": TypeInfo("Q4_0", 2, 32, 18),
    "Q8_0": TypeInfo("Q8_0", 8, 32, 34),
    "Q4_K": TypeInfo("Q4_K", 12, 256, 144),
    "Q5_K": TypeInfo("Q5_K", 13, 256, 176),
    "Q6_K": TypeInfo("Q6_K", 14, 256, 210),
    "BF16": TypeInfo("BF16", 30, 1, 2),
    "MXFP4": TypeInfo("MXFP4", 39, 32, 17),
}
_BY_ID = {t.id: t for t in TYPES.values()}

QK = 256  # K-quant super-block

# MXFP4 code values: E2M1 {0, .5, 1, 1.5, 2, 3, 4, 6} doubled, then their negatives
KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)

F32 = np.float32


def type_info(t) -> TypeInfo:
    if isinstance(t, TypeInfo):
        return t
    if isinstance(t, (int, np.integer)):
        return _BY_ID[int(t)]
    return TYPES[str(t).upper()]


def row_bytes(t, n: int) -> int:
    ti = type_info(t)
    if n % ti.block_elems:
        raise ValueError(f"{ti.name}: {n} elements is not a multiple of {ti.block_elems}")
    return n // ti.block_elems * ti.block_bytes


# ---------------------------------------------------------------------------------------------
# scalar helpers
# ---------------------------------------------------------------------------------------------
def _f16_bits(x) -> np.ndarray:
    """float -> binary16 bits, round to nearest even (overflow to inf)."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=F32).astype(np.float16).view(np.uint16)


def _f16_value(bits) -> np.ndarray:
    """binary16 bits -> exact float32 value."""
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(F32)


def _f16_round(x) -> np.ndarray:
    return _f16_value(_f16_bits(x))


def _f16_round_up(x) -> np.ndarray:
    """Nearest binary16 value whose magnitude is >= |x| (for super-block scales: a scale
    that rounded down would clip the largest code, one that underflowed to 0 would zero
    the whole block)."""
    x = np.asarray(x, dtype=F32)
    bits = _f16_bits(np.abs(x))
    lower = _f16_value(bits) < np.abs(x)
    bits = np.where(lower, bits + np.uint16(1), bits).astype(np.uint16)
    v = np.copysign(_f16_value(bits), x).astype(F32)
    return np.where(v == 0, F32(0), v).astype(F32)      # never -0


def _e8m0_half(e) -> np.ndarray:
    """ggml's E8M0 'half' decode: 2^(e-128) as float32 (e = 0, 1 give subnormals)."""
    e = np.asarray(e, dtype=np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23))
    return bits.astype(np.uint32).view(F32)


def _blocks(buf, t, n):
    ti = type_info(t)
    nb = n // ti.block_elems
    b = np.frombuffer(bytes(buf), dtype=np.uint8, count=nb * ti.block_bytes)
    return b.reshape(nb, ti.block_bytes)


def _check(x, t):
    ti = type_info(t)
    x = np.ascontiguousarray(np.asarray(x, dtype=F32).reshape(-1))
    if x.size % ti.block_elems:
        raise ValueError(f"{ti.name}: {x.size} elements is not a multiple of {ti.block_elems}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{ti.name}: input holds NaN or Inf")
    return ti, x


def _round_half_away(v):
    return np.trunc(v + np.copysign(F32(0.5), v))


# ---------------------------------------------------------------------------------------------
# F32 / F16 / BF16
# ---------------------------------------------------------------------------------------------
def _q_f32(x):
    return x.astype("<f4").tobytes()


def _dq_f32(buf, n):
    return np.frombuffer(bytes(buf), dtype="<f4", count=n).astype(F32)


def _q_f16(x):
    return _f16_bits(x).astype("<u2").tobytes()


def _dq_f16(buf, n):
    return _f16_value(np.frombuffer(bytes(buf), dtype="<u2", count=n))


def _q_bf16(x):
    u = x.view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16          # round to nearest even
    r = np.where(nan, (u >> 16) | 0x40, r)
    return r.astype("<u2").tobytes()


def _dq_bf16(buf, n):
    h = np.frombuffer(bytes(buf), dtype="<u2", count=n).astype(np.uint32)
    return (h << np.uint32(16)).view(F32)


# ---------------------------------------------------------------------------------------------
# Q8_0
# ---------------------------------------------------------------------------------------------
def _q_q8_0(x):
    xb = x.reshape(-1, 32)
    amax = np.abs(xb).max(axis=1)
    d = _f16_round(amax / F32(127))
    safe = np.where(d > 0, d, F32(1))
    q = np.clip(_round_half_away(xb / safe[:, None]), -127, 127)
    q = np.where(d[:, None] > 0, q, 0).astype(np.int8)
    out = np.empty((xb.shape[0], 34), dtype=np.uint8)
    out[:, 0:2] = _f16_bits(d).astype("<u2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.tobytes()


def _dq_q8_0(buf, n):
    b = _blocks(buf, "Q8_0", n)
    d = _f16_value(b[:, 0:2].copy().view("<u2")[:, 0])
    q = b[:, 2:].view(np.int8).astype(F32)
    return (q * d[:, None]).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Q4_0
# ---------------------------------------------------------------------------------------------
def _pack_nibbles_32(q):
    """q[nb][32] in 0..15 -> qs[nb][16]: element j low nibble, j+16 high nibble."""
    q = q.astype(np.uint8)
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _unpack_nibbles_32(qs):
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _q_q4_0(x):
    xb = x.reshape(-1, 32)
    idx = np.argmax(np.abs(xb), axis=1)
    mx = xb[np.arange(xb.shape[0]), idx]           # signed value of largest magnitude
    d = _f16_round(mx / F32(-8))                   # that value maps to code 0 (= -8·d)
    safe = np.where(d != 0, d, F32(1))
    q = np.clip(_round_half_away(xb / safe[:, None]) + 8, 0, 15)
    q = np.where(d[:, None] != 0, q, 8)
    out = np.empty((xb.shape[0], 18), dtype=np.uint8)
    out[:, 0:2] = _f16_bits(d).astype("<u2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = _pack_nibbles_32(q)
    return out.tobytes()


def _dq_q4_0(buf, n):
    b = _blocks(buf, "Q4_0", n)
    d = _f16_value(b[:, 0:2].copy().view("<u2")[:, 0])
    q = _unpack_nibbles_32(b[:, 2:]).astype(np.int16) - 8
    return (q.astype(F32) * d[:, None]).reshape(-1)


# ---------------------------------------------------------------------------------------------
# MXFP4
# ---------------------------------------------------------------------------------------------
def _mxfp4_codes(xb, d):
    """nearest kvalue index for x/d (first index on ties)."""
    kv = KVALUES_MXFP4.astype(F32)
    v = xb / d[:, None]
    err = np.abs(v[:, :, None] - kv[None, None, :])
    return np.argmin(err, axis=2).astype(np.uint8)


def _q_mxfp4(x):
    xb = x.reshape(-1, 32)
    nb = xb.shape[0]
    amax = np.abs(xb).max(axis=1)
    with np.errstate(divide="ignore"):
        guess = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2 + 127, 0)
    best_e = np.zeros(nb, dtype=np.int64)
    best_err = np.full(nb, np.inf)
    best_q = np.zeros((nb, 32), dtype=np.uint8)
    kv = KVALUES_MXFP4.astype(F32)
    for off in (-1, 0, 1, 2):
        e = np.clip(guess + off, 0, 254).astype(np.int64)
        d = _e8m0_half(e)
        q = _mxfp4_codes(xb, d)
        err = ((kv[q] * d[:, None] - xb).astype(np.float64) ** 2).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_e = np.where(better, e, best_e)
        best_q[better] = q[better]
    out = np.empty((nb, 17), dtype=np.uint8)
    out[:, 0] = best_e.astype(np.uint8)
    out[:, 1:] = _pack_nibbles_32(best_q)
    return out.tobytes()


def _dq_mxfp4(buf, n):
    b = _blocks(buf, "MXFP4", n)
    d = _e8m0_half(b[:, 0])
    q = _unpack_nibbles_32(b[:, 1:])
    return (KVALUES_MXFP4[q].astype(F32) * d[:, None]).reshape(-1)


# ---------------------------------------------------------------------------------------------
# K-quant helpers: sub-block (scale, min) search and the 12-byte 6-bit scale packing
# ---------------------------------------------------------------------------------------------
def _fit_scale_min(xs, nmax, n_steps=24):
    """For each row of xs (sub-blocks), find scale >= 0 and min >= 0 minimising
    Σ (x - (scale·q - min))², q = clip(round((x + min)/scale), 0, nmax).
    Grid over candidate inverse scales around (nmax / (max - min)), each followed by a
    least-squares refit of (scale, min) for the chosen codes."""
    xs = xs.astype(np.float64)
    lo = np.minimum(xs.min(axis=1), 0.0)           # min offset is never positive (m >= 0)
    hi = xs.max(axis=1)
    rng = hi - lo
    n = xs.shape[1]
    best_s = np.where(rng > 0, rng / nmax, 0.0)
    best_m = -lo
    q0 = np.clip(np.rint((xs + best_m[:, None]) / np.where(best_s > 0, best_s, 1)[:, None]), 0, nmax)
    best_err = ((best_s[:, None] * q0 - best_m[:, None] - xs) ** 2).sum(axis=1)
    safe_rng = np.where(rng > 0, rng, 1.0)
    for step in range(n_steps + 1):
        iscale = (nmax - 1.0 + 2.0 * step / n_steps) / safe_rng      # nmax-1 .. nmax+1
        q = np.clip(np.rint((xs - lo[:, None]) * iscale[:, None]), 0, nmax)
        sq, sx = q.sum(axis=1), xs.sum(axis=1)
        sqq, sqx = (q * q).sum(axis=1), (q * xs).sum(axis=1)
        det = n * sqq - sq * sq
        with np.errstate(divide="ignore", invalid="ignore"):
            a = np.where(det > 0, (n * sqx - sq * sx) / np.where(det > 0, det, 1), 0.0)
            b = np.where(det > 0, (sx - a * sq) / n, 0.0)
            # the offset must be <= 0 (stored min >= 0); otherwise refit the scale alone
            bad = b > 0
            a = np.where(bad, np.where(sqq > 0, sqx / np.where(sqq > 0, sqq, 1), 0.0), a)
            b = np.where(bad, 0.0, b)
        a = np.maximum(a, 0.0)
        err = ((a[:, None] * q + b[:, None] - xs) ** 2).sum(axis=1)
        better = (err < best_err) & (rng > 0)
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, a, best_s)
        best_m = np.where(better, -b, best_m)
    return best_s, best_m


def _quantize_6bit(v, nb):
    """v[nb][8] >= 0 -> (fp16 super-scale value, 6-bit codes); super-scale = max/63."""
    vmax = v.max(axis=1)
    d = _f16_round_up(vmax / 63.0)
    safe = np.where(d > 0, d, F32(1)).astype(np.float64)
    codes = np.clip(np.rint(v / safe[:, None]), 0, 63)
    codes = np.where(d[:, None] > 0, codes, 0).astype(np.uint8)
    return d, codes


def _pack_scales_k4(sc, mn):
    """sc, mn [nb][8] 6-bit -> scales[nb][12] as read by ggml's get_scale_min_k4."""
    nb = sc.shape[0]
    s = np.zeros((nb, 12), dtype=np.uint8)
    s[:, 0:4] = sc[:, 0:4] & 63
    s[:, 4:8] = mn[:, 0:4] & 63
    s[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    s[:, 0:4] |= (sc[:, 4:8] >> 4) << 6
    s[:, 4:8] |= (mn[:, 4:8] >> 4) << 6
    return s


def _unpack_scales_k4(s):
    """scales[nb][12] -> sc, mn [nb][8] (get_scale_min_k4 for j = 0..7)."""
    s = s.astype(np.uint8)
    sc = np.empty((s.shape[0], 8), dtype=np.uint8)
    mn = np.empty((s.shape[0], 8), dtype=np.uint8)
    sc[:, 0:4] = s[:, 0:4] & 63
    mn[:, 0:4] = s[:, 4:8] & 63
    sc[:, 4:8] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:8] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def _k_scale_min_quant(x, nmax):
    """Shared Q4_K/Q5_K quantizer: returns d, dmin (fp16 values), sc, mn [nb][8], q [nb][256]."""
    xb = x.reshape(-1, QK)
    nb = xb.shape[0]
    subs = xb.reshape(nb * 8, 32)
    s, m = _fit_scale_min(subs, nmax)
    s, m = s.reshape(nb, 8), m.reshape(nb, 8)
    d, sc = _quantize_6bit(s, nb)
    dmin, mn = _quantize_6bit(m, nb)
    # final codes against the scales the decoder will see (same float32 ops as dequant)
    d1 = (d[:, None] * sc.astype(F32)).astype(F32)                 # [nb][8]
    m1 = (dmin[:, None] * mn.astype(F32)).astype(F32)
    d1e = np.repeat(d1, 32, axis=1).astype(np.float64)
    m1e = np.repeat(m1, 32, axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d1e > 0, np.rint((xb + m1e) / np.where(d1e > 0, d1e, 1)), 0)
    q = np.clip(q, 0, nmax).astype(np.uint8)
    return d, dmin, sc, mn, q


def _pack_q4_pairs(q):
    """q[nb][256] (4 low bits used) -> qs[nb][128]: per 64-chunk, element l low nibble,
    element l+32 high nibble."""
    nb = q.shape[0]
    c = q.reshape(nb, 4, 2, 32) & 0x0F
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(nb, 128).astype(np.uint8)


def _unpack_q4_pairs(qs):
    nb = qs.shape[0]
    c = qs.reshape(nb, 4, 32)
    return np.stack([c & 0x0F, c >> 4], axis=2).reshape(nb, 256)


# ---------------------------------------------------------------------------------------------
# Q4_K
# ---------------------------------------------------------------------------------------------
def _q_q4_k(x):
    d, dmin, sc, mn, q = _k_scale_min_quant(x, 15)
    nb = q.shape[0]
    out = np.empty((nb, 144), dtype=np.uint8)
    out[:, 0:2] = _f16_bits(d).astype("<u2").view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = _f16_bits(dmin).astype("<u2").view(np.uint8).reshape(-1, 2)
    out[:, 4:16] = _pack_scales_k4(sc, mn)
    out[:, 16:144] = _pack_q4_pairs(q)
    return out.tobytes()


def _k_dequant(d, dmin, sc, mn, q):
    """y = (d·sc)·q - (dmin·m) in float32, the order of ggml's dequantize_row_q{4,5}_K."""
    d1 = d[:, None] * sc.astype(F32)                               # float32 products
    m1 = dmin[:, None] * mn.astype(F32)
    d1e = np.repeat(d1, 32, axis=1)
    m1e = np.repeat(m1, 32, axis=1)
    prod = (d1e * q.astype(F32)).astype(F32)
    return (prod - m1e).astype(F32).reshape(-1)


def _dq_q4_k(buf, n):
    b = _blocks(buf, "Q4_K", n)
    d = _f16_value(b[:, 0:2].copy().view("<u2")[:, 0])
    dmin = _f16_value(b[:, 2:4].copy().view("<u2")[:, 0])
    sc, mn = _unpack_scales_k4(b[:, 4:16])
    q = _unpack_q4_pairs(b[:, 16:144])
    return _k_dequant(d, dmin, sc, mn, q)


# ---------------------------------------------------------------------------------------------
# Q5_K
# ---------------------------------------------------------------------------------------------
def _q_q5_k(x):
    d, dmin, sc, mn, q = _k_scale_min_quant(x, 31)
    nb = q.shape[0]
    c = q.reshape(nb, 4, 2, 32)                 # [chunk][half][l]
    hi = (c >> 4) & 1
    qh = np.zeros((nb, 32), dtype=np.uint8)
    for j in range(4):                          # chunk j: low half -> bit 2j, high half -> bit 2j+1
        qh |= (hi[:, j, 0, :] << (2 * j)).astype(np.uint8)
        qh |= (hi[:, j, 1, :] << (2 * j + 1)).astype(np.uint8)
    out = np.empty((nb, 176), dtype=np.uint8)
    out[:, 0:2] = _f16_bits(d).astype("<u2").view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = _f16_bits(dmin).astype("<u2").view(np.uint8).reshape(-1, 2)
    out[:, 4:16] = _pack_scales_k4(sc, mn)
    out[:, 16:48] = qh
    out[:, 48:176] = _pack_q4_pairs(q)
    return out.tobytes()


def _dq_q5_k(buf, n):
    b = _blocks(buf, "Q5_K", n)
    nb = b.shape[0]
    d = _f16_value(b[:, 0:2].copy().view("<u2")[:, 0])
    dmin = _f16_value(b[:, 2:4].copy().view("<u2")[:, 0])
    sc, mn = _unpack_scales_k4(b[:, 4:16])
    qh = b[:, 16:48]
    low = _unpack_q4_pairs(b[:, 48:176]).reshape(nb, 4, 2, 32)
    q = np.empty_like(low)
    for j in range(4):
        q[:, j, 0, :] = low[:, j, 0, :] + ((qh >> (2 * j)) & 1) * 16
        q[:, j, 1, :] = low[:, j, 1, :] + ((qh >> (2 * j + 1)) & 1) * 16
    return _k_dequant(d, dmin, sc, mn, q.reshape(nb, 256))


# ---------------------------------------------------------------------------------------------
# Q6_K
# ---------------------------------------------------------------------------------------------
def _fit_scale_signed(xs, nmax=32, n_steps=18):
    """Per row: scale s (any sign) minimising Σ (x - s·q)², q = clip(round(x/s), -nmax, nmax-1).
    Candidates: the row's largest-magnitude value mapped near -nmax, refit by least squares."""
    xs = xs.astype(np.float64)
    idx = np.argmax(np.abs(xs), axis=1)
    mx = xs[np.arange(xs.shape[0]), idx]
    best_s = mx / -nmax
    best_err = np.full(xs.shape[0], np.inf)
    ok = mx != 0
    safe_mx = np.where(ok, mx, 1.0)
    for step in range(n_steps + 1):
        iscale = -(nmax - 0.9 + 1.8 * step / n_steps) / safe_mx
        q = np.clip(np.rint(xs * iscale[:, None]), -nmax, nmax - 1)
        sqq, sqx = (q * q).sum(axis=1), (q * xs).sum(axis=1)
        s = np.where(sqq > 0, sqx / np.where(sqq > 0, sqq, 1), 0.0)
        err = ((s[:, None] * q - xs) ** 2).sum(axis=1)
        better = (err < best_err) & ok
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
    return np.where(ok, best_s, 0.0)


def _q_q6_k(x):
    xb = x.reshape(-1, QK)
    nb = xb.shape[0]
    s = _fit_scale_signed(xb.reshape(nb * 16, 16)).reshape(nb, 16)
    idx = np.argmax(np.abs(s), axis=1)
    smax = s[np.arange(nb), idx]                       # signed scale of largest magnitude
    d = _f16_round_up(smax / -128.0)                   # smax maps to int8 code -128
    safe = np.where(d != 0, d, F32(1)).astype(np.float64)
    sc = np.clip(np.rint(s / safe[:, None]), -128, 127)
    sc = np.where(d[:, None] != 0, sc, 0).astype(np.int8)
    ds = (d[:, None] * sc.astype(F32)).astype(F32)      # the decoder's d·sc
    dse = np.repeat(ds, 16, axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(dse != 0, np.rint(xb / np.where(dse != 0, dse, 1)), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8)    # 0..63
    c = q.reshape(nb, 2, 4, 32)                        # [half][quarter][l]
    ql = np.empty((nb, 2, 64), dtype=np.uint8)
    ql[:, :, 0:32] = (c[:, :, 0, :] & 0x0F) | ((c[:, :, 2, :] & 0x0F) << 4)
    ql[:, :, 32:64] = (c[:, :, 1, :] & 0x0F) | ((c[:, :, 3, :] & 0x0F) << 4)
    qh = ((c[:, :, 0, :] >> 4) | ((c[:, :, 1, :] >> 4) << 2) |
          ((c[:, :, 2, :] >> 4) << 4) | ((c[:, :, 3, :] >> 4) << 6)).astype(np.uint8)
    out = np.empty((nb, 210), dtype=np.uint8)
    out[:, 0:128] = ql.reshape(nb, 128)
    out[:, 128:192] = qh.reshape(nb, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = _f16_bits(d).astype("<u2").view(np.uint8).reshape(-1, 2)
    return out.tobytes()


def _dq_q6_k(buf, n):
    b = _blocks(buf, "Q6_K", n)
    nb = b.shape[0]
    ql = b[:, 0:128].reshape(nb, 2, 64)
    qh = b[:, 128:192].reshape(nb, 2, 32)
    sc = b[:, 192:208].copy().view(np.int8)
    d = _f16_value(b[:, 208:210].copy().view("<u2")[:, 0])
    c = np.empty((nb, 2, 4, 32), dtype=np.int16)
    c[:, :, 0, :] = (ql[:, :, 0:32] & 0x0F) | (((qh >> 0) & 3) << 4)
    c[:, :, 1, :] = (ql[:, :, 32:64] & 0x0F) | (((qh >> 2) & 3) << 4)
    c[:, :, 2, :] = (ql[:, :, 0:32] >> 4) | (((qh >> 4) & 3) << 4)
    c[:, :, 3, :] = (ql[:, :, 32:64] >> 4) | (((qh >> 6) & 3) << 4)
    q = (c - 32).reshape(nb, 256).astype(F32)
    ds = d[:, None] * sc.astype(F32)                  # (d·sc) first, as in ggml
    return (np.repeat(ds, 16, axis=1) * q).astype(F32).reshape(-1)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
_QUANT = {"F32": _q_f32, "F16": _q_f16, "BF16": _q_bf16, "Q8_0": _q_q8_0, "Q4_0": _q_q4_0,
          "Q4_K": _q_q4_k, "Q5_K": _q_q5_k, "Q6_K": _q_q6_k, "MXFP4": _q_mxfp4}
_DEQUANT = {"F32": _dq_f32, "F16": _dq_f16, "BF16": _dq_bf16, "Q8_0": _dq_q8_0, "Q4_0": _dq_q4_0,
            "Q4_K": _dq_q4_k, "Q5_K": _dq_q5_k, "Q6_K": _dq_q6_k, "MXFP4": _dq_mxfp4}


def quantize(x, t) -> bytes:
    """Flat float data -> the raw blocks of type t (bytes, row_bytes(t, x.size) long)."""
    ti, x = _check(x, t)
    out = _QUANT[ti.name](x)
    assert len(out) == row_bytes(ti, x.size)
    return out


def dequantize(buf, t, n: int) -> np.ndarray:
    """Raw blocks of type t -> n float32 values, exactly as ggml's dequantize_row_*."""
    ti = type_info(t)
    if len(buf) < row_bytes(ti, n):
        raise ValueError(f"{ti.name}: {len(buf)} bytes is too short for {n} elements")
    return np.ascontiguousarray(_DEQUANT[ti.name](buf, n), dtype=F32)


def roundtrip(x, t) -> np.ndarray:
    """dequantize(quantize(x)) with x's shape: the weights a reference model must use."""
    x = np.asarray(x, dtype=F32)
    return dequantize(quantize(x, t), t, x.size).reshape(x.shape)
