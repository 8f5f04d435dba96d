#version 450
#extension GL_GOOGLE_include_directive : require
/* sigmoid_mul.comp — x[i] *= sigmoid(g[i]) over `count` floats (gated attention's output gate).
   bindings: 0 x (in place), 2 g */
#include "common.glsl"

layout(std430, binding = 0) buffer X { float x[]; };
layout(std430, binding = 2) readonly buffer G { float g[]; };
layout(push_constant) uniform PC { PC_SIGMOID_MUL(PC_FIELD) } pc;

void main() {
    uint i = wg_linear_x() * WG + gl_LocalInvocationIndex;
    if (i < pc.count) x[i] *= 1.0 / (1.0 + exp(-g[i]));
}
