#!/usr/bin/python3
"""make_codec_vectors.py — writes test/fixtures/codecs/<type>.bin, one file per block type, so
the C codecs (CPU and shaders) can be checked against gen/quants.py bit for bit.

Run from the repository root with a Python that has NumPy (Debian: /usr/bin/python3):
    /usr/bin/python3 gen/make_codec_vectors.py

FILE FORMAT (little endian, no padding):
    u32      magic        0x5643514d ("MQCV" read as bytes M Q C V... i.e. b"MQCV" little endian)
    u32      ggml_type    ggml type id: F32 0, F16 1, Q4_0 2, Q8_0 8, Q4_K 12, Q5_K 13, Q6_K 14,
                          BF16 30, MXFP4 39
    u32      n            number of elements (a multiple of 256, so of every block size)
    f32      input[n]     the values that were quantized
    u8       blocks[row_bytes(type, n)]
                          the quantized blocks made by gen/quants.py from input
                          (row_bytes = n / block_elems * block_bytes)
    f32      dequant[n]   gen/quants.py's dequantization of blocks; equals ggml's
                          dequantize_row_<type>() bit for bit, so a C decoder must reproduce it
                          exactly (compare as bit patterns)
    f32      x[n]         a random vector
    f64      dot          Σ dequant[i]·x[i] computed in float64 (a fused dequant-dot kernel
                          summing in f32 should land within ~n·2^-24·Σ|dequant[i]·x[i]|)

The input is laid out in 256-element super-blocks of different characters so every code
path runs: plain gaussian, a block with one large outlier, an all-zero block, tiny values
(fp16 scales become subnormal or zero), all positive, all negative, mixed magnitudes per
32-element sub-block, large values (|x| up to ~1000), sparse blocks, a constant block and a
uniform ramp. The quantized blocks are deterministic (fixed seed).
"""
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quants  # noqa: E402

MAGIC = 0x5643514D
N = 3072                 # 12 super-blocks of 256
ORDER = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4"]


def make_input(rng):
    blocks = []
    g = lambda s=1.0: rng.standard_normal(256).astype(np.float64) * s  # noqa: E731
    blocks.append(g())                                              # 0 gaussian
    b = g(0.05); b[rng.integers(256)] = 7.5; blocks.append(b)       # 1 one outlier
    blocks.append(np.zeros(256))                                    # 2 all zero
    b = g(3e-6); b[:32] = rng.standard_normal(32) * 1e-9            # 3 tiny: fp16 scales
    blocks.append(b)                                                #   subnormal / zero
    blocks.append(np.abs(g()) + 0.25)                               # 4 all positive
    blocks.append(-np.abs(g(2.0)) - 1.0)                            # 5 all negative
    b = g()                                                         # 6 sub-blocks of very
    for k in range(8):                                              #   different scales
        b[32 * k:32 * (k + 1)] *= 10.0 ** (k - 4)
    blocks.append(b)
    blocks.append(g(300.0))                                         # 7 large (|x| ~ 1000)
    b = np.zeros(256); idx = rng.choice(256, 12, replace=False)     # 8 sparse
    b[idx] = rng.standard_normal(12); blocks.append(b)
    blocks.append(np.full(256, 0.7))                                # 9 constant
    blocks.append(np.linspace(-1.0, 1.0, 256))                      # 10 ramp
    b = g(0.5); b[rng.integers(256)] = -40.0; b[:16] = 0.0          # 11 negative outlier,
    blocks.append(b)                                                #    zero sub-block
    x = np.concatenate(blocks).astype(np.float32)
    assert x.size == N
    return x


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = os.path.join(root, "test", "fixtures", "codecs")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(20261121)
    inp = make_input(rng)
    vec = rng.standard_normal(N).astype(np.float32)
    total = 0
    for name in ORDER:
        ti = quants.type_info(name)
        blocks = quants.quantize(inp, name)
        deq = quants.dequantize(blocks, name, N)
        dot = float(np.dot(deq.astype(np.float64), vec.astype(np.float64)))
        rel = np.sqrt(np.mean((deq.astype(np.float64) - inp) ** 2) / np.mean(inp.astype(np.float64) ** 2))
        path = os.path.join(out_dir, name.lower() + ".bin")
        with open(path, "wb") as f:
            f.write(struct.pack("<III", MAGIC, ti.id, N))
            f.write(inp.astype("<f4").tobytes())
            f.write(blocks)
            f.write(deq.astype("<f4").tobytes())
            f.write(vec.astype("<f4").tobytes())
            f.write(struct.pack("<d", dot))
        size = os.path.getsize(path)
        total += size
        print(f"{name:6s} id {ti.id:2d}  {len(blocks):6d} B of blocks  rel rms err {rel:.3e}  "
              f"dot {dot:+.6f}  -> {os.path.relpath(path, root)} ({size} B)")
    print(f"total {total} B")


if __name__ == "__main__":
    main()
