#version 450
#extension GL_GOOGLE_include_directive : require
/* l2norm.comp — in place, each head vector of hd in rows of `stride`: x /= sqrt(Σx² + eps),
   the first n_scaled heads of a row also times `scale` (Gated DeltaNet's q·k_dim^-1/2, then k).
   grid: (rows · heads). bindings: 0 x */
#include "common.glsl"

layout(std430, binding = 0) buffer X { float x[]; };
layout(push_constant) uniform PC { PC_L2NORM(PC_FIELD) } pc;

void main() {
    uint v = wg_linear_x();
    if (v >= pc.rows * pc.heads) return;
    uint r = v / pc.heads, h = v - r * pc.heads, o = r * pc.stride + h * pc.hd, tid = gl_LocalInvocationIndex;
    float ss = 0.0;
    for (uint i = tid; i < pc.hd; i += WG) ss += x[o + i] * x[o + i];
    ss = wg_sum(ss);
    float f = 1.0 / sqrt(ss + pc.eps);
    if (h < pc.n_scaled) f *= pc.scale;
    for (uint i = tid; i < pc.hd; i += WG) x[o + i] *= f;
}
