#version 450
#extension GL_GOOGLE_include_directive : require
/* mv.comp — matrix-vector products for decode (a few tokens), dequantizing on the fly.
   A workgroup computes two consecutive output rows for one column (token or expert pair): its
   threads stride over the rows in runs of 16 elements (32 for Q4_K), two runs per loop trip, with both rows'
   loads unconditional (a missing second row re-reads the first), so that many loads are in
   flight per thread; then one workgroup reduction (subgroupAdd, then across subgroups).

   modes (pc.mode):
     0 dense      y[c][r] = W[r] · x[c]                       W = window 0 from byte 0
     1 gate+up    y[p][r] = act(G_e[r] · x[t]) · (U_e[r] · x[t])   p = t·k + slot, e routed (act: pc.act)
     2 down       y[t][r] = Σ_slot w_slot · D_e[r] · x[t·k + slot]  (the weighted expert sum)
     3 gate only  y[p][r] = G_e[r] · x[t]            (gate and up of different types: pass 1)
     4 up finish  y[p][r] = act(y[p][r]) · (U_e[r] · x[t])                         (pass 2)
   The router's choice comes from topk.comp on the GPU (aux: ids[t·k + s], weights[t·k + s]);
   experts come from the indirection table (binding 3): entry [tbl + e] = (window, byte offset).
   With pc.acc set the result is added to y instead of stored (a fused residual add).
   With pc.norm bit 0 the input is RMS-normalised on the fly (modes 0, 1): x ∘ g is dotted and the
   row's 1/rms, from the sum of squares gathered on the same pass, scales the result; bit 1:
   the workgroups of the first row block also write the normalised row to binding 5, so the
   separate RMSNorm dispatch (and its barrier) disappears.
   bindings: 0 x, 1 y, 2 aux (routing), 3 expert table, 4 norm weight, 5 normalised x, 6 weights */
#include "common.glsl"
#include "dequant.glsl"

#define RW 2u /* rows per workgroup (the host sizes the grid with it) */

layout(std430, binding = 0) readonly buffer X4 { vec4 x4[]; };
layout(std430, binding = 1) buffer Y { float y[]; };
layout(std430, binding = 2) readonly buffer Aux { uint aux[]; };
layout(std430, binding = 3) readonly buffer Tbl { uvec2 tbl[]; };
layout(std430, binding = 4) readonly buffer G4 { vec4 g4[]; };
layout(std430, binding = 5) writeonly buffer XN4 { vec4 xn4[]; };

layout(push_constant) uniform PC { PC_MV(PC_FIELD) } pc;

float dot16(float v[16], vec4 a0, vec4 a1, vec4 a2, vec4 a3) {
    return dot(vec4(v[0], v[1], v[2], v[3]), a0) + dot(vec4(v[4], v[5], v[6], v[7]), a1) +
           dot(vec4(v[8], v[9], v[10], v[11]), a2) + dot(vec4(v[12], v[13], v[14], v[15]), a3);
}

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

void put(uint idx, float v) {
    if (pc.acc != 0u) y[idx] += v;
    else y[idx] = v;
}

/* mode 2: flattened run f (expert slot f / nit, run f % nit) of token tok's down rows, weighted */
vec2 down_run(uint tok, uint f, uint nit, uint rb0, uint rb1, inout float ss) {
    uint s = f / nit, it = f - s * nit, p = tok * pc.k_used + s;
    uvec2 e = tbl[pc.tbl0 + aux[pc.ids_off + p]];
    float w = uintBitsToFloat(aux[pc.w_off + p]);
    return w * run_dot2(e.x, e.y + rb0, e.y + rb1, pc.x_off + p * pc.x_stride, it, ss);
}

void main() {
    uint blk = wg_linear_x();
    if (blk >= pc.nblk) return;
    uint tid = gl_LocalInvocationIndex;
    uint col = gl_WorkGroupID.y;
    uint nit = pc.K / RUN;
    uint r0 = blk * RW;
    bool ok1 = r0 + 1u < pc.M;
    uint rb0 = r0 * pc.row_bytes, rb1 = ok1 ? rb0 + pc.row_bytes : rb0;
    uint yo = pc.y_off + col * pc.y_stride + r0;
    uint tok = pc.mode == 2u ? col : col / pc.k_used;

    float ss = 0.0, ss2 = 0.0;
    if (pc.mode == 0u) {
        uint xo = pc.x_off + col * pc.x_stride;
        vec2 a = wg_sum2(row_dot2(0u, rb0, rb1, xo, tid, nit, ss));
        a *= norm_scale(ss, xo, blk, true);
        if (tid == 0u) put(yo, a.x);
        if (tid == 1u && ok1) put(yo + 1u, a.y);
        return;
    }
    if (pc.mode == 2u) {
        /* the k experts' runs flattened over the threads (a 768-wide down row has fewer runs
           than a workgroup has threads), two per trip so that their loads are in flight together */
        uint tot = pc.k_used * nit, f = tid;
        vec2 a = vec2(0.0), b = vec2(0.0);
        for (; f + WG < tot; f += 2u * WG) {
            a += down_run(tok, f, nit, rb0, rb1, ss);
            b += down_run(tok, f + WG, nit, rb0, rb1, ss);
        }
        if (f < tot) a += down_run(tok, f, nit, rb0, rb1, ss);
        a = wg_sum2(a + b);
        if (tid == 0u) put(yo, a.x);
        if (tid == 1u && ok1) put(yo + 1u, a.y);
        return;
    }
    uint e = aux[pc.ids_off + col];
    uint xo = pc.x_off + tok * pc.x_stride;
    if (pc.mode == 1u) {
        uvec2 g = tbl[pc.tbl0 + e], u = tbl[pc.tbl1 + e];
        vec4 a = vec4(row_dot2(g.x, g.y + rb0, g.y + rb1, xo, tid, nit, ss), row_dot2(u.x, u.y + rb0, u.y + rb1, xo, tid, nit, ss2));
        a = wg_sum4(a);
        a *= norm_scale(ss, xo, blk, col % pc.k_used == 0u);
        if (tid == 0u) y[yo] = act_fn(a.x, pc.act) * a.z;
        if (tid == 1u && ok1) y[yo + 1u] = act_fn(a.y, pc.act) * a.w;
        return;
    }
    uvec2 ent = tbl[(pc.mode == 3u ? pc.tbl0 : pc.tbl1) + e];
    vec2 a = wg_sum2(row_dot2(ent.x, ent.y + rb0, ent.y + rb1, xo, tid, nit, ss));
    a *= norm_scale(ss, xo, blk, pc.mode == 3u && col % pc.k_used == 0u);
    if (pc.mode == 3u) {
        if (tid == 0u) y[yo] = a.x;
        if (tid == 1u && ok1) y[yo + 1u] = a.y;
    } else {
        if (tid == 0u) y[yo] = act_fn(y[yo], pc.act) * a.x;
        if (tid == 1u && ok1) y[yo + 1u] = act_fn(y[yo + 1u], pc.act) * a.y;
    }
}
