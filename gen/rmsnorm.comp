#version 450
#extension GL_GOOGLE_include_directive : require
/* rmsnorm.comp — y = x / sqrt(mean(x²) + eps) · g over rows of `width` (g optional).
   grid: (rows). bindings: 0 x, 1 y, 2 g */
#include "common.glsl"

layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) writeonly buffer Y { float y[]; };
layout(std430, binding = 2) readonly buffer G { float g[]; };
layout(push_constant) uniform PC { PC_RMSNORM(PC_FIELD) } pc;

void main() {
    uint r = wg_linear_x();
    if (r >= pc.rows) return;
    uint tid = gl_LocalInvocationIndex, o = r * pc.width;
    float ss = 0.0;
    for (uint i = tid; i < pc.width; i += WG) ss += x[o + i] * x[o + i];
    ss = wg_sum(ss);
    float scale = 1.0 / sqrt(ss / float(pc.width) + pc.eps);
    for (uint i = tid; i < pc.width; i += WG) y[o + i] = x[o + i] * scale * (pc.has_g != 0u ? g[i] : 1.0);
}
