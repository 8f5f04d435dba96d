#version 450
#extension GL_GOOGLE_include_directive : require
/* gated_norm.comp — Gated DeltaNet's output norm: x = x / sqrt(mean(x²) + eps) · g ⊙ silu(z)
   over rows of `width`. grid: (rows). bindings: 0 x (in place), 2 g, 3 z */
#include "common.glsl"

layout(std430, binding = 0) buffer X { float x[]; };
layout(std430, binding = 2) readonly buffer G { float g[]; };
layout(std430, binding = 3) readonly buffer Z { float z[]; };
layout(push_constant) uniform PC { PC_GATED_NORM(PC_FIELD) } pc;

void main() {
    uint r = wg_linear_x();
    if (r >= pc.rows) return;
    uint tid = gl_LocalInvocationIndex, o = r * pc.width;
    float ss = 0.0;
    for (uint i = tid; i < pc.width; i += WG) ss += x[o + i] * x[o + i];
    ss = wg_sum(ss);
    float scale = 1.0 / sqrt(ss / float(pc.width) + pc.eps);
    for (uint i = tid; i < pc.width; i += WG) {
        float zv = z[o + i];
        x[o + i] = x[o + i] * scale * g[i] * (zv / (1.0 + exp(-zv)));
    }
}
