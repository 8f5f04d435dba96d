#version 450
#extension GL_GOOGLE_include_directive : require
/* scale.comp — x *= s · (has_w ? w[i mod width] : 1) over `count` floats (rows of width).
   bindings: 0 x (in place), 2 w */
#include "common.glsl"

layout(std430, binding = 0) buffer X { float x[]; };
layout(std430, binding = 2) readonly buffer W { float w[]; };
layout(push_constant) uniform PC { PC_SCALE(PC_FIELD) } pc;

void main() {
    uint i = wg_linear_x() * WG + gl_LocalInvocationIndex;
    if (i < pc.count) x[i] *= pc.has_w != 0u ? pc.s * w[i % pc.width] : pc.s;
}
