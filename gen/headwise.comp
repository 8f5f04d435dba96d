#version 450
#extension GL_GOOGLE_include_directive : require
/* headwise.comp — per attention head of one token, in place on binding 0, any of (flags):
     1  RMSNorm over the head (q_norm / k_norm)        x = x / rms(x) · g
     2  NeoX RoPE at position pos                      (cos, sin) from a host-made table
     4  store the head into K cache row pos mod rows   (f16 or f32; rows: n_ctx or a ring)
     8  copy the same head of V (binding 1) into V cache row pos mod rows
   pos = step pos0 + pos_delta + token (pos_delta is 0 unless an op's pos0 differs from the
   step's). Flags 4 and 8 fold the KV-cache store of the attention op into the K heads' norm +
   rope dispatch; attn_prep.comp goes further and takes the q heads into the same grid.
   grid: (n_heads, n). bindings: 0 x (in place), 1 V rows, 2 g, 3 rope table, 4 K cache,
   5 V cache (this layer's windows), 7 step */
#include "common.glsl"

layout(std430, binding = 0) buffer X { float x[]; };
layout(std430, binding = 1) readonly buffer VA { float va[]; };
layout(std430, binding = 2) readonly buffer G { float g[]; };
layout(push_constant) uniform PC { PC_HEADWISE(PC_FIELD) } pc;
#define HEAD_X(o, d) x[(o) + (d)]
#define HEAD_G(d) g[d]
#define HEAD_V(i) va[i]
#include "head_prep.glsl"

void main() {
    uint h = gl_WorkGroupID.x, i = gl_WorkGroupID.y, tid = gl_LocalInvocationIndex;
    uint o = (i * pc.n_heads + h) * pc.hd;
    uint pos = uint(int(STEP_POS0) + pc.pos_delta) + i;
    head_norm_rope(o, pc.hd, pc.n_rot, (pc.flags & 1u) != 0u, (pc.flags & 2u) != 0u, pc.eps, pos);
    if ((pc.flags & 3u) != 0u)
        for (uint d = tid; d < pc.hd; d += WG) x[o + d] = hs[d];
    uint c = (pos % max(pc.rows, 1u)) * pc.kvw + h * pc.hd; /* rows is 0 without a store */
    if ((pc.flags & 4u) != 0u) head_store_k(c, pc.hd);
    if ((pc.flags & 8u) != 0u) head_store_v(c, o, pc.hd);
}
