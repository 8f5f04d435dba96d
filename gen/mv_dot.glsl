/* mv_dot.glsl — the dot products of the matrix-vector kernels (mv.comp, route_mv.comp): a
   workgroup's threads stride over two weight rows in runs of RUN elements (16; 32 for Q4_K),
   two runs per loop trip, optionally RMS-normalising x on the fly. The includer declares x4 (the
   input), g4 (the norm weight), xn4 (the normalised row it may write) and pc with the fields K,
   eps and norm (bit 0: normalise x; bit 1: the first row block writes the normalised row to xn4). */
#if defined(T_Q4_K)
/* Q4_K runs are 32 weights: the 16 bytes of qs that hold elements l..l+15 of sub-block 2j in
   their low nibbles hold the same elements of sub-block 2j+1 in their high ones, so one 16-byte
   load serves both. Σ (d·sc·q − dmin·m)·x = d·sc·Σ q·x − dmin·m·Σ x: the min term costs one sum
   of x per 16 elements, shared by both rows, and q stays a small integer until its dot. */
#define RUN 32u
float q4k_dot(uvec4 w, vec4 a[4], uint shift) {
    float s = 0.0;
    [[unroll]] for (uint c = 0u; c < 4u; c++) {
        uint n = (w[c] >> shift) & 0x0f0f0f0fu;
        s += dot(vec4(n & 0xffu, (n >> 8) & 0xffu, (n >> 16) & 0xffu, n >> 24), a[c]);
    }
    return s;
}
float q4k_run(uint buf, uint rb, uint it, vec4 lo[4], vec4 hi[4], float sum_lo, float sum_hi) {
    uint bo = rb + (it >> 3) * 144u, j = (it >> 1) & 3u;
    uvec4 head = wb4[buf].d[bo >> 4]; /* d, dmin | 12 bytes of scales (blocks are 16-byte aligned) */
    uvec4 q = wb4[buf].d[(bo >> 4) + 1u + 2u * j + (it & 1u)];
    vec2 dm = unpackHalf2x16(head.x);
    uint sc0, m0, sc1, m1;
    scale_min_k4(2u * j, head.yzw, sc0, m0);
    scale_min_k4(2u * j + 1u, head.yzw, sc1, m1);
    return dm.x * (float(sc0) * q4k_dot(q, lo, 0u) + float(sc1) * q4k_dot(q, hi, 4u)) -
           dm.y * (float(m0) * sum_lo + float(m1) * sum_hi);
}
/* run `it` of two rows (byte offsets rb0, rb1) against x at float offset xo (times the norm
   weight, its squares summed into ss, when pc.norm is set) */
vec2 run_dot2(uint buf, uint rb0, uint rb1, uint xo, uint it, inout float ss) {
    uint e4 = (it >> 3) * 64u + ((it >> 1) & 3u) * 16u + (it & 1u) * 4u; /* first element / 4 */
    uint xi = (xo >> 2) + e4;
    vec4 lo[4], hi[4];
    [[unroll]] for (uint c = 0u; c < 4u; c++) {
        lo[c] = x4[xi + c];
        hi[c] = x4[xi + 8u + c];
    }
    if ((pc.norm & 1u) != 0u) {
        [[unroll]] for (uint c = 0u; c < 4u; c++) {
            ss += dot(lo[c], lo[c]) + dot(hi[c], hi[c]);
            lo[c] *= g4[e4 + c];
            hi[c] *= g4[e4 + 8u + c];
        }
    }
    float sum_lo = dot(lo[0] + lo[1] + lo[2] + lo[3], vec4(1.0));
    float sum_hi = dot(hi[0] + hi[1] + hi[2] + hi[3], vec4(1.0));
    return vec2(q4k_run(buf, rb0, it, lo, hi, sum_lo, sum_hi), q4k_run(buf, rb1, it, lo, hi, sum_lo, sum_hi));
}
#else
#define RUN 16u
float dot16(float v[16], vec4 a0, vec4 a1, vec4 a2, vec4 a3) {
    return dot(vec4(v[0], v[1], v[2], v[3]), a0) + dot(vec4(v[4], v[5], v[6], v[7]), a1) +
           dot(vec4(v[8], v[9], v[10], v[11]), a2) + dot(vec4(v[12], v[13], v[14], v[15]), a3);
}

/* the 16 weights of run `it` of two rows (byte offsets rb0, rb1) against x at float offset xo
   (times the norm weight, its squares summed into ss, when pc.norm is set) */
vec2 run_dot2(uint buf, uint rb0, uint rb1, uint xo, uint it, inout float ss) {
    uint xi = (xo >> 2) + it * 4u;
    vec4 a0 = x4[xi], a1 = x4[xi + 1u], a2 = x4[xi + 2u], a3 = x4[xi + 3u];
    if ((pc.norm & 1u) != 0u) {
        ss += dot(a0, a0) + dot(a1, a1) + dot(a2, a2) + dot(a3, a3);
        uint gi = it * 4u;
        a0 *= g4[gi];
        a1 *= g4[gi + 1u];
        a2 *= g4[gi + 2u];
        a3 *= g4[gi + 3u];
    }
    float v0[16], v1[16];
    dq16(buf, rb0, it * 16u, v0);
    dq16(buf, rb1, it * 16u, v1);
    return vec2(dot16(v0, a0, a1, a2, a3), dot16(v1, a0, a1, a2, a3));
}
#endif

/* Σ over the rows' runs, split over the workgroup's threads, two runs per trip */
vec2 row_dot2(uint buf, uint rb0, uint rb1, uint xo, uint tid, uint nit, inout float ss) {
    vec2 a = vec2(0.0), b = vec2(0.0);
    uint it = tid;
    for (; it + WG < nit; it += 2u * WG) {
        a += run_dot2(buf, rb0, rb1, xo, it, ss);
        b += run_dot2(buf, rb0, rb1, xo, it + WG, ss);
    }
    if (it < nit) a += run_dot2(buf, rb0, rb1, xo, it, ss);
    return a + b;
}

/* 1/rms of the row from the workgroup's partial sums of squares (1 without a norm); the first
   row block writes the normalised row when asked */
float norm_scale(float ss, uint xo, uint blk, bool writer) {
    if ((pc.norm & 1u) == 0u) return 1.0;
    float s = 1.0 / sqrt(wg_sum(ss) / float(pc.K) + pc.eps);
    if ((pc.norm & 2u) != 0u && blk == 0u && writer)
        for (uint q = gl_LocalInvocationIndex; q < pc.K / 4u; q += WG) xn4[(xo >> 2) + q] = x4[(xo >> 2) + q] * s * g4[q];
    return s;
}
