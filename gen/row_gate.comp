#version 450
#extension GL_GOOGLE_include_directive : require
/* row_gate.comp — y[r] *= sigmoid(w · x[r]) over rows of `width` (the shared expert's gate).
   grid: (rows). bindings: 0 x, 1 y (in place), 2 w */
#include "common.glsl"

layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) buffer Y { float y[]; };
layout(std430, binding = 2) readonly buffer W { float w[]; };
layout(push_constant) uniform PC { PC_ROW_GATE(PC_FIELD) } pc;

void main() {
    uint r = wg_linear_x();
    if (r >= pc.rows) return;
    uint tid = gl_LocalInvocationIndex, o = r * pc.width;
    float d = 0.0;
    for (uint i = tid; i < pc.width; i += WG) d += w[i] * x[o + i];
    d = wg_sum(d);
    float g = 1.0 / (1.0 + exp(-d));
    for (uint i = tid; i < pc.width; i += WG) y[o + i] *= g;
}
