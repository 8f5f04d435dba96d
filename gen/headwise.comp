#version 450
#extension GL_GOOGLE_include_directive : require
/* headwise.comp — per attention head of one token, in place on binding 0, any of (flags):
     1  RMSNorm over the head (q_norm / k_norm)        x = x / rms(x) · g
     2  NeoX RoPE at position pos                      (cos, sin) from a host-made table
     4  store the head into K cache row pos mod rows   (f16 or f32; rows: n_ctx or a ring)
     8  copy the same head of V (binding 1) into V cache row pos mod rows
   pos = step pos0 + pos_delta + token (pos_delta is 0 unless an op's pos0 differs from the
   step's). The rope table holds, per position p and pair j, (cos, sin) of f32(p · inv_freq_j),
   computed as the CPU backend does. Flags 4 and 8 fold the KV-cache store of the attention op
   into the K heads' norm + rope dispatch.
   grid: (n_heads, n). bindings: 0 x (in place), 1 V rows, 2 g, 3 rope table, 4 K cache,
   5 V cache (this layer's windows), 7 step */
#include "common.glsl"

layout(std430, binding = 0) buffer X { float x[]; };
layout(std430, binding = 1) readonly buffer VA { float va[]; };
layout(std430, binding = 2) readonly buffer G { float g[]; };
layout(std430, binding = 3) readonly buffer Rope { vec2 rope_cs[]; };
#ifdef KV_F32
layout(std430, binding = 4) writeonly buffer KC { float kc[]; };
layout(std430, binding = 5) writeonly buffer VC { float vc[]; };
#else
layout(std430, binding = 4) writeonly buffer KC { uint kc[]; };
layout(std430, binding = 5) writeonly buffer VC { uint vc[]; };
#endif
layout(push_constant) uniform PC { PC_HEADWISE(PC_FIELD) } pc;

shared float hs[512];

void main() {
    uint h = gl_WorkGroupID.x, i = gl_WorkGroupID.y, tid = gl_LocalInvocationIndex;
    uint o = (i * pc.n_heads + h) * pc.hd;
    uint pos = uint(int(STEP_POS0) + pc.pos_delta) + i;
    float ss = 0.0;
    for (uint d = tid; d < pc.hd; d += WG) {
        float v = x[o + d];
        hs[d] = v;
        ss += v * v;
    }
    if ((pc.flags & 1u) != 0u) {
        ss = wg_sum(ss);
        float scale = 1.0 / sqrt(ss / float(pc.hd) + pc.eps);
        for (uint d = tid; d < pc.hd; d += WG) hs[d] = hs[d] * scale * g[d];
    }
    barrier();
    if ((pc.flags & 2u) != 0u) {
        uint half_ = pc.n_rot / 2u;
        float a[4], b[4];
        uint cnt = 0u;
        for (uint p = tid; p < half_; p += WG, cnt++) {
            vec2 cs = rope_cs[pos * half_ + p];
            float u = hs[p], w = hs[p + half_];
            a[cnt] = u * cs.x - w * cs.y;
            b[cnt] = w * cs.x + u * cs.y;
        }
        barrier();
        cnt = 0u;
        for (uint p = tid; p < half_; p += WG, cnt++) {
            hs[p] = a[cnt];
            hs[p + half_] = b[cnt];
        }
        barrier();
    }
    if ((pc.flags & 3u) != 0u)
        for (uint d = tid; d < pc.hd; d += WG) x[o + d] = hs[d];
    uint c = (pos % max(pc.rows, 1u)) * pc.kvw + h * pc.hd; /* rows is 0 without a store */
    if ((pc.flags & 4u) != 0u) {
#ifdef KV_F32
        for (uint d = tid; d < pc.hd; d += WG) kc[c + d] = hs[d];
#else
        for (uint d = 2u * tid; d < pc.hd; d += 2u * WG) kc[(c + d) >> 1] = packHalf2x16(vec2(hs[d], hs[d + 1u]));
#endif
    }
    if ((pc.flags & 8u) != 0u) {
#ifdef KV_F32
        for (uint d = tid; d < pc.hd; d += WG) vc[c + d] = va[o + d];
#else
        for (uint d = 2u * tid; d < pc.hd; d += 2u * WG) vc[(c + d) >> 1] = packHalf2x16(vec2(va[o + d], va[o + d + 1u]));
#endif
    }
}
