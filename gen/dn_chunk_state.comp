#version 450
#extension GL_GOOGLE_include_directive : require
/* dn_chunk_state.comp — the chunked delta rule, step 3: the state through the chunks in order.
   Column d of the f32 state S [dk][dv] of value head j evolves on its own, so each invocation
   owns one column (a workgroup covers WG columns of one head) and, per chunk of L tokens:
     V'_t = U_t - W_t S0                          (in place of U)
     O_t  = e^{G_t} q̂_t S0 + Σ_{s<=t} M_ts V'_s
     S    = e^{G_L} S0 + Σ_t e^{G_L-G_t} k̂_t ⊗ V'_t
   (dn_chunk.glsl's layout; ARCHITECTURES.md §3.4). grid: nv · ⌈dv / WG⌉.
   bindings: 0 conv rows [n][C] (q̂ | k̂ | v), 1 o [n][nv·dv], 2 scr, 4 S (head j at j·dk·dv) */
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Cv { float cv[]; };
layout(std430, binding = 1) writeonly buffer O { float o[]; };
layout(std430, binding = 2) buffer Scr { float scr[]; };
layout(std430, binding = 4) buffer S { float S_[]; };
layout(push_constant) uniform PC { PC_DELTA_RULE(PC_FIELD) } pc;
#include "dn_chunk.glsl"

void main() {
    uint tiles = (pc.dv + WG - 1u) / WG, id = wg_linear_x(), j = id / tiles;
    uint d = (id % tiles) * WG + gl_LocalInvocationIndex;
    if (j >= pc.nv || d >= pc.dv) return;
    uint s0 = j * pc.dk * pc.dv + d, vstride = pc.nv * pc.dv;
    for (uint t0 = 0u; t0 < pc.n; t0 += DN_CT) {
        uint L = min(DN_CT, pc.n - t0), m0 = dn_m(t0 / DN_CT, j), u0 = dn_u(t0, j) + d;
        for (uint t = 0u; t < L; t++) {
            uint w = dn_w(t0 + t, j);
            float x = 0.0;
            for (uint i = 0u; i < pc.dk; i++) x += scr[w + i] * S_[s0 + i * pc.dv];
            scr[u0 + t * vstride] -= x;
        }
        for (uint t = 0u; t < L; t++) {
            uint q = dn_q(t0 + t, j);
            float x = 0.0;
            for (uint i = 0u; i < pc.dk; i++) x += cv[q + i] * S_[s0 + i * pc.dv];
            x *= exp(scr[dn_gb(t0 + t, j) + 1u]);
            for (uint s = 0u; s <= t; s++) x += scr[m0 + t * DN_CT + s] * scr[u0 + s * vstride];
            o[(t0 + t) * vstride + j * pc.dv + d] = x;
        }
        float GL = scr[dn_gb(t0 + L - 1u, j) + 1u];
        for (uint i = 0u; i < pc.dk; i++) {
            float x = S_[s0 + i * pc.dv] * exp(GL);
            for (uint t = 0u; t < L; t++) x += exp(GL - scr[dn_gb(t0 + t, j) + 1u]) * cv[dn_k(t0 + t, j) + i] * scr[u0 + t * vstride];
            S_[s0 + i * pc.dv] = x;
        }
    }
}
