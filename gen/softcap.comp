#version 450
#extension GL_GOOGLE_include_directive : require
/* softcap.comp — x = cap · tanh(x / cap) over `count` floats (final logit softcapping).
   bindings: 0 x (in place) */
#include "common.glsl"

layout(std430, binding = 0) buffer X { float x[]; };
layout(push_constant) uniform PC { PC_SOFTCAP(PC_FIELD) } pc;

void main() {
    uint i = wg_linear_x() * WG + gl_LocalInvocationIndex;
    if (i < pc.count) x[i] = pc.cap * tanh_safe(x[i] / pc.cap);
}
