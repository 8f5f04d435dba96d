#version 450
#extension GL_GOOGLE_include_directive : require
/* copy.comp — y = x over `count` uvec4s: the bandwidth probe's plain copy (moe_ctx_probe_bandwidth).
   bindings: 0 x, 1 y */
#include "common.glsl"

layout(std430, binding = 0) readonly buffer X { uvec4 x[]; };
layout(std430, binding = 1) writeonly buffer Y { uvec4 y[]; };
layout(push_constant) uniform PC { PC_COPY(PC_FIELD) } pc;

void main() {
    uint i = wg_linear_x() * WG + gl_LocalInvocationIndex;
    if (i < pc.count) y[i] = x[i];
}
