#version 450
#extension GL_GOOGLE_include_directive : require
/* add.comp — y += x over `count` floats. bindings: 0 x, 1 y */
#include "common.glsl"

layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) buffer Y { float y[]; };
layout(push_constant) uniform PC { PC_ADD(PC_FIELD) } pc;

void main() {
    uint i = wg_linear_x() * WG + gl_LocalInvocationIndex;
    if (i < pc.count) y[i] += x[i];
}
