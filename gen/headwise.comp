#version 450
#extension GL_GOOGLE_include_directive : require
/* headwise.comp — per attention head of one token, any of (flags):
     1  RMSNorm over the head (q_norm / k_norm)        y = x / rms(x) · g
     2  NeoX RoPE at position pos0 + token             (cos, sin) from a host-made table
     4  store the head into the KV cache row pos0 + token (f16 or f32)
   Writes y (binding 1) when 1 or 2 is set. The rope table holds, per position p and pair j,
   (cos, sin) of f32(p · inv_freq_j), computed as the CPU backend does. Token i sits at position
   step pos0 + pos_delta + i (pos_delta is 0 unless an op's pos0 differs from the step's).
   grid: (n_heads, n). bindings: 0 x, 1 y, 2 g, 3 rope table, 4 cache (layer window), 7 step */
#include "common.glsl"

layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) writeonly buffer Y { float y[]; };
layout(std430, binding = 2) readonly buffer G { float g[]; };
layout(std430, binding = 3) readonly buffer Rope { vec2 rope_cs[]; };
#ifdef KV_F32
layout(std430, binding = 4) writeonly buffer Cache { float cache[]; };
#else
layout(std430, binding = 4) writeonly buffer Cache { uint cache[]; };
#endif
layout(push_constant) uniform PC { uint n_heads, hd, n_rot, flags; float eps; uint kvw; int pos_delta; } pc;

shared float hs[256];

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
        for (uint d = tid; d < pc.hd; d += WG) y[o + d] = hs[d];
    if ((pc.flags & 4u) != 0u) {
        uint c = pos * pc.kvw + h * pc.hd;
#ifdef KV_F32
        for (uint d = tid; d < pc.hd; d += WG) cache[c + d] = hs[d];
#else
        for (uint d = 2u * tid; d < pc.hd; d += 2u * WG) cache[(c + d) >> 1] = packHalf2x16(vec2(hs[d], hs[d + 1u]));
#endif
    }
}
