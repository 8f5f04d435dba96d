#version 450
#extension GL_GOOGLE_include_directive : require
/* dn_chunk_gates.comp — the chunked delta rule, step 1: per chunk and value head, β_t and the
   log decays g_t, G_t, H_t over the chunk (dn_chunk.glsl's layout), one invocation each, in
   token order. grid: ⌈chunks · nv / WG⌉.
   bindings: 1 scr, 2 b (or b|a grouped per key head), 3 a, 5 a_coef [nv]; 6 (window 0) dt_bias */
#include "common.glsl"

layout(std430, binding = 1) buffer Scr { float scr[]; };
layout(std430, binding = 2) readonly buffer Bt { float bt[]; };
layout(std430, binding = 3) readonly buffer Al { float al[]; };
layout(std430, binding = 5) readonly buffer Ac { float a_coef[]; };
layout(std430, binding = 6) readonly buffer Dt { float dt[]; } dtw[XBUFS];
layout(push_constant) uniform PC { PC_DELTA_RULE(PC_FIELD) } pc;
#include "dn_gate.glsl"
#include "dn_chunk.glsl"

void main() {
    uint id = wg_linear_x() * WG + gl_LocalInvocationIndex, c = id / pc.nv, j = id % pc.nv;
    if (c * DN_CT >= pc.n) return;
    uint t1 = min(pc.n, (c + 1u) * DN_CT);
    float G = 0.0, H = 0.0;
    for (uint t = c * DN_CT; t < t1; t++) {
        vec2 ga = dn_gate(t, j);
        G += ga.y;
        scr[dn_gb(t, j)] = ga.x;
        scr[dn_gb(t, j) + 1u] = ga.y;
        scr[dn_gb(t, j) + 2u] = G;
    }
    for (uint t = t1 - 1u; t > c * DN_CT; t--) { /* H_t, from the chunk's end */
        scr[dn_gb(t, j) + 3u] = H;
        H += scr[dn_gb(t, j) + 1u];
    }
    scr[dn_gb(c * DN_CT, j) + 3u] = H;
}
