#version 450
#extension GL_GOOGLE_include_directive : require
/* embed.comp — token embedding lookup: y[i] = dequant(row tokens[i]) for the rows held by the
   bound weight window (rows [row_lo, row_hi) of the table; other tokens are left alone, so a
   table split over several windows takes one dispatch per window).
   grid: (ceil(K / (16·WG)), n). bindings: 1 y, 6 weights (window 0), 7 step (tokens) */
#include "common.glsl"
#include "dequant.glsl"

layout(std430, binding = 1) writeonly buffer Y { float y[]; };
layout(push_constant) uniform PC { PC_EMBED(PC_FIELD) } pc;

void main() {
    uint i = gl_WorkGroupID.y;
    uint tok = step_u[4u + i];
    if (tok < pc.row_lo || tok >= pc.row_hi) return;
    uint k0 = (gl_WorkGroupID.x * WG + gl_LocalInvocationIndex) * 16u;
    if (k0 >= pc.K) return;
    float v[16];
    dq16(0u, (tok - pc.row_lo) * pc.row_bytes, k0, v);
    [[unroll]] for (uint t = 0u; t < 16u; t++) y[i * pc.K + k0 + t] = v[t];
}
