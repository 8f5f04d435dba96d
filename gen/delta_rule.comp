#version 450
#extension GL_GOOGLE_include_directive : require
/* delta_rule.comp — the gated delta rule, token by token, one workgroup per value head j with
   its f32 state S [dk][dv] (in place in the state buffer, head j at j·dk·dv):
     α = exp(a_coef[j] · softplus(a + dt[j])), β = sigmoid(b)
     S ← α S;  u = β (v − Sᵀk̂);  S ← S + k̂ ⊗ u;  o = Sᵀq̂
   q̂, k̂ come L2-normalised (l2norm.comp). Each invocation owns columns d of S and walks i in
   the CPU backend's order. Value head j reads key head j % nk (v_tiled) or j / (nv / nk).
   bindings: 0 conv rows [n][C] (q_all | k_all | v_all), 1 o [n][nv·dv], 2 b (or b|a grouped
   per key head), 3 a, 4 S, 5 a_coef [nv]; 6 (window 0) dt_bias [nv] */
#include "common.glsl"

layout(std430, binding = 0) readonly buffer Cv { float cv[]; };
layout(std430, binding = 1) writeonly buffer O { float o[]; };
layout(std430, binding = 2) readonly buffer Bt { float bt[]; };
layout(std430, binding = 3) readonly buffer Al { float al[]; };
layout(std430, binding = 4) buffer S { float S_[]; };
layout(std430, binding = 5) readonly buffer Ac { float a_coef[]; };
layout(std430, binding = 6) readonly buffer Dt { float dt[]; } dtw[XBUFS];
layout(push_constant) uniform PC { PC_DELTA_RULE(PC_FIELD) } pc;
#include "dn_gate.glsl"

#define DN_MAX_DK 256
shared float qs[DN_MAX_DK], ks[DN_MAX_DK];

void main() {
    uint j = wg_linear_x();
    if (j >= pc.nv) return;
    uint tid = gl_LocalInvocationIndex, r = pc.nv / pc.nk, kh = pc.v_tiled != 0u ? j % pc.nk : j / r;
    uint s0 = j * pc.dk * pc.dv;
    for (uint t = 0u; t < pc.n; t++) {
        uint x = t * pc.C;
        for (uint i = tid; i < pc.dk; i += WG) {
            qs[i] = cv[x + kh * pc.dk + i];
            ks[i] = cv[x + (pc.nk + kh) * pc.dk + i];
        }
        barrier();
        vec2 ga = dn_gate(t, j);
        float beta = ga.x, alpha = exp(ga.y);
        uint v0 = x + 2u * pc.nk * pc.dk + j * pc.dv;
        for (uint d = tid; d < pc.dv; d += WG) {
            float u = 0.0;
            for (uint i = 0u; i < pc.dk; i++) {
                float s = S_[s0 + i * pc.dv + d] * alpha;
                S_[s0 + i * pc.dv + d] = s;
                u += s * ks[i];
            }
            u = (cv[v0 + d] - u) * beta;
            float acc = 0.0;
            for (uint i = 0u; i < pc.dk; i++) {
                float s = S_[s0 + i * pc.dv + d] + ks[i] * u;
                S_[s0 + i * pc.dv + d] = s;
                acc += s * qs[i];
            }
            o[t * pc.nv * pc.dv + j * pc.dv + d] = acc;
        }
        barrier();
    }
}
