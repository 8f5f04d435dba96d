#version 450
#extension GL_GOOGLE_include_directive : require
/* dn_chunk_state.comp — the chunked delta rule, step 3: the state through the chunks in order.
   Columns of the f32 state S [dk][dv] of value head j evolve independently, so a workgroup owns
   DT columns of one head, holds them in shared memory for the whole op (written back at the end,
   still f32) and, per chunk of L tokens, with its invocations spread over tokens or state rows:
     V'_t = U_t - W_t S0                          (V' in shared memory)
     O_t  = e^{G_t} q̂_t S0 + Σ_{s<=t} M_ts V'_s
     S    = e^{G_L} S0 + Σ_t e^{H_t} k̂_t ⊗ V'_t
   (dn_chunk.glsl's layout; ARCHITECTURES.md §3.4). Its serial depth per chunk is ~(2·dk + L)·L /
   RG + dk·L / RG against the token recurrence's 2·dk·L. grid: nv · ⌈dv / DT⌉, WG = DT · RG.
   bindings: 0 conv rows [n][C] (q̂ | k̂ | v), 1 o [n][nv·dv], 2 scr, 4 S (head j at j·dk·dv) */
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Cv { float cv[]; };
layout(std430, binding = 1) writeonly buffer O { float o[]; };
layout(std430, binding = 2) readonly buffer Scr { float scr[]; };
layout(std430, binding = 4) buffer S { float S_[]; };
layout(push_constant) uniform PC { PC_DELTA_RULE(PC_FIELD) } pc;
#include "dn_chunk.glsl"

#define DT 16u           /* state columns per workgroup */
#define DN_MAX_DK 256u
shared float Ss[DN_MAX_DK * DT], Vs[DN_CT * DT], eG[DN_CT], eH[DN_CT];

void main() {
    uint tiles = (pc.dv + DT - 1u) / DT, id = wg_linear_x(), j = id / tiles, tid = gl_LocalInvocationIndex;
    uint RG = WG / DT, dl = tid % DT, rg = tid / DT, d = (id % tiles) * DT + dl;
    bool live = d < pc.dv;
    uint s0 = j * pc.dk * pc.dv, vstride = pc.nv * pc.dv;
    for (uint i = rg; i < pc.dk; i += RG) Ss[i * DT + dl] = live ? S_[s0 + i * pc.dv + d] : 0.0;
    for (uint t0 = 0u; t0 < pc.n; t0 += DN_CT) {
        uint L = min(DN_CT, pc.n - t0), m0 = dn_m(t0 / DN_CT, j);
        if (tid < L) {
            eG[tid] = exp(scr[dn_gb(t0 + tid, j) + 2u]);
            eH[tid] = exp(scr[dn_gb(t0 + tid, j) + 3u]);
        }
        barrier();
        for (uint t = rg; t < L; t += RG) {
            uint w = dn_w(t0 + t, j);
            float x = 0.0;
            for (uint i = 0u; i < pc.dk; i++) x += scr[w + i] * Ss[i * DT + dl];
            Vs[t * DT + dl] = live ? scr[dn_u(t0 + t, j) + d] - x : 0.0;
        }
        barrier();
        for (uint t = rg; t < L; t += RG) {
            uint q = dn_q(t0 + t, j);
            float x = 0.0;
            for (uint i = 0u; i < pc.dk; i++) x += cv[q + i] * Ss[i * DT + dl];
            x *= eG[t];
            for (uint s = 0u; s <= t; s++) x += scr[m0 + t * DN_CT + s] * Vs[s * DT + dl];
            if (live) o[(t0 + t) * vstride + j * pc.dv + d] = x;
        }
        barrier();
        float eL = eG[L - 1u];
        for (uint i = rg; i < pc.dk; i += RG) {
            float x = Ss[i * DT + dl] * eL;
            for (uint t = 0u; t < L; t++) x += eH[t] * cv[dn_k(t0 + t, j) + i] * Vs[t * DT + dl];
            Ss[i * DT + dl] = x;
        }
        barrier();
    }
    if (live)
        for (uint i = rg; i < pc.dk; i += RG) S_[s0 + i * pc.dv + d] = Ss[i * DT + dl];
}
