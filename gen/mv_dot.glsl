/* mv_dot.glsl — the dot products of the matrix-vector kernels (mv.comp, route_mv.comp): a
   workgroup's threads stride over two weight rows in runs of 16 elements, two runs per loop trip,
   optionally RMS-normalising x on the fly. The includer declares x4 (the input), g4 (the norm
   weight), xn4 (the normalised row it may write) and pc with the fields K, eps and norm (bit 0:
   normalise x; bit 1: the first row block writes the normalised row to xn4). */
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

