#version 450
#extension GL_GOOGLE_include_directive : require
/* dn_chunk_prep.comp — the chunked delta rule, step 2: per chunk and value head (one workgroup),
   everything that does not depend on the state: A_ts = -β_t e^{G_t-G_s} k̂_t·k̂_s (s < t) in
   shared memory and M_ts = e^{G_t-G_s} q̂_t·k̂_s (s <= t); then the WY factors by forward
   substitution, (I - A) W = diag(β e^G) K̂ and (I - A) U = diag(β) V, each invocation owning
   columns of [W | U] and walking the rows in order (the CPU backend's order). Layout in
   dn_chunk.glsl. grid: chunks · nv. bindings: 0 conv rows [n][C] (q̂ | k̂ | v), 1 scr
   The dots and the substitution are compensated sums (sum2.glsl): measured stage by stage on the
   fixtures' chunks against long double, these two are where the f32 chunked form lost accuracy
   (the error of O_t relative to its row's rms: up to 1e-4 from plain f32 dots, where the output
   row is a small difference of the M_ts V'_s terms; ~1e-6 compensated, where the f32 token
   recurrence's own error reaches 1e-5 to 1e-4). The decays (summed directly, see dn_chunk.glsl) and
   the state pass stay plain f32: their share was < 1e-6. This pass is parallel over chunks and
   heads, so the ~8 flops per term do not lengthen the serial state pass. */
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Cv { float cv[]; };
layout(std430, binding = 1) buffer Scr { float scr[]; };
layout(push_constant) uniform PC { PC_DELTA_RULE(PC_FIELD) } pc;
#include "dn_chunk.glsl"
#include "sum2.glsl"

shared float A[DN_CT * DN_CT], gs[DN_CT], Gs[DN_CT], Bs[DN_CT];

void main() {
    uint id = wg_linear_x(), c = id / pc.nv, j = id % pc.nv, tid = gl_LocalInvocationIndex;
    if (c * DN_CT >= pc.n) return;
    uint t0 = c * DN_CT, L = min(DN_CT, pc.n - t0), m0 = dn_m(c, j);
    for (uint t = tid; t < L; t += WG) {
        Bs[t] = scr[dn_gb(t0 + t, j)];
        gs[t] = scr[dn_gb(t0 + t, j) + 1u];
        Gs[t] = scr[dn_gb(t0 + t, j) + 2u];
    }
    barrier();
    for (uint e = tid; e < L * DN_CT; e += WG) {
        uint t = e / DN_CT, s = e % DN_CT;
        if (s > t) continue;
        uint qt = dn_q(t0 + t, j), kt = dn_k(t0 + t, j), ks = dn_k(t0 + s, j);
        vec2 kk = vec2(0.0), qk = vec2(0.0);
        for (uint i = 0u; i < pc.dk; i++) {
            float k = cv[ks + i];
            sum2_add(kk, cv[kt + i], k);
            sum2_add(qk, cv[qt + i], k);
        }
        float g = 0.0; /* G_t - G_s, summed directly (dn_chunk.glsl) */
        for (uint r = s + 1u; r <= t; r++) g += gs[r];
        float decay = exp(g);
        if (s < t) A[e] = -Bs[t] * decay * sum2_get(kk);
        scr[m0 + e] = decay * sum2_get(qk);
    }
    barrier();
    /* column col of [W | U]: x_t = base_t + Σ_{s<t} A_ts x_s, x_s read back from this
       invocation's own earlier writes */
    for (uint col = tid; col < pc.dk + pc.dv; col += WG) {
        bool isw = col < pc.dk;
        for (uint t = 0u; t < L; t++) {
            uint dst = isw ? dn_w(t0 + t, j) + col : dn_u(t0 + t, j) + (col - pc.dk);
            vec2 x = vec2(isw ? Bs[t] * exp(Gs[t]) * cv[dn_k(t0 + t, j) + col] : Bs[t] * cv[dn_v(t0 + t, j) + (col - pc.dk)], 0.0);
            uint stride = isw ? pc.nv * pc.dk : pc.nv * pc.dv;
            for (uint s = 0u; s < t; s++) sum2_add(x, A[t * DN_CT + s], scr[dst - (t - s) * stride]);
            scr[dst] = sum2_get(x);
        }
    }
}
