#version 450
#extension GL_GOOGLE_include_directive : require
/* mv.comp — matrix-vector products for decode (a few tokens), dequantizing on the fly.
   A workgroup computes two consecutive output rows for one column (token or expert pair): its
   threads stride over the rows in runs of 16 elements (32 for Q4_K), two runs per loop trip,
   with both rows' loads unconditional (a missing second row re-reads the first), so that many
   loads are in flight per thread; then one workgroup reduction (subgroupAdd, then across subgroups).

   modes (pc.mode):
     0 dense      y[c][r] = W[r] · x[c]                       W = window 0 from byte 0
     1 gate+up    y[p][r] = act(G_e[r] · x[t]) · (U_e[r] · x[t])   p = t·k + slot, e routed (act: pc.act)
     2 down       y[t][r] = Σ_slot w_slot · D_e[r] · x[t·k + slot]  (the weighted expert sum)
     3 gate only  y[p][r] = G_e[r] · x[t]            (gate and up of different types: pass 1)
     4 up finish  y[p][r] = act(y[p][r]) · (U_e[r] · x[t])                         (pass 2)
   The router's choice comes from topk.comp / route_mv.comp on the GPU (aux: ids[t·k + s],
   weights[t·k + s]);
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

#include "mv_dot.glsl"

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
