#version 450
#extension GL_GOOGLE_include_directive : require
/* mv.comp — matrix-vector products for decode (a few tokens), dequantizing on the fly.
   A workgroup computes NR consecutive output rows for one column (token or expert pair); its
   threads stride over the row in runs of 16 elements, then reduce across the workgroup.

   modes (pc.mode):
     0 dense      y[c][r] = W[r] · x[c]                       W = window 0 from byte 0
     1 gate+up    y[p][r] = silu(G_e[r] · x[t]) · (U_e[r] · x[t])   p = t·k + slot, e routed
     2 down       y[t][r] = Σ_slot w_slot · D_e[r] · x[t·k + slot]  (the weighted expert sum)
     3 gate only  y[p][r] = G_e[r] · x[t]            (gate and up of different types: pass 1)
     4 up finish  y[p][r] = silu(y[p][r]) · (U_e[r] · x[t])                         (pass 2)
   The router's choice comes from topk.comp on the GPU (aux: ids[t·k + s], weights[t·k + s]);
   experts come from the indirection table (binding 3): entry [tbl + e] = (window, byte offset).
   With pc.acc set the result is added to y instead of stored (a fused residual add).
   bindings: 0 x, 1 y, 2 aux (routing), 3 expert table, 6 weights */
#include "common.glsl"
#include "dequant.glsl"

#define NR 2u

layout(std430, binding = 0) readonly buffer X4 { vec4 x4[]; };
layout(std430, binding = 1) buffer Y { float y[]; };
layout(std430, binding = 2) readonly buffer Aux { uint aux[]; };
layout(std430, binding = 3) readonly buffer Tbl { uvec2 tbl[]; };

layout(push_constant) uniform PC {
    uint K, M, row_bytes, nblk;
    uint x_off, x_stride, y_off, y_stride;
    uint mode, acc, tbl0, tbl1;
    uint k_used, ids_off, w_off, pad;
} pc;

float run_dot(uint buf, uint rb, uint xo, uint it) {
    float v[16];
    dq16(buf, rb, it * 16u, v);
    uint xi = (xo >> 2) + it * 4u;
    float s = 0.0;
    [[unroll]] for (uint j = 0u; j < 4u; j++) {
        vec4 a = x4[xi + j];
        s += v[4u * j] * a.x + v[4u * j + 1u] * a.y + v[4u * j + 2u] * a.z + v[4u * j + 3u] * a.w;
    }
    return s;
}

void put(uint idx, float v) {
    if (pc.acc != 0u) y[idx] += v;
    else y[idx] = v;
}

void main() {
    uint blk = wg_linear_x();
    if (blk >= pc.nblk) return;
    uint tid = gl_LocalInvocationIndex;
    uint r0 = blk * NR;
    bool ok1 = r0 + 1u < pc.M;
    uint col = gl_WorkGroupID.y;
    uint nit = pc.K / 16u;
    uint rb0 = r0 * pc.row_bytes, rb1 = rb0 + pc.row_bytes;

    if (pc.mode == 0u) {
        uint xo = pc.x_off + col * pc.x_stride;
        vec2 a = vec2(0.0);
        for (uint it = tid; it < nit; it += WG) {
            a.x += run_dot(0u, rb0, xo, it);
            if (ok1) a.y += run_dot(0u, rb1, xo, it);
        }
        a = wg_sum2(a);
        uint yo = pc.y_off + col * pc.y_stride + r0;
        if (tid == 0u) put(yo, a.x);
        if (tid == 1u && ok1) put(yo + 1u, a.y);
        return;
    }

    uint tok = pc.mode == 2u ? col : col / pc.k_used;
    uint yo = pc.y_off + col * pc.y_stride + r0;

    if (pc.mode == 2u) {
        vec2 a = vec2(0.0);
        for (uint s = 0u; s < pc.k_used; s++) {
            uint p = tok * pc.k_used + s;
            uvec2 ent = tbl[pc.tbl0 + aux[pc.ids_off + p]];
            float w = uintBitsToFloat(aux[pc.w_off + p]);
            uint xo = pc.x_off + (tok * pc.k_used + s) * pc.x_stride;
            vec2 b = vec2(0.0);
            for (uint it = tid; it < nit; it += WG) {
                b.x += run_dot(ent.x, ent.y + rb0, xo, it);
                if (ok1) b.y += run_dot(ent.x, ent.y + rb1, xo, it);
            }
            a += w * b;
        }
        a = wg_sum2(a);
        if (tid == 0u) put(yo, a.x);
        if (tid == 1u && ok1) put(yo + 1u, a.y);
        return;
    }

    uint e = aux[pc.ids_off + col];
    uint xo = pc.x_off + tok * pc.x_stride;
    if (pc.mode == 1u) {
        uvec2 g = tbl[pc.tbl0 + e], u = tbl[pc.tbl1 + e];
        vec4 a = vec4(0.0);
        for (uint it = tid; it < nit; it += WG) {
            a.x += run_dot(g.x, g.y + rb0, xo, it);
            a.z += run_dot(u.x, u.y + rb0, xo, it);
            if (ok1) {
                a.y += run_dot(g.x, g.y + rb1, xo, it);
                a.w += run_dot(u.x, u.y + rb1, xo, it);
            }
        }
        a = wg_sum4(a);
        if (tid == 0u) y[yo] = silu(a.x) * a.z;
        if (tid == 1u && ok1) y[yo + 1u] = silu(a.y) * a.w;
        return;
    }
    uvec2 ent = tbl[(pc.mode == 3u ? pc.tbl0 : pc.tbl1) + e];
    vec2 a = vec2(0.0);
    for (uint it = tid; it < nit; it += WG) {
        a.x += run_dot(ent.x, ent.y + rb0, xo, it);
        if (ok1) a.y += run_dot(ent.x, ent.y + rb1, xo, it);
    }
    a = wg_sum2(a);
    if (pc.mode == 3u) {
        if (tid == 0u) y[yo] = a.x;
        if (tid == 1u && ok1) y[yo + 1u] = a.y;
    } else {
        if (tid == 0u) y[yo] = silu(y[yo]) * a.x;
        if (tid == 1u && ok1) y[yo + 1u] = silu(y[yo + 1u]) * a.y;
    }
}
